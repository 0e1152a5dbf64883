"""Pick the loader that ``data.source`` names; the validate stage is its only caller."""

from __future__ import annotations

from pathlib import Path

from fuserec.config import DataConfig
from fuserec.data.raw import RawSource


def source_path(cfg: DataConfig) -> Path:
    """The folder of a file source: ``data.path``, or the download cache when ``data.download`` is set."""
    if cfg.path:
        return Path(cfg.path).expanduser()
    if cfg.download and cfg.source.startswith("movielens"):
        from fuserec.data.download import fetch_movielens

        return fetch_movielens(cfg.source, Path(cfg.cache_dir).expanduser())
    raise ValueError(
        f"data.source is {cfg.source!r} but data.path is not set; pass --set data.path=FOLDER "
        f"(or --set data.download=true to fetch a MovieLens archive when online)"
    )


def load_source(cfg: DataConfig) -> RawSource:
    if cfg.source == "synthetic":
        from fuserec.data.synthetic import generate

        return generate(cfg.synthetic)
    path = source_path(cfg)
    if cfg.source == "movielens-100k":
        from fuserec.data.movielens import load_movielens_100k

        return load_movielens_100k(path)
    if cfg.source in ("movielens-1m", "movielens-10m"):
        from fuserec.data.movielens import load_movielens_dat

        return load_movielens_dat(path)
    if cfg.source in ("movielens-latest", "movielens-latest-small"):
        from fuserec.data.movielens import load_movielens_latest

        return load_movielens_latest(path)
    from fuserec.data.generic import load_generic

    return load_generic(path, cfg)

"""``fuserec``: run the pipeline, run one stage (what dvc.yaml calls), list plugins, show results."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

import fuserec.flows.environment  # noqa: F401
from fuserec.stages.table import STAGE_NAMES

if TYPE_CHECKING:
    from fuserec.config import Params

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="params file")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a param: dotted.key=value (value parsed as YAML)"),
]


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    user: Annotated[str | None, typer.Option(help="raw user id to show the top-10 for")] = None,
) -> None:
    """Run the whole pipeline as a Prefect flow, then print the metrics and one user's top-10."""
    overrides = list(set_ or [])
    loaded = _load_params(params, overrides)  # fails fast on bad settings, before Prefect is imported
    from fuserec.flows.pipeline import train_pipeline

    train_pipeline(str(params), overrides)
    _show(loaded.outputs_dir, user)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGE_NAMES)}")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one stage's code without the Prefect engine (dvc.yaml calls this)."""
    if name not in STAGE_NAMES:
        raise typer.BadParameter(f"unknown stage {name!r}; choose one of {', '.join(STAGE_NAMES)}")
    loaded = _load_params(params, set_)
    dvc_file = params.parent / "dvc.yaml"
    if name == "validate" and not set_ and dvc_file.exists():  # as DVC runs it: the project's params
        from fuserec.stages.table import stale_raw_data

        problem = stale_raw_data(dvc_file, loaded.data)
        if problem:
            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {problem}", highlight=False)
            raise typer.Exit(2)
    module = importlib.import_module(f"fuserec.stages.{name}")
    out = getattr(module, name)(loaded)
    console.print(f"[green]{name}[/green] -> {out}")


@app.command("dvc-yaml")
def dvc_yaml(
    params: ParamsOpt = Path("params.yaml"),
    path: Annotated[Path, typer.Option(help="where to write it")] = Path("dvc.yaml"),
    check: Annotated[bool, typer.Option("--check", help="only say whether the file is current")] = False,
) -> None:
    """Write dvc.yaml from the stage table and params.yaml's raw data, or check that it is current.

    The validate stage depends on the raw folder that data.source / data.path select, so run this again
    (and commit dvc.yaml) after pointing params.yaml at other data."""
    from fuserec.stages.table import dvc_yaml as generate
    from fuserec.stages.table import raw_data_dependency, settings_dependency

    data = _load_params(params, None).data
    text = generate(raw_data=raw_data_dependency(data), settings=settings_dependency(data))
    if check:
        if not path.exists() or path.read_text() != text:
            console.print(
                f"[red]{path} differs from the stage table and {params}[/red]: run `fuserec dvc-yaml`"
            )
            raise typer.Exit(1)
        console.print(f"{path} is current")
        return
    path.write_text(text)
    console.print(f"wrote {path}")


@app.command()
def tune(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    dvc_exp: Annotated[
        str | None,
        typer.Option("--dvc-exp", help="then run the DVC pipeline as this experiment, best settings set"),
    ] = None,
) -> None:
    """Search hyper-parameters on the validation carve; write the best into <data.settings_dir>/<source>.yaml.

    Trials run as Prefect tasks on train.task_runner, train.workers at a time (threads, or Dask). With
    --dvc-exp NAME the best settings are also recorded as a DVC experiment (`dvc exp show` lists it)."""
    loaded = _load_params(params, set_)
    from fuserec.flows.tuning import run_tune
    from fuserec.stages.clean import clean
    from fuserec.stages.split import split
    from fuserec.stages.validate import validate

    for run_stage in (validate, clean, split):
        run_stage(loaded)
    table = Table("plugin", "metric", "validation", "best setting", "trials")
    records = run_tune(loaded, loaded.data.settings_path)
    for name, record in records.items():
        best = {k: v for k, v in record["best"].items() if k != "seed"}
        table.add_row(
            name, record["metric"], f"{record['best_value']:.4f}", str(best), str(len(record["trials"]))
        )
    console.print(table)
    if dvc_exp:
        from fuserec.tuning import record_experiment

        cmd = record_experiment(records, dvc_exp, params.resolve().parent)
        console.print(f"recorded experiment [green]{dvc_exp}[/green]: {' '.join(cmd[1:])}")


@app.command()
def plugins() -> None:
    """List every algorithm plugin found through entry points, broken ones included."""
    from fuserec.registry import discover

    table = Table("name", "distribution", "version", "api_version", "status")
    for info in discover():
        status = "[green]ok[/green]" if info.ok else f"[red]{info.error}[/red]"
        table.add_row(info.name, info.distribution, info.version, info.api_version or "?", status)
    console.print(table)


@app.command("new-plugin")
def new_plugin(
    name: Annotated[
        str,
        typer.Argument(help="plugin name: lower case, digits, underscores (the params.yaml key), e.g. cooc"),
    ],
    kind: Annotated[
        str, typer.Option(help="what to generate: algorithm (fuserec.algorithms) or fuser (fuserec.fusers)")
    ] = "algorithm",
    dest: Annotated[
        Path | None, typer.Option(help="folder to create (default ./fuserec-NAME); must not exist yet")
    ] = None,
) -> None:
    """Generate a plugin distribution that installs and passes the conformance kit as it is.

    It holds pyproject.toml with the entry point, a typed config, a working algorithm with ONNX export
    (or a fuser learned on validation), tests subclassing fuserec.testing.AlgorithmTests (or FuserTests),
    and a README for the author.
    """
    from rich.markup import escape

    from fuserec.scaffold import PluginNames, ScaffoldError, next_steps
    from fuserec.scaffold import new_plugin as generate

    try:
        folder = generate(name, dest, kind)
    except ScaffoldError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    names = PluginNames.from_name(name)
    console.print(f"[green]{names.distribution}[/green] written to {escape(str(folder))}. Next:")
    console.print(escape(next_steps(folder, name, kind)), highlight=False)


@app.command()
def serve(
    model: Annotated[
        Path | None,
        typer.Option(help="an exported model folder (OUTPUTS/model); its run folder is its parent"),
    ] = None,
    outputs: Annotated[
        Path,
        typer.Option(help="a finished run's outputs, or served/current (when --model is not given)"),
    ] = Path("outputs"),
    store: Annotated[
        Path | None, typer.Option(help="SQLite event store (default: serve.store in params.yaml)")
    ] = None,
    host: Annotated[str, typer.Option(help="bind address; non-loopback needs API keys")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    providers: Annotated[
        list[str] | None,
        typer.Option("--provider", help="onnxruntime provider, repeatable (default: the manifest's)"),
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="most concurrent requests scored in one run (default: serve.max_batch)")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="onnxruntime threads, 0 = one per core (default: serve.threads)"),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Serve the exported model over HTTP: /recommend, /events, /explain, /admin/reload, /health, /ready,
    /metrics. Limits, keys and the store come from the serve section of params.yaml."""
    import logging

    import uvicorn

    from fuserec.serving.app import create_app
    from fuserec.serving.auth import KeyRing
    from fuserec.serving.service import default_store

    logging.basicConfig(level=logging.INFO)
    settings = _serve_params(params, overrides)
    root = model.parent if model is not None else outputs
    try:
        keys = KeyRing.load(settings.serve.keys_file)
        application = create_app(
            root,
            store or default_store(settings.serve, settings.promote.served_dir),
            providers or None,
            max_batch,
            threads,
            settings=settings.serve,
            keys=keys,
            host=host,
        )
    except (PermissionError, ValueError, FileNotFoundError, RuntimeError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from exc
    # the access log's lines carry paths and queries; no route takes personal data in its query but
    # GET /events (admin only), so the default access log stays on
    uvicorn.run(application, host=host, port=port, log_level="info")


@app.command()
def rollback(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """Serve the previous release again: swap promote.served_dir's current and previous pointers (logged).

    A running service with serve.watch_s > 0 loads it by itself; otherwise POST /admin/reload.
    """
    from fuserec.stages.promote import rollback as swap

    settings = _serve_params(params, overrides)
    try:
        done = swap(settings.promote.served_dir)
    except FileNotFoundError as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from exc
    print(f"current -> {done.restored} (previous -> {done.replaced})")


keys_app = typer.Typer(
    no_args_is_help=True, help="API keys of `fuserec serve` (stored hashed in serve.keys_file)"
)
app.add_typer(keys_app, name="keys")


@keys_app.command("add")
def keys_add(
    name: Annotated[str, typer.Argument(help="who or what uses the key, e.g. web-frontend")],
    scopes: Annotated[
        list[str],
        typer.Option("--scope", help="read (recommend, explain), write (events), admin; repeat it"),
    ],
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Make a key: its secret is printed once, only its SHA-256 is stored."""
    from fuserec.serving.auth import KeyRing

    path = Path(_serve_params(params, overrides).serve.keys_file)
    try:
        secret = KeyRing.load(path).add(name, scopes)
    except ValueError as exc:
        Console(stderr=True).print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from exc
    Console(stderr=True).print(f"key {name!r} ({', '.join(sorted(scopes))}) saved to {path}; its secret:")
    print(secret)


@keys_app.command("list")
def keys_list(params: ParamsOpt = Path("params.yaml"), overrides: SetOpt = None) -> None:
    """The keys' names and scopes (secrets are not stored, so they cannot be shown)."""
    from fuserec.serving.auth import KeyRing

    for key in KeyRing.load(_serve_params(params, overrides).serve.keys_file).keys:
        print(f"{key.name}\t{','.join(sorted(key.scopes))}\tsha256:{key.sha256[:12]}")


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="the key's name")],
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Remove a key; a running service reads keys at start, so restart it (or reload) to apply."""
    from fuserec.serving.auth import KeyRing

    ring = KeyRing.load(_serve_params(params, overrides).serve.keys_file)
    if not ring.revoke(name):
        Console(stderr=True).print(f"error: no key named {name!r}", markup=False)
        raise typer.Exit(2)
    print(f"revoked {name}")


@app.command()
def recommend(
    outputs: Annotated[Path, typer.Option(help="a finished run's outputs folder")],
    users: Annotated[Path, typer.Option(help="raw user ids: .txt (one a line), .csv or .parquet (user_id)")],
    out: Annotated[Path, typer.Option(help="rows user_id, rank, item_id, title, score: .parquet or .csv")],
    k: Annotated[int, typer.Option(min=1, help="items per user")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="users scored per model call")] = 256,
    store: Annotated[
        Path | None, typer.Option(help="the service's SQLite event store (default: the training split)")
    ] = None,
) -> None:
    """Write every listed user's top-k from the exported model: the rows POST /recommend would return."""
    from rich.markup import escape

    from fuserec.serving.batch import recommend_batch

    try:
        summary = recommend_batch(outputs, users, out, k=k, batch_size=batch_size, store=store)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    console.print(
        f"[green]{summary.rows}[/green] rows for {summary.users} users -> {escape(str(summary.out))} "
        f"(histories from {escape(summary.source)}; {summary.empty_histories} empty)"
    )
    if summary.duplicates:
        console.print(f"{summary.duplicates} repeated user ids scored once")
    if summary.unknown:
        console.print(
            f"[yellow]{summary.unknown} unknown user ids[/yellow] scored from an empty history, e.g. "
            f"{escape(', '.join(summary.unknown_examples))}"
        )


@app.command()
def deploy(
    names: Annotated[
        list[str] | None, typer.Option("--name", help="deployment of prefect.yaml, repeatable (default: all)")
    ] = None,
    host: Annotated[str, typer.Option(help="the Prefect server's address (loopback: no auth)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the Prefect server's port")] = 4200,
    worker: Annotated[
        bool, typer.Option(help="then run a process worker here until Ctrl-C (it executes the runs)")
    ] = True,
) -> None:
    """Deploy prefect.yaml locally: start a Prefect server if none answers, create the process work pool,
    `prefect deploy`, then run a worker. Offline, no cloud account (docs/how-to/schedule-with-prefect.md)."""
    from rich.markup import escape

    from fuserec.flows.deploy import run as run_deploy

    try:
        run_deploy(host, port, names, worker, echo=lambda text: console.print(escape(text)))
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc


@app.command()
def show(
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    user: Annotated[str | None, typer.Option(help="raw user id")] = None,
) -> None:
    """Print the last run's metrics table and a user's top-10 from the exported ONNX model."""
    _show(_load_params(params, set_).outputs_dir, user)


def _load_params(params: Path, overrides: list[str] | None) -> Params:
    """``load_params``, with a bad params file, override or plugin setting reported without a traceback."""
    from pydantic import ValidationError
    from rich.markup import escape

    from fuserec.config import load_params

    try:
        return load_params(params, list(overrides or []))
    except (ValidationError, ValueError, FileNotFoundError) as exc:  # PluginSettingsError is a ValueError
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from exc


def _serve_params(params: Path, overrides: list[str] | None) -> Params:
    """params.yaml when there is one (the service needs no plugin checks), else the defaults."""
    from fuserec.config import Params, load_params

    if not params.exists() and not overrides:
        return Params()
    try:
        return load_params(params, list(overrides or []), check_plugins=False)
    except (ValueError, FileNotFoundError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from exc


def _show(outputs: Path, user: str | None) -> None:
    from fuserec.report import metrics_table, top_items_for_user

    console.print(metrics_table(outputs))
    console.print(top_items_for_user(outputs, user))


if __name__ == "__main__":
    app()

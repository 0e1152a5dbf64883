"""``fuserec``: run the pipeline, run one stage (what dvc.yaml calls), list plugins, show results."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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
    _show(loaded.outputs_dir, user, _pseudonymiser(params, overrides) if user is not None else None)


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

        problem = stale_raw_data(dvc_file, loaded.data, erasures=loaded.privacy.erasures)
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

    loaded = _load_params(params, None)
    data, register = loaded.data, Path(loaded.privacy.erasures)
    if not check and not register.exists():  # DVC needs every dependency to exist: empty = nobody erased
        register.parent.mkdir(parents=True, exist_ok=True)
        register.touch()
    text = generate(
        raw_data=raw_data_dependency(data), settings=settings_dependency(data), erasures=register.as_posix()
    )
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
    """List every plugin found through entry points (algorithms, fusers, raters, rating fusers), broken
    ones included, with what each can do."""
    from fuserec.registry import (
        ALGORITHMS_GROUP,
        FUSERS_GROUP,
        RATERS_GROUP,
        RATING_FUSERS_GROUP,
        capabilities,
        discover,
    )

    table = Table("group", "name", "distribution", "version", "api_version", "capabilities", "status")
    for group in (ALGORITHMS_GROUP, FUSERS_GROUP, RATERS_GROUP, RATING_FUSERS_GROUP):
        for info in discover(group):
            status = "[green]ok[/green]" if info.ok else f"[red]{info.error}[/red]"
            table.add_row(
                group.removeprefix("fuserec."),
                info.name,
                info.distribution,
                info.version,
                info.api_version or "?",
                ", ".join(capabilities(info)),
                status,
            )
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
    /metrics (a rating run: /predict instead of /recommend and /explain). Limits, keys and the store come
    from the serve section of params.yaml."""
    import logging

    import uvicorn

    from fuserec.privacy.pseudonyms import Pseudonymiser, check_key
    from fuserec.serving.app import create_app
    from fuserec.serving.auth import KeyRing
    from fuserec.serving.privacy import UserPrivacy, read_privacy_record
    from fuserec.serving.service import default_store

    logging.basicConfig(level=logging.INFO)
    settings = _serve_params(params, overrides)
    root = model.parent if model is not None else outputs
    serve_cfg = settings.serve
    if serve_cfg.retention_days is None and settings.privacy.retention_days is not None:
        serve_cfg = serve_cfg.model_copy(update={"retention_days": settings.privacy.retention_days})
    try:
        keys = KeyRing.load(serve_cfg.keys_file)
        privacy = UserPrivacy.from_params(settings)  # the store is the running service's own
        check_key(Pseudonymiser.from_params(settings), read_privacy_record(root), f"the served run {root}")
        application = create_app(
            root,
            store or default_store(serve_cfg, settings.promote.served_dir),
            providers or None,
            max_batch,
            threads,
            settings=serve_cfg,
            keys=keys,
            host=host,
            privacy=privacy,
        )
    except (PermissionError, ValueError, FileNotFoundError, RuntimeError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from exc
    # uvicorn's access log prints paths and queries (user ids): the app logs route templates instead
    uvicorn.run(application, host=host, port=port, log_level="info", access_log=False)


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


AlsoOpt = Annotated[
    list[Path] | None,
    typer.Option("--also", help="another folder or file holding user tables (batch outputs); repeatable"),
]
StoreOpt = Annotated[Path | None, typer.Option(help="SQLite event store (default: serve.store)")]


def _privacy(params: Path, overrides: list[str] | None, also: list[Path] | None, store: Path | None) -> Any:
    """The project's :class:`UserPrivacy` with the store at ``store``; exits 2 when no key is set up."""
    from fuserec.privacy.pseudonyms import MissingKeyError
    from fuserec.serving.privacy import UserPrivacy
    from fuserec.serving.service import default_store

    settings = _serve_params(params, overrides)
    path = store or default_store(settings.serve, settings.promote.served_dir)
    try:
        privacy = UserPrivacy.from_params(settings, also or [], path)
    except MissingKeyError as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from exc
    if privacy is None:
        Console(stderr=True, soft_wrap=True).print(
            "error: erasure and access need the privacy key, for the register's keyed hashes: set the "
            f"variable {settings.privacy.key_env} or create {settings.privacy.key_file} (docs: privacy)",
            highlight=False,
            markup=False,
        )
        raise typer.Exit(2)
    return privacy, settings, path


@app.command("privacy-key")
def privacy_key(
    path: Annotated[Path | None, typer.Option(help="where to write it (default: privacy.key_file)")] = None,
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Create the pseudonym key (32 random bytes as hex, owner-readable only). Refuses to overwrite one:
    a new key changes every pseudonym (docs: privacy, key rotation)."""
    from fuserec.privacy.pseudonyms import new_key_file

    target = path or Path(_serve_params(params, overrides).privacy.key_file)
    try:
        written = new_key_file(target)
    except FileExistsError as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from exc
    print(f"key written to {written}; keep it out of the repository and the outputs")


@app.command()
def forget(
    user_ids: Annotated[list[str], typer.Argument(help="the ids as the data source and clients know them")],
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    store: StoreOpt = None,
    also: AlsoOpt = None,
) -> None:
    """Erase people: their events (bytes too), their rows in every output and served table, the stage
    cache; one audit line each in privacy.erasures (a keyed hash, no id). Exits 1 if a search still finds
    an id afterwards. Then `dvc repro` retrains without them (docs: privacy)."""
    import json

    privacy, _, _ = _privacy(params, overrides, also, store)
    result = privacy.forget(user_ids, None, where="cli")
    print(json.dumps(result, indent=2))
    if result["residue"]:
        raise typer.Exit(1)


@app.command("export-user")
def export_user(
    user_id: Annotated[str, typer.Argument(help="the id as the data source and clients know it")],
    outputs: Annotated[
        Path | None,
        typer.Option(help="the served run folder (default: served/current, else outputs)"),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
    store: StoreOpt = None,
    also: AlsoOpt = None,
) -> None:
    """Everything fuserec holds about a person, as one JSON document on stdout: stored events, table rows
    (attributes, rejected lines), current recommendations and the first one's explanation."""
    import json

    from fuserec.serving.service import Service

    privacy, settings, path = _privacy(params, overrides, also, store)
    current = Path(settings.promote.served_dir) / "current"
    root = outputs or (current if current.exists() else settings.outputs_dir)
    service = Service(root, path, settings=settings.serve)
    try:
        print(json.dumps(privacy.export(user_id, service), indent=2, default=str))
    finally:
        service.close()


store_app = typer.Typer(
    no_args_is_help=True,
    help="The service's event store (serve.store): what it holds that the next retrain needs",
)
app.add_typer(store_app, name="store")


@store_app.command("export-items")
def store_export_items(
    out: Annotated[Path, typer.Argument(help="the items table to write: .parquet, or .csv")],
    store: StoreOpt = None,
    merge: Annotated[
        Path | None,
        typer.Option(
            "--merge",
            help="an items file (.csv or .parquet, canonical column names) to start from: its rows, then "
            "the added items it lacks",
        ),
    ] = None,
    separator: Annotated[str, typer.Option(help="CSV field separator (data.files.separator)")] = ",",
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Write the items added to the service (POST /items) as rows of an items table (item_id, title,
    genres, tags, text, year), so the next retrain's catalogue has them with their metadata: point
    data.files.items of a csv/parquet source at the file (docs: operate the service, new items)."""
    from rich.markup import escape

    from fuserec.serving.new_items import items_table
    from fuserec.serving.service import default_store

    settings = _serve_params(params, overrides)
    path = store or default_store(settings.serve, settings.promote.served_dir)
    try:
        written, added, kept = items_table(path, out, merge, separator)
    except (FileNotFoundError, ValueError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from exc
    console.print(
        f"[green]{written}[/green] rows -> {escape(str(out))} ({added} added items"
        + (f", {kept} rows of {escape(str(merge))}" if merge is not None else "")
        + ")"
    )


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
    params: ParamsOpt = Path("params.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Write every listed user's top-k from the exported model: the rows POST /recommend would return.
    Ids are looked up as the run stores them (pseudonyms, with privacy.pseudonymise) and written as listed."""
    from rich.markup import escape

    from fuserec.serving.batch import recommend_batch

    pseudonymiser = _pseudonymiser(params, overrides)
    try:
        summary = recommend_batch(
            outputs,
            users,
            out,
            k=k,
            batch_size=batch_size,
            store=store,
            pseudonym=pseudonymiser.stored if pseudonymiser is not None else None,
        )
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
    pseudonymiser = _pseudonymiser(params, set_) if user is not None else None
    _show(_load_params(params, set_).outputs_dir, user, pseudonymiser)


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


def _pseudonymiser(params: Path, overrides: list[str] | None) -> Any:
    """The run's pseudonymiser (None: ids are stored as given); exits 2 when its key is missing."""
    from fuserec.privacy.pseudonyms import MissingKeyError, Pseudonymiser

    try:
        return Pseudonymiser.from_params(_serve_params(params, overrides))
    except MissingKeyError as exc:
        Console(stderr=True, soft_wrap=True).print(f"error: {exc}", highlight=False, markup=False)
        raise typer.Exit(2) from exc


def _show(outputs: Path, user: str | None, pseudonymiser: Any = None) -> None:
    """The metrics table and one user's top-k; ``user`` as the data names them (mapped to its pseudonym)."""
    from fuserec.layout import Layout
    from fuserec.manifest import read_json
    from fuserec.report import (
        metrics_table,
        rating_metrics_table,
        rating_predictions_for_user,
        top_items_for_user,
    )

    stored = pseudonymiser.stored(user) if pseudonymiser is not None and user is not None else user
    if read_json(Layout(outputs).metrics).get("task") == "rating":
        console.print(rating_metrics_table(outputs))
        console.print(rating_predictions_for_user(outputs, stored))
        return
    console.print(metrics_table(outputs))
    console.print(top_items_for_user(outputs, stored))


if __name__ == "__main__":
    app()

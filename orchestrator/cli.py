"""``orch``: submit grids, follow them, and read their results."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from orchestrator import access
from orchestrator.cluster import ClusterOptions, set_ray_env
from orchestrator.jobs import JobsError
from orchestrator.lock import DriverLock
from orchestrator.manifest import Manifest
from orchestrator.spec import GridSpec, SpecError, check_experiment_name, load_spec
from orchestrator.store import STATES, ExperimentStore, ManifestError, list_experiments

USAGE_ERROR = 2
REPORT_METRICS_PER_TABLE = 7
RESULTS_ENV = "ORCH_RESULTS"


def _results_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--results",
        "results",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get(RESULTS_ENV, "results"),
        show_default="results (or $ORCH_RESULTS)",
        help="Folder holding every experiment's results and the default MLflow store.",
    )(func)


def _access_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--allow-insecure", is_flag=True, default=access.allow_insecure_default,
                        help="Allow plain HTTP/gRPC to an address that is not private (default $ORCH_ALLOW_INSECURE).")(func)
    return click.option("--token-file", type=click.Path(dir_okay=False), default=None,
                        help="The cluster's token (default $ORCH_TOKEN_FILE, else ~/.orch/tokens/HOST, else Ray's "
                             "local token for a cluster on this machine).")(func)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(USAGE_ERROR)


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bad input into one line on stderr and exit code 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from workloads.registry import UnknownKindError

        try:
            return func(*args, **kwargs)
        except (SpecError, UnknownKindError, ManifestError) as exc:
            _fail(str(exc))
        except (JobsError, access.AccessError) as exc:
            _fail(str(exc))

    return wrapper


def _load(grid: Path) -> tuple[GridSpec, Any, list[Any]]:
    from orchestrator.expand import expand
    from workloads.registry import resolve_kind

    spec = load_spec(grid)
    try:
        kind = resolve_kind(spec.kind)
    except ValueError as exc:
        raise SpecError(f"{grid}: kind: {exc}") from None
    return spec, kind, expand(spec, kind, str(grid))


def _print_trials(spec: GridSpec, trials: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.experiment}: {len(trials)} trials of kind {spec.kind}")
    table.add_column("trial id")
    for axis in spec.axes:
        table.add_column(axis)
    if spec.repeats > 1:
        table.add_column("repeat")
    table.add_column("resources")
    resources = " ".join(f"{k}={v:g}" for k, v in trials[0].resources.items() if v) if trials else ""
    for trial in trials:
        row = [trial.trial_id, *(str(trial.axes.get(a)) for a in spec.axes)]
        if spec.repeats > 1:
            row.append(str(trial.repeat))
        table.add_row(*row, resources)
    Console(width=200).print(table)


@click.group()
def main() -> None:
    """orch: grid experiments on Ray, results in Parquet and MLflow."""
    set_ray_env()


@main.command()
@click.argument("grid", type=click.Path(path_type=Path))
@_user_errors
def validate(grid: Path) -> None:
    """Check a grid file and print its expanded trials."""
    spec, _kind, trials = _load(grid)
    _print_trials(spec, trials)


@main.command()
@click.argument("grid", type=click.Path(path_type=Path))
@_results_option
@click.option("--dry-run", is_flag=True, help="Print the expanded trials and run nothing.")
@click.option("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else an embedded local Ray).")
@click.option("--no-dashboard", is_flag=True, help="Embedded Ray without its dashboard (faster start).")
@click.option("--num-cpus", type=click.FloatRange(min=0), default=None, help="CPUs the embedded Ray offers (default: all).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite in --results).")
@click.option("--remote-results", default="~/orch-results", show_default=True,
              help="With an http:// address: results folder on the head node.")
@click.option("--no-follow", is_flag=True, help="With an http:// address: return once the job is submitted.")
@_access_options
@_user_errors
def submit(
    grid: Path,
    results: Path,
    dry_run: bool,
    address: str | None,
    no_dashboard: bool,
    num_cpus: float | None,
    tracking_uri: str | None,
    remote_results: str,
    no_follow: bool,
    token_file: str | None,
    allow_insecure: bool,
) -> None:
    """Run every trial of GRID that is not done yet.

    With --address http://HEAD:8265 the driver runs on the cluster as a Ray Job; otherwise here,
    against the cluster at --address / $RAY_ADDRESS or an embedded local Ray.
    """
    spec, kind, trials = _load(grid)
    if dry_run:
        _print_trials(spec, trials)
        return
    address = address or os.environ.get("RAY_ADDRESS")
    set_ray_env(address)  # before Ray is imported
    from orchestrator import jobs

    if jobs.is_job_address(address):
        target = jobs.target(address, token_file, allow_insecure)
        jobs.check_placeable(target, kind, trials)
        extra = ["--tracking-uri", tracking_uri] if tracking_uri else []
        job_id, new = jobs.submit_job(target, grid, spec.experiment, remote_results, extra)
        click.echo(f"{'submitted' if new else 'attached to running'} job {job_id} on {address}")
        if no_follow:
            return
        final = jobs.follow_logs(target, job_id)
        click.echo(f"job {job_id}: {final}")
        sys.exit(0 if final == "SUCCEEDED" else 1)
    from orchestrator.progress import TerminalProgress

    store = ExperimentStore(results, spec.experiment)
    store.load_manifest()  # an unreadable manifest is refused here, before Ray starts (ManifestError)
    lock = DriverLock(store.path, spec.experiment)
    lock.acquire()  # refuses while another driver runs this experiment
    progress = TerminalProgress()
    try:
        options = ClusterOptions(address=address, dashboard=not no_dashboard, num_cpus=num_cpus, token_file=token_file,
                                 allow_insecure=allow_insecure)
        outcome, begin = _run_here(spec, kind, trials, store, progress, grid, options, tracking_uri)
    finally:
        lock.release()
    progress.close(outcome.counts, time.time() - begin)
    click.echo(f"results: {store.path}")
    if outcome.tracking_error:
        click.echo(f"MLflow: not synced ({outcome.tracking_error}); run `orch sync {spec.experiment}` later", err=True)
    if outcome.error:
        click.echo(f"error: the submission failed: {outcome.error}", err=True)
        sys.exit(1)
    if outcome.interrupted:
        sys.exit(130)
    if outcome.counts.get("failed", 0) or outcome.counts.get("timeout", 0):
        sys.exit(1)


def _run_here(spec: GridSpec, kind: Any, trials: list[Any], store: ExperimentStore, progress: Any, grid: Path,
              options: ClusterOptions, tracking_uri: str | None) -> tuple[Any, float]:
    """Run the submission in this process against a Ray cluster (embedded unless an address is given)."""
    from orchestrator import cluster
    from orchestrator.scheduler import Submission
    from orchestrator.tracking import Tracker

    connected = cluster.connect(options)
    # `kill` and Ray's job stop send SIGTERM: stop as cleanly as on Ctrl-C. Set after connecting,
    # because ray.init installs a SIGTERM handler of its own that ends the process at once.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    progress.event(connected)
    begin = time.time()
    try:
        cluster.check_cluster(kind, trials, cluster.alive_nodes(), host=True)
        tracker = Tracker(store, tracking_uri)
        outcome = Submission(spec, kind, trials, store, tracker, progress, grid_file=str(grid)).run()
    finally:
        cluster.disconnect()
    return outcome, begin


def _store_or_fail(results: Path, experiment: str) -> tuple[ExperimentStore, Manifest]:
    try:  # the grid's naming rule: a name is a folder under --results, never a path out of it
        check_experiment_name(experiment)
    except ValueError as exc:
        _fail(f"experiment {experiment!r}: {exc}")
    store = ExperimentStore(results, experiment)
    manifest = Manifest.load(store)
    if manifest is None:
        known = ", ".join(list_experiments(results)) or "none"
        _fail(f"no experiment {experiment!r} under {results} (known: {known})")
    return store, manifest


@main.command(name="ls")
@_results_option
@_user_errors
def list_command(results: Path) -> None:
    """Experiments with their trial counts by state."""
    from rich.console import Console
    from rich.table import Table

    if not results.is_dir():  # nothing submitted yet, or another folder meant: say which, not an empty table
        click.echo(f"no experiments: there is no results folder at {results} (--results or $ORCH_RESULTS names another)")
        return
    table = Table(title=f"experiments in {results}")
    table.add_column("experiment")
    table.add_column("kind")
    for state in STATES:
        table.add_column(state, justify="right")
    table.add_column("unsynced", justify="right")
    unreadable = []
    for name in list_experiments(results):
        try:
            manifest = Manifest.load_or_new(ExperimentStore(results, name))
        except ManifestError as exc:  # listed as unreadable; the others still are
            unreadable.append(str(exc))
            table.add_row(name, "unreadable", *("-" for _ in STATES), "-")
            continue
        counts = manifest.counts()
        table.add_row(name, manifest.kind or "?", *(str(counts.get(s, 0)) for s in STATES), str(len(manifest.unsynced())))
    console = Console(width=200)
    console.print(table)
    for message in unreadable:
        console.print(message, markup=False, highlight=False, soft_wrap=True)


@main.command()
@click.argument("experiment", required=False)
@_results_option
@click.option("--address", default=None, help="A cluster's dashboard (http://HEAD:8265): show its orch jobs.")
@_access_options
@_user_errors
def status(experiment: str | None, results: Path, address: str | None, token_file: str | None,
           allow_insecure: bool) -> None:
    """Trial states of EXPERIMENT (or of every experiment)."""
    from rich.console import Console
    from rich.table import Table

    from orchestrator import jobs
    from orchestrator.progress import status_line

    if jobs.is_job_address(address):
        for job in jobs.list_jobs(jobs.target(address, token_file, allow_insecure)):
            if experiment in (None, job["experiment"]):
                click.echo(f"{job['id']}  {job['experiment']}  {job['status']}")
        return
    names = [experiment] if experiment is not None else list_experiments(results)
    console = Console(width=200)
    for name in names:
        try:
            _store, manifest = _store_or_fail(results, name)
        except ManifestError as exc:
            if experiment:
                raise  # that one experiment: exit 2 with the one line
            console.print(f"{name}: {exc}", markup=False, highlight=False, soft_wrap=True)
            continue
        submission = manifest.last_submission()
        console.print(f"[bold]{name}[/bold] ({manifest.kind}) last submission {submission.get('id')}: "
                      f"{submission.get('status')}; " + status_line(manifest.counts(), 0, None).rsplit(" | elapsed", 1)[0])
        if not experiment:
            continue
        table = Table()
        for column in ("trial id", "state", "attempts", "node", "seconds", "axes", "error"):
            table.add_column(column)
        for trial_id, entry in sorted(manifest.trials.items()):
            seconds = entry["end_s"] - entry["start_s"] if entry.get("end_s") and entry.get("start_s") else None
            axes = " ".join(f"{k}={v}" for k, v in (entry.get("axes") or {}).items())
            table.add_row(trial_id, entry.get("state", "?"), str(entry.get("attempts", 0)), str(entry.get("node") or "")[:12],
                          f"{seconds:.1f}" if seconds else "", axes, (entry.get("error") or "")[:80])
        console.print(table)


def _report_columns(kind_name: str) -> dict[str, list[str]]:
    from workloads.registry import resolve_kind

    try:
        return resolve_kind(kind_name).report_columns
    except ValueError:
        return {}


@main.command()
@click.argument("experiment")
@_results_option
@click.option("--format", "fmt", type=click.Choice(["terminal", "html", "md"]), default="terminal", show_default=True,
              help="terminal tables, or a page with figures (self-contained HTML, or Markdown beside SVG files).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the html/md page and its figures (default RESULTS/EXPERIMENT/report).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite in --results).")
@click.option("--no-mlflow", is_flag=True, help="Do not log the html/md page and figures to the submission's MLflow run.")
@_user_errors
def report(experiment: str, results: Path, fmt: str, out: Path | None, tracking_uri: str | None, no_mlflow: bool) -> None:
    """Summary metrics grouped by the grid's axes (mean over repeats); with --format html|md, figures too."""
    from rich.console import Console
    from rich.table import Table

    from orchestrator.provenance import mixed_commits_warning
    from orchestrator.report import format_value, summarize
    from orchestrator.report.data import load_experiment

    store, manifest = _store_or_fail(results, experiment)
    columns = _report_columns(manifest.kind)
    if fmt != "terminal":
        from orchestrator.report import page
        from orchestrator.report.artifacts import log_report

        out = out or store.path / "report"
        built = page.build(load_experiment(store), columns)
        try:
            files = page.write(built, out, fmt)
        except OSError as exc:
            _fail(f"--out {out}: cannot write the report there ({exc.strerror or exc})")
        click.echo(f"report: {files[0]} ({len(files) - 1} figures)")
        if not no_mlflow:
            click.echo(log_report(store, files, out, tracking_uri))
        return
    console = Console(width=250)
    counts = {k: v for k, v in manifest.counts().items() if v}
    console.print(f"[bold]{experiment}[/bold]: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    mixed = mixed_commits_warning(manifest.data)
    if mixed:
        console.print(mixed, markup=False, highlight=False)
    reports = summarize(load_experiment(store), columns)
    if not reports:
        console.print("no finished trials with summaries yet")
    for rep in reports:
        metrics = [c for c in rep.frame.columns if c not in rep.axes]
        # Several narrow tables (the axes repeated) instead of one with truncated headers.
        for start in range(0, len(metrics), REPORT_METRICS_PER_TABLE):
            chunk = metrics[start : start + REPORT_METRICS_PER_TABLE]
            table = Table(title=rep.table if start == 0 else None)
            for column in [*rep.axes, *chunk]:
                table.add_column(str(column), justify="left" if column in rep.axes else "right", min_width=len(str(column)))
            for row in rep.frame[[*rep.axes, *chunk]].itertuples(index=False):
                table.add_row(*(format_value(v) for v in row))
            console.print(table)


@main.command()
@click.argument("experiment_a")
@click.argument("experiment_b")
@_results_option
@click.option("--metric", "metrics", multiple=True, help="Metric to compare (repeatable); exit 1 if one regressed. "
              "Default: the report's columns, and exit 0.")
@click.option("--threshold", type=click.FloatRange(min=0), default=0.05, show_default=True,
              help="Relative change in the bad direction that counts as a regression (0.05 = 5%).")
@_user_errors
def compare(experiment_a: str, experiment_b: str, results: Path, metrics: tuple[str, ...], threshold: float) -> None:
    """Summaries of EXPERIMENT_B against EXPERIMENT_A on their shared configurations."""
    from orchestrator.report.compare import CompareError
    from orchestrator.report.compare import compare as compare_experiments
    from orchestrator.report.data import load_experiment
    from orchestrator.report.terminal import print_comparison

    if experiment_a == experiment_b:
        _fail(f"compare needs two experiments; got {experiment_a!r} twice")
    store_a, manifest_a = _store_or_fail(results, experiment_a)
    store_b, _manifest_b = _store_or_fail(results, experiment_b)
    try:
        result = compare_experiments(load_experiment(store_a), load_experiment(store_b), list(metrics) or None, threshold,
                                     _report_columns(manifest_a.kind))
    except CompareError as exc:
        _fail(str(exc))
    print_comparison(result, experiment_a, experiment_b, threshold)
    regressions = result.regressions(list(metrics)) if metrics else []
    if regressions:
        click.echo(f"regressed beyond {threshold:.0%}: " + ", ".join(sorted({d.metric for d in regressions})), err=True)
        sys.exit(1)


@main.command()
@click.argument("experiment")
@_results_option
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite in --results).")
@_user_errors
def sync(experiment: str, results: Path, tracking_uri: str | None) -> None:
    """Log to MLflow the finished trials that are not synced yet."""
    from orchestrator.tracking import Tracker, sync_experiment

    store, _manifest = _store_or_fail(results, experiment)
    lock = DriverLock(store.path, experiment)
    lock.refuse_while_running("sync")
    # Held while syncing: a submit started now would otherwise save its manifest under ours.
    lock.acquire()
    try:
        manifest = Manifest.load(store)  # as it is now that no driver can change it
        assert manifest is not None
        tracker = Tracker(store, tracking_uri)
        if not tracker.available:
            _fail(f"MLflow at {tracker.uri} is unreachable: {tracker.error}")
        synced = sync_experiment(tracker, manifest)
    finally:
        lock.release()
    click.echo(f"synced {synced} trial(s) of {experiment} to {tracker.uri}")


@main.command()
@_results_option
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--tracking-uri", default=None, help="Backend store (default $MLFLOW_TRACKING_URI, else SQLite in --results).")
@_user_errors
def ui(results: Path, port: int, tracking_uri: str | None) -> None:
    """Serve the MLflow UI on 127.0.0.1."""
    from orchestrator.tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri(results)
    artifacts = (results.resolve() / "mlartifacts").as_uri()
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--default-artifact-root", artifacts,
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    click.echo(f"MLflow UI at http://127.0.0.1:{port} (store {uri})")
    os.execv(sys.executable, args)


@main.command()
@click.argument("source")
@click.argument("trial_id")
@_results_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@_user_errors
def serve(source: str, trial_id: str, results: Path, host: str, port: int) -> None:
    """Serve the configuration of TRIAL_ID (from experiment or grid file SOURCE) until Ctrl-C.

    For serving trials: our engine with the trial's model and cache policy behind Ray Serve,
    with OpenAI-compatible /v1/completions and /v1/chat/completions on http://HOST:PORT.
    """
    from workloads.registry import resolve_kind

    if Path(source).is_file():
        _spec, kind, trials = _load(Path(source))
        found = {t.trial_id: t.params for t in trials}
    else:
        _store, manifest = _store_or_fail(results, source)
        kind = resolve_kind(manifest.kind)
        found = {tid: e["params"] for tid, e in manifest.trials.items()}
    if trial_id not in found:
        _fail(f"no trial {trial_id!r} in {source} (trials: {', '.join(sorted(found)[:10])}{' ...' if len(found) > 10 else ''})")
    params = kind.params_model.model_validate(found[trial_id])
    try:
        url = kind.serve(params, host, port)
    except NotImplementedError as exc:
        _fail(str(exc))
    click.echo(f"serving {trial_id} at {url}/v1/completions and {url}/v1/chat/completions (Ctrl-C stops)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from orchestrator import cluster

        cluster.disconnect()


@main.command()
@click.argument("experiment")
@_results_option
@click.option("--address", default=None, help="A cluster's dashboard (http://HEAD:8265): stop the experiment's job there.")
@_access_options
@_user_errors
def cancel(experiment: str, results: Path, address: str | None, token_file: str | None, allow_insecure: bool) -> None:
    """Stop EXPERIMENT's running submission cleanly (running trials are recorded cancelled)."""
    from orchestrator import jobs

    if jobs.is_job_address(address):
        target = jobs.target(address, token_file, allow_insecure)
        running = [j for j in jobs.list_jobs(target) if j["experiment"] == experiment and j["status"] not in jobs.TERMINAL]
        if not running:
            _fail(f"no running orch job for {experiment} on {address}")
        for job in running:
            jobs.stop_job(target, job["id"])
            click.echo(f"stopping job {job['id']}")
        return
    store, manifest = _store_or_fail(results, experiment)
    lock = DriverLock(store.path, experiment)
    driver = lock.holder()
    if driver is None:
        _fail(f"{experiment} has no running driver")
    if driver.host != socket.gethostname():
        _fail(f"{experiment}'s driver runs on host {driver.host} (pid {driver.pid}); cancel it there")
    if not driver.is_alive():  # gone, or its pid now belongs to another process: signal nothing
        _fail(f"the driver of {experiment} ({driver.describe()}) is no longer running; resubmit the grid to finish it")
    os.kill(driver.pid, signal.SIGINT)
    click.echo(f"sent interrupt to the driver of {experiment} ({driver.describe()})")


@main.command()
@click.argument("head")
@_user_errors
def token(head: str) -> None:
    """Create the token of the cluster whose head is HEAD (once), for cluster.yaml to ship to its nodes."""
    path, created = access.new_token(head)
    click.echo(f"{'created' if created else 'kept the existing'} token for {path.name}: {path}")


if __name__ == "__main__":
    main()

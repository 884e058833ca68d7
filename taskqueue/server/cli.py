"""The ``taskqueue`` command: parse, load the configuration, hand off.

Exit codes: 0 stopped cleanly; 1 failed while running; 2 bad usage or
configuration; 130 forced by a second signal.
"""

import asyncio
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from aiokafka.errors import KafkaError
from rich.console import Console

from taskqueue.server import app as processes
from taskqueue.server import config as config_module
from taskqueue.server import dlq, dlq_view, logs, stats
from taskqueue.server.descriptors import ArgumentTypes
from taskqueue.server.errors import BadArgument, ConfigError, TaskQueueError
from taskqueue.server.replay import ReplayOptions
from taskqueue.server.worker import TierName

EXIT_FAILED = 1
EXIT_CONFIG = 2

cli = typer.Typer(
    name="taskqueue",
    help="Durable, scheduled, retried gRPC calls stored in Apache Kafka.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    str,
    typer.Option(
        "--config", "-c", help="FILE@SECTION of the configuration.", show_default=True
    ),
]
LogLevel = Annotated[
    str | None,
    typer.Option(
        "--log-level", help="DEBUG, INFO, WARNING, ERROR [default: logs.level, INFO]"
    ),
]
LogFormat = Annotated[
    str | None,
    typer.Option("--log-format", help="text or json [default: logs.format, text]"),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=0,
        max=65535,
        help="Serve /metrics and /healthz on this port (0: any free one); "
        "overrides metrics.port of the config.",
    ),
]


def _load(
    location: str, level: str | None, fmt: str | None, metrics_port: int | None = None
) -> config_module.Config:
    """The configuration, logging set up by the flags, else by its ``logs``."""
    if fmt is not None and fmt not in logs.FORMATS:
        raise typer.BadParameter(f"--log-format must be one of {logs.FORMATS}")
    if level is not None and level.upper() not in logs.LEVELS:
        raise typer.BadParameter(f"--log-level must be one of {logs.LEVELS}")
    logs.configure(level or "INFO", fmt or "text")  # until the config is read
    try:
        loaded = config_module.load(location)
    except ConfigError as exc:
        typer.echo(f"taskqueue: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    logs.configure(level or loaded.logs.level, fmt or loaded.logs.format)
    if metrics_port is not None:
        loaded = config_module.with_metrics_port(loaded, metrics_port)
    return loaded


@cli.command()
def rpc(
    config: ConfigOption = config_module.DEFAULT_LOCATION,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Serve /taskqueue.service.TaskQueue/add.

    Example: taskqueue rpc --config config.yaml@dev --metrics-port 9464
    """
    loaded = _load(config, log_level, log_format, metrics_port)
    _serve(processes.serve_rpc(loaded), loaded)


@cli.command()
def worker(
    config: ConfigOption = config_module.DEFAULT_LOCATION,
    tier: Annotated[
        TierName, typer.Option(help="main: new tasks; retry: the delay ladder.")
    ] = TierName.MAIN,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
    metrics_port: MetricsPort = None,
) -> None:
    """Consume task topics of one tier and make the calls.

    Examples: taskqueue worker --tier main; taskqueue worker --tier retry
    --metrics-port 9465
    """
    loaded = _load(config, log_level, log_format, metrics_port)
    _serve(processes.serve_worker(loaded, tier), loaded)


def _serve(main: Coroutine[Any, Any, None], loaded: config_module.Config) -> None:
    """Run a process; what stops it at start-up is one line, not a traceback."""
    try:
        asyncio.run(main)
    except ConfigError as exc:  # e.g. a certificate file that is no PEM
        typer.echo(f"taskqueue: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    except KafkaError as exc:
        bootstrap = loaded.kafka.bootstrap_servers
        typer.echo(f"taskqueue: Kafka at {bootstrap} failed: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    except OSError as exc:  # e.g. the rpc or metrics port is taken
        typer.echo(f"taskqueue: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None


# ------------------------------------------------------------------ dlq
# Exit codes of `taskqueue dlq ...`: 0 done; 1 some matching dead letters were
# not replayed, or Kafka could not be used; 2 bad usage or configuration; 130
# stopped by Ctrl-C or SIGTERM (the writes under way finish first).

dlq_cli = typer.Typer(
    help="Dead letters: list, show and replay them. Dead letters are never "
    "changed or deleted by these commands.",
    no_args_is_help=True,
)
cli.add_typer(dlq_cli, name="dlq")
T = TypeVar("T")

DlqLogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")]
AsJson = Annotated[bool, typer.Option("--json", help="JSON for scripts.")]
Authorities = Annotated[
    list[str] | None,
    typer.Option("--authority", help="host:port pattern, e.g. '*.prod:*'."),
]
Queues = Annotated[list[str] | None, typer.Option("--queue", help="Queue name.")]
Methods = Annotated[
    list[str] | None,
    typer.Option("--method", help="Method pattern, e.g. '/cafe.*'."),
]
Statuses = Annotated[
    list[str] | None,
    typer.Option("--status", help="Last gRPC status, e.g. UNAVAILABLE."),
]
TaskIds = Annotated[list[str] | None, typer.Option("--task-id", help="Task id.")]
Since = Annotated[
    str | None,
    typer.Option(help="Dead-lettered at or after: ISO time (UTC) or 2h (ago)."),
]
Until = Annotated[
    str | None, typer.Option(help="Dead-lettered before: ISO time (UTC) or 30m (ago).")
]
Limit = Annotated[int | None, typer.Option(min=1, help="At most this many.")]


def _filters(
    *,
    authority: list[str] | None,
    queue: list[str] | None,
    method: list[str] | None,
    status: list[str] | None,
    task_id: list[str] | None,
    since: str | None,
    until: str | None,
) -> dlq.Filters:
    return _checked(
        lambda: dlq.make_filters(
            authorities=authority or (),
            queues=queue or (),
            methods=method or (),
            statuses=status or (),
            task_ids=task_id or (),
            since=since,
            until=until,
        )
    )


def _checked(make: Callable[[], T]) -> T:
    """``make()``, a wrong command-line value ending the command with exit 2."""
    try:
        return make()
    except BadArgument as exc:
        typer.echo(f"taskqueue: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def _run_dlq(run: Coroutine[Any, Any, int]) -> None:
    try:
        code = asyncio.run(run)
    except TaskQueueError as exc:
        typer.echo(f"taskqueue: {exc}", err=True)
        code = dlq_view.EXIT_FAILED
    raise typer.Exit(code)


@dlq_cli.command("list")
def dlq_list(
    *,
    config: ConfigOption = config_module.DEFAULT_LOCATION,
    as_json: AsJson = False,
    log_level: DlqLogLevel = "WARNING",
) -> None:
    """Per queue: how many dead letters, oldest, newest, counts by status.

    Examples: taskqueue dlq list; taskqueue dlq list --json -c config.yaml@prod
    """
    loaded = _load(config, log_level, "text")
    _run_dlq(
        dlq_view.run_list(loaded, as_json=as_json, console=dlq_view.make_console())
    )


@dlq_cli.command("show")
def dlq_show(
    *,
    config: ConfigOption = config_module.DEFAULT_LOCATION,
    authority: Authorities = None,
    queue: Queues = None,
    method: Methods = None,
    status: Statuses = None,
    task_id: TaskIds = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = None,
    descriptor_set: Annotated[
        Path | None,
        typer.Option(
            help="FileDescriptorSet (protoc --descriptor_set_out "
            "--include_imports) to decode arguments with."
        ),
    ] = None,
    as_json: AsJson = False,
    log_level: DlqLogLevel = "WARNING",
) -> None:
    """Dead letters with their full context; arguments decoded when their type
    is in --descriptor-set, else shown as bytes.

    Examples: taskqueue dlq show --queue default --status INVALID_ARGUMENT;
    taskqueue dlq show --task-id 0b1f... --descriptor-set cafe.pb --json
    """
    loaded = _load(config, log_level, "text")
    filters = _filters(
        authority=authority,
        queue=queue,
        method=method,
        status=status,
        task_id=task_id,
        since=since,
        until=until,
    )
    types = ArgumentTypes()
    if descriptor_set is not None:
        types = _checked(lambda: ArgumentTypes.load(descriptor_set))
    run = dlq_view.run_show(
        loaded,
        filters,
        limit=limit,
        types=types,
        as_json=as_json,
        console=dlq_view.make_console(),
    )
    _run_dlq(run)


@dlq_cli.command("replay")
def dlq_replay(
    *,
    config: ConfigOption = config_module.DEFAULT_LOCATION,
    authority: Authorities = None,
    queue: Queues = None,
    method: Methods = None,
    status: Statuses = None,
    task_id: TaskIds = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print what would be replayed; write nothing."),
    ] = False,
    again: Annotated[
        bool,
        typer.Option("--again", help="Replay dead letters replayed before, too."),
    ] = False,
    rate: Annotated[
        float | None, typer.Option(min=0.001, help="At most this many a second.")
    ] = None,
    delay: Annotated[
        str | None, typer.Option(help="Due this long from now, e.g. 10m; default now.")
    ] = None,
    as_json: AsJson = False,
    log_level: DlqLogLevel = "WARNING",
) -> None:
    """Put matching dead letters back on their queue with attempts reset.

    A dead letter is replayed once: running the same replay again skips it
    unless --again. Dead letters arriving while it runs are left for later.

    Examples: taskqueue dlq replay --queue default --status UNAVAILABLE --dry-run;
    taskqueue dlq replay --since 2h --rate 50
    """
    loaded = _load(config, log_level, "text")
    filters = _filters(
        authority=authority,
        queue=queue,
        method=method,
        status=status,
        task_id=task_id,
        since=since,
        until=until,
    )
    delay_s = (
        0.0
        if delay is None
        else _checked(lambda: dlq.parse_duration_s(delay, "--delay"))
    )
    options = ReplayOptions(
        dry_run=dry_run, again=again, rate_per_s=rate, delay_s=delay_s, limit=limit
    )
    run = dlq_view.run_replay(
        loaded, filters, options, as_json=as_json, console=dlq_view.make_console()
    )
    _run_dlq(run)


@cli.command()
def queues(
    config: ConfigOption = config_module.DEFAULT_LOCATION,
    as_json: AsJson = False,
    heads: Annotated[
        bool, typer.Option(help="Read each partition's head for the oldest due time.")
    ] = True,
) -> None:
    """Every queue: its depth per tier, oldest due time and how late it is.

    Examples: taskqueue queues; taskqueue queues --json --no-heads
    Exit codes: 0 shown; 1 Kafka could not be read; 2 bad configuration.
    """
    loaded = _load(config, "WARNING", "text")
    try:
        found = asyncio.run(stats.collect(loaded, heads=heads))
    except TaskQueueError as exc:
        typer.echo(f"taskqueue: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(stats.to_json(found))
    else:
        Console().print(stats.table(found))


def main() -> None:
    cli()


def legacy_main(argv: list[str]) -> None:
    """``python -m taskqueue.server config.yaml@dev rpc|worker`` (the seed's form)."""
    if len(argv) == 2 and "@" in argv[0] and argv[1] in ("rpc", "worker"):
        sys.argv = [sys.argv[0], argv[1], "--config", argv[0]]
    main()

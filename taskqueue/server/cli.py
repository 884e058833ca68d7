"""The ``taskqueue`` command: parse, load the configuration, hand off.

Exit codes: 0 stopped cleanly; 1 failed while running; 2 bad usage or
configuration; 130 forced by a second signal.
"""

import asyncio
import sys
from typing import Annotated

import typer

from taskqueue.server import app as processes
from taskqueue.server import config as config_module
from taskqueue.server import logs
from taskqueue.server.errors import ConfigError
from taskqueue.server.worker import TierName

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
LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")]
LogFormat = Annotated[str, typer.Option("--log-format", help="text or json")]


def _load(location: str, level: str, fmt: str) -> config_module.Config:
    if fmt not in logs.FORMATS:
        raise typer.BadParameter(f"--log-format must be one of {logs.FORMATS}")
    logs.configure(level, fmt)
    try:
        return config_module.load(location)
    except ConfigError as exc:
        typer.echo(f"taskqueue: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


@cli.command()
def rpc(
    config: ConfigOption = config_module.DEFAULT_LOCATION,
    log_level: LogLevel = "INFO",
    log_format: LogFormat = "text",
) -> None:
    """Serve /taskqueue.service.TaskQueue/add.

    Example: taskqueue rpc --config config.yaml@dev
    """
    loaded = _load(config, log_level, log_format)
    asyncio.run(processes.serve_rpc(loaded))


@cli.command()
def worker(
    config: ConfigOption = config_module.DEFAULT_LOCATION,
    tier: Annotated[
        TierName, typer.Option(help="main: new tasks; retry: the delay ladder.")
    ] = TierName.MAIN,
    log_level: LogLevel = "INFO",
    log_format: LogFormat = "text",
) -> None:
    """Consume task topics of one tier and make the calls.

    Examples: taskqueue worker --tier main; taskqueue worker --tier retry
    """
    loaded = _load(config, log_level, log_format)
    asyncio.run(processes.serve_worker(loaded, tier))


def main() -> None:
    cli()


def legacy_main(argv: list[str]) -> None:
    """``python -m taskqueue.server config.yaml@dev rpc|worker`` (the seed's form)."""
    if len(argv) == 2 and "@" in argv[0] and argv[1] in ("rpc", "worker"):
        sys.argv = [sys.argv[0], argv[1], "--config", argv[0]]
    main()

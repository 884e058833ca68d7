"""Shared bits of the benchmarks: broker, arguments, child processes, figures.

Nothing here writes outside a temporary directory, and everything started
here (the local broker, child processes) is stopped by the context managers
that started it.
"""

import argparse
import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import statistics
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from taskqueue.server import config as config_module
from taskqueue.server import logs
from taskqueue.server.config import Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "localkafka"))

# localkafka/ is not a package: `mypy bench` alone cannot see it (the project's
# full mypy run, whose files include localkafka/, can).
from localbroker import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    DEFAULT_JARS_DIR,
    LocalBroker,
)

# Children are spawned, not forked: the parent has an event loop and threads.
SPAWN = multiprocessing.get_context("spawn")
CHILD_START_S = 60.0
CHILD_STOP_S = 30.0


# -- arguments -------------------------------------------------------------------


def parser(description: str, rounds: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="use this Kafka broker (on loopback) instead of starting a local one",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help=f"measure each side this many times; the medians are compared "
        f"(default {rounds})",
    )
    p.add_argument(
        "--log-level",
        default="",
        metavar="LEVEL",
        help="configure taskqueue's logging at LEVEL (as its CLI does), "
        "written to a file in the temp dir; default: logging not configured",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after measuring, run our side once more under cProfile and "
        "print the hot spots",
    )
    return p


# -- temp dir and broker ---------------------------------------------------------


@contextlib.contextmanager
def temp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="taskqueue-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class Broker:
    bootstrap: str
    pid: int | None  # the JVM, when this run started it
    version: str


@contextlib.contextmanager
def broker(bootstrap: str | None, tmp: Path) -> Iterator[Broker]:
    """The broker given on the command line, else a local one in ``tmp``."""
    if bootstrap:
        yield Broker(bootstrap, None, "external")
        return
    local = LocalBroker(port=0, data_dir=tmp / "kafka")
    local.start()
    try:
        yield Broker(local.bootstrap, local.pid, kafka_version())
    finally:
        local.stop()


def kafka_version() -> str:
    for jar in sorted(DEFAULT_JARS_DIR.glob("kafka_*.jar")):
        # kafka_2.13-4.1.1.jar
        return str(jar.stem).rpartition("-")[2]
    return "unknown"


def make_config(bootstrap: str, **sections: dict[str, object]) -> Config:
    """Product defaults, in a topic namespace and consumer groups of this run."""
    data: dict[str, dict[str, object] | list[str]] = {
        "kafka": {"bootstrap_servers": bootstrap},
        "topics": {"prefix": f"bench{uuid.uuid4().hex[:10]}"},
        "rpc": {"host": "127.0.0.1", "port": 0},
        "worker": {"group_prefix": f"bench{uuid.uuid4().hex[:10]}"},
        "allow": ["127.0.0.1:*"],
    }
    for key, value in sections.items():
        current = data.get(key)  # a section of several keys: merged
        data[key] = {**current, **value} if isinstance(current, dict) else value
    return config_module.from_dict(data)


def configure_logging(level: str, tmp: Path) -> None:
    """taskqueue's own log set-up, its lines going to a file in ``tmp``."""
    if not level:
        return
    logs.configure(level)
    stream = (tmp / f"taskqueue-{os.getpid()}.log").open("a")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)


# -- child processes -------------------------------------------------------------

# A child entry point: (pipe to the parent, *args). It sends one picklable
# "ready" message (e.g. its port), then runs until the parent sends anything.
ChildMain = Callable[..., None]


@dataclass
class Child:
    process: BaseProcess
    conn: multiprocessing.connection.Connection
    ready: Any

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid


@contextlib.contextmanager
def child(main: ChildMain, *args: object) -> Iterator[Child]:
    """Run ``main(conn, *args)`` in a spawned process; stop it on exit."""
    parent_end, child_end = SPAWN.Pipe()
    process = SPAWN.Process(target=main, args=(child_end, *args), daemon=True)
    process.start()
    try:
        if not parent_end.poll(CHILD_START_S):
            raise RuntimeError(f"child {main.__name__} did not start")
        yield Child(process, parent_end, parent_end.recv())
    finally:
        with contextlib.suppress(OSError):
            parent_end.send("stop")
        process.join(CHILD_STOP_S)
        if process.is_alive():
            process.kill()
            process.join()


# -- figures ---------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """User plus system CPU seconds used so far by process ``pid``."""
    if pid is None:
        return 0.0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    # fields[0] is the state (stat field 3); utime and stime are fields 14, 15.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank, of unsorted ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return str(value)


def machine(kafka: str) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"Kafka {kafka}, {load()}"
    )


def load() -> str:
    """The load average: other work on the machine skews every figure."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) {five:.2f} (5 min)"

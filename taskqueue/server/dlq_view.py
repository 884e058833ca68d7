"""What ``taskqueue dlq`` prints, and its three runs, each returning an exit code.

On a terminal: rich tables, panels and a progress bar. With ``--json``: one
JSON document (``list``) or one JSON object a line (``show``, ``replay``), the
same fields whatever the output is connected to, for scripts.
"""

import asyncio
import contextlib
import signal
from base64 import b64encode
from collections.abc import Iterator
from typing import Any

import msgspec
from rich.console import Console, Group, RenderableType
from rich.json import JSON
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table
from rich.text import Text

from taskqueue.protobuf.service_pb2 import AT_MOST_ONCE
from taskqueue.server.config import Config
from taskqueue.server.descriptors import ArgumentTypes, Decoded
from taskqueue.server.dlq import Filters, QueueStats, Shown, find, queue_stats
from taskqueue.server.record import iso_ms
from taskqueue.server.replay import (
    FAILURES,
    Outcome,
    Replayer,
    ReplayHooks,
    ReplayOptions,
    Step,
    Summary,
)

EXIT_OK = 0
# Some matching dead letters were not replayed, or Kafka could not be used.
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Bytes of an undecoded argument shown on a terminal; --json shows them all.
SHOWN_BYTES = 256
PIPE_COLUMNS = 160

Json = dict[str, Any]


def make_console() -> Console:
    """A console for stdout; wider than rich's 80 columns when not a terminal,
    so that a table written to a file or a pipe keeps one row a line."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, PIPE_COLUMNS)
    return console


def iso(ms: int | None) -> str | None:
    return None if ms is None else iso_ms(ms)


def _emit(console: Console, document: object) -> None:
    console.out(msgspec.json.encode(document).decode(), highlight=False)


# ------------------------------------------------------------------------ list


async def run_list(config: Config, *, as_json: bool, console: Console) -> int:
    stats = await queue_stats(config)
    if as_json:
        _emit(console, [_stats_json(s) for s in stats])
    else:
        console.print(_stats_table(config.topics.prefix, stats))
    return EXIT_OK


def _stats_json(stats: QueueStats) -> Json:
    return {
        "topic": stats.topic,
        "authority": stats.authority,
        "queue": stats.queue,
        "count": stats.count,
        "replayed": stats.replayed,
        "oldest": iso(stats.oldest_ms),
        "newest": iso(stats.newest_ms),
        "statuses": dict(stats.statuses.most_common()),
    }


def _stats_table(prefix: str, stats: list[QueueStats]) -> RenderableType:
    if not stats:
        return Text(f"No dead-letter topics under {prefix}.")
    table = Table(title=f"Dead letters under {prefix}", show_footer=True)
    table.add_column("Authority", "total")
    table.add_column("Queue")
    table.add_column("Dead letters", str(sum(s.count for s in stats)), justify="right")
    table.add_column("Replayed", str(sum(s.replayed for s in stats)), justify="right")
    table.add_column("Oldest")
    table.add_column("Newest")
    table.add_column("By status")
    for s in stats:
        by_status = ", ".join(f"{name} {n}" for name, n in s.statuses.most_common())
        table.add_row(
            Text(s.authority),
            Text(s.queue),
            str(s.count),
            str(s.replayed),
            iso(s.oldest_ms) or "-",
            iso(s.newest_ms) or "-",
            Text(by_status),
            style=None if s.count else "dim",
        )
    return table


# ------------------------------------------------------------------------ show


async def run_show(
    config: Config,
    filters: Filters,
    *,
    limit: int | None,
    types: ArgumentTypes,
    as_json: bool,
    console: Console,
) -> int:
    shown = 0
    async with contextlib.aclosing(find(config, filters, limit)) as found:
        async for one in found:
            fields = letter_json(one, types)
            if as_json:
                _emit(console, fields)
            else:
                console.print(_letter_panel(fields))
            shown += 1
    if not as_json:
        console.print(f"{shown} dead letter(s) shown.", highlight=False, soft_wrap=True)
    return EXIT_OK


def letter_json(shown: Shown, types: ArgumentTypes) -> Json:
    """A dead letter with its full context, in the order people read it."""
    letter = shown.letter
    fields: Json = {"task_id": letter.task_id}
    task, state = letter.task, letter.state
    if task is None or state is None:
        fields |= {
            "unreadable": letter.problem,
            "reason": letter.header("reason"),
            "origin": letter.header("origin"),
            "value": _bytes_json(letter.value),
        }
    else:
        fields |= {
            "authority": task.authority,
            "method": task.method,
            "queue": task.queue,
            "status": state.last_status,
            "message": state.last_message,
            "reason": state.reason,
            "attempts": state.attempt,
            "first_attempt_at": iso(state.first_attempt_ms),
            "last_attempt_at": iso(state.last_attempt_ms),
            "added_at": iso(state.added_ms),
            "origin": state.origin,
            "replays": state.replays,
            "delivery": "at-most-once"
            if task.delivery == AT_MOST_ONCE
            else "at-least-once",
            "metadata": dict(task.metadata),
            "argument": _argument_json(types.decode(task.argument)),
        }
    fields |= {
        "dead_letter": letter.where,
        "dead_lettered_at": iso(letter.timestamp_ms),
        "replayed": shown.replayed,
    }
    return fields


def _argument_json(decoded: Decoded) -> Json:
    fields: Json = {"type_url": decoded.type_url}
    if decoded.json is not None:
        fields["json"] = decoded.json
        return fields
    if decoded.problem is not None:
        fields["problem"] = decoded.problem
    return fields | _bytes_json(decoded.value)


def _bytes_json(value: bytes) -> Json:
    return {"size": len(value), "hex": value.hex(), "base64": b64encode(value).decode()}


def _letter_panel(fields: Json) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in fields.items():
        if name in ("argument", "value") or value in (None, {}, ""):
            continue
        grid.add_row(name.replace("_", " "), Text(_text(value)))
    parts: list[RenderableType] = [grid]
    if "argument" in fields:
        parts += [Text("argument", style="bold"), *_bytes_view(fields["argument"])]
    if "value" in fields:
        parts += [Text("record value", style="bold"), *_bytes_view(fields["value"])]
    title = Text(str(fields.get("task_id") or "unreadable dead letter"))
    return Panel(Group(*parts), title=title, title_align="left")


def _bytes_view(fields: Json) -> Iterator[RenderableType]:
    if "type_url" in fields:
        yield Text(f"  type {fields['type_url'] or '(none)'}")
    if "json" in fields:
        yield JSON(msgspec.json.encode(fields["json"]).decode())
        return
    if "problem" in fields:
        yield Text(f"  {fields['problem']}", style="yellow")
    size = fields["size"]
    hex_text = fields["hex"][: SHOWN_BYTES * 2]
    more = f" ... ({size} bytes; --json shows all)" if size > SHOWN_BYTES else ""
    yield Text(f"  hex {hex_text or '(empty)'}{more}")
    if size <= SHOWN_BYTES:
        yield Text(f"  base64 {fields['base64']}")


def _text(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


# ---------------------------------------------------------------------- replay


async def run_replay(
    config: Config,
    filters: Filters,
    options: ReplayOptions,
    *,
    as_json: bool,
    console: Console,
) -> int:
    stop = asyncio.Event()
    with _stopped_by_signals(stop), _Display(console, as_json) as display:
        replayer = Replayer(config, filters, options, hooks=display.hooks, stop=stop)
        summary = await replayer.run()
        display.summary(summary, options.dry_run)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.failed else EXIT_OK


@contextlib.contextmanager
def _stopped_by_signals(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C or SIGTERM: finish the writes under way, summarise, exit 130."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


class _Display:
    """A replay's lines, progress bar and summary."""

    def __init__(self, console: Console, as_json: bool) -> None:
        self._console = console
        self._as_json = as_json
        self._progress: Progress | None = None
        self._bar: TaskID | None = None
        if console.is_terminal and not as_json:
            self._progress = Progress(
                TextColumn("scanning dead letters"),
                BarColumn(),
                MofNCompleteColumn(),
                console=console,
                transient=True,
            )
        self.hooks = ReplayHooks(
            started=self._started, scanned=self._scanned, step=self._step
        )

    def __enter__(self) -> "_Display":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _started(self, total: int) -> None:
        if self._progress is not None:
            self._bar = self._progress.add_task("scan", total=total)

    def _scanned(self) -> None:
        if self._progress is not None and self._bar is not None:
            self._progress.advance(self._bar)

    def _step(self, step: Step) -> None:
        if self._as_json:
            _emit(self._console, step_json(step))
            return
        letter = step.letter
        task = letter.task
        line = [step.outcome.value, letter.task_id or "-", letter.where]
        if task is not None:
            line[2:2] = [task.authority, task.method]
        if step.destination:
            line.append(f"-> {step.destination}")
        if step.detail:
            line.append(f"({step.detail})")
        style = "red" if step.outcome in FAILURES else ""
        self._console.print(Text(" ".join(line), style=style), soft_wrap=True)

    def summary(self, summary: Summary, dry_run: bool) -> None:
        counts = {o.value: summary.outcomes[o] for o in Outcome if summary.outcomes[o]}
        if self._as_json:
            document = {
                "summary": {"scanned": summary.scanned, "dry_run": dry_run, **counts},
                "interrupted": summary.interrupted,
            }
            _emit(self._console, document)
            return
        done = ", ".join(f"{n} {name}" for name, n in counts.items()) or "none matched"
        verb = "dry run, nothing written" if dry_run else "replay"
        ending = "; interrupted" if summary.interrupted else ""
        text = f"{verb}: {summary.scanned} dead letter(s) scanned: {done}{ending}."
        self._console.print(Text(text, style="bold"), soft_wrap=True)


def step_json(step: Step) -> Json:
    letter = step.letter
    return {
        "outcome": step.outcome.value,
        "task_id": letter.task_id,
        "authority": letter.task.authority if letter.task else None,
        "method": letter.task.method if letter.task else None,
        "dead_letter": letter.where,
        "destination": step.destination,
        "detail": step.detail,
    }

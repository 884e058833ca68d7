"""Log set-up for the processes: readable lines by default, JSON on request.

Every task lifecycle event (enqueued, succeeded, retrying, failed,
dead-lettered) is one line from :func:`task_event`, carrying the task id,
outcome, authority, method, attempt, queue and tier; in JSON those are keys
of the line too, so that a log pipeline needs no parsing of the message.
"""

import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# The LogRecord attribute that carries a task event's fields to the formatter.
EVENT_ATTRIBUTE = "task_event"


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """Who a lifecycle line is about."""

    task_id: str
    authority: str
    method: str
    attempt: int  # calls made so far
    queue: str
    # The tier of the topic the record was read from; on add, written to.
    tier: str


def task_event(
    logger: logging.Logger,
    level: int,
    outcome: str,
    event: TaskEvent,
    **more: str | int | float,
) -> None:
    """Log ``task ID OUTCOME authority=... method=... attempt=N queue=Q tier=T``
    followed by ``more`` as ``key=value``. Never pass payloads or metadata."""
    if not logger.isEnabledFor(level):
        return  # on the hot path: build nothing for a line nobody keeps
    keys = "".join(f" {key}=%s" for key in more)
    logger.log(
        level,
        "task %s %s authority=%s method=%s attempt=%d queue=%s tier=%s" + keys,
        event.task_id,
        outcome,
        event.authority,
        event.method,
        event.attempt,
        event.queue,
        event.tier,
        *more.values(),
        extra={
            EVENT_ATTRIBUTE: {**dataclasses.asdict(event), "outcome": outcome, **more}
        },
        stacklevel=2,
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, EVENT_ATTRIBUTE, {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries(root.level)


# Kept at WARNING whatever the level: aiokafka is chatty at INFO about every
# group join and logs record values (payloads) at DEBUG; hpack and h2 log
# every header at DEBUG, bearer tokens included.
QUIET_LOGGERS = ("aiokafka", "hpack", "h2")


def quiet_libraries(level: int) -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))

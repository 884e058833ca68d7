"""The exceptions of taskqueue's server side.

All derive from :class:`TaskQueueError`; each class names the gRPC status a
caller of ``add`` receives for it. The rpc handler turns them into statuses in
one place (``rpc.py``) and logs each once there; the time limits around every
handler (``guard.py``) do so for their own two.

    TaskQueueError
    ├── ConfigError          bad configuration; start-up stops
    ├── InvalidTask          a Task field is wrong        -> INVALID_ARGUMENT
    ├── Unauthenticated      no valid caller credentials   -> UNAUTHENTICATED
    ├── AuthorityNotAllowed  the operator did not allow it -> PERMISSION_DENIED
    ├── CallerNotAllowed     not for this caller           -> PERMISSION_DENIED
    ├── DeadlineExceeded     the caller's deadline passed  -> DEADLINE_EXCEEDED
    ├── RequestTimedOut      the request stalled midway    -> DEADLINE_EXCEEDED
    ├── InvalidTimeout       a malformed grpc-timeout      -> INVALID_ARGUMENT
    ├── ResetFlood           a rapid-reset client (closes its connection)
    ├── BrokerUnavailable    Kafka did not acknowledge     -> UNAVAILABLE
    │   └── TopicRefused     a queue's topic name collides -> INVALID_ARGUMENT
    ├── BadRecord            a Kafka record we cannot read (dead-lettered)
    ├── UnreadableBatch      a fetched batch we cannot parse (also aiokafka's)
    └── BadArgument          an operator's command-line value is wrong; exit 2
"""

from aiokafka.errors import CorruptRecordException
from grpclib.const import Status


class TaskQueueError(Exception):
    """Base of every error raised by taskqueue's server side."""

    status = Status.INTERNAL


class ConfigError(TaskQueueError):
    """The configuration is invalid; the message names the key and the file."""

    status = Status.FAILED_PRECONDITION


class InvalidTask(TaskQueueError):
    """A Task sent to ``add`` is invalid; the message names the field."""

    status = Status.INVALID_ARGUMENT


class Unauthenticated(TaskQueueError):
    """A caller of ``add`` presented no valid credentials."""

    status = Status.UNAUTHENTICATED


class AuthorityNotAllowed(TaskQueueError):
    """The task's authority (or method) is not on the operator's allowlist."""

    status = Status.PERMISSION_DENIED


class CallerNotAllowed(TaskQueueError):
    """A known caller asked for what its entry in ``security.callers`` denies."""

    status = Status.PERMISSION_DENIED


class DeadlineExceeded(TaskQueueError):
    """The caller's deadline (its ``grpc-timeout``) passed before the answer."""

    status = Status.DEADLINE_EXCEEDED


class RequestTimedOut(TaskQueueError):
    """A request did not arrive in full within ``rpc.request_read_timeout_s``.

    Not CANCELLED: gRPC keeps that status for a call its own caller cancelled,
    while this is a time limit that ran out, which clients and retry policies
    already read as "too slow, may be retried".
    """

    status = Status.DEADLINE_EXCEEDED


class InvalidTimeout(TaskQueueError):
    """A request's ``grpc-timeout`` header is not a timeout gRPC can encode."""

    status = Status.INVALID_ARGUMENT


class ResetFlood(TaskQueueError):
    """A client reset too many streams too fast (guard.py's rapid-reset limit).

    It ends the connection with GOAWAY; no request is answered with it.
    """


class BrokerUnavailable(TaskQueueError):
    """Kafka did not acknowledge a write in time."""

    status = Status.UNAVAILABLE


class TopicRefused(BrokerUnavailable):
    """Kafka refused to create a queue's topic (a name colliding with another).

    Retrying ``add`` cannot help, hence its status; a worker writing a record
    treats it like any refused write (it keeps the record and tries again).
    """

    status = Status.INVALID_ARGUMENT


class BadRecord(TaskQueueError):
    """A record read from Kafka is not a task record; it goes to the DLQ."""


class UnreadableBatch(TaskQueueError, CorruptRecordException):  # type: ignore[misc]
    """A fetched record batch is malformed, found while re-reading it leniently.

    Also aiokafka's ``CorruptRecordException``, which it replaces: code around
    a consumer handles it as it handles aiokafka's own report of a bad batch.
    """


class BadArgument(TaskQueueError):
    """A value given to a ``taskqueue`` command is wrong; the message names it."""

    status = Status.INVALID_ARGUMENT

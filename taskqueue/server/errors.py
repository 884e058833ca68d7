"""The exceptions of taskqueue's server side.

All derive from :class:`TaskQueueError`; each class names the gRPC status a
caller of ``add`` receives for it. The rpc handler turns them into statuses in
one place (``rpc.py``) and logs each once there.

    TaskQueueError
    ├── ConfigError          bad configuration; start-up stops
    ├── InvalidTask          a Task field is wrong        -> INVALID_ARGUMENT
    ├── Unauthenticated      no valid caller credentials   -> UNAUTHENTICATED
    ├── AuthorityNotAllowed  the operator did not allow it -> PERMISSION_DENIED
    ├── CallerNotAllowed     not for this caller           -> PERMISSION_DENIED
    ├── BrokerUnavailable    Kafka did not acknowledge     -> UNAVAILABLE
    │   └── TopicRefused     a queue's topic name collides -> INVALID_ARGUMENT
    ├── BadRecord            a Kafka record we cannot read (dead-lettered)
    └── BadArgument          an operator's command-line value is wrong; exit 2
"""

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


class BadArgument(TaskQueueError):
    """A value given to a ``taskqueue`` command is wrong; the message names it."""

    status = Status.INVALID_ARGUMENT

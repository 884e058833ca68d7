"""Configuration: ``config.yaml`` with named sections, chosen as ``FILE@SECTION``.

The file is decoded into immutable msgspec structs; an unknown or mistyped key
stops start-up with a message naming the key, the section and the file.
"""

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from grpclib.const import Status

from taskqueue.server.allowlist import Allowlist
from taskqueue.server.errors import ConfigError
from taskqueue.server.ladder import parse_delay_s

DEFAULT_LOCATION = "config.yaml@dev"
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")

# Bounded so that no setting can overflow a time or a count downstream.
Positive = Annotated[float, msgspec.Meta(gt=0, le=1e10)]
Count = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]
# At least one tier: without any, retries and scheduled tasks wait in memory.
Tiers = Annotated[list[str], msgspec.Meta(min_length=1)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class KafkaConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "taskqueue"
    # Partitions and replication of the topics taskqueue creates.
    partitions: Count = 4
    replication_factor: Count = 1
    request_timeout_s: Positive = 10.0
    # How soon a worker notices a queue created after it started.
    metadata_max_age_s: Positive = 3.0


class TopicsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Topics are named PREFIX.<authority>.<queue>[.<tier>].
    prefix: str = "taskqueue"
    # Delays of the tier topics that hold retries and scheduled tasks.
    tiers: Tiers = msgspec.field(
        default_factory=lambda: ["5s", "1m", "10m", "1h", "8h", "2d", "14d"]
    )
    # Records stay on a tier this long after they are due, so that a worker
    # outage shorter than this loses nothing.
    tier_grace_s: Positive = 7 * 86400.0
    dlq_retention_s: Positive = 30 * 86400.0


class RetryConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Total calls, the first one included.
    max_attempts: Count = 10
    # Delays before the 2nd, 3rd... attempt; the last repeats.
    backoff_s: Annotated[list[Positive], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: [5.0, 60.0]
    )
    max_age_s: Positive | None = None
    # Status names that are retried; everything else is dead-lettered at once.
    retryable: list[str] = msgspec.field(
        default_factory=lambda: [
            "UNAVAILABLE",
            "DEADLINE_EXCEEDED",
            "RESOURCE_EXHAUSTED",
            "ABORTED",
            "INTERNAL",
            "UNKNOWN",
            "CANCELLED",
        ]
    )


class QueueConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    deadline_s: Positive = 30.0
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)


class RpcConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 50051
    # Longest wait for Kafka's acknowledgement of an `add`.
    add_timeout_s: Positive = 10.0
    # Largest request message accepted, in bytes.
    max_message_bytes: Count = 1_000_000
    # Longest wait for the rest of a request once its headers arrived (unary
    # requests: until the caller ends its side). A request that stalls midway
    # is answered DEADLINE_EXCEEDED and its memory freed.
    request_read_timeout_s: Positive = 10.0
    # Requests one connection may have under way at once, advertised as
    # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; more are refused one by one
    # (REFUSED_STREAM), the connection and its other requests unharmed.
    max_concurrent_streams: Count = 256
    # A connection from which nothing at all (no request, no data, no PING)
    # arrived for this long is closed (GOAWAY, then the socket), requests
    # under way or not: a stream whose client never sends, or never lets the
    # answer be written, holds no socket for good. A health Watch from a
    # client that says nothing meanwhile is closed too; Watch clients open it
    # again, as others connect again on their next call. Must be above
    # add_timeout_s, so that an `add` waiting for Kafka is answered first.
    idle_timeout_s: Positive = 300.0

    def __post_init__(self) -> None:
        if self.idle_timeout_s <= self.add_timeout_s:
            # msgspec reports it as invalid, naming the section.
            raise ValueError("rpc.idle_timeout_s must be above rpc.add_timeout_s")


class WorkerConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    group_prefix: str = "taskqueue"
    # Calls in flight at once.
    concurrency: Count = 100
    # Records taken from Kafka and not finished yet (calls, timers, writes).
    max_pending: Count = 1000
    max_poll_interval_s: Positive = 300.0
    # A worker that stops heartbeating loses its partitions after this long.
    session_timeout_s: Positive = 10.0
    commit_interval_s: Positive = 0.2
    shutdown_grace_s: Positive = 30.0
    # Open channels to targets; the least recently used is closed beyond it.
    channel_cache_size: Count = 64
    # Records of one queue (one topic) pending at once; beyond it none of its
    # records are taken, so that a slow or flooded queue leaves room for the
    # others.
    max_pending_per_queue: Count = 200
    # Bytes of those records (their values): large tasks fill memory before
    # their count does.
    max_pending_bytes: Count = 64 * 1024 * 1024
    # Bytes one queue may hold of those: a queue of large, slow tasks must not
    # take the whole byte budget from the others.
    max_pending_bytes_per_queue: Count = 16 * 1024 * 1024
    # Calls in flight to one authority, unless authority_limits says
    # otherwise: one that never answers cannot take every call slot.
    max_calls_per_authority: Count = 50


class AuthorityLimit(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Flow control for the authorities matching ``authority`` (fnmatch)."""

    authority: str
    # Calls in flight to one such authority at once.
    concurrency: Count | None = None
    # Calls started per second (a token bucket of ``burst`` tokens).
    rate_per_s: Positive | None = None
    burst: Count = 1


class OverloadConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Backing off from an authority that says it is overloaded or down."""

    # Consecutive RESOURCE_EXHAUSTED or UNAVAILABLE answers that pause it.
    threshold: Count = 5
    backoff_s: Positive = 1.0
    max_backoff_s: Positive = 60.0


class MetricsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The HTTP endpoint of a process: ``/metrics`` (Prometheus) and ``/healthz``."""

    host: str = "127.0.0.1"
    # None: not served. 0: any free port, logged at start-up, so that several
    # processes on one host need no port each (`--metrics-port` overrides).
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None


class HealthConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # How often the broker is probed (rpc) and the consumer lag measured (worker).
    interval_s: Positive = 5.0
    # A probe that takes longer counts as failed.
    timeout_s: Positive = 3.0
    # A worker is unhealthy when a partition it may fetch has lag and no
    # record was taken or finished for this long; keep it above the longest
    # deadline_s, since calls that hang until their deadline make no progress.
    stuck_after_s: Positive = 120.0
    # A stuck worker stops and exits with code 3, so that its supervisor
    # starts a fresh one; false leaves it to a probe of /healthz.
    exit_when_stuck: bool = True


class AdminConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # Serve taskqueue.admin.Admin (pause, resume) beside add. Anyone who can
    # reach the rpc port can then pause calls: enable it behind a network
    # policy or where only operators reach that port, or list
    # security.callers, and then only those marked admin may use it.
    enabled: bool = False


class LogsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # `--log-level` and `--log-format` override these.
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class AllowRule(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An ``allow`` entry that also limits the methods callable there."""

    authority: str
    # Method paths that may be called there, as shell patterns
    # (/package.Service/*); every method when unset.
    methods: Annotated[list[str], msgspec.Meta(min_length=1)] | None = None


class RpcTlsConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    # PEM files of the rpc server's certificate chain and private key; the rpc
    # server speaks TLS when they are set.
    cert: str | None = None
    key: str | None = None
    # PEM bundle of the CAs that sign client certificates: with it, every
    # caller must present such a certificate (mutual TLS).
    client_ca: str | None = None


class CallerConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A caller of ``add``, known by the bearer token it presents."""

    name: str
    # The token's SHA-256 in hex, or a file holding the token itself (a
    # mounted secret): never the token in this file.
    token_sha256: str | None = None
    token_file: str | None = None
    # host:port patterns this caller may enqueue calls to, within `allow`;
    # everything `allow` allows when empty.
    authorities: list[str] = msgspec.field(default_factory=list)
    # May use taskqueue.admin.Admin (pause, resume) when it is served.
    admin: bool = False


class OutgoingTlsConfig(
    _Section, frozen=True, forbid_unknown_fields=True, kw_only=True
):
    """TLS for the calls to the authorities matching ``authority``."""

    authority: str
    # PEM bundle of the CAs that sign the targets' certificates; the system's
    # trusted CAs when unset.
    ca: str | None = None
    # Client certificate chain and key, for targets that want mutual TLS.
    cert: str | None = None
    key: str | None = None
    # The name the target's certificate must carry; the authority's host when
    # unset.
    server_name: str | None = None


class SecurityConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    tls: RpcTlsConfig = msgspec.field(default_factory=RpcTlsConfig)
    # When any caller is listed, `add` wants metadata `authorization: Bearer
    # <token>` with one of their tokens.
    callers: list[CallerConfig] = msgspec.field(default_factory=list)
    # First matching entry wins; an authority matching none is called over
    # plaintext HTTP/2.
    outgoing_tls: list[OutgoingTlsConfig] = msgspec.field(default_factory=list)


class Config(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    kafka: KafkaConfig = msgspec.field(default_factory=KafkaConfig)
    topics: TopicsConfig = msgspec.field(default_factory=TopicsConfig)
    rpc: RpcConfig = msgspec.field(default_factory=RpcConfig)
    worker: WorkerConfig = msgspec.field(default_factory=WorkerConfig)
    # Policy of queues not named in `queues`.
    queue_defaults: QueueConfig = msgspec.field(default_factory=QueueConfig)
    queues: dict[str, QueueConfig] = msgspec.field(default_factory=dict)
    # First matching entry wins; an authority matching none has no own limit.
    authority_limits: list[AuthorityLimit] = msgspec.field(default_factory=list)
    overload: OverloadConfig = msgspec.field(default_factory=OverloadConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    health: HealthConfig = msgspec.field(default_factory=HealthConfig)
    logs: LogsConfig = msgspec.field(default_factory=LogsConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    # host:port patterns (* and ? are wildcards) that may be called, or
    # {authority: PATTERN, methods: [PATTERN, ...]}; nothing when empty.
    allow: list[str | AllowRule] = msgspec.field(default_factory=list)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)

    def queue(self, name: str) -> QueueConfig:
        return self.queues.get(name, self.queue_defaults)


def load(location: str = DEFAULT_LOCATION) -> Config:
    """Load ``FILE@SECTION`` (the section defaults to ``dev``)."""
    path_text, _, section = location.partition("@")
    section = section or "dev"
    path = Path(path_text)

    try:
        sections = msgspec.yaml.decode(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None

    if not isinstance(sections, dict) or section not in sections:
        known = ", ".join(map(str, sections)) if isinstance(sections, dict) else ""
        raise ConfigError(
            f"{path} has no section {section!r}"
            + (f" (it has: {known})" if known else "")
        )
    return from_dict(sections[section] or {}, origin=f"{path}@{section}")


def with_metrics_port(config: Config, port: int) -> Config:
    """``config`` with ``metrics.port`` replaced (``--metrics-port``)."""
    metrics = msgspec.structs.replace(config.metrics, port=port)
    return msgspec.structs.replace(config, metrics=metrics)


def from_dict(data: object, origin: str = "<config>") -> Config:
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    _check(config, origin)
    return config


def _check(config: Config, origin: str) -> None:
    for tier in config.topics.tiers:
        parse_delay_s(tier, origin)
    queues = {"queue_defaults": config.queue_defaults}
    queues |= {f"queues.{name}": queue for name, queue in config.queues.items()}
    for where, queue in queues.items():
        for status in queue.retry.retryable:
            if status not in Status.__members__:
                raise ConfigError(
                    f"{origin}: {where}.retry.retryable: {status!r} is not a gRPC "
                    "status name like UNAVAILABLE"
                )
    if config.worker.max_pending < config.worker.concurrency:
        raise ConfigError(f"{origin}: worker.max_pending is below worker.concurrency")
    deadlines = [config.queue_defaults.deadline_s]
    deadlines += [q.deadline_s for q in config.queues.values()]
    if max(deadlines) >= config.worker.max_poll_interval_s:
        raise ConfigError(
            f"{origin}: a queue's deadline_s is not below worker.max_poll_interval_s"
        )
    Allowlist(config.allow, where=f"{origin}: allow")
    _check_security(config.security, origin)


def _check_security(security: SecurityConfig, origin: str) -> None:
    tls = security.tls
    _pair(origin, "security.tls", tls.cert, tls.key)
    if tls.client_ca is not None and tls.cert is None:
        raise ConfigError(f"{origin}: security.tls.client_ca needs cert and key")
    _readable(origin, "security.tls", cert=tls.cert, key=tls.key, ca=tls.client_ca)

    names = [caller.name for caller in security.callers]
    for index, caller in enumerate(security.callers):
        where = f"security.callers[{index}]"
        if names.count(caller.name) > 1:
            raise ConfigError(f"{origin}: {where}: name {caller.name!r} is repeated")
        if (caller.token_sha256 is None) == (caller.token_file is None):
            raise ConfigError(
                f"{origin}: {where}: set one of token_sha256 and token_file"
            )
        digest = caller.token_sha256
        if digest is not None and not _SHA256_HEX.fullmatch(digest):
            raise ConfigError(
                f"{origin}: {where}.token_sha256 is not 64 hexadecimal digits"
            )
        _readable(origin, where, token_file=caller.token_file)
        Allowlist(caller.authorities, where=f"{origin}: {where}.authorities")

    for index, rule in enumerate(security.outgoing_tls):
        where = f"security.outgoing_tls[{index}]"
        Allowlist([rule.authority], where=f"{origin}: {where}.authority")
        _pair(origin, where, rule.cert, rule.key)
        _readable(origin, where, ca=rule.ca, cert=rule.cert, key=rule.key)


def _pair(origin: str, where: str, cert: str | None, key: str | None) -> None:
    if (cert is None) != (key is None):
        raise ConfigError(f"{origin}: {where}: set both cert and key, or neither")


def _readable(origin: str, where: str, **paths: str | None) -> None:
    # Checked at load, so that a wrong path stops start-up with the key's name
    # rather than failing the first connection.
    for key, path in paths.items():
        if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            raise ConfigError(f"{origin}: {where}.{key}: cannot read {path}")

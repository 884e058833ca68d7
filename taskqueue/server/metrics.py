"""Prometheus metrics of one process, and the HTTP endpoint that serves them.

Every process (an rpc server, a worker) keeps its metrics in a registry of its
own rather than prometheus_client's global one: tests and benchmarks run
several servers and workers in one process, and each must count only its own
work and never register a metric twice.

Label values are bounded: queue names and authorities (each one is a set of
Kafka topics), methods, status names and tier names; never task ids. Refused
tasks are counted without their queue, since its name is whatever the caller
sent. Worker state (partitions, lag) is measured by the health probe in the
event loop and published as one immutable snapshot, because the endpoint
answers from its own thread and must not walk the worker's live structures.
"""

import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector

from taskqueue.server.config import MetricsConfig
from taskqueue.server.policy import Failure

log = logging.getLogger(__name__)

OK = "OK"
# A retry whose delay is below the smallest tier waits on a timer in the worker.
IN_PLACE = "inplace"
MAIN = "main"

CALL_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
LATENESS_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    5,
    30,
    60,
    300,
    3600,
)

# The answer of a health check: healthy or not, and why, for /healthz.
HealthCheck = Callable[[], tuple[bool, str]]


@dataclass(frozen=True, slots=True)
class TierState:
    """A worker's partitions of one tier (``main``, ``retry-5s``...)."""

    assigned: int = 0
    waiting: int = 0  # paused until their head record is due
    lag: int = 0  # records not finished yet: end offset minus committable offset


@dataclass(frozen=True, slots=True)
class WorkerState:
    tiers: dict[str, TierState] = field(default_factory=dict)
    # Seconds since the worker last took or finished a record.
    idle_s: float = 0.0


class _WorkerCollector(Collector):
    """Reads the latest worker snapshot at scrape time."""

    def __init__(self) -> None:
        self.state: WorkerState | None = None

    def collect(self) -> Iterable[Metric]:
        state = self.state  # one read: the probe swaps in a new object
        if state is None:
            return
        families = {
            "assigned": GaugeMetricFamily(
                "taskqueue_partitions_assigned",
                "Partitions assigned to this worker, by tier.",
                labels=["tier"],
            ),
            "waiting": GaugeMetricFamily(
                "taskqueue_partitions_waiting",
                "Assigned partitions paused until their head record is due.",
                labels=["tier"],
            ),
            "lag": GaugeMetricFamily(
                "taskqueue_consumer_lag_records",
                "Records of assigned partitions not finished yet "
                "(end offset minus the offset that would be committed).",
                labels=["tier"],
            ),
        }
        for tier, counts in sorted(state.tiers.items()):
            for name, family in families.items():
                family.add_metric([tier], getattr(counts, name))
        yield from families.values()
        yield GaugeMetricFamily(
            "taskqueue_worker_idle_seconds",
            "Seconds since the worker last took or finished a record.",
            value=state.idle_s,
        )


class _Children:
    """A metric's labelled children, each looked up once: ``labels()`` takes a
    lock and checks its arguments on every call, and the call path is hot.
    Label values are bounded (see above), so this cache is too."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child


class Metrics:
    """The metrics of one process; each method is one lifecycle event."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._added = Counter(
            "taskqueue_tasks_added",
            "Tasks add answered, by queue (empty when refused) and gRPC status.",
            ["queue", "outcome"],
            registry=registry,
        )
        self._calls = Counter(
            "taskqueue_calls",
            "Calls made to targets, by authority, method and gRPC status.",
            ["authority", "method", "code"],
            registry=registry,
        )
        self._call_seconds = Histogram(
            "taskqueue_call_duration_seconds",
            "How long calls to targets took, by authority.",
            ["authority"],
            buckets=CALL_BUCKETS_S,
            registry=registry,
        )
        self._lateness = Histogram(
            "taskqueue_call_lateness_seconds",
            "How long after its due time a call started, by the tier it was read from.",
            ["tier"],
            buckets=LATENESS_BUCKETS_S,
            registry=registry,
        )
        self._in_flight = Gauge(
            "taskqueue_calls_in_flight",
            "Calls to targets under way.",
            registry=registry,
        )
        self._retries = Counter(
            "taskqueue_retries",
            "Failed calls scheduled again, by the tier that holds the retry "
            "(inplace: a timer in the worker).",
            ["tier"],
            registry=registry,
        )
        self._dead_letters = Counter(
            "taskqueue_dead_letters",
            "Tasks and records written to a dead-letter topic.",
            ["authority", "queue"],
            registry=registry,
        )
        self._broker_up = Gauge(
            "taskqueue_broker_up",
            "1 when the latest broker probe succeeded, else 0.",
            registry=registry,
        )
        self._worker = _WorkerCollector()
        registry.register(self._worker)
        # Read when scraped: a gauge's inc() and dec() take a lock each call.
        self._calls_now = 0
        self._in_flight.set_function(lambda: self._calls_now)
        self._added_child = _Children(self._added)
        self._calls_child = _Children(self._calls)
        self._call_seconds_child = _Children(self._call_seconds)
        self._lateness_child = _Children(self._lateness)

    def added(self, queue: str, outcome: str) -> None:
        self._added_child(queue, outcome).inc()

    async def timed_call(
        self,
        calling: Awaitable[Failure | None],
        authority: str,
        method: str,
        *,
        tier: str,
        late_s: float,
    ) -> Failure | None:
        """Await ``calling`` (one call to a target) and count it."""
        self._lateness_child(tier).observe(max(0.0, late_s))
        started = time.monotonic()
        self._calls_now += 1
        try:
            failure = await calling
        finally:
            self._calls_now -= 1
        self._call_seconds_child(authority).observe(time.monotonic() - started)
        code = OK if failure is None else failure.status.name
        self._calls_child(authority, method, code).inc()
        return failure

    def retried(self, tier: str) -> None:
        self._retries.labels(tier).inc()

    def dead_lettered(self, authority: str, queue: str) -> None:
        self._dead_letters.labels(authority, queue).inc()

    def broker_up(self, up: bool) -> None:
        self._broker_up.set(1 if up else 0)

    def worker_state(self, state: WorkerState) -> None:
        self._worker.state = state


class _QuietHandler(WSGIRequestHandler):
    """Scrapes every few seconds would drown the process's own log lines."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _app(registry: CollectorRegistry, health: HealthCheck) -> Any:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        if environ.get("PATH_INFO") != "/healthz":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        healthy, detail = health()
        body = json.dumps({"healthy": healthy, "detail": detail}).encode()
        status = "200 OK" if healthy else "503 Service Unavailable"
        start_response(status, [("Content-Type", "application/json")])
        return iter([body])

    return app


class _IPv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP, answered from a thread of its own.

    A thread rather than the event loop, so that a scrape still answers (and
    ``/healthz`` can say the loop is stuck) while the loop is busy.
    """

    def __init__(
        self, config: MetricsConfig, registry: CollectorRegistry, health: HealthCheck
    ) -> None:
        self._config = config
        self._app = _app(registry, health)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and serve; the bound port."""
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        host, port = self._config.host, self._config.port or 0
        self._server = make_server(
            host,
            port,
            self._app,
            server_class=_IPv6Server if ":" in host else ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics", daemon=True
        )
        self._thread.start()
        bound = int(self._server.server_address[1])
        log.info("metrics and health served on http://%s:%d", self._config.host, bound)
        return bound

    def stop(self) -> None:
        """Stop serving (blocks until the serving thread has returned)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None

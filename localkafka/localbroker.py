"""Start and stop a local single-node Apache Kafka broker without Docker.

The broker's jars come from Maven Central through ``pom.xml`` beside this file
(``mvn dependency:copy-dependencies``, cached in ``~/.m2``); the broker itself
runs as a plain ``java kafka.Kafka server.properties`` child process in KRaft
mode, as one combined broker+controller node bound to 127.0.0.1 only.

Library use (tests, fixtures)::

    with LocalBroker(port=0, data_dir=tmp_path) as broker:
        use(broker.bootstrap)  # "127.0.0.1:PORT"

Command line (the README demo, CI)::

    python localkafka/localbroker.py start --port 9092 --data-dir .kafka-data
    python localkafka/localbroker.py stop --data-dir .kafka-data
    python localkafka/localbroker.py jars

Only the standard library is used, so the script runs before any project
dependency is installed. Needs Java 17+ (``JAVA_HOME`` or ``java`` on PATH)
and, the first time, Maven (``mvn``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Final, Self

__all__ = [
    "CLUSTER_ID",
    "DEFAULT_JARS_DIR",
    "BrokerStartError",
    "LocalBroker",
    "LocalBrokerError",
    "ToolNotFoundError",
    "main",
    "resolve_jars",
    "stop_from_pid_file",
]

HERE: Final = Path(__file__).resolve().parent
POM_FILE: Final = HERE / "pom.xml"
DEFAULT_JARS_DIR: Final = HERE / ".jars"
# Written into the jars dir after a successful copy; holds the pom's hash and
# the jar names, so a changed pom or a deleted jar triggers a fresh copy.
JARS_MARKER: Final = ".complete"
# Any fixed 16-byte id, base64url without padding (22 chars), will do.
CLUSTER_ID: Final = "dGFza3F1ZXVlLWxvY2FsIQ"
HOST: Final = "127.0.0.1"
READY_LINE: Final = "Kafka Server started"

SERVER_PROPERTIES: Final = "server.properties"
LOG4J_PROPERTIES: Final = "log4j2.properties"
PID_FILE: Final = "broker.pid"
DEFAULT_LOG_FILE: Final = "broker.log"
LOG_DIRS: Final = "kafka-logs"

JVM_FLAGS: Final = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
)

# Kafka logs through log4j2 to stdout, which the launcher sends to the log
# file (so JVM errors land there too). WARN and up, plus the few INFO lines
# that tell what happened: the version and "Kafka Server started".
LOG4J_CONFIG: Final = """\
status = warn
name = localbroker
shutdownHook = disable
appender.out.type = Console
appender.out.name = OUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.raft.name = kafka.server.KafkaRaftServer
logger.raft.level = INFO
logger.appinfo.name = org.apache.kafka.common.utils.AppInfoParser
logger.appinfo.level = INFO
"""


class LocalBrokerError(RuntimeError):
    """The local broker could not be prepared, started or stopped."""


class ToolNotFoundError(LocalBrokerError):
    """``java`` or ``mvn`` is not installed."""


class BrokerStartError(LocalBrokerError):
    """The broker exited early or was not ready in time."""


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("java")
    if found is None:
        raise ToolNotFoundError(
            "java not found: install a Java 17+ runtime (e.g. "
            "`apt-get install openjdk-17-jre-headless`) or set JAVA_HOME"
        )
    return found


def _mvn() -> str:
    found = shutil.which("mvn")
    if found is None:
        raise ToolNotFoundError(
            "mvn not found: Maven is needed once to fetch the Kafka jars "
            "(e.g. `apt-get install maven`)"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_free(port: int) -> bool:
    # SO_REUSEADDR as the JVM sets it, so TIME_WAIT leftovers don't count.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _log_summary(path: Path, start: int = 0, lines: int = 30) -> str:
    """The last ``lines`` lines of ``path`` from byte ``start``, without the
    stack frames of Java tracebacks (their messages and causes are kept)."""
    try:
        with path.open("rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    kept = [
        line
        for line in data.decode("utf-8", "replace").splitlines()
        if line.strip() and not line.startswith(("\tat ", "\t..."))
    ]
    return "\n".join(kept[-lines:])


def _pom_digest() -> str:
    return hashlib.sha256(POM_FILE.read_bytes()).hexdigest()


def _jars_complete(jars_dir: Path, digest: str) -> bool:
    try:
        lines = (jars_dir / JARS_MARKER).read_text().splitlines()
    except OSError:
        return False
    if not lines or lines[0] != digest or len(lines) < 2:
        return False
    return all((jars_dir / name).is_file() for name in lines[1:])


def _copy_dependencies(mvn: str, out_dir: Path) -> None:
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(POM_FILE),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={out_dir}",
        "-DincludeScope=runtime",
    ]
    try:
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=900
        )
    except subprocess.TimeoutExpired as exc:
        raise LocalBrokerError("mvn dependency:copy-dependencies timed out") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        tail = "\n".join(output.strip().splitlines()[-30:])
        raise LocalBrokerError(
            f"mvn dependency:copy-dependencies failed (exit {result.returncode}):"
            f"\n{tail}"
        )


def _swap_in(tmp: Path, jars_dir: Path, digest: str) -> None:
    if jars_dir.exists():
        if _jars_complete(jars_dir, digest):
            return  # another process finished first
        shutil.rmtree(jars_dir)
    try:
        tmp.rename(jars_dir)
    except OSError:
        if not _jars_complete(jars_dir, digest):
            raise


def resolve_jars(jars_dir: Path = DEFAULT_JARS_DIR) -> Path:
    """Copy the broker's jars into ``jars_dir`` unless they are already there.

    Runs ``mvn dependency:copy-dependencies`` on ``pom.xml`` (beside this
    file) into a temporary directory beside ``jars_dir`` and swaps it in with
    a marker file, so a failed or concurrent run never leaves a half-filled or
    mixed-version classpath. A changed ``pom.xml`` or a missing jar makes the
    next call copy afresh. Returns ``jars_dir``.
    """
    jars_dir = Path(jars_dir).resolve()
    digest = _pom_digest()
    if _jars_complete(jars_dir, digest):
        return jars_dir
    mvn = _mvn()
    jars_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".jars-tmp-", dir=jars_dir.parent))
    try:
        _copy_dependencies(mvn, tmp)
        names = sorted(p.name for p in tmp.glob("*.jar"))
        if not any(n.startswith("kafka_2.13-") for n in names):
            raise LocalBrokerError(f"mvn copied no kafka_2.13 jar into {tmp}")
        (tmp / JARS_MARKER).write_text("\n".join([digest, *names]) + "\n")
        _swap_in(tmp, jars_dir, digest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return jars_dir


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie awaiting its parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_our_broker(pid: int, data_dir: Path) -> bool:
    """True if ``pid`` is a live ``kafka.Kafka`` using ``data_dir``'s config."""
    if not _pid_alive(pid):
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid file
    args = raw.decode("utf-8", "replace").split("\0")
    config = str(data_dir.resolve() / SERVER_PROPERTIES)
    return "kafka.Kafka" in args and config in args


def _read_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate_pid(pid: int, timeout_s: float) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL it."""
    _signal_group(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout_s):
        _signal_group(pid, signal.SIGKILL)
        _wait_gone(pid, 5.0)


def _stop_at_exit(proc: subprocess.Popen[bytes]) -> None:
    # Safety net for a LocalBroker garbage-collected or left running at
    # interpreter exit without stop(): never leave an orphan JVM behind.
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()


def stop_from_pid_file(data_dir: Path, timeout_s: float = 15.0) -> bool:
    """Stop the broker whose pid file is in ``data_dir``.

    Returns True if a running broker was stopped, False if none was running
    (a stale pid file is removed). SIGTERM first, SIGKILL after ``timeout_s``.
    """
    pid = _read_pid(data_dir)
    if pid is None:
        return False
    stopped = False
    if _is_our_broker(pid, data_dir):
        _terminate_pid(pid, timeout_s)
        stopped = True
    (data_dir / PID_FILE).unlink(missing_ok=True)
    return stopped


class LocalBroker:
    """A single-node KRaft Kafka broker on 127.0.0.1, run as a child JVM.

    ``port=0`` (or ``controller_port=0``) picks a free loopback port; the
    controller port defaults to ``port + 1`` (a free one when ``port=0``).
    Picked ports are known from construction on (``bootstrap``) and kept
    across stop/start, unless taken by someone else when ``start()`` runs.
    ``data_dir`` holds the generated configs, the pid file, the log file
    (unless ``log_file`` is given) and the partition data (``kafka-logs/``),
    which survives a stop and a restart. A broker still running when its
    LocalBroker is garbage-collected or the interpreter exits is stopped,
    unless ``detach()`` was called.
    """

    def __init__(
        self,
        *,
        port: int = 9092,
        controller_port: int | None = None,
        data_dir: Path,
        jars_dir: Path | None = None,
        log_file: Path | None = None,
    ) -> None:
        if controller_port is None:
            controller_port = 0 if port == 0 else port + 1
        # Ports asked as 0 are picked now and picked again by start() if taken.
        self._auto_port = port == 0
        self._auto_controller_port = controller_port == 0
        self._port = port
        self._controller_port = controller_port
        self._pick_ports()
        self._data_dir = Path(data_dir).resolve()
        self._jars_dir = Path(jars_dir or DEFAULT_JARS_DIR).resolve()
        self._log_file = Path(log_file or self._data_dir / DEFAULT_LOG_FILE).resolve()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._finalizer: (
            weakref.finalize[[subprocess.Popen[bytes]], LocalBroker] | None
        ) = None

    def _pick_ports(self) -> None:
        if self._auto_port:
            self._port = _free_port()
        if self._auto_controller_port:
            self._controller_port = _free_port()
            while self._controller_port == self._port:
                self._controller_port = _free_port()

    def _check_ports(self) -> None:
        for _ in range(5):
            busy = [p for p in (self._port, self._controller_port) if not _port_free(p)]
            if not busy:
                return
            if not (self._auto_port or self._auto_controller_port):
                break
            self._pick_ports()
        raise BrokerStartError(f"port {HOST}:{busy[0]} is already in use")

    # -- read-only facts ---------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def controller_port(self) -> int:
        return self._controller_port

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap_servers`` string for clients: ``127.0.0.1:PORT``."""
        return f"{HOST}:{self._port}"

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def jars_dir(self) -> Path:
        return self._jars_dir

    @property
    def log_file(self) -> Path:
        return self._log_file

    @property
    def pid(self) -> int | None:
        """The JVM's pid (also its process group id) while it runs."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- jars ----------------------------------------------------------------

    def resolve_jars(self) -> Path:
        """Make sure ``jars_dir`` holds the broker's jars; see ``resolve_jars``."""
        return resolve_jars(self._jars_dir)

    # -- configs -----------------------------------------------------------

    def server_properties(self) -> dict[str, str]:
        """The broker's configuration, as written to ``server.properties``."""
        port, cport = self._port, self._controller_port
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{cport}",
            "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": (
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
            ),
            "log.dirs": str(self._data_dir / LOG_DIRS),
            "num.partitions": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
        }

    def _write_configs(self) -> Path:
        self._data_dir.mkdir(parents=True, exist_ok=True)
        (self._data_dir / LOG_DIRS).mkdir(exist_ok=True)
        config = self._data_dir / SERVER_PROPERTIES
        lines = [f"{key}={value}" for key, value in self.server_properties().items()]
        header = "# Written by localkafka/localbroker.py; rewritten on every start.\n"
        config.write_text(header + "\n".join(lines) + "\n")
        (self._data_dir / LOG4J_PROPERTIES).write_text(LOG4J_CONFIG)
        return config

    def _java_cmd(self, java: str, main_class: str, *args: str) -> list[str]:
        return [
            java,
            *JVM_FLAGS,
            f"-Dkafka.logs.dir={self._log_file.parent}",
            f"-Dlog4j2.configurationFile={self._data_dir / LOG4J_PROPERTIES}",
            "-cp",
            str(self._jars_dir / "*"),
            main_class,
            *args,
        ]

    def _format_storage(self, java: str, config: Path) -> None:
        cmd = self._java_cmd(
            java,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            CLUSTER_ID,
            "-c",
            str(config),
            "-g",
        )
        result = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode("utf-8", "replace")
            hint = ""
            if "UnsupportedClassVersionError" in output:
                hint = "\nKafka 4.x needs Java 17 or newer."
            raise BrokerStartError(
                f"formatting {self._data_dir / LOG_DIRS} failed "
                f"(exit {result.returncode}):\n{output.strip()}{hint}"
            )

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the broker and return once it accepts clients.

        Fetches the jars first if needed (not counted in ``timeout_s``), then
        writes the configs, formats the storage (a no-op once formatted) and
        starts the JVM. Ready means the log says "Kafka Server started" and
        the port accepts connections. Raises BrokerStartError (with the last
        log lines) if the JVM exits early or is not ready within
        ``timeout_s``; the JVM is stopped then. A no-op if already running.
        """
        if self.running:
            return
        java = _java()
        self.resolve_jars()
        deadline = time.monotonic() + timeout_s
        other = _read_pid(self._data_dir)
        if other is not None and _is_our_broker(other, self._data_dir):
            raise BrokerStartError(
                f"a broker already runs from {self._data_dir} (pid {other}); "
                "stop it first"
            )
        self._check_ports()
        self._format_storage(java, self._write_configs())
        for attempt in range(1, 4):
            self._spawn(java, self._write_configs())
            try:
                self._wait_ready(deadline, timeout_s)
                return
            except BrokerStartError as exc:
                self.stop()
                # A port picked for port=0 can be taken before the JVM binds
                # it (e.g. by another process's client socket): pick again.
                auto = self._auto_port or self._auto_controller_port
                if not auto or attempt == 3 or "Address already in use" not in str(exc):
                    raise
                self._pick_ports()
                self._check_ports()
            except BaseException:
                self.stop()
                raise

    def _spawn(self, java: str, config: Path) -> None:
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        with self._log_file.open("ab") as log:
            self._log_offset = log.tell()
            self._proc = subprocess.Popen(
                self._java_cmd(java, "kafka.Kafka", str(config)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                start_new_session=True,  # own process group, no terminal signals
            )
        self._finalizer = weakref.finalize(self, _stop_at_exit, self._proc)
        (self._data_dir / PID_FILE).write_text(f"{self._proc.pid}\n")

    def _wait_ready(self, deadline: float, timeout_s: float) -> None:
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BrokerStartError(
                    f"Kafka broker exited early with code {code}; last log lines "
                    f"({self._log_file}):\n{self._recent_log()}"
                )
            if self._logged_ready() and _port_open(self._port):
                return
            if time.monotonic() >= deadline:
                raise BrokerStartError(
                    f"Kafka broker not ready on {self.bootstrap} after {timeout_s:g}"
                    f" s; last log lines ({self._log_file}):\n{self._recent_log()}"
                )
            time.sleep(0.1)

    def _logged_ready(self) -> bool:
        try:
            with self._log_file.open("rb") as f:
                f.seek(self._log_offset)
                return READY_LINE.encode() in f.read()
        except OSError:
            return False

    def _recent_log(self) -> str:
        return _log_summary(self._log_file, self._log_offset) or "(no output)"

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL the process group. Idempotent."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        if _read_pid(self._data_dir) == proc.pid:
            (self._data_dir / PID_FILE).unlink(missing_ok=True)

    def detach(self) -> int:
        """Leave the running broker behind: no stop on exit. Returns its pid.

        Afterwards stop it with ``stop_from_pid_file(data_dir)`` or the
        ``stop`` command.
        """
        if self._proc is None or not self.running:
            raise LocalBrokerError("the broker is not running")
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        proc, self._proc = self._proc, None
        pid = proc.pid
        with warnings.catch_warnings():
            # Popen warns when dropped while its child runs: intended here.
            warnings.simplefilter("ignore", ResourceWarning)
            del proc
        return pid

    def wait(self) -> int:
        """Block until the broker's JVM exits; returns its exit code."""
        if self._proc is None:
            raise LocalBrokerError("the broker was not started")
        return self._proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"LocalBroker({self.bootstrap}, {self._data_dir}, {state})"


# -- command line --------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="localbroker.py",
        description="Run a local single-node Apache Kafka broker (KRaft) on "
        "127.0.0.1 from Maven Central jars, without Docker.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a broker (detached by default)")
    start.add_argument("--port", type=int, default=9092, help="0 picks a free one")
    start.add_argument("--controller-port", type=int, default=None)
    start.add_argument("--data-dir", type=Path, default=Path(".kafka-data"))
    start.add_argument("--jars-dir", type=Path, default=None)
    start.add_argument("--log-file", type=Path, default=None)
    start.add_argument("--timeout", type=float, default=60.0)
    start.add_argument(
        "--foreground",
        action="store_true",
        help="stay attached and stop the broker on Ctrl-C/SIGTERM",
    )
    stop = sub.add_parser("stop", help="stop the broker of a data dir")
    stop.add_argument("--data-dir", type=Path, default=Path(".kafka-data"))
    stop.add_argument("--timeout", type=float, default=15.0)
    jars = sub.add_parser("jars", help="only fetch the broker's jars")
    jars.add_argument("--jars-dir", type=Path, default=None)
    return parser.parse_args(argv)


def _run_foreground(broker: LocalBroker) -> int:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        code = broker.wait()
    except KeyboardInterrupt:
        print("stopping Kafka broker", file=sys.stderr)
        broker.stop()
        return 0
    broker.stop()
    if code in (0, 128 + signal.SIGTERM, -signal.SIGTERM):  # e.g. the stop command
        print("Kafka broker stopped", file=sys.stderr)
        return 0
    print(f"Kafka broker exited with code {code}", file=sys.stderr)
    return 1


def _cmd_start(args: argparse.Namespace) -> int:
    broker = LocalBroker(
        port=args.port,
        controller_port=args.controller_port,
        data_dir=args.data_dir,
        jars_dir=args.jars_dir,
        log_file=args.log_file,
    )
    t0 = time.monotonic()
    broker.start(timeout_s=args.timeout)
    print(
        f"Kafka broker ready in {time.monotonic() - t0:.1f} s (pid {broker.pid}, "
        f"log {broker.log_file})",
        file=sys.stderr,
    )
    print(broker.bootstrap, flush=True)
    if args.foreground:
        return _run_foreground(broker)
    broker.detach()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = _parse_args(argv)
    try:
        if args.command == "start":
            return _cmd_start(args)
        if args.command == "stop":
            if stop_from_pid_file(args.data_dir, args.timeout):
                print("Kafka broker stopped", file=sys.stderr)
            else:
                print(f"no Kafka broker running from {args.data_dir}", file=sys.stderr)
            return 0
        print(resolve_jars(args.jars_dir or DEFAULT_JARS_DIR))
        return 0
    except LocalBrokerError as exc:
        print(f"localbroker: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

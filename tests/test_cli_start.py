"""Processes that cannot start say why in one line and exit with a code."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Port 1 on loopback: nothing listens there, so every connect is refused.
NO_BROKER = """
dev:
  kafka: {bootstrap_servers: "127.0.0.1:1", request_timeout_s: 2}
  rpc: {port: 0}
"""


def run_cli(*args: str) -> "subprocess.CompletedProcess[str]":
    """``python -m taskqueue.server ARGS`` from the repository, bounded."""
    return subprocess.run(
        [sys.executable, "-m", "taskqueue.server", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "command", [["rpc"], ["worker"], ["worker", "--tier", "retry"]]
)
def test_unreachable_broker_is_one_line_and_exit_1(
    tmp_path: Path, command: list[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(NO_BROKER)

    done = run_cli(*command, "-c", f"{config}@dev")

    assert done.returncode == 1
    assert "taskqueue: Kafka at 127.0.0.1:1 failed" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Unclosed" not in done.stderr


def test_unknown_config_key_is_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("dev:\n  kafka: {bootstrap_server: x}\n")

    done = run_cli("rpc", "-c", f"{config}@dev")

    assert done.returncode == 2
    assert "bootstrap_server" in done.stderr
    assert f"{config}@dev" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_taken_port_is_one_line_and_exit_1(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(
            f"dev:\n  kafka: {{bootstrap_servers: '{kafka_bootstrap}'}}\n"
            f"  rpc: {{port: {port}}}\n"
        )

        done = run_cli("rpc", "-c", f"{config}@dev")

    assert done.returncode == 1
    assert "address already in use" in done.stderr
    assert "Traceback" not in done.stderr

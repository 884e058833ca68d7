"""Shared fixtures: a real Kafka broker, configs, targets, running services.

The broker comes from, in order: ``TASKQUEUE_TEST_KAFKA`` (host:port of a
broker someone else runs), a testcontainers Kafka when a Docker engine answers,
otherwise a local broker started from Maven Central jars (localkafka/).
"""

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskqueue.server import config as config_module
from taskqueue.server.config import Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "localkafka"))
sys.path.insert(0, str(ROOT / "examples" / "cafe"))  # cafe_pb2 for the tests

from localbroker import LocalBroker


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=2).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    external = os.environ.get("TASKQUEUE_TEST_KAFKA")
    if external:
        yield external
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
        return
    data_dir = Path(tempfile.mkdtemp(prefix="taskqueue-kafka-"))
    try:
        with LocalBroker(port=0, data_dir=data_dir) as broker:
            yield broker.bootstrap
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def make_config(bootstrap: str, **sections: object) -> Config:
    """A config of its own topic namespace, so tests never see each other."""
    data: dict[str, object] = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "partitions": 2,
            "metadata_max_age_s": 0.5,
        },
        "topics": {"prefix": f"t{uuid.uuid4().hex[:10]}"},
        "rpc": {"host": "127.0.0.1", "port": 0, "add_timeout_s": 5},
        "worker": {
            "group_prefix": f"g{uuid.uuid4().hex[:10]}",
            "shutdown_grace_s": 5,
            "commit_interval_s": 0.05,
        },
        "allow": ["127.0.0.1:*", "[::1]:*"],
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}  # type: ignore[dict-item]
        else:
            data[key] = value
    return config_module.from_dict(data)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of the test's own, for tests that stop and start it."""
    broker = LocalBroker(port=0, data_dir=tmp_path / "kafka")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def config(kafka_bootstrap: str) -> Config:
    return make_config(kafka_bootstrap)

"""Configuration: named sections, and refusals that name the key and the file."""

import re
from pathlib import Path

import pytest

from taskqueue.server.config import Config, from_dict, load
from taskqueue.server.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
REPO_CONFIG = ROOT / "config.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def refusal(path: Path, section: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load(f"{path}@{section}")
    message = str(raised.value)
    assert f"{path}@{section}" in message
    return message


def test_repository_config_dev() -> None:
    config = load(f"{REPO_CONFIG}@dev")

    assert config.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert (config.rpc.host, config.rpc.port) == ("127.0.0.1", 50051)
    assert config.allow == ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    assert config.worker == Config().worker


def test_repository_config_prod() -> None:
    config = load(f"{REPO_CONFIG}@prod")

    assert config.kafka.bootstrap_servers == "kafka-1:9092,kafka-2:9092,kafka-3:9092"
    assert (config.kafka.partitions, config.kafka.replication_factor) == (12, 3)
    assert config.rpc.host == "0.0.0.0"
    assert config.worker.concurrency == 200
    assert config.queue_defaults.retry.max_attempts == 12
    assert config.queue_defaults.retry.backoff_s == [5.0, 60.0, 600.0, 3600.0]
    assert config.queue("any-queue") is config.queue_defaults
    assert config.allow == ["*.svc.cluster.local:50051"]


def test_section_defaults_to_dev(tmp_path: Path) -> None:
    path = write(tmp_path, "dev:\n  rpc:\n    port: 7000\nprod:\n  rpc:\n    port: 1\n")

    assert load(str(path)).rpc.port == 7000
    assert load(f"{path}@").rpc.port == 7000


def test_an_empty_section_is_all_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "dev:\n")

    assert load(f"{path}@dev") == Config()


@pytest.mark.parametrize(
    ("yaml", "key"),
    [
        ("kafak:\n    partitions: 3\n", "kafak"),
        ("kafka:\n    bootstrap_server: x:9092\n", "bootstrap_server"),
        ("queues:\n    orders:\n      retry:\n        max_attempt: 3\n", "max_attempt"),
        ("worker:\n    concurency: 3\n", "concurency"),
    ],
)
def test_an_unknown_key_is_named(tmp_path: Path, yaml: str, key: str) -> None:
    indented = "".join(f"  {line}\n" for line in yaml.splitlines())
    path = write(tmp_path, f"staging:\n{indented}")

    assert f"`{key}`" in refusal(path, "staging")


@pytest.mark.parametrize(
    ("yaml", "key"),
    [
        ("kafka:\n    partitions: many\n", "$.kafka.partitions"),
        ("kafka:\n    partitions: 0\n", "$.kafka.partitions"),
        ("rpc:\n    port: 70000\n", "$.rpc.port"),
        ("worker:\n    commit_interval_s: -1\n", "$.worker.commit_interval_s"),
        ("allow: cafe:50051\n", "$.allow"),
        ("queues:\n    orders:\n      deadline_s: soon\n", "$.queues[...].deadline_s"),
        ("kafka: 3\n", "$.kafka"),
    ],
)
def test_a_mistyped_value_is_named(tmp_path: Path, yaml: str, key: str) -> None:
    indented = "".join(f"  {line}\n" for line in yaml.splitlines())
    path = write(tmp_path, f"staging:\n{indented}")

    assert key in refusal(path, "staging")


@pytest.mark.parametrize("tier", ["5w", "0s", "1.5h", "m", "100000d"])
def test_bad_tier_names_are_refused(tmp_path: Path, tier: str) -> None:
    path = write(tmp_path, f"dev:\n  topics:\n    tiers: [5s, '{tier}', 1h]\n")

    assert repr(tier) in refusal(path, "dev")


def test_a_ladder_without_tiers_is_refused(tmp_path: Path) -> None:
    # Every retry and scheduled task would then wait in worker memory.
    path = write(tmp_path, "dev:\n  topics:\n    tiers: []\n")

    assert "$.topics.tiers" in refusal(path, "dev")


@pytest.mark.parametrize("name", ["UNAVAILABL", "unavailable", "OK2"])
def test_unknown_retryable_status_names_are_refused(tmp_path: Path, name: str) -> None:
    path = write(
        tmp_path,
        f"dev:\n  queues:\n    orders:\n      retry:\n        retryable: [{name}]\n",
    )

    assert repr(name) in refusal(path, "dev")


def test_an_empty_backoff_list_is_refused() -> None:
    with pytest.raises(ConfigError, match="backoff_s"):
        from_dict({"queue_defaults": {"retry": {"backoff_s": []}}})


def test_a_missing_section_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "dev:\n  rpc:\n    port: 1\n")

    with pytest.raises(ConfigError) as raised:
        load(f"{path}@prod")

    assert str(raised.value) == f"{path} has no section 'prod' (it has: dev)"


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*nowhere\.yaml"):
        load(f"{tmp_path / 'nowhere.yaml'}@dev")


@pytest.mark.parametrize("text", ["dev: [unclosed\n", "- just\n- a list\n", "7\n"])
def test_a_file_that_is_not_sections_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)

    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load(f"{path}@dev")


@pytest.mark.parametrize("deadline_s", [300, 301, 1000])
def test_a_deadline_not_below_the_poll_interval_is_refused(deadline_s: int) -> None:
    # C01: a call longer than max.poll.interval.ms gets the worker thrown out.
    data = {
        "worker": {"max_poll_interval_s": 300},
        "queue_defaults": {"deadline_s": deadline_s},
    }

    with pytest.raises(ConfigError, match="max_poll_interval_s"):
        from_dict(data, origin="config.yaml@prod")


def test_a_queue_deadline_not_below_the_poll_interval_is_refused() -> None:
    data = {
        "worker": {"max_poll_interval_s": 60},
        "queues": {"fast": {"deadline_s": 5}, "slow": {"deadline_s": 60}},
    }

    with pytest.raises(ConfigError, match=r"^config.yaml@prod: .*deadline_s"):
        from_dict(data, origin="config.yaml@prod")


def test_a_deadline_below_the_poll_interval_is_accepted() -> None:
    data = {
        "worker": {"max_poll_interval_s": 300},
        "queue_defaults": {"deadline_s": 299.5},
        "queues": {"slow": {"deadline_s": 299}},
    }

    config = from_dict(data)

    assert config.queue("slow").deadline_s == 299
    assert config.queue("other").deadline_s == 299.5


def test_max_pending_below_concurrency_is_refused() -> None:
    data = {"worker": {"concurrency": 10, "max_pending": 9}}

    with pytest.raises(ConfigError, match="max_pending"):
        from_dict(data, origin="x.yaml@dev")


def test_the_config_is_immutable() -> None:
    config = from_dict({})

    with pytest.raises(AttributeError):
        config.rpc.port = 1  # type: ignore[misc]

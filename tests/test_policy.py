"""Retry decisions: classification, attempts, backoff, RetryInfo, max age."""

import math
from datetime import timedelta

import pytest
from google.protobuf.duration_pb2 import Duration
from grpclib.const import Status
from hypothesis import given
from hypothesis import strategies as st

from taskqueue.protobuf.service_pb2 import RetryPolicy, Task
from taskqueue.server.config import QueueConfig, RetryConfig, from_dict
from taskqueue.server.errors import InvalidTask
from taskqueue.server.policy import Failure, GiveUp, Policy, Retry
from taskqueue.server.validation import MAX_DELAY_S, check_retry

DEFAULTS = QueueConfig()
UNAVAILABLE = Failure(Status.UNAVAILABLE, "connection refused")
RETRIED = {
    Status.UNAVAILABLE,
    Status.DEADLINE_EXCEEDED,
    Status.RESOURCE_EXHAUSTED,
    Status.ABORTED,
    Status.INTERNAL,
    Status.UNKNOWN,
    Status.CANCELLED,
}


def seconds(value: float) -> Duration:
    duration = Duration()
    duration.FromTimedelta(timedelta(seconds=value))
    return duration


def task_with(**retry: object) -> Task:
    task = Task(authority="cafe:50051", method="/coffeemachine.CoffeeMachine/x")
    if retry:
        task.retry.CopyFrom(RetryPolicy(**retry))  # type: ignore[arg-type]
    return task


def queue_with(**retry: object) -> QueueConfig:
    return from_dict({"queue_defaults": {"retry": retry}}).queue_defaults


def delays(policy: Policy, attempts: int) -> list[float]:
    """The delay chosen after each failed attempt 1..attempts."""
    chosen = []
    for attempt in range(1, attempts + 1):
        decision = policy.decide(UNAVAILABLE, attempt, age_s=0.0)
        assert isinstance(decision, Retry), decision
        chosen.append(decision.delay_s)
    return chosen


@pytest.mark.parametrize("status", list(Status), ids=lambda s: s.name)
def test_classification_by_status(status: Status) -> None:
    policy = Policy.for_task(task_with(), DEFAULTS)

    decision = policy.decide(Failure(status, "boom"), attempt=1, age_s=0.0)

    if status in RETRIED:
        assert decision == Retry(5.0)
    else:
        assert isinstance(decision, GiveUp)
        assert status.name in decision.reason


@pytest.mark.parametrize(
    "status", [Status.INVALID_ARGUMENT, Status.NOT_FOUND, Status.UNIMPLEMENTED]
)
def test_caller_errors_are_given_up_after_one_attempt(status: Status) -> None:
    policy = Policy.for_task(task_with(max_attempts=50), DEFAULTS)

    decision = policy.decide(Failure(status, "no"), attempt=1, age_s=0.0)

    assert decision == GiveUp(f"{status.name} is not retried")


def test_retried_statuses_are_configurable() -> None:
    policy = Policy.for_task(task_with(), queue_with(retryable=["NOT_FOUND"]))

    assert policy.decide(Failure(Status.NOT_FOUND, ""), 1, 0.0) == Retry(5.0)
    assert isinstance(policy.decide(UNAVAILABLE, 1, 0.0), GiveUp)


def test_max_attempts_of_the_queue() -> None:
    policy = Policy.for_task(task_with(), DEFAULTS)

    assert isinstance(policy.decide(UNAVAILABLE, 9, 0.0), Retry)
    assert policy.decide(UNAVAILABLE, 10, 0.0) == GiveUp("gave up after 10 attempts")


def test_max_attempts_of_the_task_overrides_the_queue() -> None:
    policy = Policy.for_task(task_with(max_attempts=3), DEFAULTS)

    assert isinstance(policy.decide(UNAVAILABLE, 2, 0.0), Retry)
    assert policy.decide(UNAVAILABLE, 3, 0.0) == GiveUp("gave up after 3 attempts")


def test_one_attempt_means_no_retry() -> None:
    policy = Policy.for_task(task_with(max_attempts=1), DEFAULTS)

    assert isinstance(policy.decide(UNAVAILABLE, 1, 0.0), GiveUp)


def test_backoff_list_of_the_queue_repeats_its_last_delay() -> None:
    policy = Policy.for_task(task_with(), DEFAULTS)

    assert delays(policy, 5) == [5.0, 60.0, 60.0, 60.0, 60.0]


def test_backoff_list_of_the_task_overrides_the_queue() -> None:
    task = task_with(backoff=[seconds(1), seconds(2.5), seconds(7)])
    policy = Policy.for_task(task, queue_with(backoff_s=[100.0]))

    assert delays(policy, 5) == [1.0, 2.5, 7.0, 7.0, 7.0]


def test_exponential_backoff_is_capped() -> None:
    task = task_with(
        initial_backoff=seconds(1), multiplier=3.0, max_backoff=seconds(20)
    )
    policy = Policy.for_task(task, DEFAULTS)

    assert delays(policy, 6) == [1.0, 3.0, 9.0, 20.0, 20.0, 20.0]


def test_exponential_backoff_doubles_when_no_multiplier_is_set() -> None:
    task = task_with(initial_backoff=seconds(0.5))
    check_retry(task)
    policy = Policy.for_task(task, DEFAULTS)

    assert delays(policy, 4) == [0.5, 1.0, 2.0, 4.0]


def test_an_explicit_backoff_list_wins_over_exponential() -> None:
    task = task_with(backoff=[seconds(3)], initial_backoff=seconds(1))

    assert delays(Policy.for_task(task, DEFAULTS), 3) == [3.0, 3.0, 3.0]


@given(
    st.floats(min_value=1.0, max_value=1e300),
    st.floats(min_value=0.001, max_value=1e6),
    st.integers(min_value=1, max_value=999),
)
def test_exponential_backoff_never_overflows(
    multiplier: float, initial_s: float, attempt: int
) -> None:
    # check_retry lets any multiplier >= 1 through; the worker must not crash.
    task = task_with(
        initial_backoff=seconds(initial_s), multiplier=multiplier, max_attempts=1000
    )
    check_retry(task)
    policy = Policy.for_task(task, DEFAULTS)

    delay_s = policy.backoff(attempt)

    assert math.isfinite(delay_s)
    assert 0 < delay_s <= MAX_DELAY_S


@pytest.mark.parametrize("multiplier", [math.nan, 0.5, -2.0])
def test_a_multiplier_below_one_is_refused(multiplier: float) -> None:
    task = task_with(initial_backoff=seconds(1), multiplier=multiplier)

    with pytest.raises(InvalidTask, match="multiplier"):
        check_retry(task)


def test_retry_info_delay_is_honoured() -> None:
    policy = Policy.for_task(task_with(), DEFAULTS)
    failure = Failure(Status.RESOURCE_EXHAUSTED, "slow down", retry_after_s=42.5)

    assert policy.decide(failure, attempt=1, age_s=0.0) == Retry(42.5)
    assert policy.decide(failure, attempt=7, age_s=0.0) == Retry(42.5)


def test_retry_info_does_not_make_a_caller_error_retried() -> None:
    policy = Policy.for_task(task_with(), DEFAULTS)
    failure = Failure(Status.INVALID_ARGUMENT, "bad", retry_after_s=1.0)

    assert isinstance(policy.decide(failure, 1, 0.0), GiveUp)


def test_max_age_of_the_queue() -> None:
    policy = Policy.for_task(task_with(), queue_with(max_age_s=100.0))

    assert policy.decide(UNAVAILABLE, 1, age_s=95.0) == Retry(5.0)
    decision = policy.decide(UNAVAILABLE, 1, age_s=95.5)
    assert isinstance(decision, GiveUp)
    assert "max_age 100s" in decision.reason


def test_max_age_counts_the_retry_info_delay() -> None:
    policy = Policy.for_task(task_with(), queue_with(max_age_s=100.0))
    failure = Failure(Status.UNAVAILABLE, "later", retry_after_s=200.0)

    assert isinstance(policy.decide(failure, 1, age_s=0.0), GiveUp)


def test_max_age_of_the_task_overrides_the_queue() -> None:
    task = task_with(max_age=seconds(10))
    policy = Policy.for_task(task, queue_with(max_age_s=1000.0))

    assert policy.decide(UNAVAILABLE, 1, age_s=5.0) == Retry(5.0)
    assert isinstance(policy.decide(UNAVAILABLE, 1, age_s=6.0), GiveUp)


def test_unset_task_fields_take_the_queue_defaults() -> None:
    queue = QueueConfig(
        retry=RetryConfig(max_attempts=4, backoff_s=[2.0, 8.0], max_age_s=500.0)
    )

    policy = Policy.for_task(task_with(multiplier=5.0), queue)

    assert policy.max_attempts == 4
    assert policy.backoff_s == (2.0, 8.0)
    assert policy.initial_backoff_s is None
    assert policy.max_age_s == 500.0
    assert delays(policy, 3) == [2.0, 8.0, 8.0]

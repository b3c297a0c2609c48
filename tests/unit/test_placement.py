"""Which CPU each attempt's qemu-img is kept on (h2kd.runner.placement)."""

from __future__ import annotations

from h2kd.runner.placement import choose_cpu


def test_attempts_started_one_after_another_go_to_each_cpu_before_any_gets_a_second_cpu_0_last() -> None:
    given: list[int | None] = []
    for _ in range(6):
        given.append(choose_cpu([0, 1, 2], given))
    assert given == [2, 1, 0, 2, 1, 0]


def test_a_cpu_freed_by_an_ended_attempt_is_the_next_one_given() -> None:
    assert choose_cpu([0, 1, 2], [0, 2, 1, 0, 2]) == 1
    assert choose_cpu([0, 1, 2], [2, 1, 2, 1]) == 0


def test_attempts_given_a_cpu_no_longer_counted_and_those_without_one_do_not_count() -> None:
    """A CPU taken offline since an attempt was given it (h2kd restarted meanwhile) is no reason to pass over
    the others."""
    assert choose_cpu([0, 1], [5, 5, None, 1]) == 0
    assert choose_cpu([0, 1], [None, None]) == 1
    assert choose_cpu([], [0]) is None

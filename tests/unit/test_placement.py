"""Which CPU each conversion is kept on (h2kd.runner.placement)."""

from __future__ import annotations

from h2kd.runner.placement import choose_cpu


def test_conversions_started_one_after_another_go_to_each_cpu_before_any_gets_a_second() -> None:
    given: list[int | None] = []
    for _ in range(6):
        given.append(choose_cpu([0, 1, 2], given))
    assert given == [0, 1, 2, 0, 1, 2]


def test_a_cpu_freed_by_an_ended_conversion_is_the_next_one_given() -> None:
    assert choose_cpu([0, 1, 2], [0, 2, 1, 0, 2]) == 1
    assert choose_cpu([0, 1, 2], [0, 1, 0, 1]) == 2


def test_only_cpus_h2kd_may_use_are_given() -> None:
    """An administrator's CPUAffinity= left h2kd CPUs 2 and 3: a conversion counted on a CPU it lost (given
    before the change, h2kd restarted since) is no reason to pass over the ones it has."""
    assert choose_cpu([2, 3], [0, 0, 1]) == 2
    assert choose_cpu([2, 3], [2, 0, 0]) == 3


def test_attempts_without_a_cpu_do_not_count_and_no_usable_cpu_gives_none() -> None:
    assert choose_cpu([0, 1], [None, None, 0]) == 1
    assert choose_cpu([], [0]) is None

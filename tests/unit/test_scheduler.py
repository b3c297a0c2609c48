"""Scheduler: priority then first-come order, the parallel limit, pause, priority changes, capability matching
that skips (never blocks on) jobs no worker can run, backoff, claims by external workers, and the reasons given."""

from __future__ import annotations

import time

import pytest

from h2kd.manager.ports import WorkerInfo
from h2kd.scheduler import Scheduler, worker_can_run

NOW = 1_800_000_000_000_000


def builtin(**caps) -> WorkerInfo:
    return WorkerInfo(id="builtin", name="host1", kind="builtin",
                      capabilities={"qemu_img": True, "loop": True, **caps})


def external(worker_id: str = "ext1", max_jobs: int = 0, **caps) -> WorkerInfo:
    return WorkerInfo(id=worker_id, name=worker_id, kind="external", capabilities=caps, max_jobs=max_jobs)


def queue(*jobs, max_parallel: int = 100) -> Scheduler:
    """jobs: (id, priority) or (id, priority, requirements)."""
    s = Scheduler(max_parallel)
    for seq, job in enumerate(jobs, start=1):
        job_id, priority, *rest = job
        s.add(job_id, priority, seq, "convert", rest[0] if rest else {})
    return s


def picked(s: Scheduler, running: int = 0, workers=None, now: int = NOW, running_by_owner=None) -> list[str]:
    return [job_id for job_id, _ in s.pick(running, [builtin()] if workers is None else workers, now,
                                           running_by_owner)]


def test_priority_first_then_first_come():
    s = queue(("a", 5), ("b", 1), ("c", 10), ("d", 5), ("e", 1), ("f", 3))
    assert s.ordered() == ["b", "e", "f", "a", "d", "c"]
    assert s.counts_by_priority() == [2, 0, 1, 0, 2, 0, 0, 0, 0, 1]
    assert len(s) == 6 and "a" in s and "z" not in s
    assert picked(s) == ["b", "e", "f", "a", "d", "c"]
    assert len(s) == 0 and s.counts_by_priority() == [0] * 10


def test_fifo_follows_queue_seq_not_insertion_order():
    s = Scheduler(10)
    s.add("late", 5, 30, "convert", {})
    s.add("early", 5, 10, "convert", {})   # e.g. put back after a restart with its old number
    s.add("middle", 5, 20, "convert", {})
    assert s.ordered() == ["early", "middle", "late"]


def test_max_parallel_limits_what_starts():
    s = queue(("a", 5), ("b", 5), ("c", 5), ("d", 5), max_parallel=2)
    assert picked(s, running=0) == ["a", "b"]
    assert picked(s, running=2) == []
    assert picked(s, running=1) == ["c"]
    s.max_parallel = 5
    assert s.max_parallel == 5
    assert picked(s, running=1) == ["d"]
    with pytest.raises(ValueError):
        s.max_parallel = -1


def test_worker_slots_are_respected():
    s = queue(("a", 5), ("b", 5), ("c", 5))
    worker = builtin()
    worker.max_jobs, worker.active_jobs = 2, 1
    assert picked(s, running=1, workers=[worker]) == ["a"]
    assert s.wait_reasons() == {"b": "waiting for a free slot on worker host1 (2 of 2 busy)",
                                "c": "waiting for a free slot on worker host1 (2 of 2 busy)"}


def test_pause_and_resume():
    s = queue(("a", 5), ("b", 2))
    s.pause()
    assert s.paused
    assert picked(s) == []
    assert s.wait_reasons() == {"a": "queue is paused", "b": "queue is paused"}
    assert s.claim_for(external(), NOW) is None
    s.resume()
    assert not s.paused
    assert picked(s) == ["b", "a"]


def test_set_priority_moves_a_job_keeping_its_place_by_seq():
    s = queue(("a", 5), ("b", 3), ("c", 5), ("d", 3))
    s.set_priority("c", 3)
    assert s.ordered() == ["b", "c", "d", "a"]      # c (seq 3) lands between b (seq 2) and d (seq 4)
    s.set_priority("c", 5)
    assert s.ordered() == ["b", "d", "a", "c"]
    s.set_priority("a", 1)
    assert s.ordered() == ["a", "b", "d", "c"]
    assert s.counts_by_priority()[:5] == [1, 0, 2, 0, 1]
    with pytest.raises(KeyError):
        s.set_priority("nope", 1)
    for bad in (0, 11, True, "1"):
        with pytest.raises(ValueError):
            s.set_priority("a", bad)


def test_add_and_remove():
    s = queue(("a", 5), ("b", 5), ("c", 5))
    with pytest.raises(ValueError):
        s.add("a", 5, 99, "convert", {})
    with pytest.raises(ValueError):
        s.add("z", 0, 99, "convert", {})
    assert s.remove("b") is True
    assert s.remove("b") is False
    assert s.ordered() == ["a", "c"] and "b" not in s


def test_the_oldest_entry_is_the_one_queued_longest_not_the_one_submitted_first():
    """What h2kd_queue_oldest_timestamp_seconds shows: a job submitted long ago but queued only now (held, or
    retried by hand) has not waited in the queue."""
    s = Scheduler(max_parallel=1)
    assert s.oldest_since() == 0
    s.add("retried-old-job", 5, 1, "convert", {}, since_usec=2_000)
    s.add("waiting", 5, 2, "convert", {}, since_usec=1_000)
    assert s.oldest_since() == 1_000
    s.remove("waiting")
    assert s.oldest_since() == 2_000
    s.set_priority("retried-old-job", 1)
    assert s.oldest_since() == 2_000
    s.remove("retried-old-job")
    assert s.oldest_since() == 0


def test_a_job_no_worker_can_run_waits_without_blocking_the_others():
    s = queue(("needs-nbd", 1, {"nbd": True}), ("plain", 5), ("needs-lvm", 2, {"lvm": True, "qemu_img": True}),
              ("also-plain", 9), max_parallel=10)
    assert picked(s) == ["plain", "also-plain"]
    assert s.ordered() == ["needs-nbd", "needs-lvm"]
    assert s.wait_reasons() == {"needs-nbd": "no worker offers nbd", "needs-lvm": "no worker offers lvm"}
    # Once a worker offers it, the job runs.
    assert picked(s, workers=[builtin(nbd=True)]) == ["needs-nbd"]


def test_limit_reached_reason_and_mismatch_reason_side_by_side():
    s = queue(("a", 5), ("b", 5), ("c", 5, {"nbd": True}), ("d", 5), max_parallel=2)
    assert picked(s, running=1) == ["a"]
    assert s.wait_reasons() == {"b": "waiting for a free slot (2 of 2 running)",
                                "c": "no worker offers nbd",
                                "d": "waiting for a free slot (2 of 2 running)"}


def test_no_worker_at_all_and_before_any_pass():
    s = queue(("a", 5))
    assert s.wait_reasons() == {"a": "waiting to be scheduled"}
    assert picked(s, workers=[]) == []
    assert s.wait_reasons() == {"a": "no worker is available"}


def test_stale_and_external_workers_are_not_used_by_pick():
    s = queue(("a", 5))
    stale = builtin()
    stale.state = "stale"
    assert picked(s, workers=[stale]) == []
    assert s.wait_reasons() == {"a": "no worker is available"}


def test_a_job_only_external_workers_can_run_says_it_waits_for_them():
    """pick() leaves such jobs to be claimed; their reasons name the worker that may take them, or the one
    whose slots are full, and say which requirement no worker meets while none can."""
    s = queue(("plain", 5, {"qemu_img": True}), ("nbd", 5, {"nbd": True}), ("gpu", 5, {"gpu": True}))
    agent = external("ext1", max_jobs=1, nbd=True)
    away = "systemd's manager does not answer"
    assert s.pick(0, [agent], NOW, builtin_away=away) == []      # systemd away: only the agent is there
    assert s.wait_reasons() == {
        "plain": f"this host's worker is unavailable ({away}), and no other offers what it needs",
        "nbd": "waiting for worker ext1 to claim it",
        "gpu": f"this host's worker is unavailable ({away}), and no other offers what it needs"}
    assert s.pick(0, [], NOW, builtin_away=away) == []
    assert set(s.wait_reasons().values()) == {f"no worker is available ({away})"}
    assert picked(s, workers=[builtin(), agent]) == ["plain"]
    assert s.wait_reasons() == {"nbd": "waiting for worker ext1 to claim it", "gpu": "no worker offers gpu"}
    s.add("plain2", 5, 8, "convert", {"qemu_img": True})
    everyone = external("ext2", qemu_img=True)
    s.max_parallel = 2
    assert picked(s, running=2, workers=[builtin(), everyone]) == []     # the slots are full
    assert s.wait_reasons()["plain2"] == ("waiting for a free slot (2 of 2 running) or for worker ext2 to "
                                          "claim it")
    assert s.claim_for(agent, NOW) == "nbd"
    agent.active_jobs = 1
    s.add("nbd2", 5, 9, "convert", {"nbd": True})
    assert picked(s, workers=[builtin(), agent]) == ["plain2"]
    reasons = s.wait_reasons()
    assert reasons["nbd2"] == "waiting for a free slot on worker ext1 (1 of 1 busy)"
    assert reasons["gpu"] == "no worker offers gpu"


def test_backoff_delays_only_that_job():
    s = Scheduler(10)
    later = NOW + 90 * 1_000_000
    s.add("retrying", 1, 1, "convert", {}, not_before_usec=later)
    s.add("fresh", 5, 2, "convert", {})
    assert picked(s, now=NOW) == ["fresh"]
    clock = time.strftime("%H:%M:%S", time.localtime(later / 1_000_000))
    assert s.wait_reasons() == {"retrying": f"retry backoff until {clock}"}
    assert s.claim_for(external(), NOW) is None
    assert picked(s, now=later) == ["retrying"]


def test_claim_for_takes_the_most_urgent_job_it_can_run():
    s = queue(("p5", 5), ("nbd-p3", 3, {"nbd": True}), ("p1-vhdx", 1, {"formats": ["vhdx"]}), ("p2", 2))
    worker = external(operations=["convert"], formats=["vmdk"])
    assert s.claim_for(worker, NOW) == "p2"
    assert "p2" not in s
    assert s.claim_for(external("nbd-box", nbd=True), NOW) == "nbd-p3"
    assert s.claim_for(external("vhdx-box", formats=["vhdx", "vmdk"]), NOW) == "p1-vhdx"
    assert s.claim_for(external("inspector", operations=["inspect"]), NOW) is None
    busy = external("busy", max_jobs=1)
    busy.active_jobs = 1
    assert s.claim_for(busy, NOW) is None
    stale = external("stale")
    stale.state = "stale"
    assert s.claim_for(stale, NOW) is None
    assert s.ordered() == ["p5"]


# ---------------------------------------------------------------- capability matching

@pytest.mark.parametrize(("caps", "operation", "requirements", "expected"), [
    ({}, "convert", {}, None),
    ({"nbd": True}, "convert", {"nbd": True}, None),
    ({"nbd": False}, "convert", {"nbd": True}, "does not offer nbd"),
    ({}, "convert", {"nbd": True}, "does not offer nbd"),
    ({}, "convert", {"nbd": False, "lvm": None}, None),
    ({"operations": ["inspect"]}, "convert", {}, "does not offer the convert operation"),
    ({"operations": ["inspect", "convert"]}, "convert", {}, None),
    ({"formats": ["vmdk", "vhdx"]}, "convert", {"formats": ["vhdx"]}, None),
    ({"formats": ["vmdk"]}, "convert", {"formats": ["vhdx"]}, "does not offer the vhdx format"),
    ({}, "convert", {"formats": ["vdi"]}, "does not offer the vdi format (it does not advertise formats)"),
    ({"free_bytes": 20 * 2**30}, "convert", {"min_free_bytes": 10 * 2**30}, None),
    ({"free_bytes": {"/a": 2**30, "/b": 20 * 2**30}}, "convert", {"min_free_bytes": 10 * 2**30}, None),
    ({"free_bytes": 2**30}, "convert", {"min_free_bytes": 10 * 2**30},
     "does not offer 10.0 GiB of free space (it has 1.0 GiB)"),
    ({"memory_mb": 512}, "convert", {"min_memory_mb": 2048}, "does not offer 2048 MB of memory (it has 512 MB)"),
    ({}, "convert", {"min_memory_mb": 2048}, "does not offer 2048 MB of memory (it does not advertise memory_mb)"),
    ({"arch": "x86_64"}, "convert", {"arch": "x86_64"}, None),
    ({"arch": "aarch64"}, "convert", {"arch": "x86_64"}, "does not offer arch=x86_64 (it has arch=aarch64)"),
    ({}, "convert", {"gpu": True}, "does not offer gpu"),
    ({}, "convert", {"site": "ams"}, "does not offer site=ams (it does not advertise site)"),
])
def test_worker_can_run(caps, operation, requirements, expected):
    worker = WorkerInfo(id="w", name="w", kind="external", capabilities=caps)
    assert worker_can_run(worker, operation, requirements) == expected


def test_stale_worker_can_run_nothing():
    worker = external()
    worker.state = "stale"
    assert worker_can_run(worker, "convert", {}) is not None


def test_different_needs_are_all_named():
    s = queue(("a", 5, {"nbd": True, "min_free_bytes": 2**40}))
    second = builtin(nbd=True)
    second.id, second.name = "builtin-2", "host2"
    picked(s, workers=[builtin(free_bytes=2**30), second])
    # The first builtin lacks nbd, the second lacks space: the reason names both.
    reason = s.wait_reasons()["a"]
    assert reason.startswith("no worker offers everything it needs")
    assert "nbd" in reason and "1.0 TiB of free space" in reason


def test_many_queued_jobs_are_handled_quickly():
    s = Scheduler(2)
    for i in range(50_000):
        s.add(f"j{i}", i % 10 + 1, i, "convert", {"nbd": True} if i % 7 == 0 else {})
    start = time.perf_counter()
    assert len(s.pick(0, [builtin()], NOW)) == 2
    reasons = s.wait_reasons()
    elapsed = time.perf_counter() - start
    assert len(reasons) == 49_998
    assert sum(r == "no worker offers nbd" for r in reasons.values()) == len(range(0, 50_000, 7))
    assert elapsed < 5   # generous: a pass over a full queue must not stall the daemon for long


def test_wait_reasons_stay_short_and_can_be_asked_for_the_first_jobs_only():
    """A job may need many long values, and a reply listing why every queued job waits must not grow with them:
    each reason is cut, and a listing may stop after the most urgent jobs."""
    long_names = [f"{n:02d}" + "é" * 62 for n in range(32)]
    s = queue(*((f"j{n}", 5 if n else 1, {f"k{k}": long_names for k in range(8)}) for n in range(20)))
    picked(s)
    reasons = s.wait_reasons()
    assert len(reasons) == 20
    assert all(len(reason) <= 256 and reason.endswith("...") for reason in reasons.values())
    assert reasons["j0"].startswith("no worker offers k0 00")
    assert list(s.wait_reasons(limit=3)) == ["j0", "j1", "j2"]


def owned(*jobs, max_parallel: int = 100) -> Scheduler:
    """jobs: (id, priority, owner), queued in this order."""
    s = Scheduler(max_parallel)
    for seq, (job_id, priority, owner) in enumerate(jobs, start=1):
        s.add(job_id, priority, seq, "convert", {}, owner=owner)
    return s


def test_owners_take_turns_within_a_level():
    """Alice queued a batch of five, then Bob one job and Carol two: Bob and Carol do not wait for the whole
    batch; each owner's own jobs keep their order."""
    s = owned(*[(f"a{n}", 5, 1000) for n in range(1, 6)], ("b1", 5, 1001), ("c1", 5, 1002), ("c2", 5, 1002))
    assert s.ordered() == ["a1", "b1", "c1", "a2", "c2", "a3", "a4", "a5"]
    assert picked(s, workers=[builtin()]) == ["a1", "b1", "c1", "a2", "c2", "a3", "a4", "a5"]


def test_an_owner_with_jobs_running_lets_the_others_catch_up():
    s = owned(("a3", 5, 1000), ("a4", 5, 1000), ("b1", 5, 1001), ("b2", 5, 1001), ("b3", 5, 1001),
              max_parallel=3)
    # Alice has two running already: Bob's first two go before her next one; then they are even.
    assert picked(s, running=1, workers=[builtin()], running_by_owner={1000: 2}) == ["b1", "b2"]
    assert s.ordered() == ["a3", "b3", "a4"]
    # Bob's turn came last, but Alice has many more running: his job goes first.
    assert s.claim_for(external(), NOW, running_by_owner={1000: 5, 1001: 0}) == "b3"


def test_priority_comes_before_turns_and_turns_count_across_levels():
    s = owned(("a1", 5, 1000), ("b1", 5, 1001), ("a-urgent", 1, 1000), ("b-urgent", 1, 1001), ("b-also", 1, 1001))
    # Bob's two urgent jobs go ahead of his turn at level 5, where Alice's job now comes first.
    assert s.ordered() == ["a-urgent", "b-urgent", "b-also", "a1", "b1"]
    s.set_priority("b1", 1)   # it keeps its place by when it was queued, and is Bob's first at level 1
    assert s.ordered() == ["b1", "a-urgent", "b-urgent", "b-also", "a1"]
    assert s.counts_by_priority()[0] == 4 and s.remove("b-urgent") and s.counts_by_priority()[0] == 3


def test_jobs_no_worker_can_run_do_not_use_up_their_owners_turns():
    """Alice queued fifty jobs that need nbd (its worker is away), then one plain job; Bob fifty plain jobs.
    With one slot at a time, Alice's plain job, queued before Bob's, goes first, then Bob's take turns with Alice's
    waiting ones, which pass theirs. Before, each of her nbd jobs used a turn and her plain job came after all
    fifty of Bob's. The same holds for an external worker's claims."""
    nbd = {"nbd": True}
    jobs = ([(f"a-nbd{n}", 5, 1000, nbd) for n in range(50)] + [("a-plain", 5, 1000, {})]
            + [(f"b{n}", 5, 1001, {}) for n in range(50)])
    s = Scheduler(1)
    for seq, (job_id, priority, owner, needs) in enumerate(jobs, start=1):
        s.add(job_id, priority, seq, "convert", needs, owner=owner)
    started = []
    for _ in range(3):
        (job_id,) = picked(s, running=0, running_by_owner={})
        started.append(job_id)
    assert started == ["a-plain", "b0", "b1"]
    assert "a-nbd0" in s and s.ordered()[0] == "a-nbd0"    # still first in the listing, waiting for its worker

    s = Scheduler(1)
    for seq, (job_id, priority, owner, needs) in enumerate(jobs, start=1):
        s.add(job_id, priority, seq, "convert", needs, owner=owner)
    claims = [s.claim_for(external(qemu_img=True), NOW, running_by_owner={}) for _ in range(3)]
    assert claims == ["a-plain", "b0", "b1"]

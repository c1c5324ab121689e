"""Planning (pure) and the sweep with a fake call and an in-memory writer: no database."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from availability_cron import refresh
from availability_cron.deadline import StopRequest
from availability_cron.errors import ConnectionLost
from availability_cron.refresh import (
    DueCache,
    MissingWorkspace,
    Outcome,
    PlannedRefresh,
    plan,
    reserved_for_missing,
    sweep,
)

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


# --- factories ------------------------------------------------------------------------------


def due(workspace_id: str, minutes_ago: float, *, failures: int = 0) -> DueCache:
    """A cache that went stale ``minutes_ago`` minutes before NOW (negative: not yet due)."""
    return DueCache(
        workspace_id=workspace_id,
        provider="simulated",
        provider_config={},
        stale_at=NOW - timedelta(minutes=minutes_ago),
        refreshed_at=None,
        consecutive_failures=failures,
    )


def missing(workspace_id: str, minutes_ago: float) -> MissingWorkspace:
    """A workspace created ``minutes_ago`` minutes before NOW, with no cache yet."""
    return MissingWorkspace(
        workspace_id=workspace_id,
        provider="simulated",
        provider_config={},
        created_at=NOW - timedelta(minutes=minutes_ago),
    )


def ids(queue: Sequence[PlannedRefresh]) -> list[str]:
    return [item.workspace_id for item in queue]


def stale_caches(n: int) -> list[DueCache]:
    """s00 (stalest) .. s{n-1}, in shuffled input order."""
    caches = [due(f"s{i:02d}", minutes_ago=100 - i) for i in range(n)]
    random.Random(7).shuffle(caches)
    return caches


def missing_workspaces(n: int) -> list[MissingWorkspace]:
    """m00 (oldest) .. m{n-1}, in shuffled input order."""
    workspaces = [missing(f"m{i:02d}", minutes_ago=1000 - i) for i in range(n)]
    random.Random(8).shuffle(workspaces)
    return workspaces


# --- each workspace once ----------------------------------------------------------------------


def test_plan_queues_a_workspace_once_however_often_the_reads_return_it():
    queue = plan([due("s1", 10), due("s1", 5), due("both", 3)],
                 [missing("m1", 50), missing("m1", 40), missing("both", 30)],
                 limit=10, reserve=0.5, now=NOW).queue

    assert ids(queue) == ["m1", "both", "s1"]
    assert [q.reason for q in queue] == ["missing", "missing", "stale"]


# --- reserved_for_missing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "reserve", "expected"),
    [
        (500, 0.2, 100),
        (10, 0.2, 2),
        (30, 0.1, 3),  # 30 * 0.1 is 3.0000000000000004 in floating point: still 3
        (10, 0.7, 7),  # 10 * 0.7 is 7.000000000000001: still 7
        (3, 0.5, 2),  # ceil
        (1, 0.2, 1),  # ceil: a limit smaller than the reserve's rounding keeps one slot
        (4, 0.01, 1),
        (5, 1.0, 5),
        (5, 0.0, 0),
        (0, 0.5, 0),
        (-3, 0.5, 0),
    ],
)
def test_reserved_share_is_the_ceiling_of_limit_times_reserve(limit, reserve, expected):
    assert reserved_for_missing(limit, reserve) == expected


@pytest.mark.parametrize("limit", [1, 7, 500, 1_000_000])
@pytest.mark.parametrize("reserve", [0.001, 1e-6, 1e-12])
def test_any_positive_reserve_keeps_at_least_one_slot(limit, reserve):
    assert reserved_for_missing(limit, reserve) >= 1


# --- plan: order ----------------------------------------------------------------------------


def test_stale_caches_are_planned_stalest_first():
    the_plan = plan(stale_caches(6), [], limit=10, reserve=0.2, now=NOW)
    assert ids(the_plan.queue) == ["s00", "s01", "s02", "s03", "s04", "s05"]
    assert all(item.reason == "stale" for item in the_plan.queue)


def test_stale_caches_with_the_same_stale_at_are_ordered_by_workspace_id():
    caches = [due("b", 5), due("c", 5), due("a", 5), due("z", 9)]
    the_plan = plan(caches, [], limit=10, reserve=0.0, now=NOW)
    assert ids(the_plan.queue) == ["z", "a", "b", "c"]


def test_missing_workspaces_are_planned_oldest_first():
    the_plan = plan([], missing_workspaces(5), limit=10, reserve=0.2, now=NOW)
    assert ids(the_plan.queue) == ["m00", "m01", "m02", "m03", "m04"]
    assert all(item.reason == "missing" for item in the_plan.queue)


def test_missing_workspaces_created_at_the_same_time_are_ordered_by_workspace_id():
    workspaces = [missing("y", 3), missing("x", 3), missing("old", 30)]
    the_plan = plan([], workspaces, limit=10, reserve=0.5, now=NOW)
    assert ids(the_plan.queue) == ["old", "x", "y"]


def test_reserved_missing_workspaces_start_before_stale_ones():
    # limit 5, reserve 0.4: two slots kept for missing workspaces, and they go first.
    the_plan = plan(stale_caches(10), missing_workspaces(3), limit=5, reserve=0.4, now=NOW)
    assert ids(the_plan.queue) == ["m00", "m01", "s00", "s01", "s02"]
    assert the_plan.missing_reserved == 2
    assert (the_plan.missing, the_plan.stale) == (2, 3)


def test_extra_missing_workspaces_come_after_the_stale_caches():
    the_plan = plan(stale_caches(2), missing_workspaces(6), limit=6, reserve=0.2, now=NOW)
    assert ids(the_plan.queue) == ["m00", "m01", "s00", "s01", "m02", "m03"]
    assert the_plan.missing_reserved == 2


# --- plan: sharing the limit ----------------------------------------------------------------


def test_capacity_the_stale_side_leaves_unused_goes_to_missing_workspaces():
    the_plan = plan(stale_caches(1), missing_workspaces(10), limit=5, reserve=0.2, now=NOW)
    assert ids(the_plan.queue) == ["m00", "s00", "m01", "m02", "m03"]
    assert (the_plan.missing, the_plan.stale) == (4, 1)


def test_capacity_the_missing_side_leaves_unused_goes_to_stale_caches():
    the_plan = plan(stale_caches(10), missing_workspaces(1), limit=5, reserve=0.6, now=NOW)
    assert ids(the_plan.queue) == ["m00", "s00", "s01", "s02", "s03"]
    assert the_plan.missing_reserved == 1


def test_with_no_missing_workspaces_the_whole_limit_goes_to_stale_caches():
    the_plan = plan(stale_caches(10), [], limit=5, reserve=0.4, now=NOW)
    assert ids(the_plan.queue) == ["s00", "s01", "s02", "s03", "s04"]
    assert the_plan.missing_reserved == 0


def test_the_queue_never_exceeds_the_limit():
    the_plan = plan(stale_caches(20), missing_workspaces(20), limit=7, reserve=0.3, now=NOW)
    assert len(the_plan.queue) == 7
    assert len(set(ids(the_plan.queue))) == 7


def test_everything_is_planned_when_it_fits_in_the_limit():
    the_plan = plan(stale_caches(3), missing_workspaces(2), limit=100, reserve=0.2, now=NOW)
    assert sorted(ids(the_plan.queue)) == ["m00", "m01", "s00", "s01", "s02"]


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_of_zero_plans_nothing(limit):
    the_plan = plan(stale_caches(5), missing_workspaces(5), limit=limit, reserve=0.5, now=NOW)
    assert the_plan.queue == ()
    assert the_plan.missing_reserved == 0


def test_a_reserve_of_zero_gives_missing_workspaces_only_leftover_capacity():
    crowded = plan(stale_caches(5), missing_workspaces(5), limit=4, reserve=0.0, now=NOW)
    assert ids(crowded.queue) == ["s00", "s01", "s02", "s03"]
    assert crowded.missing_reserved == 0

    roomy = plan(stale_caches(3), missing_workspaces(5), limit=5, reserve=0.0, now=NOW)
    assert ids(roomy.queue) == ["s00", "s01", "s02", "m00", "m01"]


def test_a_reserve_of_one_gives_missing_workspaces_the_whole_limit():
    all_missing = plan(stale_caches(5), missing_workspaces(5), limit=3, reserve=1.0, now=NOW)
    assert ids(all_missing.queue) == ["m00", "m01", "m02"]
    assert all_missing.missing_reserved == 3

    leftover = plan(stale_caches(5), missing_workspaces(2), limit=4, reserve=1.0, now=NOW)
    assert ids(leftover.queue) == ["m00", "m01", "s00", "s01"]
    assert leftover.missing_reserved == 2


def test_a_limit_smaller_than_the_reserve_rounding_still_keeps_one_missing_slot():
    # 1 * 0.2 = 0.2 rounds up to one slot: the one workspace with no cache wins.
    the_plan = plan(stale_caches(5), missing_workspaces(3), limit=1, reserve=0.2, now=NOW)
    assert ids(the_plan.queue) == ["m00"]


# --- plan: entries ---------------------------------------------------------------------------


def test_caches_not_yet_stale_at_now_are_dropped():
    caches = [due("past", 1), due("exactly-now", 0), due("pushed-out", -1)]
    the_plan = plan(caches, [], limit=10, reserve=0.2, now=NOW)
    assert ids(the_plan.queue) == ["past", "exactly-now"]


def test_planned_entries_carry_their_reason_due_time_and_failures():
    the_plan = plan(
        [due("s", 5, failures=3)], [missing("m", 60)], limit=10, reserve=0.5, now=NOW
    )
    first, second = the_plan.queue
    assert (first.workspace_id, first.reason, first.due_since, first.consecutive_failures) == (
        "m", "missing", NOW - timedelta(minutes=60), 0
    )
    assert (second.workspace_id, second.reason, second.due_since) == (
        "s", "stale", NOW - timedelta(minutes=5)
    )
    assert second.consecutive_failures == 3
    assert (second.provider, second.provider_config) == ("simulated", {})


def test_overdue_seconds_counts_from_the_due_time():
    item = PlannedRefresh("ws", "simulated", {}, "stale", NOW - timedelta(minutes=2))
    assert item.overdue_seconds(NOW) == 120.0
    assert item.overdue_seconds(NOW - timedelta(minutes=3)) == -60.0


# --- sweep ----------------------------------------------------------------------------------


def queue_of(n: int, reason: refresh.Reason = "stale") -> list[PlannedRefresh]:
    return [
        PlannedRefresh(f"ws-{i:02d}", "simulated", {}, reason, NOW - timedelta(minutes=n - i))
        for i in range(n)
    ]


def ok(item: PlannedRefresh) -> Outcome:
    return Outcome(item, NOW, NOW, NOW, NOW + timedelta(days=1), slots=("2026-11-28T13:00:00Z",))


def failed(item: PlannedRefresh, error: str = "[retryable] boom") -> Outcome:
    return Outcome(item, NOW, NOW, NOW, NOW + timedelta(days=1), error=error)


class Recorder:
    """An in-memory ``write``: keeps every batch, stores every success unless told otherwise."""

    def __init__(self, newer: set[str] | None = None) -> None:
        #: workspaces that already have a newer success stored
        self.newer = newer or set()
        self.batches: list[list[Outcome]] = []
        self._lock = threading.Lock()

    def __call__(self, outcomes: Sequence[Outcome]) -> int:
        with self._lock:
            self.batches.append(list(outcomes))
        return sum(1 for o in outcomes if o.ok and o.item.workspace_id not in self.newer)

    @property
    def outcomes(self) -> list[Outcome]:
        return [o for batch in self.batches for o in batch]


class SteppingClock:
    """A monotonic clock that moves only when a fake call says so (thread-safe)."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def test_the_sweep_starts_the_queue_in_order():
    queue = queue_of(8)
    started: list[str] = []

    def call(item: PlannedRefresh) -> Outcome:
        started.append(item.workspace_id)
        time.sleep(0.001)
        return ok(item)

    write = Recorder()
    result = sweep(queue, call=call, write=write, concurrency=1,
                   deadline=time.monotonic() + 30, margin=0.1,
                   clock=lambda: NOW, monotonic=time.monotonic)

    assert started == ids(queue)
    assert [o.item.workspace_id for o in write.outcomes] == ids(queue)
    assert (result.started, result.succeeded, result.failed) == (8, 8, 0)
    assert (result.skipped_deadline, result.abandoned, result.superseded) == (0, 0, 0)


def test_the_sweep_never_has_more_calls_in_flight_than_its_concurrency():
    queue = queue_of(12)
    first_three = threading.Barrier(3, timeout=10)  # proves three really run at once
    lock = threading.Lock()
    in_flight = max_in_flight = 0

    def call(item: PlannedRefresh) -> Outcome:
        nonlocal in_flight, max_in_flight
        with lock:
            in_flight += 1
            max_in_flight = max(max_in_flight, in_flight)
        try:
            if item.workspace_id in {"ws-00", "ws-01", "ws-02"}:
                first_three.wait()
            time.sleep(0.01)
            return ok(item)
        finally:
            with lock:
                in_flight -= 1

    write = Recorder()
    result = sweep(queue, call=call, write=write, concurrency=3,
                   deadline=time.monotonic() + 30, margin=0.1,
                   clock=lambda: NOW, monotonic=time.monotonic)

    assert max_in_flight == 3
    assert result.started == result.succeeded == 12
    assert sorted(o.item.workspace_id for o in write.outcomes) == ids(queue)


def test_no_call_starts_once_less_than_the_margin_is_left():
    # Each call takes one (fake) second; deadline at 10 s, margin 3 s: calls start at
    # t = 0..7 (10 - t >= 3) and the one that would start at t = 8 is skipped.
    clock = SteppingClock()
    starts: list[float] = []

    def call(item: PlannedRefresh) -> Outcome:
        starts.append(clock())
        clock.advance(1.0)
        return ok(item)

    queue = queue_of(20)
    write = Recorder()
    result = sweep(queue, call=call, write=write, concurrency=1, deadline=10.0, margin=3.0,
                   grace=2.0, clock=lambda: NOW, monotonic=clock)

    assert starts == [float(t) for t in range(8)]
    assert result.started == 8
    assert result.skipped_deadline == 12
    assert result.succeeded == 8
    assert result.abandoned == 0
    assert [o.item.workspace_id for o in write.outcomes] == ids(queue[:8])


def test_nothing_starts_when_the_margin_is_already_reached():
    calls: list[PlannedRefresh] = []
    write = Recorder()
    result = sweep(queue_of(4), call=lambda item: calls.append(item) or ok(item), write=write,
                   concurrency=2, deadline=10.0, margin=3.0,
                   clock=lambda: NOW, monotonic=lambda: 7.5)
    assert calls == []
    assert write.batches == []
    assert (result.started, result.skipped_deadline) == (0, 4)


def test_a_deadline_cut_still_starts_the_reserved_missing_workspaces():
    the_plan = plan(stale_caches(10), missing_workspaces(5), limit=10, reserve=0.2, now=NOW)
    clock = SteppingClock()
    started: list[str] = []

    def call(item: PlannedRefresh) -> Outcome:
        started.append(item.workspace_id)
        clock.advance(1.0)
        return ok(item)

    # Room for 3 calls only: at t = 0, 1, 2 at least the 2 s margin is left of 4.5 s.
    result = sweep(the_plan.queue, call=call, write=Recorder(), concurrency=1, deadline=4.5,
                   margin=2.0, clock=lambda: NOW, monotonic=clock)

    assert started == ["m00", "m01", "s00"]
    assert (result.missing_started, result.stale_started) == (2, 1)
    assert result.skipped_deadline == 7


def test_a_call_that_never_returns_is_abandoned_at_deadline_plus_grace():
    release = threading.Event()
    finished: list[str] = []

    def call(item: PlannedRefresh) -> Outcome:
        if item.workspace_id == "ws-00":
            release.wait(30)  # a provider ignoring its timeout
        finished.append(item.workspace_id)
        return ok(item)

    write = Recorder()
    began = time.monotonic()
    try:
        result = sweep(queue_of(2), call=call, write=write, concurrency=2,
                       deadline=began + 0.2, margin=0.05, grace=0.2,
                       clock=lambda: NOW, monotonic=time.monotonic)
        elapsed = time.monotonic() - began
        still_running = "ws-00" not in finished
    finally:
        release.set()

    assert still_running, "the sweep waited for the hanging call instead of abandoning it"
    assert elapsed < 10
    assert (result.started, result.succeeded, result.failed, result.abandoned) == (2, 1, 1, 1)
    given_up = [o for o in write.outcomes if o.abandoned]
    assert len(given_up) == 1
    assert given_up[0].item.workspace_id == "ws-00"
    assert given_up[0].error == refresh.ABANDONED_ERROR
    assert not given_up[0].ok and given_up[0].slots is None
    assert [o.item.workspace_id for o in write.outcomes if o.ok] == ["ws-01"]


def test_successes_the_writer_did_not_store_count_as_superseded():
    queue = queue_of(5)

    def call(item: PlannedRefresh) -> Outcome:
        return failed(item) if item.workspace_id == "ws-03" else ok(item)

    write = Recorder(newer={"ws-01", "ws-04"})
    result = sweep(queue, call=call, write=write, concurrency=2,
                   deadline=time.monotonic() + 30, margin=0.1,
                   clock=lambda: NOW, monotonic=time.monotonic)

    assert (result.succeeded, result.failed) == (4, 1)
    assert result.superseded == 2
    assert len(write.outcomes) == 5


def test_the_sweep_counts_missing_and_stale_starts_separately():
    queue = queue_of(2, "missing") + queue_of(3, "stale")
    result = sweep(queue, call=ok, write=Recorder(), concurrency=4,
                   deadline=time.monotonic() + 30, margin=0.1,
                   clock=lambda: NOW, monotonic=time.monotonic)
    assert (result.missing_started, result.stale_started, result.started) == (2, 3, 5)


def test_the_sweep_reports_progress_at_its_start_and_after_each_written_batch():
    queue = queue_of(5)
    reports: list[refresh.SweepProgress] = []
    write = Recorder()

    def call(item: PlannedRefresh) -> Outcome:
        return failed(item) if item.workspace_id == "ws-02" else ok(item)

    sweep(queue, call=call, write=write, concurrency=1, deadline=time.monotonic() + 30,
          margin=0.1, clock=lambda: NOW, monotonic=time.monotonic, on_progress=reports.append)

    assert reports[0] == refresh.SweepProgress(planned=5, started=0, done=0, succeeded=0,
                                               failed=0)
    assert len(reports) == 1 + len(write.batches)
    assert reports[-1] == refresh.SweepProgress(planned=5, started=5, done=5, succeeded=4,
                                                failed=1)
    assert [r.done for r in reports] == sorted(r.done for r in reports)


def test_a_failing_progress_display_neither_stops_the_sweep_nor_is_called_again():
    calls = 0

    def broken_display(_progress: refresh.SweepProgress) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("terminal went away")

    write = Recorder()
    result = sweep(queue_of(4), call=ok, write=write, concurrency=2,
                   deadline=time.monotonic() + 30, margin=0.1,
                   clock=lambda: NOW, monotonic=time.monotonic, on_progress=broken_display)

    assert calls == 1
    assert (result.started, result.succeeded) == (4, 4)
    assert len(write.outcomes) == 4


def test_a_stop_request_starts_nothing_more_and_writes_what_finished():
    stop = StopRequest(lambda: 0.0)
    write = Recorder()

    def call(item: PlannedRefresh) -> Outcome:
        if item.workspace_id == "ws-02":
            stop.request("SIGTERM")  # as the signal handler would, mid-sweep
        return ok(item)

    result = sweep(queue_of(10), call=call, write=write, concurrency=1, deadline=100.0,
                   margin=1.0, clock=lambda: NOW, monotonic=lambda: 0.0, stop=stop)

    assert result.stopped == "SIGTERM"
    assert (result.started, result.succeeded, result.not_started) == (3, 3, 7)
    assert (result.skipped_deadline, result.lost, result.interrupted) == (0, 0, 0)
    assert ids(queue_of(10)[:3]) == [o.item.workspace_id for o in write.outcomes]


def test_results_of_a_batch_that_cannot_be_written_are_counted_as_lost():
    def write(outcomes: Sequence[Outcome]) -> int:
        raise ConnectionLost("gone")

    with pytest.raises(ConnectionLost) as info:
        sweep(queue_of(5), call=ok, write=write, concurrency=1, deadline=100.0, margin=1.0,
              clock=lambda: NOW, monotonic=lambda: 0.0)

    partial = info.value.partial  # type: ignore[attr-defined]
    assert partial.started == partial.lost + partial.interrupted + partial.succeeded
    assert partial.lost >= 1 and partial.succeeded == 0
    assert partial.not_started == 5 - partial.started and partial.skipped_deadline == 0

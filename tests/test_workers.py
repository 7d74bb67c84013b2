"""Worker processes: the kernel's first choice when memory runs out, not the coordinator."""

from __future__ import annotations

from pathlib import Path

from fl_coordinator.workers import OOM_SCORE_ADJ, worker_processes

SCORE = Path("/proc/self/oom_score_adj")


def score() -> int:
    return int(SCORE.read_text())


async def test_a_worker_is_the_first_to_go_when_memory_runs_out() -> None:
    ours = score()
    async with worker_processes("the test's workers", grace_period=5) as workers:
        in_worker = await workers.run_sync(score)
    assert in_worker == OOM_SCORE_ADJ == 1000
    assert score() == ours < OOM_SCORE_ADJ  # the coordinator itself keeps its own score

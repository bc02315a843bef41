"""The test suite's pool of long-lived gloo ranks (tests/_pool.py): results by
rank, a rank's failure with its traceback, timeouts, and nothing a body
changes reaching the next body."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed as dist

from tests import _pool
from tests._harness import TIMEOUT
from zerograph.runtime.launch import RankFailed

pytestmark = pytest.mark.timeout(TIMEOUT + 30)


def _identity(value):
    return dist.get_rank(), dist.get_world_size(), os.getpid(), value, torch.tensor([dist.get_rank()])


def _fail_on(rank):
    if dist.get_rank() == rank:
        raise ValueError(f"rank {rank} says no")
    dist.barrier()  # the other rank waits in a collective for the failed one
    return "never"


def _sleep(seconds):
    import time

    time.sleep(seconds)


def _leave_state(key):
    """Change what a body may change: env, logging, Dynamo config, a process group, the RNG."""
    import torch._dynamo.config as dynamo_config

    os.environ[key] = "set by a body"
    logging.getLogger("zerograph").addHandler(logging.NullHandler())
    logging.getLogger("zerograph").setLevel(logging.DEBUG)
    dynamo_config.recompile_limit = 3
    group = dist.new_group([0, 1])
    dist.all_reduce(torch.ones(1), group=group)
    torch.set_grad_enabled(False)
    return torch.rand(1).item()


def _state(key):
    import torch._dynamo.config as dynamo_config

    from zerograph._torch_private import process_groups

    lg = logging.getLogger("zerograph")
    return {"env": os.environ.get(key), "handlers": len(lg.handlers), "level": lg.level,
            "recompile_limit": dynamo_config.recompile_limit, "groups": len(process_groups()),
            "grad": torch.is_grad_enabled(), "random": torch.rand(1).item(), "pid": os.getpid()}


def test_results_by_rank_from_the_same_processes():
    first = _pool.run(_identity, 2, "x", timeout=TIMEOUT)
    second = _pool.run(_identity, 2, "y", timeout=TIMEOUT)
    assert [r[:2] for r in first] == [(0, 2), (1, 2)]
    assert [r[3] for r in second] == ["y", "y"] and [int(r[4]) for r in second] == [0, 1]
    assert [r[2] for r in first] == [r[2] for r in second]  # no respawn


def test_a_failing_rank_fails_the_call_with_its_traceback_and_the_pool_restarts():
    before = [r[2] for r in _pool.run(_identity, 2, None, timeout=TIMEOUT)]
    with pytest.raises(RankFailed, match="rank 1 says no") as info:
        _pool.run(_fail_on, 2, 1, timeout=TIMEOUT)
    assert info.value.rank == 1 and "ValueError: rank 1 says no" in info.value.traceback
    after = [r[2] for r in _pool.run(_identity, 2, None, timeout=TIMEOUT)]
    assert not set(before) & set(after)  # new processes


def test_a_call_past_its_timeout_is_killed_and_the_pool_restarts():
    before = _pool.run(_identity, 1, None, timeout=TIMEOUT)[0][2]
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish"):
        _pool.run(_sleep, 1, 60, timeout=3)
    after = _pool.run(_identity, 1, None, timeout=TIMEOUT)[0]
    assert after[:2] == (0, 1) and after[2] != before


def _abort_once(marker: str):
    """Abort (SIGABRT, as glibc's heap checks do) unless ``marker`` exists; create it first."""
    import sys

    if not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()
    return " ".join(sys.orig_argv)


def test_a_forked_rank_that_crashes_runs_the_call_again_in_new_interpreters_and_a_new_one_fails(tmp_path):
    """A forked rank that dies of a signal: the call runs again once, in new
    interpreters, and the pool stays on them (the summary says so); such a
    crash in a new interpreter fails the call."""
    import signal

    pool = _pool.RankPool(1, start_method="forkserver")
    try:
        argv = pool.run(_abort_once, (str(tmp_path / "crashed"),), timeout=TIMEOUT)[0]
        assert "spawn_main" in argv, argv  # the rerun ran in a new interpreter
        assert pool.start_method == "spawn" and pool.starts == 2
        assert pool.stops[-1] == (f"_abort_once: rank 0 (forked) died of signal {signal.SIGABRT}; "
                                  "the call ran again in new interpreters"), pool.stops
        with pytest.raises(RankFailed, match="rank 0 died with exit code -6") as info:
            pool.run(_abort_once, (str(tmp_path / "crashed-again"),), timeout=TIMEOUT)
        assert info.value.exitcode == -signal.SIGABRT
    finally:
        pool.close()


def test_nothing_a_body_changes_reaches_the_next_body():
    key = "ZEROGRAPH_TEST_POOL_LEAK"
    before = _pool.run(_state, 2, key, timeout=TIMEOUT)
    drawn = _pool.run(_leave_state, 2, key, timeout=TIMEOUT)
    after = _pool.run(_state, 2, key, timeout=TIMEOUT)
    for b, a, d in zip(before, after, drawn):
        assert a["pid"] == b["pid"]
        assert a["random"] != b["random"] and a["random"] != d  # reseeded: not a continued sequence
        assert {k: v for k, v in a.items() if k not in ("random",)} == {k: v for k, v in b.items() if k != "random"}
    assert _pool.run(_state, 2, key, timeout=TIMEOUT, env={key: "1"})[0]["env"] == "1"
    assert _pool.run(_state, 2, key, timeout=TIMEOUT)[0]["env"] is None


def test_functions_that_cannot_be_pickled_fail_in_the_test():
    with pytest.raises(Exception, match="pickle|lambda"):
        _pool.run(lambda: 1, 2, timeout=TIMEOUT)

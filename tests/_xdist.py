"""Running the suite in several pytest-xdist workers (``-n``, set in pyproject's addopts).

A world-2 test keeps both cores of a 2-core machine busy only part of the time:
the test process traces and compares alone, a fault test waits out a timeout,
a subprocess starts. Two workers fill those gaps. Each worker is an ordinary
pytest process with its own rank pools (tests/_pool.py) on its own ports and
process-group stores, its own ``tmp_path`` folder and its own reference-run
cache, so the tests need nothing else from each other, except:

- ``@pytest.mark.alone``: a test whose assertions bound wall-clock time
  (a rank declared dead within the documented margin after a timeout) runs
  while no other worker runs a test: a readers-writer lock on a file shared by
  the session's workers (every test holds it shared; an ``alone`` test
  exclusively, and once it waits, no new test starts beside it). Every
  nightly (``slow``) test is ``alone`` too: world 8 and large models, two at a
  time, would not fit the memory of a CI machine; ``-m slow`` runs in one
  process (``-n auto`` gives no workers for it).
- ``@pytest.mark.xdist_group(name)`` (``--dist loadgroup``): the tests of a
  module whose module-scoped fixture trains or saves once for several tests run
  in one worker, so that fixture runs once.

Without xdist (``-p no:xdist``, ``-n 0``) all of this does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import pytest

# A worker holds up to tests/_pool.py's MAX_LIVE_RANKS ranks (~0.5-1 GiB each)
# and its own test process (~1-2 GiB): about 8 GiB at most.
_GIB_PER_WORKER = 8
_MAX_WORKERS = 4


@pytest.hookimpl(optionalhook=True)
def auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most 4, and at most one per 8 GiB
    of memory; none (one process, as before) for the nightly set
    (``-m slow``), whose tests run one at a time anyway (``alone``)."""
    expr = config.option.markexpr or ""
    if "slow" in expr and "not slow" not in expr:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = _GIB_PER_WORKER * _MAX_WORKERS
    return max(1, min(cores, _MAX_WORKERS, int(mem_gib // _GIB_PER_WORKER)))


def threads_per_worker() -> int:
    """Torch's intra-op threads in one worker: the cores divided among the workers."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    return max(1, (os.cpu_count() or 1) // workers)


def collection_modifyitems(config, items) -> None:
    """Every nightly (``slow``) test runs alone (see the module docstring)."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("alone") is None:
            item.add_marker(pytest.mark.alone)


@contextlib.contextmanager
def _flock(path, mode):
    with open(path, "a+") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def turn(node, tmp_path_factory):
    """Hold this test's turn: shared, or exclusive for an ``alone`` test.

    Two files: ``gate`` (taken exclusively by an ``alone`` test while it waits
    and runs, briefly shared by every other test on its way in) and ``run``
    (shared by every running test, exclusive for an ``alone`` one). A waiting
    ``alone`` test holds the gate, so tests that come after it wait instead of
    overtaking it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    folder = tmp_path_factory.getbasetemp().parent  # shared by this session's workers
    gate, run = folder / "zerograph-xdist.gate", folder / "zerograph-xdist.run"
    if node.get_closest_marker("alone") is not None:
        with _flock(gate, fcntl.LOCK_EX), _flock(run, fcntl.LOCK_EX):
            yield
        return
    with _flock(gate, fcntl.LOCK_SH):
        held = _flock(run, fcntl.LOCK_SH)
        held.__enter__()
    try:
        yield
    finally:
        held.__exit__(None, None, None)


# -- the rank pools' summary line, from each worker to the terminal ------------------

_KEY = "zerograph_pool_summary"


@pytest.hookimpl(tryfirst=True)
def sessionfinish(session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is None:
        return
    import sys

    pool = sys.modules.get("tests._pool")
    if pool is not None and pool.summary():
        workeroutput[_KEY] = pool.summary()


@pytest.hookimpl(optionalhook=True)
def testnodedown(node, error) -> None:
    text = getattr(node, "workeroutput", {}).get(_KEY)
    if text:
        summaries = node.config.__dict__.setdefault("_zerograph_pool_summaries", [])
        summaries.extend(f"[{node.gateway.id}] {line}" for line in text.splitlines())


def worker_pool_summaries(config) -> list[str]:
    return sorted(config.__dict__.get("_zerograph_pool_summaries", []))

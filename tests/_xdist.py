"""Running the suite in several pytest-xdist workers (``-n``, set in pyproject's addopts).

A world-2 test keeps both cores of a 2-core machine busy only part of the
time: the test process traces and compares alone, a fault test waits out a
timeout, a subprocess starts. Two workers fill those gaps. Each worker is an
ordinary pytest process with its own rank pools (tests/_pool.py) on its own
ports and process-group stores, its own ``tmp_path`` folder and its own
reference-run cache, so the tests need nothing else from each other, except
what the scheduler below (``--dist loadgroup``, pyproject's addopts) keeps apart:

- ``@pytest.mark.timing``: a test whose assertions bound wall-clock time on
  both sides (a hung or frozen rank reported after ``collective_timeout_s``
  and within the documented margin). These tests run first, spread over the
  workers, beside each other only: what they time is waiting (a collective's
  timeout, a heartbeat watch), not computing, and no other test starts until
  the last of them has ended.
- ``@pytest.mark.alone``: the test runs while no other worker runs a test.
  Every nightly (``slow``) test is ``alone``: world 8 and large models, two at
  a time, would not fit the memory of a CI machine (``-m slow`` runs in one
  process anyway: ``-n auto`` gives no workers for it).
- ``@pytest.mark.xdist_group(name)``: the tests of a module whose
  module-scoped fixture trains or saves once for several tests run in one
  worker, so that fixture runs once.

The scheduler is xdist's ``loadgroup`` with those two rules; workers mark the
``timing`` and ``alone`` tests by a group of their own each (the controller
sees only node ids). Under another ``--dist`` mode the rules do not apply (a
warning says so). Without xdist (``-p no:xdist``, ``-n 0``) all of this does nothing.
"""

from __future__ import annotations

import logging
import os

import pytest

_log = logging.getLogger("tests.xdist")

# A worker holds up to tests/_pool.py's MAX_LIVE_RANKS ranks (~0.5-1 GiB each)
# and its own test process (~1-2 GiB): about 8 GiB at most.
_GIB_PER_WORKER = 8
_MAX_WORKERS = 4
# the xdist_group of a `timing` / `alone` test: this prefix, then the test's index
_TIMING, _ALONE = "zerograph-timing-", "zerograph-alone-"


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


@pytest.hookimpl(trylast=True)  # after `-m`/`-k` deselected, and after xdist's own loadgroup suffixes
def collection_modifyitems(config, items) -> None:
    """Every nightly (``slow``) test runs ``alone``. In an xdist worker under
    ``--dist loadgroup``, each selected ``timing`` or ``alone`` test gets a
    group of its own, which names its kind to the scheduler: the suffix
    ``@zerograph-timing-N`` on its node id, as xdist writes ``xdist_group``
    names (pytest < 9 keeps a node id in ``_nodeid``); one in an
    ``xdist_group`` gets the group's name with the prefix."""
    grouping = hasattr(config, "workerinput") and config.getvalue("loadgroup")
    for index, item in enumerate(items):
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("alone") is None:
            item.add_marker(pytest.mark.alone)
        if not grouping:
            continue
        for marker, prefix in (("alone", _ALONE), ("timing", _TIMING)):
            if item.get_closest_marker(marker) is not None:
                nodeid, group = item.nodeid, str(index)
                if nodeid.rfind("@") > nodeid.rfind("]"):  # in an xdist_group: its tests of this kind stay together
                    nodeid, group = nodeid.rsplit("@", 1)
                item._nodeid = f"{nodeid}@{prefix}{group}"
                break


def _kind(scope: str) -> str:
    return "timing" if scope.startswith(_TIMING) else "alone" if scope.startswith(_ALONE) else "other"


@pytest.hookimpl(optionalhook=True)
def make_scheduler(config, log):
    """``--dist loadgroup`` with the ``timing`` and ``alone`` rules (module docstring)."""
    dist = config.getoption("dist", "no")
    if dist != "loadgroup":
        if dist != "no":
            _log.warning("--dist %s: `timing` and `alone` tests may run beside others (--dist loadgroup keeps "
                         "them apart: tests/_xdist.py)", dist)
        return None
    from xdist.scheduler import LoadGroupScheduling

    class Scheduling(LoadGroupScheduling):
        """xdist's loadgroup, with the ``timing`` units moved to the front of
        the queue and every hand-out checked against the rules.

        An xdist worker runs a test only once it has been sent the next one (or
        told to stop): it needs the next item to tear down fixtures. So every
        test sent to a worker starts when the following test (or the stop) is
        sent; the last one waits ("parked"). Sending a worker a unit releases its
        parked test and every test of the unit but its last; stopping it releases
        the parked test. A worker runs what it was released in order, so only
        the other workers matter; a release is allowed when, on every other worker:

        - for a ``timing`` test: no test of another kind is released;
        - for an ``alone`` test: no test is released;
        - for any other test: no ``timing`` or ``alone`` test is sent and unfinished
          (so a waiting one is not overtaken).

        When the queue's head is a group of several tests, a worker whose parked
        test is ``timing`` or ``alone`` gets the first single test behind it
        instead (it releases only the parked test). When no worker has a test
        released, any hand-out is allowed (nothing can run beside it; waiting
        would never end). Each finished test lets every other worker ask again,
        then its own."""

        _ordered = False

        def _released_and_parked(self, node) -> tuple[list[str], str | None]:
            kinds = [_kind(scope) for scope, unit in self.assigned_work.get(node, {}).items()
                     for done in unit.values() if not done]
            if node.shutting_down or not kinds:
                return kinds, None
            return kinds[:-1], kinds[-1]

        def _allowed(self, node, releasing: list[str]) -> bool:
            states = [(other, *self._released_and_parked(other)) for other in self.nodes]
            if not any(released for _, released, _ in states):
                return True  # nothing runs anywhere
            released, sent = set(), set()
            for other, r, parked in states:
                if other is not node:
                    released.update(r)
                    sent.update(r + [parked] * (parked is not None))
            for kind in releasing:
                if kind == "timing" and released - {"timing"}:
                    return False
                if kind == "alone" and released:
                    return False
                if kind == "other" and sent & {"timing", "alone"}:
                    return False
            return True

        def _next_unit(self, node) -> str | None:
            """The unit to send ``node`` now, or None."""
            if not self._ordered:  # the queue is complete at the first hand-out
                self._ordered = True
                for scope in reversed([s for s in self.workqueue if _kind(s) == "timing"]):
                    self.workqueue.move_to_end(scope, last=False)
            _, parked = self._released_and_parked(node)
            head, unit = next(iter(self.workqueue.items()))
            candidates = [head]
            if _kind(head) == "other" and len(unit) > 1 and parked in ("timing", "alone"):
                candidates.append(next((s for s, u in self.workqueue.items() if len(u) == 1 and _kind(s) == "other"),
                                       head))
            for scope in candidates[::-1]:
                releasing = [parked] * (parked is not None) + [_kind(scope)] * (len(self.workqueue[scope]) - 1)
                if self._allowed(node, releasing):
                    return scope
            return None

        def _assign_work_unit(self, node) -> None:
            scope = self._next_unit(node)
            if scope is not None:
                self.workqueue.move_to_end(scope, last=False)  # loadgroup sends the queue's first unit
                super()._assign_work_unit(node)

        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                _, parked = self._released_and_parked(node)
                if parked is None or self._allowed(node, [parked]):  # stopping releases the parked test
                    node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) <= 2:  # loadgroup's heuristic
                self._assign_work_unit(node)

        def mark_test_complete(self, node, item_index: int, duration: float = 0) -> None:
            nodeid = self.registered_collections[node][item_index]
            self.assigned_work[node][self._split_scope(nodeid)][nodeid] = True
            for other in self.nodes:  # the workers held back first (a waiting test is not overtaken), then this one
                if other is not node:
                    self._reschedule(other)
            self._reschedule(node)

    return Scheduling(config, log)


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

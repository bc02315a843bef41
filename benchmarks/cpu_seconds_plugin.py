"""CPU seconds of each test's whole process tree (a measuring plugin, not part of CI).

Wall-clock time of a test on a shared, loaded machine says little; the CPU
seconds spent by the test process and everything it started (rank-pool
processes, spawned ranks, subprocesses) do not depend on the load. Use::

    python -m pytest -p benchmarks.cpu_seconds_plugin tests/...

It prints one line per test (CPU seconds of the tree, wall seconds) at the
end, and appends each to ``$CPU_SECONDS_OUT`` (when that is set) as soon as
the test ends, so a long run that is cut short still leaves its numbers. A test's
seconds include what its pools' ranks spent while it ran, and starting a pool
when it is the first to need one.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

_results: list[tuple[str, float, float]] = []


def _tree_cpu_seconds() -> float:
    me = psutil.Process()
    reaped = os.times()
    total = reaped.user + reaped.system + reaped.children_user + reaped.children_system
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue
        # a live child's own time plus that of its children it has reaped
        total += t.user + t.system + t.children_user + t.children_system
    return total


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu0, wall0 = _tree_cpu_seconds(), time.monotonic()
    yield
    result = (item.nodeid, _tree_cpu_seconds() - cpu0, time.monotonic() - wall0)
    _results.append(result)
    out = os.environ.get("CPU_SECONDS_OUT")
    if out:
        with open(out, "a") as f:
            f.write(f"{result[1]:.1f}\t{result[2]:.1f}\t{result[0]}\n")


def pytest_terminal_summary(terminalreporter):
    if not _results:
        return
    terminalreporter.write_sep("=", "CPU seconds of the process tree per test")
    for nodeid, cpu, wall in sorted(_results, key=lambda r: -r[1]):
        terminalreporter.write_line(f"{cpu:9.1f} cpu {wall:9.1f} wall  {nodeid}")
    total = sum(r[1] for r in _results)
    terminalreporter.write_line(f"{total:9.1f} cpu total ({len(_results)} tests)")

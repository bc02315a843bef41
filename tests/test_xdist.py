"""The suite's xdist scheduler (tests/_xdist.py), on a small suite of sleeping
tests run by two real workers: ``timing`` tests first, beside each other
only; an ``alone`` test beside nothing; the others as loadgroup hands them out."""

from __future__ import annotations

import json
import os

import pytest

pytest_plugins = ["pytester"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFTEST = f"""
import json, os, sys, time
sys.path.insert(0, {REPO!r})
import pytest
from tests import _xdist

pytest_collection_modifyitems = _xdist.collection_modifyitems
pytest_xdist_make_scheduler = _xdist.make_scheduler


@pytest.fixture(autouse=True)
def _record(request):
    start = time.monotonic()
    yield
    with open(os.path.join(os.environ["SPANS"], request.node.name + ".json"), "w") as f:
        json.dump({{"start": start, "end": time.monotonic(), "worker": os.environ.get("PYTEST_XDIST_WORKER"),
                    "kind": "timing" if request.node.get_closest_marker("timing") else
                    "alone" if request.node.get_closest_marker("alone") else "other"}}, f)
"""

_TESTS = """
import time
import pytest

@pytest.mark.parametrize("i", range(6))
def test_other_before(i):
    time.sleep(0.2)

@pytest.mark.timing
@pytest.mark.parametrize("i", range(4))
def test_timed(i):
    time.sleep(0.6)

@pytest.mark.alone
def test_lonely():
    time.sleep(0.5)

@pytest.mark.parametrize("i", range(6))
def test_other_after(i):
    time.sleep(0.2)

# a group of several tests: first in loadgroup's queue after the timing tests
@pytest.mark.xdist_group("trio")
@pytest.mark.parametrize("i", range(3))
def test_grouped(i):
    time.sleep(0.2)
"""


def _overlap(a, b) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


@pytest.mark.timeout(120)
def test_timing_tests_run_first_beside_each_other_and_alone_tests_beside_nothing(pytester, tmp_path, monkeypatch):
    pytest.importorskip("xdist")
    pytester.makeconftest(_CONFTEST)
    pytester.makepyfile(test_sleepers=_TESTS)
    pytester.makeini("[pytest]\nmarkers =\n    timing: t\n    alone: a\n")
    spans_dir = tmp_path / "spans"
    spans_dir.mkdir()
    monkeypatch.setenv("SPANS", str(spans_dir))  # the workers inherit it
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                                           timeout=90)  # a scheduler that deadlocks: killed, not orphaned
    result.assert_outcomes(passed=20)
    spans = {p.stem: json.loads(p.read_text()) for p in spans_dir.glob("*.json")}
    assert len(spans) == 20, sorted(spans)
    timing = [s for s in spans.values() if s["kind"] == "timing"]
    alone = [s for s in spans.values() if s["kind"] == "alone"]
    others = [s for s in spans.values() if s["kind"] == "other"]
    # first, although collected after six others; on both workers, two at a time
    assert max(t["end"] for t in timing) <= min(o["start"] for o in others + alone), spans
    assert {t["worker"] for t in timing} == {"gw0", "gw1"}, timing
    assert any(_overlap(a, b) for a in timing for b in timing if a is not b), timing
    # nothing beside the alone test
    assert not any(_overlap(alone[0], s) for s in spans.values() if s is not alone[0]), spans
    assert {o["worker"] for o in others} == {"gw0", "gw1"}, others

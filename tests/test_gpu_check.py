"""benchmarks/gpu_check.py: the dry run (every part on CPU, tiny shapes) reports
a result for every part, and the runner survives a part that raises, crashes
or hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check, gpu_check_parts

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~1 min of CPU: nightly runs every part; CI checks the runner (the tests below)
@pytest.mark.timeout(600)
def test_dry_run_reports_every_part(tmp_path):
    # about 60 s of CPU time (a minute on a quiet 2-core machine); the timeout is for a loaded one
    env = dict(os.environ, PYTHONPATH="")  # the script finds the checkout by itself
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / gpu_check.REPORT).read_text()
    parts = json.loads((tmp_path / gpu_check.REPORT_JSON).read_text())["parts"]
    assert [p["name"] for p in parts] == [p.name for p in gpu_check.PARTS]
    for i, part in enumerate(parts, 1):
        assert part["status"] == "ok", (part["name"], part["status"], part.get("log_tail"))
        assert f"## {i}. {part['name']}" in report
        assert part["name"] == "environment" or part["figures"], part["name"]
        for figure in part["figures"]:
            assert figure["anchor"] and figure["anchor_value"], figure
            assert figure["ratio"] is None or figure["ratio"] == figure["ratio"], figure  # not nan
    assert report.count("**Result: ok**") == len(gpu_check.PARTS)
    assert "failed" not in report.split("## 1.")[0]  # the summary
    assert "CPU only" in report.splitlines()[3] and "torch " in report  # device and versions in the header


def test_caps_sum_to_less_than_nine_minutes():
    assert sum(p.cap_s for p in gpu_check.PARTS) < 9 * 60
    assert len({p.name for p in gpu_check.PARTS}) == len(gpu_check.PARTS)
    for p in gpu_check.PARTS:
        assert callable(getattr(gpu_check_parts, f"part_{p.name}")), p.name


def _raises(ctx, rep):
    rep.figure("before the error", "1", "anchor", "1", 1.0, "a / a")
    raise ValueError("a bad shape")


def _crashes(ctx, rep):
    rep.figure("before the crash", "1", "anchor", "1", 1.0, "a / a")
    os.abort()


def _hangs(ctx, rep):
    rep.figure("before the hang", "1", "anchor", "1", 1.0, "a / a")
    time.sleep(60)


@pytest.mark.timeout(60)
def test_a_failing_part_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check_parts, "part_raises", _raises, raising=False)
    monkeypatch.setattr(gpu_check_parts, "part_crashes", _crashes, raising=False)
    monkeypatch.setattr(gpu_check_parts, "part_hangs", _hangs, raising=False)
    records = []
    with open(tmp_path / "log", "w") as log:
        for name, cap in (("raises", 30), ("crashes", 30), ("hangs", 2)):
            t0 = time.monotonic()
            records.append(gpu_check._run_part(gpu_check.Part(name, name, cap), cap, True, tmp_path, log))
            assert time.monotonic() - t0 < cap + 5
    raised, crashed, hung = records
    assert raised["status"] == "failed: ValueError: a bad shape"
    assert "ValueError: a bad shape" in raised["log_tail"]  # the traceback is in the log
    assert crashed["status"].startswith("failed: the part's process ended (killed by signal 6)")
    assert hung["status"].startswith("failed: timed out after its cap of 2 s")
    # what each recorded before it failed is kept
    assert [[f["figure"] for f in r["figures"]] for r in records] == [["before the error"], ["before the crash"],
                                                                      ["before the hang"]]
    report = gpu_check.render(records, dict(dry_run=True, date="d", command="c", n_parts=3, caps=62, elapsed=1))
    assert report.count("**Result: failed") == 3 and "Last lines of its output:" in report


def test_multi_gpu_part_skips_without_several_gpus(tmp_path):
    import torch

    if torch.cuda.device_count() > 1:
        pytest.skip("this machine has several GPUs")
    rep = gpu_check.PartReport(tmp_path / "nccl.json")
    ctx = gpu_check.Context(dry_run=False, deadline=time.monotonic() + 30)
    with pytest.raises(gpu_check.Skip, match=r"^[01] GPUs?$"):
        gpu_check_parts.part_nccl(ctx, rep)


_FORK_SAFE = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from benchmarks import gpu_check, gpu_check_parts
gpu_check._prepare_process(dry_run=False)   # what the runner does before forking the parts

def part_threads(ctx, rep):
    import torch
    torch.set_num_threads(2)
    x = torch.randn(4_000_000)
    for _ in range(3):
        (x * 2 + 1).exp().sum()   # a parallel region: hangs after fork if the runner started OpenMP's pool
    rep.figure("ran", "1", "a", "1", 1.0, "a / a")

gpu_check_parts.part_threads = part_threads
import torch
assert not torch.cuda.is_initialized()
with open(os.path.join(sys.argv[2], "log"), "a") as log:
    rec = gpu_check._run_part(gpu_check.Part("threads", "t", 30), 30, True, Path(sys.argv[2]), log)
print(rec["status"])
"""


@pytest.mark.timeout(120)
def test_parts_forked_by_the_runner_can_use_threads(tmp_path):
    """The runner imports torch and zerograph before forking the parts, but runs
    no torch op: GNU OpenMP's thread pool does not survive a fork."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run([sys.executable, "-c", _FORK_SAFE, str(ROOT), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "ok", proc.stdout + proc.stderr

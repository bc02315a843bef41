"""``python -m zerograph bench`` in a subprocess with a tiny model, and its
errors for bad options and for an install without benchmarks/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import zerograph.cli.bench as bench_cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--world-size", "2", "--steps", "2", "--warmup", "1", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
        "--vocab-size", "64", "--block-size", "16", "--batch-size", "2", "--timeout", "200"]


def _cli(*args, cwd=ROOT, timeout=240):
    env = dict(os.environ, PYTHONPATH="")  # only what the installed package finds by itself
    return subprocess.run([sys.executable, "-m", "zerograph", "bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(260)
def test_bench_runs_the_comparison(tmp_path):
    out = tmp_path / "bench.md"
    # From another directory: the checkout's benchmarks/ is found next to the package.
    proc = _cli(*TINY, "--systems", "zerograph stage 3,DDP", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    assert report.strip() in proc.stdout
    assert "# zerograph benchmark (small)" in report
    assert "python -m zerograph bench --world-size 2 --steps 2 --warmup 1 --size small --n-layer 1" in report
    table = [line for line in report.splitlines() if line.startswith("|")]
    assert any("zerograph stage 3" in line for line in table) and any("DDP" in line for line in table), report
    assert not any("FSDP2" in line for line in table)


def test_bench_bad_options_are_errors_naming_the_option(capsys):
    import zerograph.__main__ as cli

    assert cli.main(["bench", *TINY, "--systems", "zerograph stage 9"]) == 2
    assert "--systems: unknown 'zerograph stage 9'" in capsys.readouterr().err
    assert cli.main(["bench", "--n-embd", "30", "--n-head", "4"]) == 2
    assert "--n-embd (30) must be a multiple of --n-head (4)" in capsys.readouterr().err
    assert cli.main(["bench", "--steps", "0"]) == 2
    assert "--steps and --warmup must be >= 1" in capsys.readouterr().err
    assert cli.main(["bench", "--systems", ","]) == 2  # not an IndexError from an empty report
    assert "--systems ',' names no system; choose from 'zerograph stage 0'" in capsys.readouterr().err
    assert cli.main(["bench", "--timeout", "0"]) == 2  # not a TimeoutError traceback from the launch
    assert "--timeout must be > 0 seconds, got 0" in capsys.readouterr().err


def test_bench_without_a_source_checkout_says_what_is_needed(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs the benchmarks/ directory of a zerograph source checkout"):
        bench_cli.load_benchmark(tmp_path)
    assert bench_cli.load_benchmark().__file__ == str(ROOT / "benchmarks" / "bench_zero.py")

"""``python -m zerograph bench``: benchmarks/bench_zero.py's comparison of
zerograph's ZeRO stages with DDP and FSDP2 on local gloo ranks.

    python -m zerograph bench                                   # 3.7M-parameter GPT, 2 ranks, every system
    python -m zerograph bench --world-size 4 --steps 20 --systems "zerograph stage 3,FSDP2"
    python -m zerograph bench --size large                      # ~98M parameters, peak RSS too
    python -m zerograph bench --n-layer 2 --n-embd 64 --out bench.md

The benchmark code lives in the source checkout's ``benchmarks/`` directory
(it is not part of the installed package): run from a clone installed with
``pip install -e .``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

_MODEL_KEYS = {"n_layer": "n-layer", "n_embd": "n-embd", "n_head": "n-head", "vocab_size": "vocab-size",
               "block_size": "block-size", "batch": "batch-size"}


def checkout_root() -> Path:
    """The source checkout this zerograph was imported from (the parent of the package)."""
    return Path(__file__).resolve().parents[2]  # zerograph/cli/bench.py -> the checkout


def load_benchmark(root: Path | None = None):
    """The ``benchmarks.bench_zero`` module of the checkout at ``root``."""
    root = Path(root) if root is not None else checkout_root()
    script = root / "benchmarks" / "bench_zero.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"python -m zerograph bench needs the benchmarks/ directory of a zerograph source checkout, and "
            f"{script} does not exist (this zerograph is installed from {checkout_root() / 'zerograph'}). "
            "Clone the repository and install it with `pip install -e .`, then run the command from there")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # spawned ranks inherit sys.path, so they import it too
    module = importlib.import_module("benchmarks.bench_zero")
    if Path(module.__file__).resolve() != script.resolve():
        raise ImportError(f"`benchmarks.bench_zero` resolves to {module.__file__}, not {script}: another "
                          "package named `benchmarks` shadows zerograph's; run from the checkout's root")
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, default=2, metavar="N",
                        help="number of local ranks (gloo on CPU); default %(default)s")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="timed steps per system (default 10; 3 with --size large)")
    parser.add_argument("--warmup", type=int, default=None, metavar="K",
                        help="untimed first steps, compilation included (default 3; 2 with --size large)")
    parser.add_argument("--size", choices=("small", "large"), default="small",
                        help="small: 3.7M-parameter GPT, batch 8 per rank; large: ~98M parameters, batch 2, "
                             "with peak-RSS measurement; default %(default)s")
    model = parser.add_argument_group("model (override --size)")
    for key, flag in _MODEL_KEYS.items():
        model.add_argument(f"--{flag}", dest=key, type=int, default=None, metavar="N")
    parser.add_argument("--systems", default=None,
                        help='comma-separated subset of: "zerograph stage 0".."zerograph stage 3", DDP, FSDP2')
    parser.add_argument("--out", metavar="FILE", default=None, help="also write the markdown report here")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                        help="seconds before the launch is killed; default %(default)s")


def run(args: argparse.Namespace) -> str:
    """Run the benchmark; the markdown report."""
    bench = load_benchmark()
    large = args.size == "large"
    spec = dict(bench.LARGE if large else bench.SMALL)
    for key in _MODEL_KEYS:
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{_MODEL_KEYS[key]} must be >= 1, got {value}")
            spec[key] = value
    if spec["n_embd"] % spec["n_head"]:
        raise ValueError(f"--n-embd ({spec['n_embd']}) must be a multiple of --n-head ({spec['n_head']})")
    known = bench.SMALL_SYSTEMS
    systems = list(bench.LARGE_SYSTEMS if large else bench.SMALL_SYSTEMS)
    if args.systems:
        systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        if not systems:
            raise ValueError(f"--systems {args.systems!r} names no system; choose from {', '.join(map(repr, known))}")
        unknown = [s for s in systems if s not in known]
        if unknown:
            raise ValueError(f"--systems: unknown {', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(map(repr, known))}")
    if args.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {args.world_size}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    steps = args.steps if args.steps is not None else (3 if large else 10)
    warmup = args.warmup if args.warmup is not None else (2 if large else 3)
    if steps < 1 or warmup < 1:
        raise ValueError("--steps and --warmup must be >= 1 (model states are measured after the first step)")
    if large:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # as benchmarks/bench_zero.py --large

    from zerograph.runtime.launch import spawn

    t0 = time.perf_counter()
    per_rank = spawn(bench.rank_main, args.world_size, spec, systems, steps, warmup, large, timeout=args.timeout)
    wall = time.perf_counter() - t0
    import torch

    header = [
        f"# zerograph benchmark ({args.size})", "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}; torch "
        f"{torch.__version__}, gloo, {args.world_size} ranks x {max(1, (os.cpu_count() or 1) // args.world_size)} "
        f"thread(s)",
        f"- command: `{_command_line(args, steps, warmup)}`",
        f"- whole launch: {wall:.0f} s", "",
    ]
    report = "\n".join(header) + bench.build_report(per_rank, spec, args.world_size, steps, warmup, large) + "\n"
    if args.out:
        Path(args.out).write_text(report)
    return report


def _command_line(args: argparse.Namespace, steps: int, warmup: int) -> str:
    """The command that reproduces this run (every setting spelled out)."""
    parts = ["python", "-m", "zerograph", "bench", "--world-size", str(args.world_size), "--steps", str(steps),
             "--warmup", str(warmup), "--size", args.size]
    for key, flag in _MODEL_KEYS.items():
        if getattr(args, key) is not None:
            parts += [f"--{flag}", str(getattr(args, key))]
    if args.systems:
        parts += ["--systems", args.systems]
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``python -m zerograph bench``."""
    try:
        report = run(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"zerograph bench: error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:  # the launch stopped every rank
        print(f"zerograph bench: error: {exc} (--timeout {args.timeout:g}); every rank was stopped: "
              "raise --timeout or lower --steps", file=sys.stderr)
        return 1
    print(report)
    return 0

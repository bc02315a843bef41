"""``python -m zerograph demo``: train a small byte-level GPT with ZeRO on local processes.

The demo spawns ``--world-size`` CPU processes (gloo), builds the same GPT on
every rank, shards it with :func:`zerograph.compile`, trains it with AdamW on
the packaged essay (``zerograph/data/corpus.txt``), and then reports what
ZeRO bought: this rank's model-state bytes next to plain data parallelism's
16 bytes per parameter, the communication per step next to DDP's, a loss
curve, a text sample, and the checkpoint it saved (full tensors, original
keys, loadable by a plain ``GPT``).

Use it from Python with :func:`run`, which takes the CLI's arguments::

    result = zerograph.cli.demo.run(["--steps", "20", "--n-layer", "1"])
    result.report, result.paths["model"], result.train_losses

The report is the demo's user-facing output and goes to stdout; the progress
bar goes to stderr; zerograph itself only logs.

This module holds the command line and the orchestration; the run plan is in
:mod:`~zerograph.cli.demo_plan`, what each rank runs in
:mod:`~zerograph.cli.demo_train`, the header, report and trace in
:mod:`~zerograph.cli.demo_report`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence

import zerograph
from zerograph.cli import demo_report
from zerograph.cli.demo_plan import build_plan
from zerograph.cli.demo_report import ascii_curve
from zerograph.cli.demo_train import VAL_SEED_OFFSET, rank_main
from zerograph.config import Config
from zerograph.models import GPT, GPTConfig
from zerograph.models import data as textdata

__all__ = ["DEFAULT_PROMPT", "VAL_SEED_OFFSET", "DemoResult", "add_arguments", "ascii_curve", "main", "parse_args",
           "run"]

DEFAULT_PROMPT = "Data parallelism "


# ---------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options (shared by ``python -m zerograph demo`` and :func:`parse_args`)."""
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--world-size", type=int, default=2, metavar="N",
                           help="number of local processes (gloo on CPU); default %(default)s")
    run_group.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=None,
                           help="ZeRO stage; overrides the config file's zero_optimization.stage "
                                "(default: the file's stage, else 3)")
    run_group.add_argument("--config", metavar="PATH", default=None,
                           help="DeepSpeed-style JSON config; --stage is merged over it")
    run_group.add_argument("--out", metavar="DIR", default="zerograph_out",
                           help="where rank 0 saves model.pt, config.json and losses.json; default %(default)s")
    run_group.add_argument("--seed", type=int, default=0, help="model init and data order seed; default %(default)s")
    run_group.add_argument("--timeout", type=float, default=900.0, metavar="S",
                           help="kill the processes after this many seconds; default %(default)s")
    run_group.add_argument("--no-progress", dest="progress", action="store_false",
                           help="no progress bar on stderr")
    run_group.add_argument("-v", "--verbose", action="store_true", help="show zerograph's INFO logs")

    model_group = parser.add_argument_group("model (byte-level GPT, vocab 256)")
    model_group.add_argument("--n-layer", type=int, metavar="N", default=2, help="default %(default)s")
    model_group.add_argument("--n-embd", type=int, metavar="N", default=128, help="default %(default)s")
    model_group.add_argument("--n-head", type=int, metavar="N", default=4, help="default %(default)s")
    model_group.add_argument("--block-size", type=int, metavar="N", default=64,
                             help="context length in bytes; default %(default)s")

    train_group = parser.add_argument_group("training")
    train_group.add_argument("--steps", type=int, metavar="N", default=300, help="optimizer steps; default %(default)s")
    train_group.add_argument("--batch-size", type=int, metavar="N", default=16,
                             help="global batch (rows per optimizer step, over all ranks; a config's "
                                  "train_batch_size takes precedence); default %(default)s")
    train_group.add_argument("--lr", type=float, metavar="LR", default=3e-3,
                             help="peak AdamW learning rate (linear warmup, cosine decay to 10%%); default %(default)s")
    train_group.add_argument("--eval-batches", type=int, default=8, metavar="N",
                             help="held-out batches for the validation loss; default %(default)s")

    sample_group = parser.add_argument_group("sample")
    sample_group.add_argument("--prompt", default=DEFAULT_PROMPT,
                              help="text the sample starts from; default %(default)r")
    sample_group.add_argument("--sample-bytes", type=int, default=200, metavar="N",
                              help="bytes to generate (0: no sample); default %(default)s")
    sample_group.add_argument("--top-k", type=int, default=8, metavar="K",
                              help="sample from the K most likely bytes (0: greedy); default %(default)s")
    sample_group.add_argument("--temperature", type=float, metavar="T", default=0.8, help="default %(default)s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m zerograph demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``python -m zerograph demo``: run and print the report; an exit status."""
    try:
        run(args)
    except (ValueError, zerograph.ConfigError) as e:  # bad options or config: no traceback
        print(f"zerograph demo: error: {e}", file=sys.stderr)
        return 2
    except TimeoutError as e:  # the launch stopped every rank: say which knob to turn
        print(f"zerograph demo: error: {e} (--timeout {args.timeout:g}); every rank was stopped before the run "
              "finished: raise --timeout or lower --steps", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class DemoResult:
    """What :func:`run` returns: the printed report and the numbers behind it."""

    report: str
    num_parameters: int
    stage: int
    world_size: int
    train_losses: list[float]
    val_before: float
    val_after: float
    state_bytes: list[dict[str, int]]  # per rank
    ddp_state_bytes: int
    comm: list[dict[str, int]]  # per rank, last step
    ddp_comm_bytes: int
    sample: str
    paths: dict[str, str]  # model, config, losses
    state_keys: dict[str, tuple[int, ...]]
    phase_times: dict[str, float]  # rank 0's seconds per phase
    wall_time: float  # seconds for the whole run, process start to report


def run(options: argparse.Namespace | Sequence[str] | None = None, *, echo: bool = True) -> DemoResult:
    """Run the demo: spawn the ranks, train, save, and build (and with ``echo``
    print) the report. ``options`` is a parsed namespace or a CLI-style list
    such as ``["--steps", "20"]``. Raises ValueError/ConfigError on bad options."""
    args = options if isinstance(options, argparse.Namespace) else parse_args(list(options or []))
    plan = build_plan(args)
    corpus = textdata.load_corpus()
    train, val = textdata.split(corpus)
    if len(val) <= args.block_size + 1:
        raise ValueError(f"--block-size ({args.block_size}) is too long for the held-out data ({len(val)} bytes)")
    psi = GPT(GPTConfig(**plan.model)).num_parameters()
    header = demo_report.header(plan, psi, len(corpus), len(train))
    if echo:
        print(header + "\n", flush=True)

    from zerograph.runtime.launch import spawn

    start = time.perf_counter()
    results = spawn(rank_main, args.world_size, plan, timeout=args.timeout)
    results.sort(key=lambda r: r["rank"])
    body = demo_report.report(plan, results, psi) + "\n" + demo_report.write_trace(plan)
    if echo:
        print(body, flush=True)
    r0 = results[0]
    return DemoResult(
        report=header + "\n\n" + body,
        num_parameters=psi,
        stage=Config.load(plan.zerograph).stage,
        world_size=args.world_size,
        train_losses=r0["train_losses"],
        val_before=r0["val_before"],
        val_after=r0["val_after"],
        state_bytes=[r["state_bytes"] for r in results],
        ddp_state_bytes=16 * psi,
        comm=[r["comm"] for r in results],
        ddp_comm_bytes=8 * psi,
        sample=r0["sample"],
        paths=r0["paths"],
        state_keys=r0["state_keys"],
        phase_times=r0["phase_times"],
        wall_time=time.perf_counter() - start,
    )

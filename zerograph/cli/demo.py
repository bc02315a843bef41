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
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import zerograph
from zerograph.config import Config
from zerograph.models import GPT, GPTConfig
from zerograph.models import data as textdata
from zerograph.runtime.offload import _local
from zerograph.runtime.stats import KINDS, CommStats

__all__ = ["DemoResult", "add_arguments", "ascii_curve", "main", "parse_args", "run"]

DEFAULT_PROMPT = "Data parallelism "
VAL_SEED_OFFSET = 1_000_000  # validation batches use steps far from the training ones
CURVE_ROWS = 10
CURVE_COLS = 60


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
# Setup shared by the parent and the ranks


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _zerograph_config(args: argparse.Namespace) -> dict[str, Any]:
    """The user's config file (if any) with the stage merged over it, as a dict."""
    user: dict[str, Any] = {}
    if args.config is not None:
        Config.load(args.config)  # a missing file or bad JSON is reported with the file's name
        user = json.loads(Path(args.config).read_text())
    stage = args.stage
    if stage is None:
        stage = user.get("zero_optimization", {}).get("stage", 3)
    merged = _deep_merge(user, {"zero_optimization": {"stage": stage}})
    Config.load(merged)  # validate here, with a clear error, before any process starts
    return merged


def _model_config(args: argparse.Namespace) -> GPTConfig:
    return GPTConfig(
        vocab_size=textdata.VOCAB_SIZE,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=0.0,
        bias=True,
        tie_weights=True,
    )


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a rank needs, picklable."""

    args: dict[str, Any]
    model: dict[str, Any]
    zerograph: dict[str, Any]
    global_batch: int
    accumulation: int
    out_dir: str


def _plan(args: argparse.Namespace) -> _Plan:
    for name in ("world_size", "steps", "n_layer", "n_embd", "n_head", "block_size", "eval_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise ValueError(f"--n-embd ({args.n_embd}) must be divisible by --n-head ({args.n_head})")
    if args.lr <= 0 or args.temperature <= 0:
        raise ValueError("--lr and --temperature must be positive")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be positive (seconds before the run is stopped), got {args.timeout:g}")
    if args.sample_bytes < 0 or args.top_k < 0:
        raise ValueError("--sample-bytes and --top-k must not be negative")
    zg = _zerograph_config(args)
    cfg = Config.load(zg)
    train_batch, _, accumulation = cfg.resolve_batch(args.world_size)
    global_batch = train_batch if train_batch is not None else args.batch_size
    if global_batch % (args.world_size * accumulation):
        raise ValueError(
            f"the global batch ({global_batch}) must be divisible by world size ({args.world_size}) "
            f"x gradient accumulation steps ({accumulation}); change --batch-size"
        )
    if not args.prompt.encode("utf-8"):
        raise ValueError("--prompt must not be empty")
    return _Plan(
        args=vars(args).copy(),
        model=dataclasses.asdict(_model_config(args)),
        zerograph=zg,
        global_batch=global_batch,
        accumulation=accumulation,
        out_dir=str(Path(args.out).resolve()),
    )


def _lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first min(20, steps/10) steps, then cosine decay to 10% of peak."""
    warmup = max(1, min(20, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------
# What runs on every rank


class _Progress:
    """A one-line progress bar on stderr (rank 0 only)."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self.start = time.perf_counter()
        self.first_done: float | None = None  # the first step includes compilation: no ETA from it

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done = now
        elapsed = now - self.start
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        if done == 1 and self.total > 1:
            left = "   ?"
        else:
            left = f"{(now - self.first_done) / max(1, done - 1) * (self.total - done):4.0f}"
        sys.stderr.write(f"\rtraining [{bar}] {done}/{self.total}  loss {loss:.3f}  "
                         f"{elapsed:5.1f}s elapsed, ~{left}s left ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of this rank's local tensors: parameter shards, gradient shards,
    optimizer state (Adam's two moments; its 0-dim step counters separately).
    Tensors sharing storage (tied weights) are counted once."""
    seen: set[tuple[int, int]] = set()

    def nbytes(t: torch.Tensor) -> int:
        t = _local(t)
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    params = list(dict.fromkeys(model.parameters()))
    out = {"params": 0, "grads": 0, "optimizer": 0, "step_counters": 0}
    for p in params:
        out["params"] += nbytes(p)
        if p.grad is not None:
            out["grads"] += nbytes(p.grad)
    for state in opt.state.values():  # keyed by the parameters, or by make_optimizer's masters
        for value in state.values():
            if isinstance(value, torch.Tensor):
                out["step_counters" if value.dim() == 0 else "optimizer"] += nbytes(value)
    return out


def _mean_over_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return float(t.item())


@torch.no_grad()
def _val_loss(model, val: torch.Tensor, plan: _Plan, rank: int, world: int) -> float:
    a = plan.args
    total = 0.0
    for i in range(a["eval_batches"]):
        idx, targets = textdata.get_batch(val, VAL_SEED_OFFSET + i, plan.global_batch, a["block_size"],
                                          rank, world, seed=a["seed"])
        total += model(idx, targets).loss.item()
    return _mean_over_ranks(total / a["eval_batches"])


@torch.no_grad()
def _sample(model, plan: _Plan, world: int) -> str:
    """Continue the prompt, one byte per forward.

    Every forward has one fixed shape (the validation batches' rows per
    rank x block size), so the growing text never triggers a recompilation:
    the context is right-padded, and since the model is causal the logits at
    the last real position do not depend on the padding. Every rank runs the
    same calls (stage 3 gathers parameters inside the forward) with the same
    generator; only row 0 is used.
    """
    a = plan.args
    block = a["block_size"]
    rows = plan.global_batch // world
    ids = textdata.encode(a["prompt"])
    gen = torch.Generator().manual_seed(a["seed"])
    window = torch.full((rows, block), ord(" "), dtype=torch.long)
    for _ in range(a["sample_bytes"]):
        context = ids[-block:]
        window[:, :len(context)] = context
        logits = model(window).logits[0, len(context) - 1].float()
        if a["top_k"] == 0:
            nxt = logits.argmax().view(1)
        else:
            top, where = logits.topk(min(a["top_k"], logits.numel()))
            probs = torch.softmax(top / a["temperature"], dim=-1)
            nxt = where[torch.multinomial(probs, 1, generator=gen)]
        ids = torch.cat([ids, nxt])
    return textdata.decode(ids)


def _save(plan: _Plan, state: dict[str, torch.Tensor], losses: dict[str, Any]) -> dict[str, str]:
    out = Path(plan.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / "model.pt", "config": out / "config.json", "losses": out / "losses.json"}
    torch.save(state, paths["model"])
    a = plan.args
    config = {
        "model": plan.model,
        "zerograph": Config.load(plan.zerograph).to_dict(),
        "training": {
            "world_size": a["world_size"],
            "steps": a["steps"],
            "global_batch": plan.global_batch,
            "gradient_accumulation_steps": plan.accumulation,
            "lr": a["lr"],
            "schedule": "linear warmup min(20, steps/10), cosine decay to 10%",
            "optimizer": "torch.optim.AdamW (default betas, weight_decay 0.01)",
            "seed": a["seed"],
            "data": "zerograph/data/corpus.txt (byte-level, first 90% train)",
        },
    }
    paths["config"].write_text(json.dumps(config, indent=2) + "\n")
    paths["losses"].write_text(json.dumps(losses, indent=2) + "\n")
    return {k: str(v) for k, v in paths.items()}


def _rank_main(plan: _Plan) -> dict[str, Any]:
    """One rank of the demo (run by :func:`zerograph.runtime.launch.spawn`)."""
    import torch.distributed as dist

    a = plan.args
    logging.basicConfig(level=logging.INFO if a["verbose"] else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1

    t0 = time.perf_counter()
    train, val = textdata.split(textdata.load_corpus())
    torch.manual_seed(a["seed"])  # the same initial model on every rank
    model = GPT(GPTConfig(**plan.model))
    model = zerograph.compile(model, plan.zerograph)
    opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=a["lr"])  # steps the local shards

    setup_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_before = _val_loss(model, val, plan, rank, world)
    val_before_time = time.perf_counter() - t0

    progress = _Progress(a["steps"], enabled=a["progress"] and rank == 0)
    losses: list[float] = []
    step_times: list[float] = []
    state_bytes: dict[str, int] = {}
    comm: dict[str, int] = {}
    start = time.perf_counter()
    for step in range(a["steps"]):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, a["steps"], a["lr"])
        idx, targets = textdata.get_batch(train, step, plan.global_batch, a["block_size"], rank, world, seed=a["seed"])
        total = 0.0
        for micro_idx, micro_targets in zip(idx.chunk(plan.accumulation), targets.chunk(plan.accumulation)):
            loss = model(micro_idx, micro_targets).loss
            loss.backward()
            total += loss.item() / plan.accumulation
        opt.step()
        if step == a["steps"] - 1:  # gradients and optimizer state are both alive here
            state_bytes = _state_bytes(model, opt)
            comm = dict(zerograph.inspect(model).comm_bytes_last_step)
        opt.zero_grad()
        losses.append(_mean_over_ranks(total))
        step_times.append(time.perf_counter() - t0)
        progress.update(step + 1, losses[-1])
    progress.close()
    train_time = time.perf_counter() - start

    t0 = time.perf_counter()
    val_after = _val_loss(model, val, plan, rank, world)
    eval_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    sample = _sample(model, plan, world) if a["sample_bytes"] else ""
    sample_time = time.perf_counter() - t0

    t0 = time.perf_counter()
    state = zerograph.full_state_dict(model)  # collective: every rank
    result: dict[str, Any] = {"rank": rank, "state_bytes": state_bytes, "comm": comm}
    if rank == 0:
        loss_record = {"train": losses, "val_before": val_before, "val_after": val_after}
        result.update(
            train_losses=losses,
            val_before=val_before,
            val_after=val_after,
            step_times=step_times,
            train_time=train_time,
            sample=sample,
            paths=_save(plan, state, loss_record),
            state_keys={k: tuple(v.shape) for k, v in state.items()},
        )
        result["phase_times"] = dict(setup=setup_time, val_before=val_before_time, train=train_time,
                                     val_after=eval_time, sample=sample_time, save=time.perf_counter() - t0)
    return result


# ---------------------------------------------------------------------------
# The report


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


def ascii_curve(values: Sequence[float], rows: int = CURVE_ROWS, cols: int = CURVE_COLS) -> str:
    """A text plot of ``values``: up to ``cols`` columns (means of equal runs of
    steps), ``rows`` rows between the smallest and largest column."""
    if not values:
        return "(no values)"
    n = len(values)
    cols = min(cols, n)
    edges = [round(i * n / cols) for i in range(cols + 1)]
    points = [sum(values[edges[i]:edges[i + 1]]) / (edges[i + 1] - edges[i]) for i in range(cols)]
    hi, lo = max(points), min(points)
    span = (hi - lo) or 1.0
    levels = [rows - 1 - round((p - lo) / span * (rows - 1)) for p in points]
    lines = []
    for r in range(rows):
        label = f"{hi:6.2f}" if r == 0 else f"{lo:6.2f}" if r == rows - 1 else ""
        lines.append(f"  {label:>6} |" + "".join("*" if lv == r else " " for lv in levels))
    lines.append("         +" + "-" * cols)
    first, last = "step 1", f"step {n}"
    if cols >= len(first) + len(last) + 1:
        lines.append("          " + first + last.rjust(cols - len(first)))
    else:
        lines.append(f"          {first} .. {last}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _report(plan: _Plan, results: list[dict[str, Any]], psi: int) -> str:
    """The report after training (everything but the header)."""
    a = plan.args
    r0 = results[0]
    world = a["world_size"]
    losses = r0["train_losses"]
    lines: list[str] = []

    # -- training
    times = r0["step_times"]
    timing = f"first step {times[0]:.1f} s with compilation"
    if len(times) > 1:
        timing += f", then {sum(times[1:]) / (len(times) - 1) * 1000:.0f} ms/step"
    tail = losses[-min(10, len(losses)):]
    lines += [
        "Training",
        f"  {len(losses)} steps in {r0['train_time']:.1f} s ({timing})",
        f"  train loss  {losses[0]:.3f} -> {sum(tail) / len(tail):.3f}  (step 1 -> mean of the last {len(tail)} steps)",
        f"  val loss    {r0['val_before']:.3f} -> {r0['val_after']:.3f}  (held-out last 10% of the corpus; "
        f"a uniform guess scores ln 256 = {math.log(256):.3f})",
        "",
        f"Train loss per step (mean over ranks; each column averages "
        f"{len(losses) / min(CURVE_COLS, len(losses)):.1f} steps)",
        ascii_curve(losses),
        "",
    ]

    # -- memory
    ddp = {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi}
    ddp_total = sum(ddp.values())
    lines += [
        f"Model-state memory per rank (bytes of this rank's local tensors after the last step; "
        f"psi = {psi:,} parameters)",
        f"  {'':24}{'params':>12}{'grads':>12}{'Adam m+v':>12}{'total':>12}   vs DDP",
    ]
    for r in results:
        sb = r["state_bytes"]
        total = sb["params"] + sb["grads"] + sb["optimizer"]
        lines.append(f"  {'zerograph rank ' + str(r['rank']):24}{sb['params']:>12,}{sb['grads']:>12,}"
                     f"{sb['optimizer']:>12,}{total:>12,}   {total / ddp_total:.3f}x  ({ddp_total / total:.2f}x less)")
    lines.append(f"  {'DDP (fp32 AdamW, 16 psi)':24}{ddp['params']:>12,}{ddp['grads']:>12,}{ddp['optimizer']:>12,}"
                 f"{ddp_total:>12,}   1.000x")
    counters = r0["state_bytes"]["step_counters"]
    if counters:
        lines.append(f"  (not counted: Adam's 0-dim step counters, {counters:,} bytes per rank)")
    stage = Config.load(plan.zerograph).stage
    if world > 1 and stage in (1, 2):
        lines.append(f"  (stage {stage}: between steps zerograph keeps only parameter shards; within a step the "
                     "gathered full parameters live from forward into backward, as in ZeRO-1/2)")
    lines.append("")

    # -- communication
    ddp_comm = 2 * psi * 4
    lines += [
        "Communication per optimizer step (bytes, last step; unit of the ZeRO paper: an all-gather "
        "counts its output, a reduce-scatter its input, an all-reduce twice its input)",
        f"  {'':24}" + "".join(f"{k:>16}" for k in (*KINDS, "volume")) + "   vs DDP",
    ]
    for r in results:
        c = r["comm"]
        vol = CommStats.volume(c)
        lines.append(f"  {'zerograph rank ' + str(r['rank']):24}"
                     + "".join(f"{c.get(k, 0):>16,}" for k in KINDS)
                     + f"{vol:>16,}   {vol / ddp_comm:.2f}x  (= {vol / (4 * psi):.2f} psi x 4 B)")
    lines.append(f"  {'DDP (2 psi x 4 B)':24}{0:>16,}{0:>16,}{psi * 4:>16,}{ddp_comm:>16,}   1.00x")
    lines.append("  (ZeRO paper: stages 1-2 move what DDP moves, 2 psi; stage 3 adds the backward all-gather, "
                 "3 psi = 1.5x DDP)")
    if world == 1:
        lines.append("  (one rank: nothing to communicate)")
    if plan.accumulation > 1:
        lines.append(f"  (each optimizer step ran {plan.accumulation} micro-batches, each with its own "
                     "forward and backward collectives)")
    lines.append("")

    # -- sample
    if a["sample_bytes"]:
        how = "greedy" if a["top_k"] == 0 else f"top-{a['top_k']} sampling, temperature {a['temperature']}"
        lines += [f"Sample ({a['sample_bytes']} bytes after the prompt, {how}, compiled model under torch.no_grad)"]
        lines += ["  | " + line for line in r0["sample"].splitlines() or [""]]
        lines.append("")

    # -- saved files
    lines.append("Saved by rank 0 (zerograph.full_state_dict: full tensors under the original keys)")
    descriptions = {
        "model": f"state dict, {len(r0['state_keys'])} tensors; loads into a plain GPT",
        "config": "model config + zerograph config + training settings",
        "losses": "train loss per step, val loss before/after",
    }
    for key, path in r0["paths"].items():
        size = os.path.getsize(path)
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
        lines.append(f"  {shown:32} {_size(size):>10}  ({size:,} bytes)  {descriptions[key]}")
    return "\n".join(lines)


def _header(plan: _Plan, psi: int, corpus_bytes: int, train_bytes: int) -> str:
    a, m = plan.args, plan.model
    per_rank = plan.global_batch // a["world_size"]
    accum = f", {plan.accumulation} micro-batches per step" if plan.accumulation > 1 else ""
    stage = Config.load(plan.zerograph).stage
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= a["world_size"] else "gloo"
    return "\n".join([
        f"zerograph demo: ZeRO stage {stage} on {a['world_size']} local "
        f"{'process' if a['world_size'] == 1 else 'processes'} ({backend})",
        f"  model  GPT, {m['n_layer']} layer{'s' * (m['n_layer'] != 1)}, "
        f"{m['n_head']} head{'s' * (m['n_head'] != 1)}, d={m['n_embd']}, context {m['block_size']}, "
        f"vocab 256 (bytes), tied embeddings: {psi:,} parameters",
        f"  data   zerograph/data/corpus.txt, {corpus_bytes:,} bytes ({train_bytes:,} train / "
        f"{corpus_bytes - train_bytes:,} val); global batch {plan.global_batch} x {m['block_size']} bytes "
        f"({per_rank} rows per rank{accum})",
        f"  optim  AdamW, lr {a['lr']:g} (warmup, cosine decay), {a['steps']} steps",
    ])


def _write_trace(plan: _Plan) -> str:
    """Write the Chrome trace of one training step's compiled graphs
    (``zerograph.explain``, traced in this process on the fake process
    group) next to the checkpoint; the report line saying where it is."""
    path = Path(plan.out_dir) / "trace.json"
    rows = max(1, plan.global_batch // (plan.args["world_size"] * plan.accumulation))
    idx = torch.zeros(rows, plan.model["block_size"], dtype=torch.long)
    try:
        torch.manual_seed(plan.args["seed"])
        explanation = zerograph.explain(GPT(GPTConfig(**plan.model)), plan.zerograph, idx, idx,
                                        world_size=plan.args["world_size"])
        explanation.write_chrome_trace(path)
    except Exception as exc:  # the trace is an extra: never fail the finished run for it
        logging.getLogger(__name__).warning("zerograph demo: no Chrome trace: %s", exc)
        return f"Chrome trace: not written ({type(exc).__name__}: {exc})"
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
    return (f"Chrome trace of one step's graphs (zerograph.explain): {shown}  "
            "(open in https://ui.perfetto.dev or chrome://tracing)")


def run(options: argparse.Namespace | Sequence[str] | None = None, *, echo: bool = True) -> DemoResult:
    """Run the demo: spawn the ranks, train, save, and build (and with ``echo``
    print) the report. ``options`` is a parsed namespace or a CLI-style list
    such as ``["--steps", "20"]``. Raises ValueError/ConfigError on bad options."""
    args = options if isinstance(options, argparse.Namespace) else parse_args(list(options or []))
    plan = _plan(args)
    corpus = textdata.load_corpus()
    train, val = textdata.split(corpus)
    if len(val) <= args.block_size + 1:
        raise ValueError(f"--block-size ({args.block_size}) is too long for the held-out data ({len(val)} bytes)")
    psi = GPT(GPTConfig(**plan.model)).num_parameters()
    header = _header(plan, psi, len(corpus), len(train))
    if echo:
        print(header + "\n", flush=True)

    from zerograph.runtime.launch import spawn

    start = time.perf_counter()
    results = spawn(_rank_main, args.world_size, plan, timeout=args.timeout)
    results.sort(key=lambda r: r["rank"])
    body = _report(plan, results, psi) + "\n" + _write_trace(plan)
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

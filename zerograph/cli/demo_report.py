"""The demo's output: the header printed before training, the report after it
(loss curve, model-state memory and communication next to DDP's, sample,
saved files) and the Chrome trace of one step's graphs."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import zerograph
from zerograph.cli.demo_plan import Plan
from zerograph.config import Config
from zerograph.models import GPT, GPTConfig
from zerograph.runtime.stats import KINDS, CommStats

__all__ = ["ascii_curve", "header", "report", "write_trace"]

CURVE_ROWS = 10
CURVE_COLS = 60


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


def report(plan: Plan, results: list[dict[str, Any]], psi: int) -> str:
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


def header(plan: Plan, psi: int, corpus_bytes: int, train_bytes: int) -> str:
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


def write_trace(plan: Plan) -> str:
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

"""zerograph's 1F1B and interleaved 1F1B pipelines vs torch.distributed.pipelining's
Schedule1F1B and ScheduleInterleaved1F1B.

    python benchmarks/bench_pipeline.py [--stages P] [--virtual V] [--micro M[,M...]] [--steps N] [--warmup K] [--inductor] [--out FILE.md]

Same model (nanoGPT-style, untied embedding so that the hand-split torch
stages need no weight sharing), same batches, same AdamW, one launch of P
gloo ranks (pipeline only, no data parallelism; ZeRO stage 0 inside each
stage). For each micro-batch count M:

* **zerograph**: ``zerograph.compile(model, {"pipeline": {"stages": P,
  "micro_batches": M}}, example_batch=...)``, split automatically by the cost
  model; step = ``train_step`` + ``opt.step`` + ``zero_grad``.
* **torch.distributed.pipelining**: the model split by hand at the same block
  (stage 0: embeddings + first blocks; last: remaining blocks + ln_f +
  lm_head), ``PipelineStage`` + ``Schedule1F1B``.

* **interleaved** (``--virtual V``, default 2; 1 turns it off): both systems
  again with the model cut into P·V stages of whole blocks, rank r holding
  stages r, r+P, …: zerograph's ``"schedule": "interleaved_1f1b"`` with
  ``split_points`` at the same blocks, and ``ScheduleInterleaved1F1B`` over
  V ``PipelineStage`` objects per rank (when this torch has it). M must be a
  multiple of P.

* **inductor** (``--inductor``): each zerograph system once more with
  ``zerograph.compiler: "inductor"`` (the stage graphs compiled by
  TorchInductor instead of run op by op), compared with the same torch
  schedule.

Reported per system: median step time (with the optimizer step); the
measured bubble fraction, i.e. the share of the pipelined part of a step
(``train_step`` / ``schedule.step``, without the optimizer) that a stage does
not spend in its own forward/backward compute, per rank, against the
formula (P-1)/(M+P-1) (interleaved: (P-1)/(V·M+P-1)), which assumes equal stages and free communication
(the ratio line uses the busiest stage, the one the formula describes); and the peak number of
micro-batches whose forward is done and backward not yet (activations in
flight) per rank (interleaved: a (stage, micro-batch) pair counts once; it
holds 1/V of a micro-batch's activations). zerograph's runtime times each stage forward/backward
itself (``model.last_stats``, waits for inputs excluded); for the torch
stages, an identity autograd function at the stage's float input and at its
output marks the start and end of each forward and each backward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = dict(vocab_size=1000, block_size=64, n_layer=4, n_head=4, n_embd=128, tie_weights=False)
ROWS = 16
LR = 1e-4


class StageClock:
    """Forward/backward compute time and activations in flight of one stage."""

    def __init__(self):
        self.busy = 0.0
        self.in_flight = 0
        self.peak = 0
        self._t = None

    def reset(self):
        self.busy, self.in_flight, self.peak = 0.0, 0, 0


class _Mark(torch.autograd.Function):
    """Identity; ``start`` marks where a stage's forward begins (its backward ends)."""

    @staticmethod
    def forward(ctx, clock, start, x):
        ctx.clock, ctx.start = clock, start
        now = time.perf_counter()
        if start:
            clock._t = now
        else:
            clock.busy += now - clock._t
            clock.in_flight += 1
            clock.peak = max(clock.peak, clock.in_flight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        now = time.perf_counter()
        clock = ctx.clock
        if ctx.start:
            clock.busy += now - clock._bt
            clock.in_flight -= 1
        else:
            clock._bt = now
        return None, None, grad


def _model():
    from zerograph.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(**MODEL))


def _batches(steps: int):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, MODEL["vocab_size"], (ROWS, MODEL["block_size"] + 1), generator=g)
        out.append((idx[:, :-1].contiguous(), idx[:, 1:].contiguous()))
    return out


class TimedBlocks(nn.Module):
    """Blocks ``lo..hi`` of a GPT with clock marks; embeddings first / head last when asked."""

    def __init__(self, gpt, lo, hi, first, last, clock):
        super().__init__()
        self.first, self.last, self.clock = first, last, clock
        if first:
            self.wte, self.wpe = gpt.wte, gpt.wpe
        self.h = nn.ModuleList(gpt.h[lo:hi])
        if last:
            self.ln_f, self.lm_head = gpt.ln_f, gpt.lm_head

    def forward(self, x, targets=None):
        if self.first:
            x = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
        x = _Mark.apply(self.clock, True, x) if x.requires_grad or not self.first else x
        for b in self.h:
            x = b(x)
        if self.last:
            x = self.lm_head(self.ln_f(x))
            if targets is not None:
                x = F.cross_entropy(x.flatten(0, 1).float(), targets.flatten())
        return _Mark.apply(self.clock, False, x)


def _cut(stages: int, n_layer: int) -> list[int]:
    if stages > n_layer:
        raise SystemExit(f"{stages} pipeline stages need at least as many blocks; the model has {n_layer}")
    per = n_layer // stages
    return [per * s for s in range(stages)] + [n_layer]


def _setup_torch(p, m, v=1):
    """A step function for torch.distributed.pipelining on hand-split stages
    (``v > 1``: ``v`` stages per rank and ScheduleInterleaved1F1B)."""
    import torch.distributed as dist
    from torch.distributed import pipelining

    rank = dist.get_rank()
    gpt = _model()
    n = p * v
    cuts = _cut(n, MODEL["n_layer"])
    clock = StageClock()  # one per rank: its stages run one at a time
    mine = [rank + c * p for c in range(v)]
    mods = [TimedBlocks(gpt, cuts[k], cuts[k + 1], k == 0, k == n - 1, clock) for k in mine]
    stages = [pipelining.PipelineStage(mod, k, n, torch.device("cpu")) for k, mod in zip(mine, mods)]

    def loss_fn(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    if v == 1:
        schedule = pipelining.Schedule1F1B(stages[0], n_microbatches=m, loss_fn=loss_fn)
    else:
        schedule = pipelining.ScheduleInterleaved1F1B(stages, n_microbatches=m, loss_fn=loss_fn)
    opt = torch.optim.AdamW([q for mod in mods for q in mod.parameters()], lr=LR)

    def step(batch):
        idx, targets = batch
        clock.reset()
        t0 = time.perf_counter()
        first, last = rank == 0, rank == (n - 1) % p
        if first and last:
            schedule.step(idx, target=targets, losses=[])
        elif first:
            schedule.step(idx)
        elif last:
            schedule.step(target=targets, losses=[])
        else:
            schedule.step()
        pipe = time.perf_counter() - t0
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0, 1 - clock.busy / pipe, clock.peak

    return step


def _setup_zerograph(p, m, example, v=1, compiler="eager"):
    """A step function for zerograph's pipeline, split at the same blocks
    (``compiler``: ``zerograph.compiler``, how the stage graphs run)."""
    import zerograph

    cuts = _cut(p * v, MODEL["n_layer"])
    pipeline = {"stages": p, "micro_batches": m, "split_points": [f"h.{c}" for c in cuts[1:-1]]}
    if v > 1:
        pipeline.update(schedule="interleaved_1f1b", virtual_stages=v)
    config = {"pipeline": pipeline, "zerograph": {"compiler": compiler}}
    if "nonfinite_grads" in zerograph.config.ZerographOptions.model_fields:
        config["zerograph"]["nonfinite_grads"] = "ignore"  # torch's schedule does not check either
    model = zerograph.compile(_model(), config, example_batch=example)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(batch):
        t0 = time.perf_counter()
        model.train_step(batch)
        pipe = time.perf_counter() - t0
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0, 1 - model.last_stats["compute_s"] / pipe, model.last_stats["peak_in_flight"]

    return step


SYSTEMS = ("zerograph 1F1B", "torch.distributed.pipelining Schedule1F1B")
INTERLEAVED = ("zerograph interleaved 1F1B", "torch.distributed.pipelining ScheduleInterleaved1F1B")
INDUCTOR = " inductor"  # suffix: the same zerograph system with zerograph.compiler "inductor"


def _systems(virtual: int, inductor: bool = False) -> tuple[str, ...]:
    names = SYSTEMS + ((SYSTEMS[0] + INDUCTOR,) if inductor else ())
    if virtual < 2:
        return names
    from torch.distributed import pipelining

    torch_has = hasattr(pipelining, "ScheduleInterleaved1F1B")
    names += (INTERLEAVED if torch_has else INTERLEAVED[:1]) + ((INTERLEAVED[0] + INDUCTOR,) if inductor else ())
    return names


def _pairs(names) -> list[tuple[str, str]]:
    """(zerograph system, the torch system it is compared with), for those that ran."""
    pairs = [(ours + suffix, theirs) for ours, theirs in (SYSTEMS, INTERLEAVED) for suffix in ("", INDUCTOR)]
    return [pair for pair in pairs if all(n in names for n in pair)]


def _worker(p, micro, steps, warmup, model_cfg, virtual=1, inductor=False):
    """All systems live side by side and take turns step by step, so that
    load from other processes on the machine hits them alike."""
    import torch.distributed as dist

    MODEL.update(model_cfg)  # spawned ranks re-import this module
    batches = _batches(warmup + steps)
    out = {}
    setups = {
        SYSTEMS[0]: lambda m: _setup_zerograph(p, m, batches[0]),
        SYSTEMS[1]: lambda m: _setup_torch(p, m),
        INTERLEAVED[0]: lambda m: _setup_zerograph(p, m, batches[0], virtual),
        INTERLEAVED[1]: lambda m: _setup_torch(p, m, virtual),
        SYSTEMS[0] + INDUCTOR: lambda m: _setup_zerograph(p, m, batches[0], compiler="inductor"),
        INTERLEAVED[0] + INDUCTOR: lambda m: _setup_zerograph(p, m, batches[0], virtual, compiler="inductor"),
    }
    names = _systems(virtual, inductor)
    for m in micro:
        torch._dynamo.reset()
        runners = {name: setups[name](m) for name in names}
        samples = {name: [] for name in names}
        for i, batch in enumerate(batches):
            for name, step in runners.items():
                dist.barrier()
                result = step(batch)
                if i >= warmup:
                    samples[name].append(result)
        for name, rows in samples.items():
            out[(name, m)] = (
                statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows), max(r[2] for r in rows)
            )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--virtual", type=int, default=2, help="stages per rank for the interleaved runs; 1: none")
    ap.add_argument("--micro", default="4,8")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--large", action="store_true", help="d=256, seq 128 (the foundation benchmark GPT, untied)")
    ap.add_argument("--layers", type=int, help="blocks of the GPT (default 4)")
    ap.add_argument("--inductor", action="store_true",
                    help="also run each zerograph system with zerograph.compiler \"inductor\" (compiled stage graphs)")
    ap.add_argument("--out")
    args = ap.parse_args()
    micro = [int(x) for x in args.micro.split(",")]
    if args.large:
        MODEL.update(block_size=128, n_embd=256)
    if args.layers:
        MODEL.update(n_layer=args.layers)
    p, v = args.stages, args.virtual
    _cut(p * max(v, 1), MODEL["n_layer"])
    if v > 1 and any(m % p for m in micro):
        raise SystemExit(f"--micro {args.micro}: interleaved 1F1B needs micro-batch counts that are multiples of --stages {p}")
    from zerograph.runtime.launch import spawn

    load_before = os.getloadavg()[0]
    results = spawn(_worker, p, p, micro, args.steps, args.warmup, dict(MODEL), v, args.inductor, timeout=args.timeout)
    load_after = os.getloadavg()[0]
    names = _systems(v, args.inductor)
    params = sum(x.numel() for x in _model().parameters())
    lines = [
        f"Pipeline benchmark: GPT {MODEL['n_layer']} layers, d={MODEL['n_embd']}, vocab {MODEL['vocab_size']}, "
        f"seq {MODEL['block_size']}, {params / 1e6:.2f}M parameters, batch {ROWS}; p={p} gloo ranks on "
        f"{platform.node()} ({os.cpu_count()} CPUs, torch {torch.__version__}); median of {args.steps} steps "
        f"after {args.warmup} warmup; 1-minute load average {load_before:.2f} before, {load_after:.2f} after."
        + (f" Interleaved: v={v} stages per rank." if v > 1 else ""),
        "",
        "| system | m | step ms | bubble per rank | formula | peak in flight per rank |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def formula(name, m):
        vv = v if name.removesuffix(INDUCTOR) in INTERLEAVED else 1
        return (p - 1) / (vv * m + p - 1)

    for m in micro:
        for name in names:
            per_rank = [r[(name, m)] for r in results]
            step = max(t for t, _, _ in per_rank)
            bubbles = ", ".join(f"{b:.3f}" for _, b, _ in per_rank)
            peaks = ", ".join(str(pk) for _, _, pk in per_rank)
            lines.append(f"| {name} | {m} | {step * 1e3:.1f} | {bubbles} | {formula(name, m):.3f} | {peaks} |")
    lines.append("")
    for m in micro:
        for ours, theirs in _pairs(names):
            z = max(r[(ours, m)][0] for r in results)
            t = max(r[(theirs, m)][0] for r in results)
            zb = min(r[(ours, m)][1] for r in results)
            tb = min(r[(theirs, m)][1] for r in results)
            f = formula(ours, m)
            lines.append(
                f"m={m}: step time {ours} / {theirs} = {z / t:.2f}x; "
                f"bubble of the busiest rank / formula: zerograph {zb / f:.2f}x, torch {tb / f:.2f}x"
            )
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()

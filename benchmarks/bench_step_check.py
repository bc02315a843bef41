"""The cost of the per-phase position check (zerograph.runtime.agreement.StepCheck).

    python benchmarks/bench_step_check.py [--steps N] [--warmup K] [--stages 1,3]

On the bench GPT of bench_zero.py (4 layers, d=256, vocab 1000, seq 128,
batch 8 per rank, 2 gloo ranks), per ZeRO stage: two models trained in one
launch from the same weights on the same batches, one with the check (the
default) and one with it switched off (``runtime.step_check = None``, for
this measurement only), their timed steps interleaved so that load drift
falls on both alike. Prints, per stage: checks per step; the latency of
one check alone (200 back to back: a blocking all-gather of 4 int64 on a
gloo group of its own); the mean time spent in a check during training
(which includes waiting for the other rank to arrive: time the step would
otherwise spend waiting in its first collective) and its share of the step;
the median step times with and without (ratio).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

SPEC = dict(vocab_size=1000, block_size=128, n_layer=4, n_head=4, n_embd=256, batch=8)


class _Timed:
    """Wraps a StepCheck, adding up the seconds spent in it."""

    def __init__(self, check):
        self.check, self.seconds, self.calls = check, 0.0, 0

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.check(*args)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


def _rank_main(stages: list[int], steps: int, warmup: int):
    import torch.distributed as dist

    import zerograph
    from zerograph.models import GPT, GPTConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, SPEC["vocab_size"], (SPEC["batch"] * world, SPEC["block_size"] + 1), generator=gen)
               for _ in range(4)]
    out = []
    for stage in stages:
        runs = {}
        for name in ("with check", "without"):
            torch.manual_seed(0)
            torch._dynamo.reset()
            cfg = GPTConfig(**{k: v for k, v in SPEC.items() if k != "batch"})
            model = zerograph.compile(GPT(cfg), {"train_micro_batch_size_per_gpu": SPEC["batch"],
                                                 "zero_optimization": {"stage": stage}})
            runtime = model._zg_runtime
            runtime.step_check = _Timed(runtime.step_check) if name == "with check" else None
            runs[name] = {"model": model, "opt": torch.optim.AdamW(model.parameters(), lr=1e-4), "times": []}

        def one_step(run, i):
            data = batches[i % len(batches)].chunk(world)[rank]
            dist.barrier()
            start = time.perf_counter()
            run["model"](data[:, :-1], data[:, 1:]).loss.backward()
            run["opt"].step()
            run["opt"].zero_grad()
            return time.perf_counter() - start

        for i in range(warmup):
            for run in runs.values():
                one_step(run, i)
        timed = runs["with check"]["model"]._zg_runtime.step_check
        timed.seconds, timed.calls = 0.0, 0
        for i in range(steps):
            order = list(runs.values()) if i % 2 == 0 else list(runs.values())[::-1]
            for run in order:
                run["times"].append(one_step(run, warmup + i))
        # the check alone, back to back (no waiting for a slower rank): its own latency
        dist.barrier()
        start = time.perf_counter()
        for _ in range(200):
            timed.check("forward", 0, 0)
        alone = (time.perf_counter() - start) / 200
        out.append({"stage": stage, "check_s": timed.seconds, "checks": timed.calls, "alone_s": alone,
                    "with": runs["with check"]["times"], "without": runs["without"]["times"]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--stages", default="1,3")
    args = ap.parse_args(argv)
    from zerograph.runtime.launch import spawn

    stages = [int(s) for s in args.stages.split(",")]
    per_rank = spawn(_rank_main, 2, stages, args.steps, args.warmup, timeout=1800)
    print("| stage | checks per step | one check alone, µs | mean check in training, µs (incl. waiting for the "
          "other rank) | its share of the step | median step ms with | without | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for i, stage in enumerate(stages):
        rows = [r[i] for r in per_rank]
        per_check = max(r["check_s"] / max(1, r["checks"]) for r in rows)
        with_ms = statistics.median(max(r["with"][j] for r in rows) for j in range(args.steps)) * 1e3
        without_ms = statistics.median(max(r["without"][j] for r in rows) for j in range(args.steps)) * 1e3
        share = max(r["check_s"] / sum(r["with"]) for r in rows)
        alone = max(r["alone_s"] for r in rows)
        print(f"| {stage} | {rows[0]['checks'] / args.steps:g} | {alone * 1e6:.0f} | {per_check * 1e6:.0f} | "
              f"{share * 100:.2f} % | "
              f"{with_ms:.0f} | {without_ms:.0f} | {with_ms / without_ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""zerograph tensor parallelism (tp=2) vs PyTorch's own tensor parallelism
(``torch.distributed.tensor.parallel.parallelize_module``) on the same model.

    python benchmarks/bench_tp.py [--steps N] [--warmup K] [--layers L] [--embd H] [--rows B] [--seq S] [--out FILE.md]

One launch of 2 gloo ranks (tp=2, no data parallelism), the same GPT
(``zerograph.models``, untied embedding), the same initial weights and token
batches (every rank reads the whole batch: the ranks of one tp group share
their rows), AdamW, fp32:

* **zerograph**: ``zerograph.compile(model, {"tensor_parallel":
  {"autotp_size": 2}}, example_batch=...)``: the graph rule splits q/k/v (the
  fused ``qkv``, per part) and ``fc`` by columns, the two ``proj`` by rows.
* **torch TP**: ``parallelize_module`` on each block with ``ColwiseParallel``
  on ``attn.qkv`` and ``mlp.fc`` and ``RowwiseParallel`` on ``attn.proj`` and
  ``mlp.proj``. Torch cuts a weight into contiguous row blocks, so the fused
  ``qkv`` rows are first reordered to ``[q_0 k_0 v_0 | q_1 k_1 v_1]`` and each
  attention computes on its ``n_head / tp`` local heads (what torch's TP
  tutorial does to a model's attention); the math is the model's.

Both systems are built first, then trained in turns, step by step (the
order flips every step), so that a change in the machine's load hits both.
Reported: median step time (forward, backward, ``opt.step``, ``zero_grad``;
slowest rank) and the ratio zerograph / torch; model-state bytes per rank
(parameters + gradients + AdamW states) and their ratio; zerograph's
tensor-parallel bytes per step from ``zerograph.inspect`` against Megatron's
formula (per layer two all-reduces of b·s·h elements in the forward and two
in the backward), exact; the loss after the last step of both systems.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TP = 2


def _spec(args) -> dict:
    return dict(vocab_size=1000, block_size=args.seq, n_layer=args.layers, n_head=4, n_embd=args.embd,
                tie_weights=False, dropout=0.0)


def _model(spec: dict):
    from zerograph.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(**spec))


def _batches(spec: dict, rows: int, n: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec["vocab_size"], (n, rows, spec["block_size"] + 1), generator=g)
    return [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in ids]


def _local_heads_forward(self, x):
    """The attention of a torch-TP rank: its ``n_head / tp`` heads of ``[q_i k_i v_i]``."""
    b, t, c = x.shape
    q, k, v = self.qkv(x).chunk(3, dim=2)
    heads, dim = self.n_head // TP, c // self.n_head
    q, k, v = (z.reshape(b, t, heads, dim).transpose(1, 2) for z in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.proj(y.transpose(1, 2).reshape(b, t, heads * dim))


def _torch_tp(spec: dict):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _model(spec)
    mesh = init_device_mesh("cpu", (TP,), mesh_dim_names=("tp",))
    with torch.no_grad():
        for block in model.h:
            qkv = block.attn.qkv
            for p in (qkv.weight, qkv.bias):
                parts = [z.chunk(TP, 0) for z in p.chunk(3, 0)]  # [q, k, v] -> [q_0 k_0 v_0 | q_1 k_1 v_1]
                p.copy_(torch.cat([parts[j][r] for r in range(TP) for j in range(3)]))
            block.attn.forward = types.MethodType(_local_heads_forward, block.attn)
            parallelize_module(block, mesh, {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                                             "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()})
    return model


def _zerograph(spec: dict, example):
    import zerograph

    return zerograph.compile(_model(spec), {"tensor_parallel": {"autotp_size": TP}}, example_batch=example)


class _System:
    """One system's model, optimizer and measurements."""

    def __init__(self, name: str, spec: dict, example):
        t0 = time.perf_counter()
        self.name = name
        self.model = _zerograph(spec, example) if name == "zerograph" else _torch_tp(spec)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.setup_s = time.perf_counter() - t0
        self.times, self.state, self.loss, self.warmup_s = [], 0, None, 0.0

    def step(self, i: int, batch, warmup: int) -> None:
        import torch.distributed as dist
        from benchmarks.bench_zero import model_state_bytes

        dist.barrier()
        start = time.perf_counter()
        out = self.model(*batch)
        out.loss.backward()
        self.opt.step()
        if i == 0:
            self.state = model_state_bytes(self.model, self.opt)
        self.opt.zero_grad()
        elapsed = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if i < warmup:
            self.warmup_s += elapsed.item()
        else:
            self.times.append(elapsed.item())
        self.loss = out.loss.item()

    def result(self) -> dict:
        out = {"median_ms": 1000 * statistics.median(self.times), "min_ms": 1000 * min(self.times),
               "max_ms": 1000 * max(self.times), "state_bytes": self.state, "loss": self.loss,
               "warmup_s": self.setup_s + self.warmup_s}
        if self.name == "zerograph":
            import zerograph

            out["comm"] = dict(zerograph.inspect(self.model).comm_bytes_last_step)
        return out


def rank_main(spec: dict, rows: int, steps: int, warmup: int) -> dict:
    """Both systems built, then trained step by step in turns (the machine's
    load changes within a launch: alternating exposes both to it alike)."""
    torch.set_num_threads(1)
    batches = _batches(spec, rows, warmup + steps)
    systems = [_System(name, spec, batches[0]) for name in ("zerograph", "torch TP")]
    for i, batch in enumerate(batches):
        for system in (systems if i % 2 == 0 else systems[::-1]):
            system.step(i, batch, warmup)
    return {s.name: s.result() for s in systems}


def report(res: dict, spec: dict, rows: int, steps: int, warmup: int) -> str:
    zg, tt = res["zerograph"], res["torch TP"]
    b, s, h, layers = rows, spec["block_size"], spec["n_embd"], spec["n_layer"]
    formula = 2 * 2 * layers * b * s * h * 4  # per layer: 2 all-reduces forward + 2 backward of b*s*h fp32
    measured = zg["comm"].get("tp_all_reduce", 0)
    other = {k: v for k, v in zg["comm"].items() if k != "tp_all_reduce" and v}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"GPT {layers} layers, d={h}, 4 heads, vocab {spec['vocab_size']}, seq {s}, untied; batch {b} rows (every "
        f"rank: one tp group); tp={TP} on 2 gloo ranks; AdamW fp32; {warmup} warmup + {steps} timed steps; "
        f"torch {torch.__version__}, {platform.machine()}, load average {load:.2f} at the end",
        "",
        "| system | median step ms (min–max) | ratio to torch TP | model-state MiB per rank | ratio to torch TP "
        "| loss after last step | setup + warmup s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("zerograph tp=2", zg), ("torch TP (parallelize_module)", tt)):
        lines.append(f"| {name} | {r['median_ms']:.1f} ({r['min_ms']:.1f}–{r['max_ms']:.1f}) | "
                     f"{r['median_ms'] / tt['median_ms']:.2f} | {r['state_bytes'] / 2**20:.2f} | "
                     f"{r['state_bytes'] / tt['state_bytes']:.2f} | {r['loss']:.4f} | {r['warmup_s']:.1f} |")
    lines += [
        "",
        f"Tensor-parallel traffic per step and rank (zerograph, `inspect`): {measured:,} bytes of all-reduce; "
        f"Megatron's formula 4·L·b·s·h·4 B = {formula:,} bytes: ratio {measured / formula:.4f}"
        + (f"; other traffic: {other}" if other else "; no other traffic") + ".",
        f"Per layer: {measured // layers:,} bytes = 2 all-reduces of b·s·h = {b * s * h:,} fp32 elements in the "
        "forward and 2 in the backward.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from zerograph.runtime.launch import spawn

    spec = _spec(args)
    res = spawn(rank_main, TP, spec, args.rows, args.steps, args.warmup, timeout=args.timeout)[0]
    text = report(res, spec, args.rows, args.steps, args.warmup)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

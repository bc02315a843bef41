"""zerograph tensor parallelism (tp=2) vs PyTorch's own tensor parallelism
(``torch.distributed.tensor.parallel.parallelize_module``) on the same model.

    python benchmarks/bench_tp.py [--steps N] [--warmup K] [--layers L] [--embd H] [--rows B] [--seq S]
                                  [--only tp|tpdp] [--out FILE.md]

Two launches: **tp** (below) and **tpdp**: tp=2 × dp=2 (4 gloo ranks, mesh
``("dp", "tp")``, tp innermost) with ZeRO-3 over dp, zerograph with and
without Megatron sequence parallelism (``zerograph.tp_sequence_parallel``)
against torch's ``parallelize_module`` + FSDP2 ``fully_shard`` on the 2-D
mesh (each block sharded over ``mesh["dp"]``, its TP layers over
``mesh["tp"]``). Each data-parallel index reads its own ``--rows`` rows.
With Megatron-SP twice: with the backward's re-gather of each column group's
input (``zerograph.tp_sequence_parallel_regather``, the default) and
without. Reported there too: model-state bytes per rank against 16Ψ/(tp·dp) (and the
exact 16·(split/tp + whole)/dp: embeddings, norms and the LM head are whole
over tp), the bytes the forward saves for the backward on the first step
(``torch.autograd.graph.saved_tensors_hooks``, unique storages, every
system) with and without Megatron-SP, and zerograph's traffic by kind
against the formulas.

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

    def __init__(self, name: str, spec: dict, example, build=None):
        t0 = time.perf_counter()
        self.name = name
        if build is not None:
            self.model = build()
        else:
            self.model = _zerograph(spec, example) if name == "zerograph" else _torch_tp(spec)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.setup_s = time.perf_counter() - t0
        self.times, self.state, self.loss, self.warmup_s, self.saved = [], 0, None, 0.0, 0

    def step(self, i: int, batch, warmup: int) -> None:
        import torch.distributed as dist
        from benchmarks.bench_zero import model_state_bytes

        dist.barrier()
        if i == 1:  # the bytes the forward saves for the backward (compiled already; not timed)
            with _SavedBytes() as saved:
                out = self.model(*batch)
            self.saved = saved.total
            out.loss.backward()
            self.opt.zero_grad()
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
               "warmup_s": self.setup_s + self.warmup_s, "saved_bytes": self.saved}
        if self.name.startswith("zerograph"):
            import zerograph

            info = zerograph.inspect(self.model)
            out["comm"] = dict(info.comm_bytes_last_step)
            out["planned_activation_bytes"] = info.memory.peak_activation_bytes
        return out


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward while
    active (DTensors: their local part)."""

    def __init__(self):
        self.sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        from torch.distributed.tensor import DTensor

        local = t.to_local() if isinstance(t, DTensor) else t
        try:
            storage = local.untyped_storage()
            self.sizes[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # a fake tensor (a compiler tracing): nothing saved for real
            pass
        return t

    @property
    def total(self) -> int:
        return sum(self.sizes.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


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


DP = 2


def _torch_tp_fsdp(spec: dict):
    """torch TP on ``mesh["tp"]`` inside each block, FSDP2 over ``mesh["dp"]``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _model(spec)
    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    with torch.no_grad():
        for block in model.h:
            qkv = block.attn.qkv
            for p in (qkv.weight, qkv.bias):
                parts = [z.chunk(TP, 0) for z in p.chunk(3, 0)]
                p.copy_(torch.cat([parts[j][r] for r in range(TP) for j in range(3)]))
            block.attn.forward = types.MethodType(_local_heads_forward, block.attn)
            parallelize_module(block, mesh["tp"], {"attn.qkv": ColwiseParallel(), "attn.proj": RowwiseParallel(),
                                                   "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel()})
    for block in model.h:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def _zerograph_tpdp(spec: dict, example, sequence_parallel: bool, regather: bool = True):
    import zerograph

    return zerograph.compile(_model(spec), {"tensor_parallel": {"autotp_size": TP}, "zero_optimization": {"stage": 3},
                                            "zerograph": {"tp_sequence_parallel": sequence_parallel,
                                                          "tp_sequence_parallel_regather": regather}},
                             example_batch=example)


def rank_main_tpdp(spec: dict, rows: int, steps: int, warmup: int) -> dict:
    """tp=2 x dp=2: this rank reads its data-parallel index's rows of each global batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dp_index = dist.get_rank() // TP
    batches = [(i[dp_index * rows:(dp_index + 1) * rows], t[dp_index * rows:(dp_index + 1) * rows])
               for i, t in _batches(spec, rows * DP, warmup + steps)]
    systems = [
        _System("zerograph ZeRO-3", spec, None, lambda: _zerograph_tpdp(spec, batches[0], False)),
        _System("zerograph ZeRO-3 + SP", spec, None, lambda: _zerograph_tpdp(spec, batches[0], True)),
        _System("zerograph ZeRO-3 + SP, no re-gather", spec, None,
                lambda: _zerograph_tpdp(spec, batches[0], True, regather=False)),
        _System("torch TP + FSDP2", spec, None, lambda: _torch_tp_fsdp(spec)),
    ]
    for i, batch in enumerate(batches):
        for system in (systems if i % 2 == 0 else systems[::-1]):
            system.step(i, batch, warmup)
    return {s.name: s.result() for s in systems}


def _split_and_whole(spec: dict) -> tuple[int, int]:
    """(elements split over tp, elements whole on every tp rank) of the GPT."""
    split = whole = 0
    for name, p in _model(spec).named_parameters():
        if any(k in name for k in ("attn.qkv.", "mlp.fc.", "attn.proj.weight", "mlp.proj.weight")):
            split += p.numel()
        else:
            whole += p.numel()
    return split, whole


def report_tpdp(res: dict, spec: dict, rows: int, steps: int, warmup: int) -> str:
    zg, sp, tt = res["zerograph ZeRO-3"], res["zerograph ZeRO-3 + SP"], res["torch TP + FSDP2"]
    keep = res["zerograph ZeRO-3 + SP, no re-gather"]
    b, s, h, layers = rows, spec["block_size"], spec["n_embd"], spec["n_layer"]
    split, whole = _split_and_whole(spec)
    psi = split + whole
    ideal, exact = 16 * psi / (TP * DP), 16 * (split / TP + whole) / DP
    bsh = b * s * h * 4
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    lines = [
        f"GPT {layers} layers, d={h}, 4 heads, vocab {spec['vocab_size']}, seq {s}, untied; {b} rows per "
        f"data-parallel index; tp={TP} x dp={DP} on 4 gloo ranks, ZeRO-3 / FSDP2 over dp; AdamW fp32; {warmup} "
        f"warmup + {steps} timed steps; torch {torch.__version__}, {platform.machine()}, load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) at the end",
        "",
        "| system | median step ms (min–max) | ratio to torch | model-state MiB per rank | / 16Ψ/(tp·dp) "
        "| saved for backward MiB (step 2) | loss after last step | setup + warmup s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("zerograph tp=2 x dp=2 ZeRO-3", zg), ("zerograph ZeRO-3 + Megatron-SP", sp),
                    ("zerograph ZeRO-3 + Megatron-SP, no re-gather", keep), ("torch TP + FSDP2 (2-D mesh)", tt)):
        lines.append(f"| {name} | {r['median_ms']:.1f} ({r['min_ms']:.1f}–{r['max_ms']:.1f}) | "
                     f"{r['median_ms'] / tt['median_ms']:.2f} | {r['state_bytes'] / 2**20:.2f} | "
                     f"{r['state_bytes'] / ideal:.3f} | {r['saved_bytes'] / 2**20:.2f} | {r['loss']:.4f} | "
                     f"{r['warmup_s']:.1f} |")
    tp_formula = 2 * 2 * layers * bsh  # all-reduce buffer bytes, forward + backward
    lines += [
        "",
        f"Model states: Ψ = {psi:,} elements ({split:,} split over tp, {whole:,} whole: embeddings, norms, LM head, "
        f"row biases); 16Ψ/(tp·dp) = {ideal / 2**20:.2f} MiB, exact 16·(split/tp + whole)/dp = "
        f"{exact / 2**20:.2f} MiB (zerograph / exact: {zg['state_bytes'] / exact:.3f}).",
        f"Activations saved for the backward: with Megatron-SP {sp['saved_bytes'] / 2**20:.2f} MiB, without the "
        f"re-gather {keep['saved_bytes'] / 2**20:.2f} MiB, without SP {zg['saved_bytes'] / 2**20:.2f} MiB "
        f"(SP / no SP: {sp['saved_bytes'] / zg['saved_bytes']:.3f}); the re-gather saves "
        f"{(keep['saved_bytes'] - sp['saved_bytes']) / 2**20:.2f} MiB, formula 2L·b·s·h·4·(1 - 1/tp) = "
        f"{2 * layers * bsh * (1 - 1 / TP) / 2**20:.2f} MiB (the shard kept instead of the gathered input, per "
        f"column group); zerograph's planner predicts {sp['planned_activation_bytes'] / 2**20:.2f} / "
        f"{keep['planned_activation_bytes'] / 2**20:.2f} / {zg['planned_activation_bytes'] / 2**20:.2f} MiB.",
        f"zerograph traffic per step and rank (`inspect`), without SP: {zg['comm']}; tp_all_reduce / Megatron's "
        f"4·L·b·s·h·4 B = {zg['comm'].get('tp_all_reduce', 0) / tp_formula:.4f}.",
        f"With SP: {sp['comm']}; layers' reduce-scatter + all-gather (less the entry's and the LM head's "
        f"gathers, 2·b·s·h·4 B, and the backward's re-gathers, 2L·b·s·h·4 B) / (2 × the all-reduce formula, the "
        f"same bytes on the wire) = {(sp['comm'].get('tp_reduce_scatter', 0) + sp['comm'].get('tp_all_gather', 0) - 2 * bsh - 2 * layers * bsh) / (2 * tp_formula):.4f}; "
        f"re-gather traffic: SP - SP without re-gather, tp_all_gather = "
        f"{sp['comm'].get('tp_all_gather', 0) - keep['comm'].get('tp_all_gather', 0):,} B = 2L·b·s·h·4 = "
        f"{2 * layers * bsh:,}; "
        f"the norm weights' and row biases' gradient sums: tp_all_reduce {sp['comm'].get('tp_all_reduce', 0):,} B "
        f"= (6L + 2)·h·4 = {(6 * layers + 2) * h * 4:,}.",
    ]
    return "\n".join(lines)


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
    ap.add_argument("--only", choices=("tp", "tpdp"), default=None, help="run one of the two launches")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from zerograph.runtime.launch import spawn

    spec = _spec(args)
    texts = []
    if args.only in (None, "tp"):
        res = spawn(rank_main, TP, spec, args.rows, args.steps, args.warmup, timeout=args.timeout)[0]
        texts.append(report(res, spec, args.rows, args.steps, args.warmup))
        print(texts[-1], flush=True)
    if args.only in (None, "tpdp"):
        res = spawn(rank_main_tpdp, TP * DP, spec, args.rows, args.steps, args.warmup, timeout=args.timeout)[0]
        texts.append(report_tpdp(res, spec, args.rows, args.steps, args.warmup))
        print(texts[-1], flush=True)
    text = "\n\n".join(texts)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

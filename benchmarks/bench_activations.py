"""Saved-activation bytes and step time: zerograph's checkpoint policies vs
``torch.utils.checkpoint`` per block and AOTAutograd's ``activation_memory_budget``.

    python benchmarks/bench_activations.py [--layers L] [--width D] [--seq S] [--batch B] [--steps N] [--out FILE.md]

One process, one device (CPU here), the same GPT, weights and batch for every
row. "Saved bytes" is every tensor autograd stores for the backward during one
forward (``torch.autograd.graph.saved_tensors_hooks``; for compiled regions
these are exactly AOTAutograd's ``save_for_backward`` tensors, parameters
included; a second column leaves out tensors sharing a parameter's storage, which
live anyway). For ``torch.utils.checkpoint`` (non-reentrant) the tensors each
block's recomputation stores are dropped after its backward, so the figure is
what is held across the forward, as for the other rows. "Held activation memory" counts each
saved storage once (views of one tensor, e.g. ``log_softmax`` and its
``detach``, share it). "Recompute GFLOP": matmul and attention FLOPs of one
backward (``torch.utils.flop_counter``'s formulas) minus eager's backward, i.e.
what the backward recomputes. Step time: median of ``--steps`` forward+backward
passes after two warm-up steps. Ratios are to eager without checkpointing.

Budgets are compared at equal values: zerograph ``memory_budget: b`` (a fraction
of what policy none saves) vs ``torch._functorch.config.activation_memory_budget = b``
(AOTAutograd's min-cut partitioner; private torch config, set only here in the
benchmark script, never in the library).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import zerograph
from zerograph.models import GPT, GPTConfig

BUDGETS = (1.0, 0.5, 0.2, 0.0)


def make_model(args):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=4,
                         n_embd=args.width, dropout=0.0))


def batch(args):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def _storage(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.untyped_storage().data_ptr()


def measure(step, params, args) -> dict:
    idx, targets = batch(args)
    param_storages = {_storage(p) for p in params}
    saved, activations, held = [], [], {}

    def pack(t):
        saved.append(t.numel() * t.element_size())
        if _storage(t) not in param_storages:  # parameters (and views of them) live anyway
            activations.append(t.numel() * t.element_size())
            held[_storage(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(idx, targets)
    loss.backward()
    again = step(idx, targets)  # compiled: the forward runs outside the counter
    with BackwardFlops() as counter:
        again.backward()
    times = []
    for i in range(2 + args.steps):
        t0 = time.perf_counter()
        step(idx, targets).backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"saved": sum(saved), "acts": sum(activations), "held": sum(held.values()),
            "seconds": statistics.median(times), "loss": loss.item(), "bw_flops": counter.flops}


_ATEN = torch.ops.aten
# CPU's fused attention ops count like the CUDA ones (same arguments up front)
_SAME_FLOPS = {
    _ATEN._scaled_dot_product_flash_attention_for_cpu: _ATEN._scaled_dot_product_flash_attention,
    _ATEN._scaled_dot_product_flash_attention_for_cpu_backward: _ATEN._scaled_dot_product_flash_attention_backward,
}


class BackwardFlops(TorchDispatchMode):
    """Matmul and attention FLOPs of what runs under it (``torch.utils.flop_counter``'s
    formulas). Unlike ``FlopCounterMode`` it also looks inside ``run_with_rng_state``,
    the wrapper AOTAutograd puts around a recomputed op tagged random."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.higher_order.run_with_rng_state:
            state, op, *rest = args
            cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in rest)
            get, put = (torch.cuda.get_rng_state, torch.cuda.set_rng_state) if cuda else \
                (torch.get_rng_state, torch.set_rng_state)
            before = get()
            put(state)
            with self:
                out = op(*rest, **kwargs)
            put(before)
            return out
        out = func(*args, **kwargs)
        packet = getattr(_SAME_FLOPS.get(func, func), "_overloadpacket", None)
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def checkpointed_blocks(model):
    for block in model.h:
        forward = block.forward
        block.forward = lambda *a, _f=forward: torch.utils.checkpoint.checkpoint(_f, *a, use_reentrant=False)
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args()

    rows = []

    def run(name, model_or_step, compiled=None):
        torch._dynamo.reset()
        model = model_or_step
        step = compiled or (lambda i, t: model(i, t).loss)
        row = {"name": name, **measure(step, list(model.parameters()), args)}
        rows.append(row)
        print(f"{name:48s} {row['saved']:>12,d} B {row['held']:>12,d} B {row['bw_flops'] / 1e9:8.3f} GFLOP "
              f"{row['seconds'] * 1e3:8.1f} ms  loss {row['loss']:.6f}", flush=True)

    run("eager, no checkpointing", make_model(args))
    run("torch.utils.checkpoint per block", checkpointed_blocks(make_model(args)))
    for policy in ("none", "per_layer", "selective"):
        run(f"zerograph policy {policy}",
            zerograph.compile(make_model(args), {"activation_checkpointing": {"policy": policy}}))
    run("zerograph per_layer + offload_activations", zerograph.compile(
        make_model(args), {"activation_checkpointing": {"policy": "per_layer", "offload_activations": True}}))
    for budget in BUDGETS:
        run(f"zerograph memory_budget {budget}", zerograph.compile(
            make_model(args), {"activation_checkpointing": {"policy": "memory_budget", "memory_budget": budget}}))
        model = make_model(args)
        # private torch config (benchmark only): AOTAutograd's min-cut budget
        with torch._functorch.config.patch(activation_memory_budget=budget):
            compiled = torch.compile(model, backend="aot_eager_decomp_partition")
            run(f"AOTAutograd activation_memory_budget {budget}", model, lambda i, t, c=compiled: c(i, t).loss)
        # the two knobs mean different limits: also give zerograph, in bytes, the
        # activations AOTAutograd saved (its budget's unit: activations, not parameters)
        aot_acts = max(rows[-1]["acts"], 2)  # an int budget of 0 or 1 is ambiguous
        run(f"zerograph memory_budget {aot_acts:,} B (= AOTAutograd {budget}'s activations)", zerograph.compile(
            make_model(args), {"activation_checkpointing": {"policy": "memory_budget", "memory_budget": aot_acts}}))

    base = rows[0]
    lines = [f"GPT {args.layers} layers, d={args.width}, seq {args.seq}, batch {args.batch}, vocab {args.vocab}; "
             f"device: {'CUDA' if torch.cuda.is_available() else 'CPU'}; torch {torch.__version__}", "",
             "| variant | saved bytes | vs eager | saved activations (no params) | vs eager "
             "| held activation memory | vs eager | recompute GFLOP | step ms | vs eager | loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        recompute = (r["bw_flops"] - base["bw_flops"]) / 1e9
        lines.append(f"| {r['name']} | {r['saved']:,} | {r['saved'] / base['saved']:.2f} | {r['acts']:,} | "
                     f"{r['acts'] / base['acts']:.2f} | {r['held']:,} | {r['held'] / base['held']:.2f} | "
                     f"{recompute:.3f} | {r['seconds'] * 1e3:.1f} | {r['seconds'] / base['seconds']:.2f} | "
                     f"{r['loss']:.6f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

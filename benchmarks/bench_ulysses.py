"""Ulysses sequence parallelism: all-to-all bytes per layer against the
formula, and activation memory per rank, at sequence_parallel_size 1 and 2.

    python benchmarks/bench_ulysses.py [--seq S] [--width D] [--heads H] [--layers L] [--batch B] [--sp 1 2]

Each sp runs on ``sp`` spawned gloo ranks (CPU), world = sp (one data-parallel
rank), ZeRO stage 0, the same GPT and batch; every rank gets the full rows and
zerograph cuts the sequences. Per rank:

* **all-to-all bytes per layer, forward**: ``zerograph.inspect``'s
  ``sp_all_to_all`` bytes of the forward graph over the layers, next to the
  Ulysses formula 4·N·h/sp elements (N = batch·seq tokens, h = width; q, k,
  v and the output) x 4 bytes (fp32). The backward moves the same.
* **activations held for the backward**: the planner's prediction (the bytes
  of the forward's values the backward receives, kind ``activation``:
  ``inspect(model).memory``) and the measurement (every storage autograd saves
  in one forward, parameters left out: ``saved_tensors_hooks``), with the
  ratio to sp=1. Ulysses' target: 1/sp of sp=1's plus a constant (the
  attention's own saved values cover the whole sequence for heads/sp heads:
  also 1/sp).
"""

from __future__ import annotations

import argparse

import torch

import zerograph
from zerograph.models import GPT, GPTConfig
from zerograph.runtime.launch import spawn


def _model(args):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                         n_embd=args.width, dropout=0.0))


def _batch(args):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def _storage(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.untyped_storage()


def worker(args, sp: int) -> dict:
    config = {"zero_optimization": {"stage": 0}, "sequence_parallel_size": sp}
    model = zerograph.compile(_model(args), config)
    idx, targets = _batch(args)
    model(idx, targets).loss.backward()  # compile
    params = {_storage(p).data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}

    def pack(t):
        s = _storage(t)
        if s.data_ptr() not in params:
            held[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, targets).loss
    loss.backward()
    info = zerograph.inspect(model)
    forward = {}
    for region in info.regions:
        for kind, nbytes in region["comm_bytes"].get("forward", {}).items():
            forward[kind] = forward.get(kind, 0) + nbytes
    planned = sum(r.held.get("activation", 0) for r in info.memory.regions)
    return {"a2a_forward": forward.get("sp_all_to_all", 0), "measured": sum(held.values()), "planned": planned,
            "loss": loss.item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    rows, base = [], None
    tokens = args.batch * args.seq
    for sp in args.sp:
        result = spawn(worker, sp, args, sp, timeout=900)[0]
        formula = 4 * tokens * args.width // sp * 4 * args.layers if sp > 1 else 0
        base = base or result
        rows.append((sp, result, formula))
    print(f"GPT {args.layers} layers, width {args.width}, {args.heads} heads, batch {args.batch} x seq {args.seq}, fp32")
    print("| sp | all-to-all bytes/layer fwd (measured) | formula 4·N·h/sp x 4 B | activations held: planner | "
          "measured | measured / sp=1 | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for sp, r, formula in rows:
        print(f"| {sp} | {r['a2a_forward'] // args.layers} | {formula // args.layers} | {r['planned']} | "
              f"{r['measured']} | {r['measured'] / base['measured']:.3f} | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()

"""Ulysses sequence parallelism and ALST tiling: all-to-all bytes per layer
against the formula, activation memory per rank (planner vs measured) at
sequence_parallel_size 1, 2, 4, and the longest sequence that trains under a
fixed memory limit.

    python benchmarks/bench_ulysses.py [--seq S] [--width D] [--heads H] [--layers L] [--batch B] [--sp 1 2 4]
                                       [--tile T] [--longest LIMIT_MIB] [--skip-table]

Each sp runs on ``sp`` spawned gloo ranks (CPU), world = sp (one
data-parallel rank), ZeRO stage 0, the same GPT and batch; every rank gets
the full rows and zerograph cuts the sequences. Per rank:

* **all-to-all bytes per layer, forward**: ``zerograph.inspect``'s
  ``sp_all_to_all`` bytes of the forward graph over the layers, next to the
  Ulysses formula 4·N·h/sp elements (N = batch·seq tokens, h = width; q, k,
  v and the output) x 4 bytes (fp32). The backward moves the same.
* **activations held for the backward**: the planner's prediction (the bytes
  of the forward's values the backward receives, kind ``activation``:
  ``inspect(model).memory``) and the measurement (every storage autograd saves
  in one forward, parameters left out: ``saved_tensors_hooks``), with the
  ratio to sp=1. Ulysses' target: 1/sp of sp=1's plus a constant.
* **step peak** (everything the step's graphs hold at once, inputs and
  model states left out): the planner's ``peak_total_bytes`` and
  ``zerograph.track_memory``'s measured one.
* with ``--tile T`` each sp is also run with ``zerograph.sequence_tiling: T``.

``--longest LIMIT_MIB``: for each sp (and with ``--tile``, tiled too), the
longest sequence (a multiple of ``--granule`` x sp) for which one training
step runs under ``zerograph.memory_limit_bytes`` = model states + LIMIT_MIB
(states as zerograph counts them: parameters, gradients, AdamW's two
moments); a longer one raises ``MemoryBudgetError`` when its backward is
planned. The search starts from sp x the sp=1 result, so each sp costs a
few compiles.
"""

from __future__ import annotations

import argparse
import time

import torch

import zerograph
from zerograph.models import GPT, GPTConfig
from zerograph.runtime.launch import spawn


def _model(args, block: int):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=args.vocab, block_size=block, n_layer=args.layers, n_head=args.heads,
                         n_embd=args.width, dropout=0.0))


def _batch(args, seq: int):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, args.vocab, (args.batch, seq + 1), generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def _storage(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.untyped_storage()


def _zg(args, tile, **extra) -> dict:
    return {"zerograph": {"sequence_tiling": tile, **extra}}


def memory_worker(args, sp: int, tile) -> dict:
    config = {"zero_optimization": {"stage": 0}, "sequence_parallel_size": sp,
              **_zg(args, tile, track_memory=True)}
    model = zerograph.compile(_model(args, args.seq), config)
    idx, targets = _batch(args, args.seq)
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
            "peak_planned": info.memory.peak_total_bytes, "peak_measured": info.memory_measured.peak_total_bytes,
            "loss": loss.item()}


def _state_bytes(model) -> int:
    """Parameters, gradients and AdamW's two moments, fp32, this rank (stage 0: all)."""
    return 4 * 4 * sum(p.numel() for p in dict.fromkeys(model.parameters()))


def _fits(args, sp: int, tile, seq: int, limit_extra: int) -> tuple[bool, float]:
    torch._dynamo.reset()
    model = _model(args, args.max_seq)
    limit = _state_bytes(model) + limit_extra
    config = {"zero_optimization": {"stage": 0}, "sequence_parallel_size": sp,
              **_zg(args, tile, memory_limit_bytes=limit)}
    model = zerograph.compile(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx, targets = _batch(args, seq)
    start = time.perf_counter()
    try:
        model(idx, targets).loss.backward()
        opt.step()
    except zerograph.MemoryBudgetError:
        return False, time.perf_counter() - start
    return True, time.perf_counter() - start


def longest_worker(args, sp: int, tile, limit_extra: int, guess: int) -> dict:
    """The longest multiple of granule·sp that trains under the limit, searched from ``guess``."""
    granule = args.granule * sp
    seq = max(granule, guess // granule * granule)
    trials = []

    def fits(n):
        ok, seconds = _fits(args, sp, tile, n, limit_extra)
        trials.append((n, ok, round(seconds, 1)))
        return ok

    if fits(seq):
        good, bad = seq, None
        while bad is None:
            n = (int(good * 1.25) // granule + 1) * granule
            if n > args.max_seq:
                return {"longest": good, "trials": trials, "capped": True}
            good, bad = (n, None) if fits(n) else (good, n)
    else:
        good, bad = None, seq
        while good is None:
            n = max(granule, (int(bad * 0.8) // granule) * granule)
            good, bad = (n, bad) if fits(n) else (None, n)
            if good is None and n == granule:
                return {"longest": 0, "trials": trials, "capped": False}
    while bad - good > granule:
        mid = (good + bad) // 2 // granule * granule
        if fits(mid):
            good = mid
        else:
            bad = mid
    return {"longest": good, "trials": trials, "capped": False}


def _table(args):
    tiles = [None] + ([args.tile] if args.tile else [])
    rows, base = [], {}
    tokens = args.batch * args.seq
    for tile in tiles:
        for sp in args.sp:
            result = spawn(memory_worker, sp, args, sp, tile, timeout=1800)[0]
            formula = 4 * tokens * args.width // sp * 4 * args.layers if sp > 1 else 0
            base.setdefault(tile, result)
            rows.append((sp, tile, result, formula))
    print(f"GPT {args.layers} layers, width {args.width}, {args.heads} heads, vocab {args.vocab}, "
          f"batch {args.batch} x seq {args.seq}, fp32, ZeRO 0, world = sp")
    print("| sp | tiling | all-to-all bytes/layer fwd (measured) | formula 4·N·h/sp x 4 B | activations held: planner | "
          "measured | measured / sp=1 | target 1/sp | step peak: planner | measured | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for sp, tile, r, formula in rows:
        b = base[tile]
        print(f"| {sp} | {tile or 'off'} | {r['a2a_forward'] // args.layers} | {formula // args.layers} | "
              f"{r['planned']} | {r['measured']} | {r['measured'] / b['measured']:.3f} | {1 / sp:.3f} | "
              f"{r['peak_planned']} | {r['peak_measured']} | {r['loss']:.6f} |")


def _longest(args):
    limit_extra = int(args.longest * 2**20)
    tiles = [None] + ([args.tile] if args.tile else [])
    print(f"\nlongest sequence under memory_limit_bytes = model states + {args.longest} MiB "
          f"(GPT {args.layers} layers, width {args.width}, vocab {args.vocab}, batch {args.batch}; multiples of "
          f"{args.granule}·sp)")
    print("| sp | tiling | longest seq | vs sp=1 untiled | vs same sp untiled | trials (seq, fits, s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    found = {}
    for tile in tiles:
        for sp in args.sp:
            if (None, 1) in found:
                base = found[(None, 1)]
                guess = base * sp if tile is None else found.get((None, sp), base * sp) * 3 // 2
            else:
                guess = args.guess
            r = spawn(longest_worker, sp, args, sp, tile, limit_extra, guess, timeout=3600)[0]
            found[(tile, sp)] = r["longest"]
            one = found[(None, 1)]
            same = found.get((None, sp), r["longest"])
            capped = " (cap)" if r["capped"] else ""
            print(f"| {sp} | {tile or 'off'} | {r['longest']}{capped} | {r['longest'] / one:.2f}x | "
                  f"{r['longest'] / same:.2f}x | {r['trials']} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--sp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tile", type=int, default=None, help="also run with zerograph.sequence_tiling = TILE")
    parser.add_argument("--longest", type=float, default=None, help="MiB above the model states")
    parser.add_argument("--granule", type=int, default=64)
    parser.add_argument("--guess", type=int, default=1024)
    parser.add_argument("--max-seq", type=int, default=32768)
    parser.add_argument("--skip-table", action="store_true")
    args = parser.parse_args()
    if not args.skip_table:
        _table(args)
    if args.longest:
        _longest(args)


if __name__ == "__main__":
    main()

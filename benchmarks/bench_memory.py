"""Resident memory per rank: zerograph ZeRO-3 vs FSDP2 on CPU (gloo).

    python benchmarks/bench_memory.py [--model gpt-109m|gpt-4x256|gpt-6x384] [--steps N] [--world W]
                                      [--systems "zerograph stage 3,FSDP2"] [--census] [--out FILE.md]

Each system runs in its own launch of ``--world`` fresh ranks (so nothing one
system leaves in the allocator shows in the other's numbers), on the same
initial weights and token batches, with AdamW (zerograph:
``zerograph.make_optimizer``; FSDP2: over ``model.parameters()``). FSDP2 is
``fully_shard`` on each block, then the root. Both launches import the same
modules (torch, torch.distributed.fsdp, zerograph) before anything is
measured. Per rank it reads VmRSS (``/proc/self/status``):

- **after imports**: the process group is up, nothing built;
- **after warm-up**: after the first step (forward, backward, ``opt.step()``,
  ``opt.zero_grad()``; zerograph compiles here), then again after
  ``gc.collect()`` + ``malloc_trim(0)`` ("trimmed": what is still referenced,
  against what glibc kept in its free lists);
- **peak during steps 1..N**: a thread samples VmRSS every 2 ms.

``--census`` adds, after warm-up, the bytes of every tensor storage the
garbage collector can reach (by owner: model states, other), to attribute
what a rank holds beyond the model states. The report prints every number
as MiB (max over ranks) and zerograph's over FSDP2's.

``--prewarm`` first builds, steps once and frees a 1-layer model of the
same system ("after prewarm" row): the cost of the first compile in a
process (torch.compile's lazily imported modules and tables, paid once per
process, not per model) then shows before "after build" and not in the
model's growth.

``--malloc mmap128k`` sets ``MALLOC_MMAP_THRESHOLD_=131072`` in the ranks
(freed large blocks go back to the OS, so RSS follows live memory rather
than what glibc keeps for reuse); ``arenas2`` sets ``MALLOC_ARENA_MAX=2``.

``--model gpt-109m`` (12 layers, d=768, vocab 32000, seq 128, batch 2 per
rank; 109.7M parameters) is the headline shape; ``gpt-4x256`` runs in a
minute on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import shlex
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_zero import (  # noqa: E402
    MiB,
    RssSampler,
    _batches,
    _build,
    _rss_bytes,
    model_state_bytes,
)

MODELS = {
    "gpt-4x256": dict(vocab_size=1000, block_size=128, n_layer=4, n_head=4, n_embd=256, batch=8),
    "gpt-6x384": dict(vocab_size=8000, block_size=128, n_layer=6, n_head=6, n_embd=384, batch=4),
    "gpt-109m": dict(vocab_size=32000, block_size=128, n_layer=12, n_head=12, n_embd=768, batch=2),
}
SYSTEMS = ["zerograph stage 3", "FSDP2"]
MALLOC = {"default": {}, "mmap128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "arenas2": {"MALLOC_ARENA_MAX": "2"}}


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_census(model_state_ptrs: set[int]) -> dict[str, int]:
    """Bytes of the distinct tensor storages reachable from the garbage
    collector's objects: those of the model states (``model_state_ptrs``,
    storage data pointers) and all others, by (dtype, kind) of the holder."""
    import torch
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    fake = 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        t = obj
        try:
            if isinstance(t, DTensor):
                t = t._local_tensor
            if type(t).__name__ == "FakeTensor" or t.is_meta:
                fake += 1
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except Exception:  # tensor subclasses without a storage
            continue
    state = sum(n for p, n in seen.items() if p in model_state_ptrs)
    other = sum(n for p, n in seen.items() if p not in model_state_ptrs)
    return {"state": state, "other": other, "storages": len(seen), "fake_or_meta": fake}


def _state_ptrs(model, opt) -> set[int]:
    import torch
    from torch.distributed.tensor import DTensor

    out = set()
    tensors = []
    for p in model.parameters():
        tensors += [p, p.grad] if p.grad is not None else [p]
    for st in opt.state.values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    for group in getattr(opt, "param_groups", []):
        tensors += [p for p in group["params"] if isinstance(p, torch.Tensor)]
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        out.add(t.untyped_storage().data_ptr())
    return out


def _python_heap(snapshot, limit: int = 25) -> list[tuple[str, int]]:
    """tracemalloc's live Python allocations, grouped by the innermost frame
    in zerograph and the innermost in torch (else the innermost frame), largest first."""
    groups: dict[str, int] = {}
    for stat in snapshot.statistics("traceback"):
        frames = list(stat.traceback)  # most recent call last
        def short(f):
            return f"{f.filename.split('site-packages/')[-1].split('/zerograph/')[-1]}:{f.lineno}"

        zg = [f for f in frames if "/zerograph/" in f.filename and "site-packages" not in f.filename]
        th = [f for f in frames if "/torch/" in f.filename]
        where = " | ".join(short(x[-1]) for x in (zg, th) if x) or short(frames[-1])
        groups[where] = groups.get(where, 0) + stat.size
    return sorted(groups.items(), key=lambda kv: -kv[1])[:limit]


def _prewarm(name: str, spec: dict, rank: int, world: int) -> None:
    """One step of a 1-layer, d=64 model of ``name``, then freed."""
    small = dict(spec, n_layer=1, n_embd=64, n_head=2, vocab_size=128)
    model, opt, *_ = _build(name, small)
    (idx, targets), = _batches(small, 1, rank, world)
    model(idx, targets).loss.backward()
    opt.step()
    opt.zero_grad()


def rank_main(name: str, spec: dict, steps: int, census: bool, trace: bool = False, prewarm: bool = False) -> dict:
    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp  # noqa: F401  (both systems import the same modules)

    rank, world = dist.get_rank(), dist.get_world_size()
    _trim()
    out = {"name": name, "rss_torch": _rss_bytes()}
    import zerograph  # noqa: F401  (both systems: the model class lives in zerograph.models)

    batches = _batches(spec, steps + 1, rank, world)
    _trim()
    dist.barrier()
    out["rss_imports"] = _rss_bytes()
    if prewarm:
        _prewarm(name, spec, rank, world)
        _trim()
        out["rss_prewarm"] = _rss_bytes()
    if trace:
        import tracemalloc

        tracemalloc.start(12)
    model, opt, n_params, _, _ = _build(name, spec)
    out["n_params"] = n_params
    out["rss_built"] = _rss_bytes()

    def step(idx, targets):
        loss = model(idx, targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    out["losses"] = [step(*batches[0])]
    out["rss_warmup"] = _rss_bytes()
    out["state_bytes"] = model_state_bytes(model, opt)
    _trim()
    out["rss_warmup_trimmed"] = _rss_bytes()
    if trace:
        snap = tracemalloc.take_snapshot()
        tracemalloc.stop()
        out["python_heap_total"] = sum(s.size for s in snap.statistics("filename"))
        out["python_heap"] = _python_heap(snap)
        del snap
        _trim()
    if census:
        out["census"] = tensor_census(_state_ptrs(model, opt))
    dist.barrier()
    sampler = RssSampler().start()
    for idx, targets in batches[1:]:
        out["losses"].append(step(idx, targets))
    out["rss_peak"] = sampler.stop()
    out["rss_end"] = _rss_bytes()
    _trim()
    out["rss_end_trimmed"] = _rss_bytes()
    if census:
        out["census_end"] = tensor_census(_state_ptrs(model, opt))
    dist.barrier()
    return out


ROWS = [
    ("after import torch, torch.distributed.fsdp", "rss_torch"),
    ("after import zerograph", "rss_imports"),
    ("after prewarm (1-layer model compiled, stepped, freed)", "rss_prewarm"),
    ("after build", "rss_built"),
    ("after warm-up", "rss_warmup"),
    ("after warm-up, trimmed", "rss_warmup_trimmed"),
    ("peak during steps 1..N", "rss_peak"),
    ("after last step, trimmed", "rss_end_trimmed"),
]


def build_report(results: dict[str, list[dict]], spec: dict, world: int, steps: int) -> str:
    names = list(results)
    base = "FSDP2" if "FSDP2" in results else names[-1]
    first = results[names[0]][0]
    psi = first["n_params"]
    lines = [
        f"GPT {spec['n_layer']} layers, d={spec['n_embd']}, {spec['n_head']} heads, vocab {spec['vocab_size']}, "
        f"seq {spec['block_size']}; Ψ = {psi:,} parameters; batch {spec['batch']} per rank; world {world} (gloo); "
        f"AdamW fp32; 1 warm-up + {steps} steps; 16Ψ/W = {16 * psi / world / MiB:.1f} MiB",
        "",
        "| " + " | ".join(["RSS per rank (MiB, max over ranks)", *names,
                            *(f"{n} − {base}" for n in names if n != base),
                            *(f"{n} / {base}" for n in names if n != base)]) + " |",
        "|---|" + "---|" * (len(names) + 2 * (len(names) - 1)),
    ]

    def val(name, key):
        return max(r[key] for r in results[name])

    for label, key in ROWS + [("model states after zero_grad (12Ψ/W)", "state_bytes")]:
        if key not in first:
            continue
        cells = [f"{val(n, key) / MiB:.1f}" for n in names]
        cells += [f"{(val(n, key) - val(base, key)) / MiB:+.1f}" for n in names if n != base]
        cells += [f"{val(n, key) / val(base, key):.3f}" for n in names if n != base]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, key in [("growth: warm-up − imports", ("rss_warmup", "rss_imports")),
                       ("growth: peak − imports", ("rss_peak", "rss_imports")),
                       ("growth: warm-up trimmed − build", ("rss_warmup_trimmed", "rss_built"))]:
        vals = {n: max(r[key[0]] - r[key[1]] for r in results[n]) for n in names}
        cells = [f"{vals[n] / MiB:.1f}" for n in names]
        cells += [f"{(vals[n] - vals[base]) / MiB:+.1f}" for n in names if n != base]
        cells += [f"{vals[n] / vals[base]:.3f}" for n in names if n != base]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "census" in first:
        lines += ["", "| tensor census (MiB, rank 0) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for when in ("census", "census_end"):
            for k in ("state", "other"):
                lines.append(f"| {when} {k} | " + " | ".join(
                    f"{results[n][0][when][k] / MiB:.1f}" for n in names) + " |")
    if "python_heap" in first:
        for n in names:
            r = results[n][0]
            lines += ["", f"{n}: live Python allocations after warm-up (tracemalloc, rank 0): "
                      f"{r['python_heap_total'] / MiB:.1f} MiB; largest by allocating line:", ""]
            lines += [f"- {kb / MiB:.2f} MiB {where}" for where, kb in r["python_heap"]]
    lines += ["", "Loss after the last step (rank 0): " + ", ".join(
        f"{n} {results[n][0]['losses'][-1]:.4f}" for n in names)]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="gpt-4x256")
    ap.add_argument("--steps", type=int, default=3, help="steps after the warm-up step (default 3)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--census", action="store_true", help="count reachable tensor storages after warm-up")
    ap.add_argument("--trace", action="store_true",
                    help="tracemalloc from after the imports to after warm-up (slow): live Python allocations")
    ap.add_argument("--prewarm", action="store_true",
                    help="compile, step and free a 1-layer model first: the first compile's one-time cost lands "
                         "before 'after build'")
    ap.add_argument("--malloc", choices=sorted(MALLOC), default="default",
                    help="glibc malloc settings of the ranks: default; mmap128k (MALLOC_MMAP_THRESHOLD_=131072: "
                         "large blocks go back to the OS when freed, so RSS follows live memory, as bench_zero "
                         "--large); arenas2 (MALLOC_ARENA_MAX=2)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=float, default=1800.0)
    args = ap.parse_args(argv)

    from zerograph.runtime.launch import spawn

    spec = MODELS[args.model]
    os.environ.update(MALLOC[args.malloc])  # the ranks are new processes: glibc reads these at start
    systems = [s.strip() for s in args.systems.split(",")]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    results = {name: spawn(rank_main, args.world, name, spec, args.steps, args.census, args.trace, args.prewarm,
                            timeout=args.timeout)
               for name in systems}
    wall = time.perf_counter() - t0
    import torch

    header = [
        "# zerograph resident memory vs FSDP2",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}; "
        f"malloc: {args.malloc} {MALLOC[args.malloc] or ''}",
        f"- command: `python benchmarks/bench_memory.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        f"- whole run {wall:.0f} s; load average before {'/'.join(f'{x:.2f}' for x in load_before)}",
        "",
    ]
    report = "\n".join(header) + build_report(results, spec, args.world, args.steps) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The parts of ``benchmarks/gpu_check.py``: kernels, the fused graph, memory.

Each ``part_<name>(ctx, rep)`` runs in its own process (the runner's
subprocess), measures with the other benchmarks' functions and records
figures on ``rep`` (:class:`benchmarks.gpu_check.PartReport`). ``ctx.pick(gpu,
dry)`` chooses the GPU run's shapes or the dry run's tiny ones; everything
else is the same code. The training parts (offload, largest model, NCCL)
are in ``gpu_check_train.py``.
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess

import torch

from benchmarks.gpu_check_train import (  # noqa: F401  (the runner looks parts up here)
    part_activation_offload,
    part_largest_gpt,
    part_largest_gpt_offload,
    part_nccl,
    part_offload_param,
)

MiB = 2**20


def mib(n: float) -> str:
    """Bytes in the unit that reads best: GiB, MiB or KiB."""
    for unit, size in (("GiB", 2**30), ("MiB", MiB)):
        if abs(n) >= size:
            return f"{n / size:,.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n / 1024:,.1f} KiB"


def fresh(ctx) -> None:
    """Drop what the last model left: Dynamo's caches, garbage, the CUDA cache."""
    torch._dynamo.reset()
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# --------------------------------------------------------------------------- environment

def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _version(module: str, import_it: bool = True) -> str:
    try:
        if not import_it:  # installed at all (importing transformers takes seconds; no part needs it)
            from importlib.metadata import version

            return version(module)
        return __import__(module).__version__
    except Exception as exc:  # missing, or broken on this machine
        return f"not importable ({type(exc).__name__}: {exc})".splitlines()[0][:120]


def part_environment(ctx, rep) -> None:
    """The device, the software versions, and whether zerograph imports here."""
    rows = []
    if ctx.cuda:
        n = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        device = (f"{props.name} x{n} ({props.total_memory / 2**30:.1f} GiB each, compute capability "
                  f"{props.major}.{props.minor}), CUDA {torch.version.cuda}")
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        from benchmarks.bench_attention import time_ms

        ms = time_ms(lambda: a @ a, warmup=3, iters=10)
        rows.append(["bf16 8192^3 matmul (smoke test)", f"{2 * 8192**3 / ms / 1e9:.0f} TFLOP/s"])
    else:
        device = f"CPU only ({platform.machine()}, {os.cpu_count()} cores)" + (", dry run" if ctx.dry_run else "")
    mem = _meminfo()
    rows += [["device", device], ["host", f"{os.cpu_count()} CPU cores, {mem.get('MemTotal', 0) / 2**30:.0f} GiB RAM "
                                          f"({mem.get('MemAvailable', 0) / 2**30:.0f} GiB available)"]]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "no git metadata in this copy"
    except (OSError, subprocess.TimeoutExpired):
        commit = "no git here"
    software = (f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}; "
                f"zerograph commit {commit}")
    modules = {m: _version(m) for m in ("zerograph", "numpy", "networkx", "pydantic")}
    modules["transformers"] = _version("transformers", import_it=False)
    rows += [["software", software]] + [[f"import {m}", v] for m, v in modules.items()]
    rows.append(["TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")])
    rep.info = dict(device=device, software=software)
    rep.table(["item", "value"], rows)
    rep.headline = device
    missing = [m for m in ("zerograph", "numpy", "networkx", "pydantic") if modules[m].startswith("not importable")]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} cannot be imported here, so every zerograph part will fail; carry the "
            "missing wheels to the machine (see /work/.library/device/README.md on carrying wheels, or "
            "`pip download --no-deps` them for this Python) and put them on PYTHONPATH")


# --------------------------------------------------------------------------- attention

class _TritonAttention(torch.autograd.Function):
    """zerograph's attention kernels called directly (what the op launches on CUDA);
    on CPU they run under ``TRITON_INTERPRET=1`` (dry runs)."""

    @staticmethod
    def forward(ctx, q, k, v, causal):
        from zerograph.kernels import attention as kernels

        scale = q.shape[-1] ** -0.5
        out, lse = kernels.attention_forward_triton(q, k, v, None, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        from zerograph.kernels import attention as kernels

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = kernels.attention_backward_triton(grad, q, k, v, out, lse, None, ctx.causal, ctx.scale)
        return dq, dk, dv, None


def _attention_fn(ctx):
    if ctx.cuda:
        from zerograph.kernels.attention import attention

        return lambda q, k, v, causal: attention(q, k, v, causal=causal)
    return lambda q, k, v, causal: _TritonAttention.apply(q, k, v, causal)


def part_attention(ctx, rep) -> None:
    """Forward+backward time of zerograph's flash attention vs SDPA's flash kernel
    (bench_attention.measure), causal at 2k/4k/8k tokens, then full attention at 4k."""
    import torch.nn.functional as F

    from benchmarks import bench_attention

    heads, dim, tokens = ctx.pick((16, 128, 16384), (2, 16, 64))
    dtype = ctx.pick(torch.bfloat16, torch.float32)
    warmup, iters = ctx.pick((5, 20), (1, 1))
    fn = _attention_fn(ctx)
    shapes = [(s, True) for s in ctx.pick((2048, 4096, 8192), (32,))] + [(ctx.pick(4096, 32), False)]
    rows, ratios = [], []
    for seq, causal in shapes:
        if ctx.time_left() < ctx.pick(15 if causal else 25, 3):
            rep.note(f"Not measured, the part's cap was near: seq {seq}, {'causal' if causal else 'full'}.")
            continue
        batch = max(1, tokens // seq)
        r = bench_attention.measure(seq, batch, heads, heads, dim, dtype, causal, device=ctx.device,
                                    zerograph_fn=fn, with_math=False, warmup=warmup, iters=iters)
        q, k, v = (torch.randn(batch, heads, seq, dim, device=ctx.device, dtype=dtype) for _ in range(3))
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal).float()
            diff = ((fn(q, k, v, causal).float() - ref).abs().max() / ref.abs().max()).item()
        ratio = r["flash"] / r["zerograph"]
        ratios.append((seq, causal, ratio))
        kind = "causal" if causal else "full"
        tflops = lambda ms: f"{r['flops'] / ms / 1e9:.0f} TFLOP/s"  # noqa: E731
        rep.figure(f"fwd+bwd, {kind}, seq {seq} x batch {batch}", f"{r['zerograph']:.3f} ms ({tflops(r['zerograph'])})",
                   "SDPA flash", f"{r['flash']:.3f} ms ({tflops(r['flash'])})" if not r["flash_error"] else r["flash_error"],
                   ratio, "flash ms / zerograph ms", ">= 0.9x", ratio >= 0.9)
        rows.append([seq, batch, kind, f"{r['zerograph']:.3f}", f"{r['flash']:.3f}", f"{ratio:.2f}x", f"{diff:.1e}"])
    rep.table(["seq", "batch", "mask", "zerograph ms", "SDPA flash ms", "flash / zerograph", "max rel diff"], rows)
    rep.note(f"{heads} heads, head dim {dim}, {str(dtype).replace('torch.', '')}, batch x seq = {tokens} tokens; "
             f"forward + backward with a fixed output gradient; mean of {iters} calls after {warmup} warm-up "
             f"({'CUDA events' if ctx.cuda else 'perf_counter; Triton interpreter on CPU'}). TFLOP/s counts forward "
             "4·B·H·S²·D and backward 2.5x that, halved when causal.")
    label = lambda seq, causal: (f"{seq // 1024}k" if seq >= 1024 else str(seq)) + ("" if causal else " full")  # noqa: E731
    rep.headline = "flash/zerograph " + ", ".join(f"{r:.2f}x ({label(s, c)})" for s, c, r in ratios)


# --------------------------------------------------------------------------- fused graph end to end

def part_gpt_fusion(ctx, rep) -> None:
    """zerograph.models.GPT (12 layers, d=768) trained with zerograph.fusion off, then on (bench_fusion.run_model)."""
    from benchmarks import bench_fusion

    shape = dict(ctx.pick(bench_fusion.FULL, bench_fusion.TINY))
    dtype = ctx.pick("bf16", "fp32")
    steps, warmup = ctx.pick((5, 2), (2, 1))
    runs = {}
    for fusion in (False, True):
        fresh(ctx)
        runs[fusion] = r = bench_fusion.run_model("gpt", fusion, shape, steps=steps, warmup=warmup, dtype=dtype,
                                                  device=ctx.device)
        rep.note(f"fusion {'on' if fusion else 'off'}: {r['ms']:.1f} ms/step, peak {mib(r['peak'])}, "
                 f"first loss {r['loss']:.5f}")
    off, on = runs[False], runs[True]
    speedup = off["ms"] / on["ms"]
    rep.figure("step time, fused graph", f"{on['ms']:.1f} ms", "unfused graph", f"{off['ms']:.1f} ms", speedup,
               "unfused ms / fused ms", "> 1x", speedup > 1)
    memory = off["peak"] / max(on["peak"], 1)
    rep.figure("peak memory, fused graph", mib(on["peak"]), "unfused graph", mib(off["peak"]), memory,
               "unfused / fused", ">= 1x", memory >= 1)
    tol = ctx.pick(2e-2, 1e-4)
    diff = rel_diff(on["loss"], off["loss"])
    rep.figure("first step's loss, fused", f"{on['loss']:.5f}", "unfused", f"{off['loss']:.5f}", on["loss"] / off["loss"],
               "fused / unfused", f"relative difference <= {tol:g}", diff <= tol)
    counts = ", ".join(f"{k}={v}" for k, v in sorted(on["counts"].items())) or "none"
    rep.note(f"GPT {shape['n_layer']} layers, d={shape['n_embd']}, {shape['n_head']} heads, vocab {shape['vocab']}, "
             f"seq {shape['seq']}, batch {shape['batch']}, {dtype}; ZeRO stage 3 at world size 1; AdamW; median of "
             f"{steps} steps after {warmup} warm-up (compilation included there). Peak: "
             f"{'max_memory_allocated above the memory before the model' if ctx.cuda else 'RSS, rough'}. "
             f"Fused patterns: {counts}.")
    rep.headline = f"step time unfused/fused {speedup:.2f}x, peak unfused/fused {memory:.2f}x"


# --------------------------------------------------------------------------- planner vs allocator

def _fake_group(ctx, world: int):
    import torch.distributed as dist

    from benchmarks.bench_gpu_memory import fake_store

    if ctx.cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=world)


def _plan_vs_allocator(ctx, args) -> dict:
    """Train the bench_gpu_memory GPT at ZeRO-3 one step, then measure one
    forward+backward: max_memory_allocated above what was allocated before it,
    next to the plan's ``peak_total_bytes``."""
    import zerograph
    from benchmarks.bench_gpu_memory import build_model

    fresh(ctx)
    alloc = torch.cuda.memory_allocated if ctx.cuda else (lambda: 0)
    base = alloc()
    model = zerograph.compile(build_model(args).to(ctx.device), {
        "zero_optimization": {"stage": 3},
        "zerograph": {"device": ctx.device, "nonfinite_grads": "ignore"}})  # fake collectives: garbage values
    opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=1e-4, **({"fused": True} if ctx.cuda else {}))
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), device=ctx.device)

    def forward_backward():
        out = model(idx, idx)
        (out if torch.is_tensor(out) else out.loss).backward()

    forward_backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    measured = before = None
    if ctx.cuda:
        torch.cuda.synchronize()
        before = alloc()
        torch.cuda.reset_peak_memory_stats()
    forward_backward()
    if ctx.cuda:
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before
    plan = zerograph.inspect(model).memory
    out = dict(predicted=plan.peak_total_bytes, by_kind=dict(plan.peak), measured=measured,
               states=None if before is None else before - base, order=plan.order_note())
    del model, opt, idx
    return out


def part_planner(ctx, rep) -> None:
    """zerograph.inspect(model).memory.peak_total_bytes against torch.cuda.max_memory_allocated."""
    from benchmarks.bench_gpu_memory import default_args

    args = ctx.pick(default_args(), default_args(world=2, layers=2, dim=32, heads=2, vocab=64, seq=16, batch=2))
    _fake_group(ctx, args.world)
    rows, heads = [], []
    for loss_only in (True, False):
        label = "returns the loss only" if loss_only else "returns (loss, logits)"
        if not loss_only and ctx.time_left() < ctx.pick(20, 5):
            rep.note(f"Not measured, the part's cap was near: the model that {label}.")
            continue
        args.loss_only = loss_only
        r = _plan_vs_allocator(ctx, args)
        if r["measured"] is None:
            rep.figure(f"in-step peak, model {label}", mib(r["predicted"]) + " predicted", "max_memory_allocated",
                       "n/a (no CUDA allocator on CPU)", None, "predicted / measured", "0.9-1.1x")
        else:
            ratio = r["predicted"] / max(r["measured"], 1)
            rep.figure(f"in-step peak, model {label}", mib(r["predicted"]) + " predicted", "max_memory_allocated "
                       "above the memory before the step", mib(r["measured"]), ratio, "predicted / measured",
                       "0.9-1.1x", 0.9 <= ratio <= 1.1)
            total = (r["states"] + r["predicted"]) / max(r["states"] + r["measured"], 1)
            rep.figure(f"step peak incl. model states, model {label}", mib(r["states"] + r["predicted"]),
                       "max_memory_allocated above the memory before the model", mib(r["states"] + r["measured"]),
                       total, "predicted / measured", "0.9-1.1x", 0.9 <= total <= 1.1)
            heads.append(f"{ratio:.2f}x ({'loss' if loss_only else 'loss, logits'})")
        rows.append([label, *(mib(r["by_kind"].get(k, 0)) for k in ("gathered", "activation", "gradient", "other")),
                     mib(r["predicted"]), "-" if r["measured"] is None else mib(r["measured"])])
    rep.table(["model", "gathered", "activation", "gradient", "other", "predicted peak (all kinds together)",
               "measured"], rows)
    rep.note(f"GPT {args.layers} layers, d={args.dim}, vocab {args.vocab}, seq {args.seq}, batch {args.batch} per "
             f"rank, fp32, ZeRO-3 on a simulated world of {args.world} (fake process group: the allocations of a "
             "real rank, no data moved), zerograph.make_optimizer AdamW. After one full step, one forward+backward "
             "is measured; the per-kind columns are each kind's own peak (they need not coincide). Model states "
             "(parameter shards, Adam moments, the batch) are what was allocated before that forward.")
    rep.headline = ("predicted/measured " + ", ".join(heads)) if heads else "predicted only (CPU)"


# --------------------------------------------------------------------------- ZeRO-3 vs FSDP2

def part_zero3_memory(ctx, rep) -> None:
    """bench_gpu_memory.measure_system: zerograph ZeRO-3 vs FSDP2 (fully_shard per block and the root)."""
    from benchmarks.bench_gpu_memory import default_args, measure_system

    args = ctx.pick(default_args(loss_only=True, steps=3, warmup=2),
                    default_args(world=2, layers=2, dim=32, heads=2, vocab=64, seq=16, batch=2, loss_only=True,
                                 steps=1, warmup=1))
    _fake_group(ctx, args.world)
    systems = ["FSDP2", "zerograph-eager"] + ctx.pick(["zerograph-inductor"], [])
    rows = {}
    for name in systems:
        if name != "FSDP2" and name != "zerograph-eager" and ctx.time_left() < 25:
            rep.note(f"Not measured, the part's cap was near: {name}.")
            continue
        fresh(ctx)
        rows[name] = measure_system(name, args, ctx.device)
        r = rows[name]
        rep.note(f"{name}: peak {mib(r['peak']) if ctx.cuda else 'n/a (CPU)'}, model states {mib(r['states'])}, "
                 f"{r['ms']:.1f} ms/step (no communication)")
    ref = rows["FSDP2"]
    heads = []
    for name, r in rows.items():
        if name == "FSDP2":
            continue
        if ctx.cuda:
            ratio = r["peak"] / ref["peak"]
            rep.figure(f"peak allocated per rank, {name}", mib(r["peak"]), "FSDP2", mib(ref["peak"]), ratio,
                       "zerograph / FSDP2", "<= 1.0x", ratio <= 1.0)
            heads.append(f"{name} {ratio:.2f}x")
        else:
            rep.figure(f"peak allocated per rank, {name}", "n/a (CPU)", "FSDP2", "n/a (CPU)", None,
                       "zerograph / FSDP2", "<= 1.0x")
        rep.figure(f"model states per rank, {name}", mib(r["states"]), "FSDP2", mib(ref["states"]),
                   r["states"] / ref["states"], "zerograph / FSDP2", "1.00x", abs(r["states"] / ref["states"] - 1) < 1e-3)
        step = r["ms"] / ref["ms"]
        rep.figure(f"step time without communication, {name}", f"{r['ms']:.1f} ms", "FSDP2", f"{ref['ms']:.1f} ms",
                   step, "zerograph / FSDP2", "<= 1.0x", step <= 1.0)
    rep.note(f"GPT {args.layers} layers, d={args.dim}, vocab {args.vocab}, seq {args.seq}, batch {args.batch} per "
             f"rank, fp32, the model returns only its loss; simulated world {args.world} (fake process group, one "
             f"device); AdamW{' (fused)' if ctx.cuda else ''} over model.parameters(); peak = max over "
             f"{args.steps} timed steps (after {args.warmup}) of max_memory_allocated above the memory before "
             "the model. FSDP2: fully_shard on each block, then the root.")
    rep.headline = "peak vs FSDP2: " + (", ".join(heads) if heads else "n/a on CPU")


# --------------------------------------------------------------------------- linear + cross-entropy

class _TritonLinearCE(torch.autograd.Function):
    """The chunked linear cross-entropy with the Triton row kernel (what the op
    runs on CUDA), callable on CPU under ``TRITON_INTERPRET=1`` (dry runs)."""

    @staticmethod
    def forward(ctx, x, w, y):
        from zerograph.kernels import cross_entropy as ce

        scale = torch.tensor(1.0 / y.numel(), dtype=torch.float32, device=x.device)
        row_loss, gx, gw, _ = ce.linear_cross_entropy_chunked(x, w, y, None, -100, scale, True, True, True, False,
                                                              rows_fn=ce.cross_entropy_rows_triton)
        ctx.save_for_backward(gx, gw)
        return row_loss.sum() * scale

    @staticmethod
    def backward(ctx, grad):
        gx, gw = ctx.saved_tensors
        return gx * grad, gw * grad, None


def part_linear_ce(ctx, rep) -> None:
    """kernels.linear_cross_entropy_case: zerograph's linear_cross_entropy (row chunks of H/8) vs eager."""
    from benchmarks import kernels
    from zerograph.kernels.cross_entropy import chunk_rows_for

    tokens, hidden, vocab = ctx.pick((4096, 4096, 128256), (160, 32, 100))
    dtype = ctx.pick(torch.bfloat16, torch.float32)
    fused = None if ctx.cuda else (lambda x, w, y: _TritonLinearCE.apply(x, w, y))
    r = kernels.measure_case(kernels.linear_cross_entropy_case(tokens, hidden, vocab, dtype, ctx.device, fused))
    chunk = chunk_rows_for(tokens, hidden, vocab)
    if ctx.cuda:
        peak = r["fused_peak"] / r["eager_peak"]
        rep.figure("peak memory, fwd+bwd", mib(r["fused_peak"]), "eager F.cross_entropy(x @ W.T)",
                   mib(r["eager_peak"]), peak, "zerograph / eager", "<= 0.25x", peak <= 0.25)
        gpu = r["eager_gpu_ms"] / r["fused_gpu_ms"]
        rep.figure("GPU time, fwd+bwd", f"{r['fused_gpu_ms']:.3f} ms", "eager", f"{r['eager_gpu_ms']:.3f} ms", gpu,
                   "eager / zerograph", ">= 1x", gpu >= 1)
        rep.headline = f"peak {peak:.2f}x eager, GPU time {gpu:.2f}x faster"
    else:
        rep.figure("peak memory, fwd+bwd", "n/a (CPU)", "eager", "n/a (CPU)", None, "zerograph / eager", "<= 0.25x")
        rep.headline = "ran (CPU: no peak to read)"
    wall = r["eager_ms"] / r["fused_ms"]
    rep.figure("wall time, fwd+bwd", f"{r['fused_ms']:.3f} ms", "eager", f"{r['eager_ms']:.3f} ms", wall,
               "eager / zerograph", "")
    tol = ctx.pick(2e-2, 1e-4)
    rep.figure("loss", f"max rel diff {r['max_rel_diff']:.1e}", "eager", "-", None, "", f"<= {tol:g}",
               r["max_rel_diff"] <= tol)
    rep.note(f"{tokens} tokens x hidden {hidden} -> vocab {vocab}, {str(dtype).replace('torch.', '')}; row chunks "
             f"of {chunk} rows (chunk_rows_for: H/8, at least 64). Peak: max_memory_allocated over one "
             "forward+backward above the inputs; GPU time: the profiler's kernel time; wall: triton do_bench "
             "(CPU: median of 3).")

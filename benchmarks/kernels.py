"""zerograph's fused kernels vs eager PyTorch (and Liger-Kernel where installed).

For every op: forward+backward time and peak CUDA memory over a few shapes,
printed as a markdown table with ratios (eager time / zerograph time, and
zerograph peak / eager peak). Needs a CUDA GPU; without one it says so and
exits. Run::

    python benchmarks/kernels.py                 # all ops, bf16
    python benchmarks/kernels.py --ops rms_norm,swiglu --out /tmp/kernels.md

Timing, two ways: **GPU ms** is the summed duration of the kernels one
forward+backward launches (profiler; CPU launch overhead excluded: what a
training step pays when the CPU runs ahead of the GPU, as it does in real
models); **wall ms** is ``triton.testing.do_bench`` (median, L2 flushed),
which for small shapes is dominated by Python/dispatcher launch overhead.
Backward uses fixed random output gradients. Peak memory:
``torch.cuda.max_memory_allocated`` over one forward+backward, minus what was
allocated before it (inputs excluded).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], tuple]  # -> inputs (leaf tensors requiring grad where differentiable)
    eager: Callable
    fused: Callable
    liger: Callable | None = None


def _leaf(*shape, dtype, device="cuda", grad=True, scale=1.0):
    return (torch.randn(*shape, dtype=dtype, device=device) * scale).requires_grad_(grad)


# -- eager references written as models write them -------------------------------------

def _eager_rms(x, w, eps=1e-6):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _eager_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def make_cases(dtype, ops) -> list[Case]:
    from zerograph.kernels import cross_entropy, gelu, layer_norm, rms_norm, rotary, swiglu

    liger = _liger()
    cases: list[Case] = []
    if "rms_norm" in ops:
        for tokens, hidden in ((8192, 1024), (8192, 4096), (4096, 8192)):
            cases.append(Case(
                "rms_norm", f"{tokens}x{hidden}",
                lambda t=tokens, h=hidden: (_leaf(t, h, dtype=dtype), _leaf(h, dtype=dtype)),
                lambda x, w: _eager_rms(x, w),
                lambda x, w: rms_norm.rms_norm(x, w, 1e-6),
                (lambda x, w: liger["rms_norm"](x, w)) if "rms_norm" in liger else None,
            ))
    if "layer_norm" in ops:
        for tokens, hidden in ((8192, 1024), (8192, 4096)):
            cases.append(Case(
                "layer_norm", f"{tokens}x{hidden}",
                lambda t=tokens, h=hidden: (_leaf(t, h, dtype=dtype), _leaf(h, dtype=dtype), _leaf(h, dtype=dtype)),
                lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
                lambda x, w, b: layer_norm.layer_norm(x, w, b, 1e-5),
            ))
    if "swiglu" in ops:
        for tokens, inter in ((8192, 4096), (8192, 14336)):
            cases.append(Case(
                "swiglu", f"{tokens}x{inter}",
                lambda t=tokens, i=inter: (_leaf(t, i, dtype=dtype), _leaf(t, i, dtype=dtype)),
                lambda g, u: F.silu(g) * u,
                swiglu.swiglu,
                (lambda g, u: liger["swiglu"](g, u)) if "swiglu" in liger else None,
            ))
    if "gelu" in ops:
        for tokens, inter in ((8192, 4096), (8192, 16384)):
            cases.append(Case(
                "gelu_tanh", f"{tokens}x{inter}",
                lambda t=tokens, i=inter: (_leaf(t, i, dtype=dtype),),
                lambda x: F.gelu(x, approximate="tanh"),
                lambda x: gelu.gelu(x, "tanh"),
            ))
    if "rotary" in ops:
        for batch, heads, seq, dim in ((4, 32, 2048, 128),):
            def make(b=batch, h=heads, s=seq, d=dim):
                pos = torch.arange(s, device="cuda", dtype=torch.float32)
                inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
                freqs = torch.outer(pos, inv)
                emb = torch.cat((freqs, freqs), dim=-1)
                cos = emb.cos()[None].expand(b, s, d).to(dtype)
                sin = emb.sin()[None].expand(b, s, d).to(dtype)
                return (_leaf(b, h, s, d, dtype=dtype), _leaf(b, h // 4, s, d, dtype=dtype), cos, sin)

            cases.append(Case(
                "rotary", f"{batch}x{heads}x{seq}x{dim}", make, _eager_rotary,
                lambda q, k, c, s: rotary.apply_rotary(q, k, c, s),
            ))
    if "cross_entropy" in ops:
        for tokens, vocab in ((4096, 32000), (4096, 128256)):
            cases.append(Case(
                "cross_entropy", f"{tokens}x{vocab}",
                lambda t=tokens, v=vocab: (_leaf(t, v, dtype=dtype),
                                           torch.randint(0, v, (t,), device="cuda")),
                lambda logits, y: F.cross_entropy(logits.float(), y),
                lambda logits, y: cross_entropy.cross_entropy(logits, y),
                (lambda logits, y: liger["cross_entropy"](logits, y)) if "cross_entropy" in liger else None,
            ))
    if "linear_cross_entropy" in ops:
        for tokens, hidden, vocab in ((4096, 4096, 128256),):
            cases.append(linear_cross_entropy_case(tokens, hidden, vocab, dtype))
    if "attention" in ops:
        from zerograph.kernels import attention

        for seq in (2048, 4096, 8192):
            b, h, d = max(1, 16384 // seq), 16, 128
            cases.append(Case(
                "attention_causal", f"{b}x{h}x{seq}x{d}",
                lambda b=b, h=h, s=seq, d=d: tuple(_leaf(b, h, s, d, dtype=dtype) for _ in range(3)),
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                lambda q, k, v: attention.attention(q, k, v, causal=True),
            ))
    return cases


def linear_cross_entropy_case(tokens: int, hidden: int, vocab: int, dtype, device: str = "cuda",
                              fused: Callable | None = None) -> Case:
    """``F.cross_entropy(x @ W.T)`` vs ``zerograph.kernels.cross_entropy.linear_cross_entropy``
    (row chunks of ``chunk_rows_for``: H/8 rows); ``fused`` replaces the latter."""
    from zerograph.kernels import cross_entropy

    return Case(
        "linear_cross_entropy", f"{tokens}x{hidden}->{vocab}",
        lambda: (_leaf(tokens, hidden, dtype=dtype, device=device),
                 _leaf(vocab, hidden, dtype=dtype, device=device, scale=0.02),
                 torch.randint(0, vocab, (tokens,), device=device)),
        lambda x, w, y: F.cross_entropy((x @ w.t()).float(), y),
        fused or (lambda x, w, y: cross_entropy.linear_cross_entropy(x, w, y)),
    )


def _liger() -> dict[str, Callable]:
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy, liger_rms_norm, liger_swiglu
    except ImportError:
        return {}
    return {
        "rms_norm": lambda x, w: liger_rms_norm(x, w, 1e-6),
        "swiglu": liger_swiglu,
        "cross_entropy": liger_cross_entropy,
    }


def _output_grads(fn, inputs) -> list[torch.Tensor]:
    """Fixed random gradients for fn's outputs (so backward adds no extra kernels)."""
    with torch.no_grad():
        out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]


def _fwd_bwd(fn, inputs, grads):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads)


def _clear(inputs):
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None


def _gpu_busy_ms(run, iters: int = 20) -> float:
    """GPU time per call: the sum of the kernels' durations (CPU launch
    overhead excluded), from the profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            run()
        torch.cuda.synchronize()
    total = 0.0
    for evt in prof.key_averages():
        if evt.device_type == DeviceType.CUDA:
            total += getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
    return total / iters / 1e3


def _measure(fn, inputs) -> tuple[float, float, int]:
    """(wall ms per fwd+bwd incl. launch overhead, GPU-busy ms, peak bytes).

    On CPU tensors (dry runs): the median wall time of a few calls, and nan
    for the GPU time and the peak (no CUDA allocator to read)."""
    grads = _output_grads(fn, inputs)

    def run():
        _clear(inputs)
        _fwd_bwd(fn, inputs, grads)

    run()
    if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times), math.nan, math.nan
    from triton.testing import do_bench

    torch.cuda.synchronize()
    _clear(inputs)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _fwd_bwd(fn, inputs, grads)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(run, warmup=10, rep=50)
    return ms, _gpu_busy_ms(run), peak


def measure_case(case: Case) -> dict:
    """Eager vs zerograph (and Liger where installed) on one case: wall ms,
    GPU-busy ms, peak bytes of each (``eager_*``, ``fused_*``, ``liger_gpu_ms``)
    and the max relative difference of the outputs."""
    inputs = case.make()
    try:
        diff = _check(case, inputs)
        e_ms, e_gpu, e_peak = _measure(case.eager, inputs)
        z_ms, z_gpu, z_peak = _measure(case.fused, inputs)
        l_gpu = _measure(case.liger, inputs)[1] if case.liger is not None else math.nan
    finally:
        inputs = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"eager_ms": e_ms, "eager_gpu_ms": e_gpu, "eager_peak": e_peak, "fused_ms": z_ms,
            "fused_gpu_ms": z_gpu, "fused_peak": z_peak, "liger_gpu_ms": l_gpu, "max_rel_diff": diff}


def _check(case: Case, inputs) -> float:
    """Max relative difference of the fused output vs eager (sanity, not a test)."""
    with torch.no_grad():
        a, b = case.eager(*inputs), case.fused(*inputs)
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-6)).item()
               for x, y in zip(a, b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="rms_norm,layer_norm,swiglu,gelu,rotary,cross_entropy,"
                        "linear_cross_entropy,attention")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (Triton has no CPU backend); nothing measured.")
        return 0
    dtype = getattr(torch, args.dtype)
    ops = set(args.ops.split(","))
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    lines = [
        f"device: {device}, torch {torch.__version__}, dtype {args.dtype}",
        "",
        "| op | shape | eager GPU ms | zerograph GPU ms | GPU speedup | eager wall ms | zerograph wall ms | "
        "eager peak MiB | zerograph peak MiB | peak ratio | Liger GPU ms | max rel diff |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for case in make_cases(dtype, ops):
        try:
            r = measure_case(case)
            liger = "-" if math.isnan(r["liger_gpu_ms"]) else f"{r['liger_gpu_ms']:.3f}"
            row = (f"| {case.op} | {case.shape} | {r['eager_gpu_ms']:.3f} | {r['fused_gpu_ms']:.3f} | "
                   f"{r['eager_gpu_ms'] / r['fused_gpu_ms']:.2f}x | {r['eager_ms']:.3f} | {r['fused_ms']:.3f} | "
                   f"{r['eager_peak'] / 2**20:.0f} | {r['fused_peak'] / 2**20:.0f} | "
                   f"{r['fused_peak'] / max(r['eager_peak'], 1):.2f} | "
                   f"{liger} | "
                   f"{r['max_rel_diff']:.1e} |")
        except Exception as exc:  # report and go on: one broken op must not hide the others
            row = f"| {case.op} | {case.shape} | error: {type(exc).__name__}: {str(exc)[:120]} |"
        lines.append(row)
        print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attention fwd+bwd throughput: zerograph's Triton flash attention vs
``F.scaled_dot_product_attention`` (flash backend) and eager math attention.

    python benchmarks/bench_attention.py [--dtype bf16] [--head-dim 128] [--causal] [--batch-tokens 16384]

Sequence lengths 1k..8k, batch chosen so batch * seq = --batch-tokens, 16
heads (8 key/value heads with --gqa). Reports ms, TFLOP/s (fwd 4*B*H*S^2*D,
bwd 2.5x that, halved when causal) and zerograph/SDPA-flash ratios. Needs CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def time_ms(fn, warmup: int = 5, iters: int = 20, device: str = "cuda") -> float:
    """Mean milliseconds per call of ``fn``: CUDA events on CUDA, ``perf_counter`` elsewhere."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1e3 * (time.perf_counter() - t0) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _math_attention(q, k, v, causal):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def attention_flops(B: int, H: int, S: int, D: int, causal: bool) -> float:
    """Forward + backward FLOPs: forward 4*B*H*S^2*D, backward 2.5x that, halved when causal."""
    return 3.5 * 4 * B * H * S * S * D * (0.5 if causal else 1.0)


def measure(S: int, B: int, H: int, Hkv: int, D: int, dtype: torch.dtype, causal: bool, *,
            device: str = "cuda", zerograph_fn=None, with_math: bool = True,
            warmup: int = 5, iters: int = 20) -> dict:
    """Forward+backward ms of zerograph's attention, SDPA's flash kernel and
    (``with_math``) eager math attention at one shape: ``{"zerograph", "flash",
    "math"}`` (nan where a backend is unavailable), ``"flops"`` and
    ``"flash_error"``. ``zerograph_fn(q, k, v, causal)`` replaces
    ``zerograph.kernels.attention.attention`` (dry runs on CPU: the Triton
    launchers under ``TRITON_INTERPRET=1``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if zerograph_fn is None:
        from zerograph.kernels.attention import attention

        def zerograph_fn(q, k, v, causal):
            return attention(q, k, v, causal=causal)

    q = torch.randn(B, H, S, D, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, requires_grad=True)
    do = torch.randn(B, H, S, D, device=device, dtype=dtype)

    def expanded():
        return (k, v) if Hkv == H else (k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1))

    def zg():
        zerograph_fn(q, k, v, causal).backward(do)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            kk, vv = expanded()
            F.scaled_dot_product_attention(q, kk, vv, is_causal=causal).backward(do)

    def math_():
        kk, vv = expanded()
        _math_attention(q, kk, vv, causal).backward(do)

    out = {"flops": attention_flops(B, H, S, D, causal), "flash_error": None}
    out["zerograph"] = time_ms(zg, warmup, iters, device)
    try:
        out["flash"] = time_ms(flash, warmup, iters, device)
    except RuntimeError as e:  # e.g. fp32 has no flash kernel
        out["flash"], out["flash_error"] = float("nan"), str(e).splitlines()[0]
    out["math"] = float("nan")
    if with_math:
        try:
            out["math"] = time_ms(math_, min(warmup, 2), max(1, iters // 4), device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
    del q, k, v, do
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--gqa", action="store_true", help="half as many key/value heads")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--seqs", default="1024,2048,4096,8192")
    ap.add_argument("--no-math", action="store_true", help="skip eager math attention (memory-hungry)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure.")
        return 1
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    H, D = args.heads, args.head_dim
    Hkv = H // 2 if args.gqa else H
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype={args.dtype} D={D} H={H} Hkv={Hkv} "
          f"causal={args.causal}")
    print(f"{'seq':>6} {'batch':>5} | {'zerograph ms':>12} {'TF/s':>6} | {'sdpa-flash ms':>13} {'TF/s':>6} | "
          f"{'math ms':>8} {'TF/s':>6} | {'zg/flash':>8} {'zg/math':>7}")
    for S in (int(s) for s in args.seqs.split(",")):
        B = max(1, args.batch_tokens // S)
        r = measure(S, B, H, Hkv, D, dtype, args.causal, with_math=not args.no_math)
        if r["flash_error"]:
            print(f"# sdpa flash unavailable: {r['flash_error']}")
        t_zg, t_fl, t_ma = r["zerograph"], r["flash"], r["math"]
        tf = lambda t: r["flops"] / t / 1e9  # noqa: E731 (ms -> TFLOP/s)
        print(f"{S:>6} {B:>5} | {t_zg:>12.3f} {tf(t_zg):>6.1f} | {t_fl:>13.3f} {tf(t_fl):>6.1f} | "
              f"{t_ma:>8.3f} {tf(t_ma):>6.1f} | {t_fl / t_zg:>8.2f} {t_ma / t_zg:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

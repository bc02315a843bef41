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

import torch
import torch.nn.functional as F


def _time_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
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
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zerograph.kernels.attention import attention

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    H, D = args.heads, args.head_dim
    Hkv = H // 2 if args.gqa else H
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype={args.dtype} D={D} H={H} Hkv={Hkv} "
          f"causal={args.causal}")
    print(f"{'seq':>6} {'batch':>5} | {'zerograph ms':>12} {'TF/s':>6} | {'sdpa-flash ms':>13} {'TF/s':>6} | "
          f"{'math ms':>8} {'TF/s':>6} | {'zg/flash':>8} {'zg/math':>7}")
    for S in (int(s) for s in args.seqs.split(",")):
        B = max(1, args.batch_tokens // S)
        q = torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=True)
        do = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
        flops = 3.5 * 4 * B * H * S * S * D * (0.5 if args.causal else 1.0)

        def zg():
            attention(q, k, v, causal=args.causal).backward(do)

        def flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                kk, vv = (k, v) if Hkv == H else (k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1))
                F.scaled_dot_product_attention(q, kk, vv, is_causal=args.causal).backward(do)

        def math_():
            kk, vv = (k, v) if Hkv == H else (k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1))
            _math_attention(q, kk, vv, args.causal).backward(do)

        t_zg = _time_ms(zg)
        try:
            t_fl = _time_ms(flash)
        except RuntimeError as e:  # e.g. fp32 has no flash kernel
            print(f"# sdpa flash unavailable: {e}".splitlines()[0])
            t_fl = float("nan")
        t_ma = float("nan")
        if not args.no_math:
            try:
                t_ma = _time_ms(math_, warmup=2, iters=5)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
        tf = lambda t: flops / t / 1e9  # noqa: E731 (ms -> TFLOP/s)
        print(f"{S:>6} {B:>5} | {t_zg:>12.3f} {tf(t_zg):>6.1f} | {t_fl:>13.3f} {tf(t_fl):>6.1f} | "
              f"{t_ma:>8.3f} {tf(t_ma):>6.1f} | {t_fl / t_zg:>8.2f} {t_ma / t_zg:>7.2f}")
        del q, k, v, do
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

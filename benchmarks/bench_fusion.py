"""End to end: a 12-layer GPT trained with ``zerograph.fusion`` on vs off, in one run.

    python benchmarks/bench_fusion.py [--models gpt,hf_gpt2,hf_gpt2_eager] [--steps 10] [--warmup 3]
                                      [--batch 8] [--seq 1024] [--dtype bf16] [--out FILE.md]
    python benchmarks/bench_fusion.py --tiny        # CPU smoke run (2 layers, d=64, seq 32)

Models (12 layers, d=768, 12 heads, vocab 50304 unless --tiny):

- ``gpt``: ``zerograph.models.GPT`` (SDPA causal attention, ``F.gelu`` tanh);
- ``hf_gpt2``: Hugging Face ``GPT2LMHeadModel`` from a ``GPT2Config`` (built
  from the config, no download), ``attn_implementation="sdpa"``;
- ``hf_gpt2_eager``: the same with ``attn_implementation="eager"`` (attention
  written out as matmul / softmax / matmul, rewritten to the fused kernel).

For each model, in this one process, one after the other from the same initial
weights on the same random token batches (after one untimed warm-up step of
the first model): ``zerograph.compile`` with
``{"zerograph": {"fusion": false}}``, then with ``true`` (world size 1, ZeRO
stage 3, which at world size 1 gathers nothing; bf16 on CUDA by default),
AdamW. Per run: median step time (forward + backward + ``opt.step()`` +
``zero_grad``, after ``--warmup`` untimed steps that include compilation),
peak memory (CUDA: ``torch.cuda.max_memory_allocated`` above what was
allocated before the model was built; CPU: peak resident set size above the
one before the model was built, sampled every 2 ms; rough, as freed memory
is not always returned to the OS), the
loss of the first step (equal up to round-off: fusion must not change the
math), and the fused-pattern counts. Ratios are off / on: above 1 means the
fused graph is faster or uses less memory.

On CPU the fused ops run the kernels' pure-torch reference implementations
(there is no Triton CPU backend), which do the same work as the ops they
replace, in fp32: expect no speedup on CPU (ratios near or below 1). The
numbers that mean something come from a CUDA GPU, where the Triton kernels run.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import threading
import time

import torch

SEED = 0
DATA_SEED = 1234
MiB = 2**20
FULL = dict(n_layer=12, n_head=12, n_embd=768, vocab=50304, seq=1024, batch=8)
TINY = dict(n_layer=2, n_head=2, n_embd=64, vocab=211, seq=32, batch=2)


class _PeakRSS:
    """Peak resident set size (bytes) above the value at start, sampled by a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def bytes(self) -> int:
        return self.peak - self.base


def _build(name: str, s: dict):
    torch.manual_seed(SEED)
    if name == "gpt":
        from zerograph.models import GPT, GPTConfig

        return GPT(GPTConfig(vocab_size=s["vocab"], block_size=s["seq"], n_layer=s["n_layer"],
                             n_head=s["n_head"], n_embd=s["n_embd"]))
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=s["vocab"], n_positions=s["seq"], n_embd=s["n_embd"], n_layer=s["n_layer"],
                     n_head=s["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.set_attn_implementation("eager" if name == "hf_gpt2_eager" else "sdpa")
    return model


def _loss(name: str, model, idx, targets):
    if name == "gpt":
        return model(idx, targets).loss
    return model(input_ids=idx, labels=idx).loss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run(name: str, fusion: bool, s: dict, args, device) -> dict:
    import zerograph

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    config = {"zero_optimization": {"stage": 3}, "zerograph": {"fusion": fusion}}
    if args.dtype == "bf16":
        config["bf16"] = {"enabled": True}
    gen = torch.Generator().manual_seed(DATA_SEED)
    batches = [torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1), generator=gen)
               for _ in range(args.warmup + args.steps)]
    times, first_loss = [], None
    with _PeakRSS() as rss:
        model = zerograph.compile(_build(name, s).to(device), config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            idx, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            _sync(device)
            t0 = time.perf_counter()
            loss = _loss(name, model, idx, targets)
            loss.backward()
            opt.step()
            opt.zero_grad()
            _sync(device)
            if i == 0:
                first_loss = loss.item()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        info = zerograph.inspect(model)
    counts: dict[str, int] = {}
    for record in info.passes:
        for k, v in record.counts.items():
            counts[k] = counts.get(k, 0) + v
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else rss.bytes
    del model, opt
    return {"ms": 1e3 * statistics.median(times), "peak": peak, "loss": first_loss, "counts": counts}


def run_model(name: str, fusion: bool, shape: dict, *, steps: int, warmup: int, dtype: str, device) -> dict:
    """Train ``name`` (``gpt``, ``hf_gpt2``, ``hf_gpt2_eager``) of ``shape``
    (keys of :data:`FULL`) with ``zerograph.fusion`` on or off: ``{"ms": median
    step ms, "peak": bytes, "loss": first step's loss, "counts": fused patterns}``."""
    args = argparse.Namespace(steps=steps, warmup=warmup, dtype=dtype)
    return _run(name, fusion, shape, args, torch.device(device))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt,hf_gpt2,hf_gpt2_eager")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="2 layers, d=64, seq 32, batch 2: a CPU smoke run")
    for key in ("n_layer", "n_head", "n_embd", "vocab", "seq", "batch"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--out", default=None, help="also write the markdown report here")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    s = dict(TINY if args.tiny else FULL)
    for key in s:
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    names = [n for n in args.models.split(",") if n]
    unknown = set(names) - {"gpt", "hf_gpt2", "hf_gpt2_eager"}
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)}; choose from gpt, hf_gpt2, hf_gpt2_eager")

    cpu = f"CPU ({platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f})"
    dev = torch.cuda.get_device_name() if device.type == "cuda" else cpu
    lines = [
        f"device: {dev}, torch {torch.__version__}, {args.dtype}; {s['n_layer']} layers, d={s['n_embd']}, "
        f"{s['n_head']} heads, vocab {s['vocab']}, seq {s['seq']}, batch {s['batch']}; "
        f"median of {args.steps} steps after {args.warmup} warmup",
        "",
        "| model | ms/step off | ms/step on | speedup (off/on) | peak MiB off | peak MiB on | memory (off/on) "
        "| first loss off / on | fused patterns |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if device.type == "cpu":
        lines.insert(1, "CPU: the fused ops run their pure-torch references; no speedup is expected here.")
    # one untimed step first, so that the first measured run does not pay for
    # one-time work (imports, Dynamo/Inductor caches, allocator growth)
    _run(names[0], False, s, argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0}), device)
    for name in names:
        off = _run(name, False, s, args, device)
        on = _run(name, True, s, args, device)
        counts = ", ".join(f"{k}={v}" for k, v in sorted(on["counts"].items()))
        lines.append(
            f"| {name} | {off['ms']:.1f} | {on['ms']:.1f} | {off['ms'] / on['ms']:.2f}x "
            f"| {off['peak'] / MiB:.0f} | {on['peak'] / MiB:.0f} | {off['peak'] / max(on['peak'], 1):.2f}x "
            f"| {off['loss']:.5f} / {on['loss']:.5f} | {counts} |"
        )
        print(lines[-1], flush=True)
    report = "\n".join(lines)
    print()
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

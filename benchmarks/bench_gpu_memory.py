"""Peak GPU memory per rank of ZeRO-3 (zerograph) vs FSDP2 and DDP, on ONE GPU.

A W-rank job is simulated in one process with PyTorch's fake process group:
collectives allocate and return correctly shaped buffers but move no data,
so every allocation a real rank makes happens here too, and
``torch.cuda.max_memory_allocated`` is the per-rank peak of a real W-GPU run
(the values computed are garbage; the losses are not reported). Step times
exclude communication: they show each system's compute-side overhead only.

    python benchmarks/bench_gpu_memory.py                     # 12-layer d=768 GPT, W=8, fp32
    python benchmarks/bench_gpu_memory.py --world 4 --layers 24 --out /tmp/mem.md
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch
import torch.distributed as dist

from zerograph._torch_private import fake_store
from zerograph.models import GPT, GPTConfig


class LossOnly(torch.nn.Module):
    """The GPT returning only its loss (no logits output that needs a gradient)."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.h = gpt.h

    def forward(self, idx, targets):
        return self.gpt(idx, targets).loss


def build_model(args) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=args.vocab, block_size=args.seq, n_layer=args.layers, n_head=args.heads,
                    n_embd=args.dim, tie_weights=True)
    return LossOnly(GPT(cfg)) if args.loss_only else GPT(cfg)


def _zerograph(args, compiler, device="cuda"):
    import zerograph

    # the fake group's collectives return garbage: no finite-gradient check on it
    model = zerograph.compile(build_model(args), {"zero_optimization": {"stage": 3},
                                                  "zerograph": {"compiler": compiler, "device": str(device),
                                                                "nonfinite_grads": "ignore"}})
    return model


def _fsdp2(args, device="cuda"):
    from torch.distributed.fsdp import fully_shard

    model = build_model(args).to(device)
    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    return model


def _ddp(args, device="cuda"):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(build_model(args).to(device), init_sync=False)


SYSTEMS = {
    "zerograph-eager": lambda args, device: _zerograph(args, "eager", device),
    "zerograph-inductor": lambda args, device: _zerograph(args, "inductor", device),
    "FSDP2": _fsdp2,
    "DDP": _ddp,
}


def default_args(**overrides) -> argparse.Namespace:
    """The command line's defaults (12-layer d=768 GPT, W=8, ...), with ``overrides``."""
    args = _parser().parse_args([])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise TypeError(f"default_args: unknown option(s) {sorted(unknown)}; choose from {sorted(vars(args))}")
    vars(args).update(overrides)
    return args


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_system(name: str, args, device="cuda") -> dict:
    """Train system ``name`` (a key of :data:`SYSTEMS`) under the already
    initialized fake process group: ``{"name", "ms": median step ms (no
    comm), "peak": max over the timed steps of max_memory_allocated above
    the memory before the model was built (nan off CUDA), "states": model-state
    bytes per rank}``."""
    cuda = torch.device(device).type == "cuda"
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    model = SYSTEMS[name](args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    times, peaks = [], []
    for step in range(args.warmup + args.steps):
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = model(idx, idx)
        loss = out if torch.is_tensor(out) else out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            peaks.append(torch.cuda.max_memory_allocated() - base if cuda else float("nan"))
    states = sum(
        (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters()
    )
    states += sum(
        (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
        for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0
    )
    del model, opt, out, loss
    return {"name": name, "ms": 1e3 * statistics.median(times), "peak": max(peaks), "states": states}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--systems", default="zerograph-eager,zerograph-inductor,FSDP2,DDP")
    p.add_argument("--loss-only", action="store_true",
                   help="the model returns only the loss (no logits output): torch.compile's AOTAutograd "
                        "materializes a zero gradient for a returned output nobody differentiates")
    p.add_argument("--out", default=None)
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    unknown = [name for name in args.systems.split(",") if name not in SYSTEMS]
    if unknown:
        p.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    if not torch.cuda.is_available():
        print("bench_gpu_memory.py needs a CUDA GPU; nothing measured.")
        return 0
    torch.cuda.set_device(0)
    dist.init_process_group("fake", store=fake_store(), rank=0, world_size=args.world)
    rows = []
    for name in args.systems.split(","):
        try:
            rows.append(measure_system(name, args))
        except Exception as exc:  # one failing system must not hide the others
            rows.append({"name": name, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
        print(rows[-1], flush=True)
    ref = next((r for r in rows if r["name"] == "FSDP2" and "peak" in r), None)
    params = sum(p.numel() for p in dict.fromkeys(build_model(args).parameters()))
    lines = [
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}; simulated world {args.world} "
        f"(fake process group, one GPU); GPT {args.layers} layers d={args.dim} vocab {args.vocab} "
        f"({params / 1e6:.1f}M params), seq {args.seq}, batch {args.batch} per rank, fp32, AdamW"
        + (", model returns only the loss" if args.loss_only else ", model returns (loss, logits)"),
        "",
        "| system | peak allocated per rank (MiB) | vs FSDP2 | model states per rank (MiB) | step ms (no comm) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} | | | |")
            continue
        ratio = f"{r['peak'] / ref['peak']:.2f}x" if ref else "-"
        lines.append(f"| {r['name']} | {r['peak'] / 2**20:.0f} | {ratio} | {r['states'] / 2**20:.0f} | {r['ms']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

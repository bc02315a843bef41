"""Benchmark zerograph's ZeRO stages against DDP and FSDP2 on CPU (gloo).

    python benchmarks/bench_zero.py [--steps N] [--warmup K] [--world W] [--large] [--model M] [--interleave] [--out FILE.md]

Default: the 3.70M-parameter GPT (4 layers, d=256, vocab 1000, seq 128),
batch 8 per rank. In ONE launch of ``--world`` ranks, every rank trains each
system in turn on the same initial weights and the same token batches:
zerograph stage 0, 1, 2, 3, stage 3 without prefetch (``schedule_collectives``
disabled) and/or without bucketing (bucket sizes 0); DDP; FSDP2 (``fully_shard`` on each block, then
the root). Per system: median step time (forward + backward + optimizer step
+ zero_grad), model-state bytes per rank, communication per step.

``--interleave``: every system is built and warmed up first, then the timed
steps go round-robin (one step of each system per round, the order rotated
each round), so that load drift on a shared machine falls on all systems
alike instead of on whichever ran last.

``--model gpt-12x768``: the ``--large`` shape for the stage-3 variants, DDP
and FSDP2, without RSS sampling.

``--large``: a ~98M-parameter GPT (12 layers, d=768, vocab 16384, seq 128),
batch 2 per rank, for zerograph stage 3, DDP and FSDP2 only, also measuring
each rank's peak resident memory (VmRSS sampled by a background thread)
above the RSS it had just before the model was created.

Rank 0's parent process prints a markdown table; ``--out`` also writes it to
a file.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import shlex
import statistics
import sys
import threading
import time

import torch

SMALL = dict(vocab_size=1000, block_size=128, n_layer=4, n_head=4, n_embd=256, batch=8)
LARGE = dict(vocab_size=16384, block_size=128, n_layer=12, n_head=12, n_embd=768, batch=2)

SMALL_SYSTEMS = ["zerograph stage 0", "zerograph stage 1", "zerograph stage 2", "zerograph stage 3",
                 "zerograph stage 3 no-prefetch", "zerograph stage 3 unbucketed", "zerograph stage 3 no-prefetch unbucketed",
                 "DDP", "FSDP2"]
LARGE_SYSTEMS = ["zerograph stage 3", "DDP", "FSDP2"]
# --model gpt-12x768: the large model's shape without the RSS sampling, with
# the stage-3 schedule variants next to DDP and FSDP2 (default prefetching)
MODELS = {"gpt-4x256": SMALL, "gpt-12x768": LARGE}
STAGE3_SYSTEMS = ["zerograph stage 3", "zerograph stage 3 no-prefetch", "zerograph stage 3 unbucketed",
                  "zerograph stage 3 no-prefetch unbucketed", "DDP", "FSDP2"]
# stage-3 variants: "no-prefetch" disables the schedule_collectives pass (every
# collective on demand), "unbucketed" sets both bucket sizes to 0 (one
# collective per parameter), "inductor" compiles the final graphs with
# TorchInductor instead of running them op by op (``zerograph.compiler``)
# "reuse-1e9": stage3_max_reuse_distance 1e9 (DeepSpeed's default; zerograph's is 0)
# "plain-optimizer": torch.optim.AdamW over model.parameters() (the DTensors)
# instead of zerograph.make_optimizer's ShardOptimizer (the local shards)
PLAIN_OPTIMIZER = "plain-optimizer"
_VARIANTS = {"no-prefetch": {"zerograph": {"disabled_passes": ["schedule_collectives"]}},
             "unbucketed": {"zero_optimization": {"allgather_bucket_size": 0, "reduce_bucket_size": 0}},
             "inductor": {"zerograph": {"compiler": "inductor"}},
             # DeepSpeed's default reuse distance: gathered parameters stay from the forward into the
             # backward (no backward re-gather); model states unchanged, a higher transient peak
             "reuse-1e9": {"zero_optimization": {"stage3_max_reuse_distance": 1_000_000_000}},
             # parameter shards in (pinned, on CUDA) host memory, copied to the device before each gather
             "offload-param": {"zero_optimization": {"offload_param": {"device": "cpu", "pin_memory": True}}}}

LR = 1e-4
SEED = 0
DATA_SEED = 1234
MiB = 2**20


# --------------------------------------------------------------------------
# memory helpers
# --------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class RssSampler:
    """Reads VmRSS every ``interval`` seconds on a daemon thread; keeps the peak."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss > self.peak:
                self.peak = rss
            time.sleep(self.interval)

    def start(self) -> "RssSampler":
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def reset(self) -> None:
        self.peak = _rss_bytes()

    def read(self) -> int:
        return max(self.peak, _rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.read()


def _release_memory() -> None:
    """Free what the last system left: Python garbage, then glibc's free lists."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def model_state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """This rank's bytes of parameters + gradients + optimizer state tensors.

    DTensors count their local shard. A tensor is counted once even when it
    is reachable twice (tied weights)."""
    from torch.distributed.tensor import DTensor

    tensors = []
    for p in dict.fromkeys(model.parameters()):
        tensors.append(p)
        if p.grad is not None:
            tensors.append(p.grad)
    for state in opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------
# the systems
# --------------------------------------------------------------------------
def _gpt_config(spec: dict):
    from zerograph.models import GPTConfig

    return GPTConfig(
        vocab_size=spec["vocab_size"],
        block_size=spec["block_size"],
        n_layer=spec["n_layer"],
        n_head=spec["n_head"],
        n_embd=spec["n_embd"],
    )


def _prepare(name: str, model: torch.nn.Module) -> torch.nn.Module:
    if name.startswith("zerograph stage "):
        import zerograph

        words = name.split()
        config: dict = {"zero_optimization": {"stage": int(words[2])}, "zerograph": {}}
        for word in words[3:]:
            if word == PLAIN_OPTIMIZER:
                continue
            if word not in _VARIANTS:
                raise ValueError(f"unknown variant {word!r} in {name!r}; choose from {sorted(_VARIANTS)}")
            for section, values in _VARIANTS[word].items():
                config[section].update(values)
        return zerograph.compile(model, config)
    if name == "DDP":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if name == "FSDP2":
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(name)


def _device() -> torch.device:
    """Where this rank computes: its CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(spec: dict, n: int, rank: int, world: int, device: torch.device | None = None):
    """The same global random token batches for every system; this rank's slice (on ``device``)."""
    out = []
    for step in range(n):
        g = torch.Generator().manual_seed(DATA_SEED + step)
        shape = (spec["batch"] * world, spec["block_size"])
        idx = torch.randint(0, spec["vocab_size"], shape, generator=g)
        targets = torch.randint(0, spec["vocab_size"], shape, generator=g)
        out.append((idx.chunk(world)[rank].contiguous().to(device or "cpu"),
                    targets.chunk(world)[rank].contiguous().to(device or "cpu")))
    return out


def _build(name: str, spec: dict):
    """(model prepared for ``name``, its AdamW, Ψ, root parameters, prepare seconds)."""
    from zerograph.models import GPT

    torch.manual_seed(SEED)
    model = GPT(_gpt_config(spec)).to(_device())
    n_params = model.num_parameters()
    n_root = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("h."))
    t_prep = time.perf_counter()
    model = _prepare(name, model)
    if name.startswith("zerograph ") and PLAIN_OPTIMIZER not in name.split():
        import zerograph

        opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=LR)  # steps the local shards
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
    return model, opt, n_params, n_root, time.perf_counter() - t_prep


def _run_system(name: str, spec: dict, steps: int, warmup: int, sample_rss: bool) -> dict:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device()
    batches = _batches(spec, warmup + steps, rank, world, device)
    torch._dynamo.reset()
    _release_memory()
    dist.barrier()

    sampler = RssSampler().start() if sample_rss else None
    rss_before = _rss_bytes()
    model, opt, n_params, n_root, prep_s = _build(name, spec)

    times, losses = [], []
    state_bytes = 0
    rss_after_warmup = peak_all = peak_steps = None
    t_warm = time.perf_counter()
    for i, (idx, targets) in enumerate(batches):
        if i == warmup:
            warmup_s = time.perf_counter() - t_warm
            if sampler is not None:
                rss_after_warmup = _rss_bytes()
                peak_all = sampler.read()
                sampler.reset()
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        loss = model(idx, targets).loss
        loss.backward()
        opt.step()
        if i == 0:  # gradients and optimizer state exist now (step 0 is not timed)
            state_bytes = model_state_bytes(model, opt)
        opt.zero_grad()
        _sync(device)
        t1 = time.perf_counter()
        if i >= warmup:
            times.append(t1 - t0)
        losses.append(loss.item())
    if warmup == len(batches):
        warmup_s = time.perf_counter() - t_warm

    comm = None
    if name.startswith("zerograph"):
        import zerograph

        comm = dict(zerograph.inspect(model).comm_bytes_last_step)

    result = {
        "name": name,
        "n_params": n_params,
        "n_root_params": n_root,
        "times": times,
        "losses": losses,
        "state_bytes": state_bytes,
        "comm": comm,
        "prep_s": prep_s,
        "warmup_s": warmup_s,
    }
    if sampler is not None:
        peak_steps = sampler.stop()
        peak_all = max(peak_all, peak_steps)
        result.update(
            rss_before=rss_before,
            rss_after_warmup=rss_after_warmup,
            peak_all=peak_all,
            peak_steps=peak_steps,
        )
    del model, opt, loss
    torch._dynamo.reset()
    _release_memory()
    dist.barrier()
    return result


def rank_main(spec: dict, systems: list[str], steps: int, warmup: int, sample_rss: bool,
              interleave: bool = False) -> list[dict]:
    """Run on every rank: each system in turn, same weights and data (or,
    with ``interleave``, all systems alive at once, taking turns step by step)."""
    if interleave:
        return _run_interleaved(systems, spec, steps, warmup)
    return [_run_system(name, spec, steps, warmup, sample_rss) for name in systems]


def _run_interleaved(systems: list[str], spec: dict, steps: int, warmup: int) -> list[dict]:
    """Every system is built and warmed up first; then each timed round runs
    one step of every system, the order rotated by one each round, so that
    drift in the machine's load falls on all systems alike."""
    import torch.distributed as dist

    import zerograph

    # one compiled frame per zerograph system of the same model class: keep
    # Dynamo from falling back to eager after its default recompile limit
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(systems))
    torch._dynamo.reset()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device()
    batches = _batches(spec, warmup + steps, rank, world, device)
    runs = []
    for name in systems:
        model, opt, n_params, n_root, prep_s = _build(name, spec)
        runs.append({"name": name, "model": model, "opt": opt, "n_params": n_params, "n_root_params": n_root,
                     "times": [], "phases": [], "losses": [], "prep_s": prep_s, "state_bytes": 0,
                     "warmup_s": 0.0})

    def one_step(run, i):
        idx, targets = batches[i]
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        loss = run["model"](idx, targets).loss
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        t2 = time.perf_counter()
        run["opt"].step()
        if i == 0:
            run["state_bytes"] = model_state_bytes(run["model"], run["opt"])
        run["opt"].zero_grad()
        _sync(device)
        elapsed = time.perf_counter() - t0
        run["losses"].append(loss.item())
        if i >= warmup:
            run["phases"].append((t1 - t0, t2 - t1, t0 + elapsed - t2))
        return elapsed

    for run in runs:
        t_warm = time.perf_counter()
        for i in range(warmup):
            one_step(run, i)
        run["warmup_s"] = time.perf_counter() - t_warm
    for s in range(steps):
        shift = s % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run["times"].append(one_step(run, warmup + s))
    out = []
    for run in runs:
        comm = dict(zerograph.inspect(run["model"]).comm_bytes_last_step) if run["name"].startswith("zerograph") else None
        out.append({k: v for k, v in run.items() if k not in ("model", "opt")} | {"comm": comm})
    dist.barrier()
    return out


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def _comm(res: dict, world: int) -> tuple[float, str]:
    """(bytes per step in the ZeRO paper's unit, where it comes from)."""
    psi = res["n_params"]
    if res["comm"] is not None:
        c = res["comm"]
        ag, rs, ar = c.get("all_gather", 0), c.get("reduce_scatter", 0), c.get("all_reduce", 0)
        vol = ag + rs + 2 * ar
        parts = [f"{k} {v / MiB:.2f}" for k, v in (("AG", ag), ("RS", rs), ("AR", ar)) if v]
        return vol, "measured (" + ", ".join(parts or ["none"]) + ")"
    if res["name"] == "DDP":
        return 2 * psi * 4, "formula 2Ψ·4 B"
    if res["name"] == "FSDP2":
        return 3 * psi * 4, "formula 3Ψ·4 B"
    return float("nan"), "?"


def build_report(per_rank: list[list[dict]], spec: dict, world: int, steps: int, warmup: int, large: bool,
                 backend: str = "gloo") -> str:
    names = [r["name"] for r in per_rank[0]]
    rows = {}
    for i, name in enumerate(names):
        ranks = [pr[i] for pr in per_rank]
        # a step is as slow as its slowest rank: median over steps of the per-step max
        step_max = [max(r["times"][s] for r in ranks) for s in range(len(ranks[0]["times"]))]
        rows[name] = {
            "ms": 1e3 * statistics.median(step_max) if step_max else float("nan"),
            "ms_range": (1e3 * min(step_max), 1e3 * max(step_max)) if step_max else (float("nan"),) * 2,
            "rank0": ranks[0],
            "ranks": ranks,
            "state": max(r["state_bytes"] for r in ranks),
            "loss": statistics.fmean(r["losses"][-1] for r in ranks),
        }
    r0 = per_rank[0][0]
    psi = r0["n_params"]
    ideal = 16 * psi / world
    ddp_ms = rows["DDP"]["ms"] if "DDP" in rows else float("nan")

    lines = []
    model_desc = (
        f"GPT {spec['n_layer']} layers, d={spec['n_embd']}, {spec['n_head']} heads, vocab {spec['vocab_size']}, "
        f"seq {spec['block_size']}; Ψ = {psi:,} parameters ({psi * 4 / MiB:.2f} MiB fp32); "
        f"batch {spec['batch']} per rank; world {world} ({backend}); AdamW lr {LR}, fp32 (zerograph: "
        f"zerograph.make_optimizer, unless '{PLAIN_OPTIMIZER}'; DDP, FSDP2: over model.parameters()); "
        f"{warmup} warmup + {steps} timed steps; 16Ψ/W = {ideal / MiB:.2f} MiB"
    )
    lines.append("")
    lines.append(model_desc)
    lines.append("")
    head = ["system", "median step ms (min–max)", "ratio to DDP", "model-state MiB per rank", "ratio to 16Ψ/W",
            "comm MiB per step", "comm / (Ψ·4 B)", "comm source (MiB)", "loss after last step", "warmup s"]
    if large:
        head[8:8] = ["peak RSS MiB per rank (steps)", "peak ratio to FSDP2", "peak RSS MiB incl. warmup"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    fsdp_peak = None
    if large and "FSDP2" in rows:
        fsdp_peak = max(r["peak_steps"] - r["rss_before"] for r in rows["FSDP2"]["ranks"])
    for name, row in rows.items():
        vol, src = _comm(row["rank0"], world)
        cells = [
            name,
            f"{row['ms']:.0f} ({row['ms_range'][0]:.0f}–{row['ms_range'][1]:.0f})",
            f"{row['ms'] / ddp_ms:.2f}" if "DDP" in rows else "n/a",
            f"{row['state'] / MiB:.2f}",
            f"{row['state'] / ideal:.2f}",
            f"{vol / MiB:.2f}",
            f"{vol / (psi * 4):.2f}",
            src,
            f"{row['loss']:.4f}",
            f"{max(r['warmup_s'] + r['prep_s'] for r in row['ranks']):.1f}",
        ]
        if large:
            peak = max(r["peak_steps"] - r["rss_before"] for r in row["ranks"])
            peak_all = max(r["peak_all"] - r["rss_before"] for r in row["ranks"])
            cells[8:8] = [
                f"{peak / MiB:.0f}",
                f"{peak / fsdp_peak:.2f}" if fsdp_peak else "n/a",
                f"{peak_all / MiB:.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Step time: median over the timed steps of the slowest rank's step (barrier before each step). "
        "Model states: parameters + gradients + AdamW state (exp_avg, exp_avg_sq, step) of one rank, "
        "local shards for DTensors, measured after the first optimizer step; max over ranks. "
        "Comm: bytes per step per rank in the ZeRO paper's unit (all-gather output + reduce-scatter input "
        "+ 2 × all-reduce input); zerograph's from `zerograph.inspect(model).comm_bytes_last_step`, "
        "DDP's and FSDP2's from the formula (not measured). "
        "Warmup s: prepare + warmup steps (includes compilation for zerograph), slowest rank."
    )
    if large:
        lines.append("")
        lines.append(
            "Peak RSS: VmRSS sampled every 2 ms by a thread on each rank; peak during the timed steps "
            "(and, separately, from model creation through warmup and steps) minus the RSS just before "
            "the model was created; max over ranks. Per-rank baselines (MiB): "
            + "; ".join(
                f"{n}: " + "/".join(f"{r['rss_before'] / MiB:.0f}" for r in row["ranks"]) for n, row in rows.items()
            )
        )
    if all(r.get("phases") for row in rows.values() for r in row["ranks"]):  # --interleave
        lines += ["", "| system | forward ms | backward ms | opt.step + zero_grad ms |", "|---|---|---|---|"]
        for name, row in rows.items():
            ranks = row["ranks"]
            cells = [1e3 * statistics.median(max(r["phases"][s][k] for r in ranks) for s in range(len(ranks[0]["phases"])))
                     for k in range(3)]
            lines.append(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
        lines += ["", "Phases (--interleave): median over the timed steps of the slowest rank's time in each phase."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per system (default 10; 3 with --large)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed first steps, compilation included (default 3; 2 with --large)")
    ap.add_argument("--world", type=int, default=2, help="number of ranks (default 2)")
    ap.add_argument("--large", action="store_true", help="~98M-parameter model with peak-RSS measurement")
    ap.add_argument("--model", choices=sorted(MODELS), default=None,
                    help="gpt-4x256 (the default model) or gpt-12x768 (the --large shape, stage-3 variants, "
                         "DDP and FSDP2, no RSS sampling)")
    ap.add_argument("--systems", default=None, help="comma-separated subset of the systems to run")
    ap.add_argument("--out", default=None, help="also write the markdown report to this file")
    ap.add_argument("--interleave", action="store_true",
                    help="build every system first, then run them in turns, one step each per round "
                         "(load drift hits all systems alike; not with --large, which measures RSS per system)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before the launch is killed")
    args = ap.parse_args(argv)

    spec = LARGE if args.large else SMALL
    systems = LARGE_SYSTEMS if args.large else SMALL_SYSTEMS
    if args.model is not None and not args.large:
        spec = MODELS[args.model]
        systems = STAGE3_SYSTEMS if args.model == "gpt-12x768" else SMALL_SYSTEMS
    if args.systems:
        systems = [s.strip() for s in args.systems.split(",")]
    steps = args.steps if args.steps is not None else (3 if args.large else 10)
    warmup = args.warmup if args.warmup is not None else (2 if args.large else 3)
    if warmup < 1:
        ap.error("--warmup must be >= 1 (model states are measured after the first step)")
    if args.interleave and args.large:
        ap.error("--interleave keeps every system alive at once; --large measures each system's RSS alone")
    if args.large:
        # A fixed mmap threshold turns off glibc's dynamic one, so that large
        # blocks freed by one system go back to the OS instead of staying in
        # the heap where they would hide the next system's RSS growth.
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from zerograph.runtime.launch import spawn

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    per_rank = spawn(rank_main, args.world, spec, systems, steps, warmup, args.large, args.interleave,
                     timeout=args.timeout)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()

    header = [
        f"# zerograph benchmark ({'large' if args.large else 'default'})",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}; "
        f"torch {torch.__version__}, gloo, {args.world} ranks x {max(1, (os.cpu_count() or 1) // args.world)} thread(s)",
        f"- command: `python benchmarks/bench_zero.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        f"- whole launch: {wall:.0f} s; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.2f}' for x in load_before)}, after {'/'.join(f'{x:.2f}' for x in load_after)} "
        "(the benchmark itself keeps 2 cores busy)",
        "",
    ]
    report = "\n".join(header) + build_report(per_rank, spec, args.world, steps, warmup, args.large) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training parts of ``benchmarks/gpu_check.py``: parameter and activation
offload on CUDA, the largest GPT one device trains, and the multi-rank
features on NCCL (see ``gpu_check_parts.py`` for the conventions)."""

from __future__ import annotations

import gc
import math
import statistics
import time

import torch

MiB, GiB = 2**20, 2**30
HOST_SHARE = 0.6  # of MemAvailable the optimizer-offload search may fill (fp32 masters, gradients, Adam moments)


def _count(n: float) -> str:
    """A parameter count: 4.30B, 110.4M, 15.3k."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f}{unit}"
    return str(int(n))


def _mib(n: float) -> str:
    from benchmarks.gpu_check_parts import mib

    return mib(n)


def _fresh(ctx) -> None:
    torch._dynamo.reset()
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _sync(ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize()


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _memcpy_counts(prof) -> dict[str, int]:
    """Copy and synchronization events of a profiled step by kind: the device's
    ``Memcpy HtoD (Pinned -> Device)``, the runtime's ``cudaMemcpyAsync``,
    ``cudaStreamSynchronize`` (a copy that blocks the host shows as one)."""
    return {e.key: e.count for e in prof.key_averages() if "Memcpy" in e.key or "Synchronize" in e.key}


def train_world1(ctx, gpt: dict, batch: int, steps: int, config: dict, *, profile_last: bool = False) -> dict:
    """Train ``zerograph.models.GPT(**gpt)`` compiled with ``config`` at world size 1
    (no process group) for ``steps`` steps with ``zerograph.make_optimizer`` AdamW:
    losses, median step ms (after the first), the device peak (CUDA:
    max_memory_allocated above the memory before the model, over the steps
    after the first), the host shards and how many are pinned, the memory plan,
    and (``profile_last``, CUDA) the copy events of the last step."""
    import zerograph
    from zerograph.models import GPT, GPTConfig

    _fresh(ctx)
    base = torch.cuda.memory_allocated() if ctx.cuda else 0
    torch.manual_seed(0)
    model = zerograph.compile(GPT(GPTConfig(**gpt)).to(ctx.device),
                              _merge(config, {"zerograph": {"device": ctx.device}}))
    opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, gpt["vocab_size"], (batch, gpt["block_size"] + 1), generator=gen).to(ctx.device)
            for _ in range(steps)]
    losses, times, copies = [], [], {}
    for i, tokens in enumerate(data):
        if i == 1 and ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        profiling = profile_last and ctx.cuda and i == steps - 1
        prof = None
        if profiling:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.__enter__()
        _sync(ctx)
        t0 = time.perf_counter()
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(ctx)
        times.append(time.perf_counter() - t0)
        if prof is not None:
            prof.__exit__(None, None, None)
            copies = _memcpy_counts(prof)
        losses.append(loss.item())
    host = pinned = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if local.device.type == "cpu":
            host += 1
            try:
                pinned += bool(local.is_pinned())
            except RuntimeError:  # no accelerator to ask
                pass
    plan = zerograph.inspect(model).memory
    out = dict(losses=losses, ms=1e3 * statistics.median(times[1:] or times), host=host, pinned=pinned,
               peak=torch.cuda.max_memory_allocated() - base if ctx.cuda else None, copies=copies,
               activation=plan.peak_activation_bytes, host_peak=plan.peak_host_total_bytes)
    del model, opt, data, loss
    return out


def _gpt_shape(ctx) -> tuple[dict, int]:
    gpt = ctx.pick(dict(vocab_size=32000, block_size=1024, n_layer=6, n_head=16, n_embd=1024),
                   dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    return gpt, ctx.pick(4, 2)


def _describe(gpt: dict, batch: int) -> str:
    return (f"GPT {gpt['n_layer']} layers, d={gpt['n_embd']}, vocab {gpt['vocab_size']}, seq {gpt['block_size']}, "
            f"batch {batch}, fp32, world size 1, zerograph.make_optimizer AdamW")


def _copies_table(rep, runs: dict) -> None:
    kinds = sorted({k for r in runs.values() for k in r["copies"]})
    if kinds:
        rep.table(["copy kind (profiler, last step)", *runs], [[k, *(r["copies"].get(k, 0) for r in runs.values())]
                                                               for k in kinds])


def part_offload_param(ctx, rep) -> None:
    """ZeRO-3 with offload_param (pinned host shards) against the same model on the device."""
    gpt, batch = _gpt_shape(ctx)
    steps = ctx.pick(4, 3)
    stage3 = {"zero_optimization": {"stage": 3}}
    offload = _merge(stage3, {"zero_optimization": {"offload_param": {"device": "cpu", "pin_memory": True}}})
    runs = {"on the device": train_world1(ctx, gpt, batch, steps, stage3)}
    rep.note(f"on the device: {runs['on the device']['ms']:.1f} ms/step, losses {runs['on the device']['losses']}")
    runs["offload_param"] = train_world1(ctx, gpt, batch, steps, offload, profile_last=True)
    dev, off = runs["on the device"], runs["offload_param"]
    diff = max(abs(a - b) / abs(b) for a, b in zip(off["losses"], dev["losses"]))
    rep.figure(f"loss over {steps} steps, offload_param", f"{off['losses'][-1]:.6f}", "on the device",
               f"{dev['losses'][-1]:.6f}", off["losses"][-1] / dev["losses"][-1], "offload / device",
               "max relative difference <= 1e-4", diff <= 1e-4)
    rep.figure("step time, offload_param", f"{off['ms']:.1f} ms", "on the device", f"{dev['ms']:.1f} ms",
               off["ms"] / dev["ms"], "offload / device", "")
    if ctx.cuda:
        ratio = off["peak"] / dev["peak"]
        rep.figure("device peak during steps", _mib(off["peak"]), "on the device", _mib(dev["peak"]), ratio,
                   "offload / device", "< 1x", ratio < 1)
        rep.figure("host parameter shards pinned", f"{off['pinned']} of {off['host']}", "all", str(off["host"]),
                   off["pinned"] / max(off["host"], 1), "pinned / host shards", "1x",
                   off["host"] > 0 and off["pinned"] == off["host"])
        htod = {k: v for k, v in off["copies"].items() if "HtoD" in k}
        pageable = sum(v for k, v in htod.items() if "Pageable" in k)
        total = sum(htod.values())
        rep.figure("host-to-device copies from pinned memory (last step)", f"{total - pageable} of {total}",
                   "all", str(total), (total - pageable) / max(total, 1), "pinned / all HtoD copies", "1x",
                   total > 0 and pageable == 0)
        rep.headline = f"device peak {ratio:.2f}x, step {off['ms'] / dev['ms']:.2f}x, loss diff {diff:.1e}"
    else:
        rep.figure("parameter shards in host memory", str(off["host"]), "-", "-", None, "",
                   "> 0 (CPU builds cannot pin)", off["host"] > 0)
        rep.headline = f"ran on CPU (shards on the host: {off['host']}), loss diff {diff:.1e}"
    _copies_table(rep, runs)
    rep.note(f"{_describe(gpt, batch)}; ZeRO-3, `offload_param: {{device: cpu, pin_memory: true}}` against the same "
             f"config without it; {steps} steps, step time the median after the first. The copies to the device "
             "are `non_blocking` from pinned memory (asynchronous on the current stream); the gradient copies back "
             "block (docs/activations.md#parameter-offload).")


def part_activation_offload(ctx, rep) -> None:
    """per_layer checkpointing with and without offload_activations."""
    gpt, batch = _gpt_shape(ctx)
    batch = ctx.pick(8, batch)
    steps = ctx.pick(4, 2)
    per_layer = {"activation_checkpointing": {"policy": "per_layer"}}
    offload = _merge(per_layer, {"activation_checkpointing": {"offload_activations": True}})
    runs = {"per_layer": train_world1(ctx, gpt, batch, steps, per_layer)}
    runs["per_layer + offload"] = train_world1(ctx, gpt, batch, steps, offload, profile_last=True)
    base, off = runs["per_layer"], runs["per_layer + offload"]
    diff = max(abs(a - b) / abs(b) for a, b in zip(off["losses"], base["losses"]))
    rep.figure(f"loss over {steps} steps, offload", f"{off['losses'][-1]:.6f}", "per_layer",
               f"{base['losses'][-1]:.6f}", off["losses"][-1] / base["losses"][-1], "offload / per_layer",
               "max relative difference <= 1e-5", diff <= 1e-5)
    rep.figure("predicted saved activations on the device", _mib(off["activation"]), "per_layer",
               _mib(base["activation"]), off["activation"] / max(base["activation"], 1), "offload / per_layer",
               "< 1x", off["activation"] < base["activation"])
    rep.figure("step time, offload", f"{off['ms']:.1f} ms", "per_layer", f"{base['ms']:.1f} ms",
               off["ms"] / base["ms"], "offload / per_layer", "")
    if ctx.cuda:
        ratio = off["peak"] / base["peak"]
        rep.figure("device peak during steps", _mib(off["peak"]), "per_layer", _mib(base["peak"]), ratio,
                   "offload / per_layer", "< 1x", ratio < 1)
        rep.headline = (f"device peak {ratio:.2f}x, step {off['ms'] / base['ms']:.2f}x (copies on the current "
                        "stream; no side stream yet)")
    else:
        rep.headline = "ran on CPU (no device peak to read); no side stream yet"
    _copies_table(rep, runs)
    rep.note(f"{_describe(gpt, batch)}; `activation_checkpointing.policy: per_layer` with and without "
             f"`offload_activations`; {steps} steps. Host bytes the plan predicts for the offloaded copies: "
             f"{_mib(off['host_peak'])}. **Side-stream offload is not implemented:** zerograph issues the copies "
             "non_blocking on the current stream (pinned on CUDA, docs/activations.md#activation-offload), so "
             "the step-time ratio is what copies on the compute stream cost; a side stream would overlap them.")


# --------------------------------------------------------------------------- largest GPT on one device

def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _try_train(ctx, cfg: dict, config: dict, batch: int) -> tuple[bool, str, int | None]:
    """Two training steps of GPT(cfg) built on the device: (trained, what happened, device peak bytes)."""
    import zerograph
    from zerograph.models import GPT, GPTConfig

    _fresh(ctx)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    model = opt = loss = None
    try:
        torch.manual_seed(0)
        with torch.device(ctx.device):
            model = GPT(GPTConfig(**cfg))
        model = zerograph.compile(model, _merge(config, {"zerograph": {"device": ctx.device}}))
        opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=1e-4, fused=True)
        idx = torch.randint(0, cfg["vocab_size"], (batch, cfg["block_size"]), device=ctx.device)
        losses = []
        for _ in range(2):
            loss = model(idx, idx).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        peak = torch.cuda.max_memory_allocated() if ctx.cuda else None
        ok = all(math.isfinite(x) for x in losses)
        return ok, f"losses {', '.join(f'{x:.4f}' for x in losses)}", peak
    except (torch.OutOfMemoryError, zerograph.MemoryBudgetError) as exc:
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}", None
    except RuntimeError as exc:  # an allocation failure that is not torch.OutOfMemoryError (cuBLAS workspace, ...)
        if "out of memory" not in str(exc).lower() and "ALLOC_FAILED" not in str(exc):
            raise
        return False, f"RuntimeError: {str(exc).splitlines()[0][:160]}", None
    finally:
        del model, opt, loss
        _fresh(ctx)


def _largest(ctx, rep, offload: bool) -> None:
    d, heads, vocab, seq, batch = ctx.pick((8192, 64, 32000, 1024, 1), (32, 2, 64, 16, 2))
    per_layer = 12 * d * d + 13 * d
    fixed = vocab * d + seq * d + 2 * d
    device_bpp = 8 if offload else 16  # fp32 params + grads (+ two Adam moments without offload)
    act_per_layer = 4 * seq * batch * d * 24  # rough: the first guess only
    config = {"zero_optimization": {"stage": 3}}
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if ctx.cuda:
        capacity = torch.cuda.mem_get_info()[0]
        where = f"{capacity / GiB:.1f} GiB free on the device"
    else:  # the dry run: a capacity the planner enforces (zerograph.memory_limit_bytes)
        capacity = int((fixed + 3.5 * per_layer) * 16)
        config["zerograph"] = {"memory_limit_bytes": capacity}
        where = f"simulated capacity {_mib(capacity)} (zerograph.memory_limit_bytes; dry run)"
    logits = 12 * seq * batch * vocab  # fp32 logits, their gradient and log-softmax
    guess = int((0.9 * capacity - fixed * device_bpp - logits) // (per_layer * device_bpp + act_per_layer))
    host_limit = None
    if offload:  # host: fp32 master, gradient and two Adam moments per parameter
        host_limit = int((HOST_SHARE * _host_available() / 16 - fixed) // per_layer)
    n = max(1, min(guess, host_limit) if host_limit is not None else guess)
    tried: dict[int, tuple] = {}
    last_s = 0.0
    while len(tried) < 4 and ctx.time_left() > 1.3 * last_s + ctx.pick(5, 1):
        cfg = dict(vocab_size=vocab, block_size=seq, n_layer=n, n_head=heads, n_embd=d)
        t0 = time.monotonic()
        ok, what, peak = _try_train(ctx, cfg, config, batch)
        last_s = time.monotonic() - t0
        tried[n] = (ok, what, peak, last_s)
        if ok and host_limit is not None and n + 1 > host_limit:
            break
        nxt = n + 1 if ok else n - 1
        if nxt < 1 or nxt in tried:
            break
        n = nxt
    params = lambda n: fixed + n * per_layer  # noqa: E731
    rep.table(["layers", "parameters", "trained", "device peak", "seconds", "what happened"],
              [[k, _count(params(k)), "yes" if ok else "no", "-" if peak is None else _mib(peak), f"{s:.0f}",
                what] for k, (ok, what, peak, s) in sorted(tried.items())])
    fits = [k for k, (ok, *_rest) in tried.items() if ok]
    fails = [k for k, (ok, *_rest) in tried.items() if not ok and k > max(fits, default=0)]
    best = max(fits, default=None)
    if best is None:
        rep.headline = f"none of {sorted(tried)} layers trained"
        raise RuntimeError(f"no size trained (tried {sorted(tried)} layers); see the table")
    bound = ("host RAM" if host_limit is not None and best + 1 > host_limit else
             f"{min(fails)} layers did not fit" if fails else "the part's time cap (larger sizes not tried)")
    rep.figure("largest GPT that trained", f"{_count(params(best))} parameters ({best} layers)",
               "the first guess from bytes per parameter", f"{_count(params(guess))} ({guess} layers)",
               params(best) / params(max(guess, 1)), "trained / guessed", "")
    rep.headline = f"{_count(params(best))} parameters ({best} x d={d}); bound: {bound}"
    rep.note(f"GPT d={d}, {heads} heads, vocab {vocab}, seq {seq}, batch {batch}, fp32, ZeRO-3 at world size 1, "
             f"zerograph.make_optimizer AdamW (fused){', offload_optimizer to the host' if offload else ''}; "
             f"{where}. A size trains if it is built on the device, compiled, and runs two steps with finite losses; "
             f"the search starts at a guess of {device_bpp} bytes per parameter on the device"
             + (f" and at most {host_limit} layers for host memory (16 bytes per parameter in {HOST_SHARE:.0%} "
                "of MemAvailable, which keeps the kernel's OOM killer away)" if offload else "")
             + f", then goes up while sizes train and down while they fail. Bound: {bound}.")


def part_largest_gpt(ctx, rep) -> None:
    """The largest GPT (layers of a fixed width) that trains on the device, no offload."""
    _largest(ctx, rep, offload=False)


def part_largest_gpt_offload(ctx, rep) -> None:
    """The same search with offload_optimizer (fp32 masters and Adam states on the host)."""
    _largest(ctx, rep, offload=True)


# --------------------------------------------------------------------------- NCCL

def part_nccl(ctx, rep) -> None:
    """bench_zero's systems on every GPU with NCCL (gloo at world 2 in a dry run)."""
    from benchmarks import bench_zero
    from benchmarks.gpu_check import Skip
    from zerograph.runtime.launch import spawn

    gpus = torch.cuda.device_count() if ctx.cuda else 0
    if not ctx.dry_run and gpus < 2:
        raise Skip(f"{gpus} GPU" + ("" if gpus == 1 else "s"))
    world, backend = ctx.pick((min(gpus, 8), "nccl"), (2, "gloo"))
    spec = ctx.pick(dict(vocab_size=32000, block_size=1024, n_layer=4, n_head=16, n_embd=1024, batch=8),
                    dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, batch=2))
    systems = ctx.pick(["zerograph stage 3", "FSDP2", "zerograph stage 0", "DDP", "zerograph stage 3 offload-param"],
                       ["zerograph stage 3", "FSDP2", "DDP", "zerograph stage 3 offload-param"])
    steps, warmup = ctx.pick((5, 2), (1, 1))
    per_rank = spawn(bench_zero.rank_main, world, spec, systems, steps, warmup, False, False,
                     timeout=max(10.0, ctx.time_left() - 5), backend=backend)
    rep.note(bench_zero.build_report(per_rank, spec, world, steps, warmup, False, backend).strip())
    rows = {r["name"]: r for r in per_rank[0]}
    names = [r["name"] for r in per_rank[0]]
    ms = {name: 1e3 * statistics.median(max(pr[i]["times"][s] for pr in per_rank) for s in range(steps))
          for i, name in enumerate(names)}
    heads = []
    for ours, theirs in (("zerograph stage 3", "FSDP2"), ("zerograph stage 0", "DDP")):
        if ours in ms and theirs in ms:
            ratio = ms[ours] / ms[theirs]
            rep.figure(f"step time, {ours}", f"{ms[ours]:.1f} ms", theirs, f"{ms[theirs]:.1f} ms", ratio,
                       f"zerograph / {theirs}", "<= 1.0x", ratio <= 1.0)
            heads.append(f"{'ZeRO-3' if ours.endswith('3') else 'stage 0'} / {theirs} {ratio:.2f}x")
    ref = rows["zerograph stage 3"]["losses"][-1]
    for name in names:
        if name == "zerograph stage 3":
            continue
        loss = rows[name]["losses"][-1]
        diff = abs(loss - ref) / abs(ref)
        rep.figure(f"loss after the last step, {name}", f"{loss:.6f}", "zerograph stage 3", f"{ref:.6f}",
                   loss / ref, f"{name} / zerograph stage 3", "relative difference <= 1e-4", diff <= 1e-4)
    psi = rows["zerograph stage 3"]["n_params"]
    states = max(pr[names.index("zerograph stage 3")]["state_bytes"] for pr in per_rank)
    rep.figure("model states per rank, zerograph stage 3", _mib(states), "16Ψ/W", _mib(16 * psi / world),
               states / (16 * psi / world), "measured / 16Ψ/W", "1.00x", abs(states / (16 * psi / world) - 1) < 0.01)
    rep.headline = f"world {world} ({backend}): " + (", ".join(heads) or "ran")

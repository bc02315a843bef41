"""NVMe parameter offload (``offload_param.device: "nvme"``) against CPU
offload and no offload: step time, resident memory, bytes on disk and I/O.

    python benchmarks/bench_nvme.py [--steps N] [--warmup K] [--nvme-path DIR] [--systems a,b]
                                    [--n-layer L] [--sub-group-size N]

A GPT of ~17M parameters (4 layers, d=512, vocab 8192, seq 128, batch 4 per
rank; ``--n-layer`` adds blocks of 3.1M), ZeRO stage 3 on 2 gloo ranks,
``sub_group_size`` 2M elements, AdamW built by ``zerograph.make_optimizer``.
With ``offload_optimizer`` on NVMe it prints how many times rank 0's fp32
optimizer states are the host memory the swap uses (its slots: one
sub-group, at least the largest shard: the embedding's 2.1M elements).
Each system runs in a launch of its own (fresh processes, so resident
memory is its own), from the same weights on the same batches:

* ``none``: no offload (on a CPU-only machine the "device" is host memory);
* ``cpu``: ``offload_param.device: "cpu"`` (shards in host memory);
* ``nvme``: ``offload_param.device: "nvme"``, ``max_in_cpu: 0`` (every
  offloaded shard in the parameter file);
* ``nvme+opt``: the same with ``offload_optimizer.device: "nvme"``;
* ``nvme+opt-pipelined``: and ``pipeline_read``/``pipeline_write`` on.

Per system (the slower rank of each step; memory: rank 0): median step time
and its ratio to ``none`` (the anchor); resident memory at the end (RssAnon:
the process's own memory; RssFile: mapped file pages, here the parameter
file's) and the peak over the timed steps (VmHWM); bytes on disk (the
parameter file, measured) against the formula (4096-aligned fp32 shards) and
the planner (``zerograph.inspect(model).nvme``); the optimizer's file I/O per
step (it reads and writes every shard of the parameter file once, plus the
swapped states) against the planner's ``swap_bytes_per_step``; storage reads per step
(``/proc/self/io`` read_bytes: the graphs' page faults that missed the page
cache, plus the optimizer's reads) against the prediction, in bytes: the
planner's ``param_read_bytes_per_step`` (each parameter-file region the
step's graphs copy, once) plus the optimizer's swap files (read with
``O_DIRECT``; the optimizer's reads of the parameter file hit the page cache).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

SPEC = dict(vocab_size=8192, block_size=128, n_layer=4, n_head=8, n_embd=512, batch=4)
SYSTEMS = ("none", "cpu", "nvme", "nvme+opt", "nvme+opt-pipelined")
# elements per optimizer sub-group: the NvmeOptimizer's slot holds one (the
# parameter shards' regions, plus the states with nvme+opt); DeepSpeed's
# default 1e9 would make the slot as large as everything it swaps
SUB_GROUP = 2_000_000


def _zero(system: str, path: str, sub_group: int = SUB_GROUP) -> dict:
    zero: dict = {"stage": 3, "sub_group_size": sub_group}
    if system == "cpu":
        zero["offload_param"] = {"device": "cpu"}
    elif system.startswith("nvme"):
        zero["offload_param"] = {"device": "nvme", "nvme_path": path, "max_in_cpu": 0}
        if system.startswith("nvme+opt"):
            zero["offload_optimizer"] = {"device": "nvme", "nvme_path": path}
        if system == "nvme+opt-pipelined":  # read the next sub-groups / write the last while one steps
            zero["offload_optimizer"].update(pipeline_read=True, pipeline_write=True)
    return zero


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _storage_reads() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _rank_main(system: str, path: str, steps: int, warmup: int, sub_group: int = SUB_GROUP,
               n_layer: int = SPEC["n_layer"]):
    import torch.distributed as dist

    import zerograph
    from zerograph.models import GPT, GPTConfig
    from zerograph.runtime.aio import align_up, direct_io_supported
    from zerograph.runtime.optimizer import make_optimizer

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, SPEC["vocab_size"], (SPEC["batch"] * world, SPEC["block_size"] + 1), generator=gen)
               for _ in range(4)]
    torch.manual_seed(0)
    cfg = GPTConfig(**{**{k: v for k, v in SPEC.items() if k != "batch"}, "n_layer": n_layer})
    model = zerograph.compile(GPT(cfg), {"train_micro_batch_size_per_gpu": SPEC["batch"],
                                         "zero_optimization": _zero(system, path, sub_group)})
    opt = make_optimizer(model, torch.optim.AdamW, lr=1e-4)
    io = getattr(opt, "io", None)

    def one_step(i):
        data = batches[i % len(batches)].chunk(world)[rank]
        dist.barrier()
        start = time.perf_counter()
        model(data[:, :-1], data[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - start

    for i in range(warmup):
        one_step(i)
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: the peak of the timed steps
    io_before = io.stats.snapshot() if io is not None else None
    reads_before = _storage_reads()
    times, reads_by_step = [], []
    for i in range(steps):
        before = _storage_reads()
        times.append(one_step(warmup + i))
        reads_by_step.append(_storage_reads() - before)
    storage_reads = (_storage_reads() - reads_before) / steps
    io_step = io.stats.since(io_before) if io is not None else None
    status = _status()
    _trim()
    status_trimmed = _status()
    ctx = model._zg_runtime.ctx
    plan = zerograph.inspect(model).nvme
    store = ctx.nvme_params
    named = dict(model.named_parameters())
    local = {n: (p.to_local() if hasattr(p, "to_local") else p) for n, p in named.items()}
    formula = sum(align_up(local[n].numel() * 4) for n in named if ctx.specs[n].offloaded)
    shard_bytes = sum(t.numel() * t.element_size() for t in local.values())
    out = {"system": system, "times": times, "rss_anon": status_trimmed["RssAnon"], "rss_file": status["RssFile"],
           "peak": status["VmHWM"], "shard_bytes": shard_bytes, "numel": sum(p.numel() for p in GPT(cfg).parameters()),
           "storage_reads": storage_reads, "slots": getattr(opt, "buffer_bytes", lambda: 0)()}
    out["storage_reads_bytes"] = reads_by_step
    if store is not None:
        opt_files = opt.file_bytes()
        # the swap files' reads reach the disk with O_DIRECT (buffered ones may hit the page cache)
        direct = opt.swap_dir is not None and direct_io_supported(opt.swap_dir)
        out["storage_predicted"] = plan.param_read_bytes_per_step + (opt_files if direct else 0)
        out.update(file_size=os.path.getsize(store.path), formula=formula, plan_param=plan.param_file_bytes,
                   plan_opt=plan.optimizer_file_bytes, opt_files=opt_files, mapped_peak=plan.peak_mapped_bytes,
                   io_read=io_step.read_bytes / steps, io_write=io_step.write_bytes / steps,
                   io_predicted=plan.swap_bytes_per_step, io_busy=io_step.busy_s / steps,
                   io_waited=io_step.waited_s / steps)
    del model, opt
    gc.collect()
    return out


def raw_disk_bandwidth(path: str, nbytes: int = 256 << 20) -> dict[str, float]:
    """Sequential write then read of ``nbytes`` through zerograph's own
    :class:`FileIO` (default ``aio`` settings, ``O_DIRECT`` where the
    filesystem takes it, else page-cache I/O after ``fsync`` and
    ``posix_fadvise(DONTNEED)``) in ``path``: the disk's bandwidth as the
    swap sees it, measured in the same run as the systems."""
    from pathlib import Path

    from zerograph.runtime.aio import FileIO, IOConfig, SwapFile, aligned_buffer, direct_io_supported

    directory = Path(path)
    direct = direct_io_supported(directory)
    buf = aligned_buffer(nbytes)
    buf.view(torch.uint8).random_(0, 255)
    file = SwapFile(directory / "raw-bandwidth.probe", direct=direct, size=nbytes, reserve=True)
    io = FileIO(IOConfig())
    try:
        start = time.perf_counter()
        io.write([(file, 0, buf)]).wait()
        os.fsync(file.fd)
        write_s = time.perf_counter() - start
        if not direct:
            os.posix_fadvise(file.fd, 0, nbytes, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        io.read([(file, 0, buf)]).wait()
        read_s = time.perf_counter() - start
    finally:
        io.close()
        file.close()
        (directory / "raw-bandwidth.probe").unlink(missing_ok=True)
    return {"direct": direct, "write": nbytes / write_s, "read": nbytes / read_s}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--nvme-path", default=None, help="directory for the swap files (default: a temporary one)")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--n-layer", type=int, default=SPEC["n_layer"], help="the GPT's blocks (d=512: 3.1M parameters each)")
    ap.add_argument("--sub-group-size", type=int, default=SUB_GROUP,
                    help="zero_optimization.sub_group_size: one optimizer slot's elements (the host memory the swap uses)")
    args = ap.parse_args(argv)
    from zerograph.runtime.launch import spawn

    path = args.nvme_path or tempfile.mkdtemp(prefix="zerograph-bench-nvme-")
    raw = raw_disk_bandwidth(path)
    results = {}
    for system in args.systems.split(","):
        results[system] = spawn(_rank_main, 2, system, path, args.steps, args.warmup, args.sub_group_size,
                                args.n_layer, timeout=1800)
    first = next(iter(results.values()))[0]
    print(f"GPT {first['numel'] / 1e6:.1f}M parameters, ZeRO-3, 2 gloo ranks, {args.steps} timed steps after "
          f"{args.warmup}; sub_group_size {args.sub_group_size:,}; nvme_path {path}; rank 0's shards "
          f"{_mib(first['shard_bytes'])} MiB")
    for system, ranks in results.items():
        r0 = ranks[0]
        if r0.get("opt_files") and r0["slots"]:  # the states swapped against the host memory the swap uses
            print(f"{system}: rank 0's fp32 optimizer states (AdamW moments) in files {_mib(r0['opt_files'])} MiB = "
                  f"{r0['opt_files'] / r0['slots']:.1f} x its host slots ({_mib(r0['slots'])} MiB)")
    print()
    print("| system | median step ms | vs none | vs cpu | RssAnon MiB (end) | RssFile MiB (end) | VmHWM MiB "
          "(timed steps) | optimizer slots MiB | storage reads MiB/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    anchor = None
    medians = {s: statistics.median(max(r["times"][j] for r in ranks) for j in range(args.steps)) * 1e3
               for s, ranks in results.items()}
    for system, ranks in results.items():
        median = statistics.median(max(r["times"][j] for r in ranks) for j in range(args.steps)) * 1e3
        anchor = anchor or (median if system == "none" else None)
        ratio = f"{median / anchor:.2f}" if anchor else "-"
        vs_cpu = f"{median / medians['cpu']:.2f}" if "cpu" in medians else "-"
        r0 = ranks[0]
        print(f"| {system} | {median:.0f} | {ratio} | {vs_cpu} | {_mib(r0['rss_anon'])} | {_mib(r0['rss_file'])} | "
              f"{_mib(r0['peak'])} | {_mib(r0['slots'])} | {_mib(r0['storage_reads'])} |")
    print()
    print("| system | rank | parameter file bytes | formula | planner | optimizer files (= planner) | mapped peak "
          "(planner) | optimizer I/O per step read / write | predicted | I/O busy / waited ms per step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for system, ranks in results.items():
        for rank, r in enumerate(ranks):
            if "file_size" not in r:
                continue
            print(f"| {system} | {rank} | {r['file_size']:,} | {r['formula']:,} | {r['plan_param']:,} | "
                  f"{r['opt_files']:,} ({r['plan_opt']:,}) | {r['mapped_peak']:,} | {r['io_read']:,.0f} / "
                  f"{r['io_write']:,.0f} | {r['io_predicted']:,} | {r['io_busy'] * 1e3:.1f} / "
                  f"{r['io_waited'] * 1e3:.1f} |")
    print()
    print("| system | rank | storage reads per timed step (bytes) | predicted | equal |")
    print("|---|---|---|---|---|")
    for system, ranks in results.items():
        for rank, r in enumerate(ranks):
            if "storage_predicted" not in r:
                continue
            measured = sorted(set(int(b) for b in r["storage_reads_bytes"]))
            equal = measured == [r["storage_predicted"]]
            print(f"| {system} | {rank} | {', '.join(f'{b:,}' for b in measured)} | {r['storage_predicted']:,} | "
                  f"{'yes' if equal else 'no'} |")
    print()
    mode = "O_DIRECT" if raw["direct"] else "page cache, fsync + fadvise(DONTNEED)"
    print(f"Raw disk in {path} ({mode}, 256 MiB through FileIO): write {_mib(raw['write'])} MiB/s, "
          f"read {_mib(raw['read'])} MiB/s")
    print()
    print("| system | rank | optimizer swap MiB/s while busy (read+write) | vs raw (mean of read, write) | "
          "I/O hidden behind compute |")
    print("|---|---|---|---|---|")
    raw_mean = (raw["read"] + raw["write"]) / 2
    for system, ranks in results.items():
        for rank, r in enumerate(ranks):
            if "file_size" not in r or not r["io_busy"]:
                continue
            achieved = (r["io_read"] + r["io_write"]) / r["io_busy"]
            hidden = max(0.0, 1 - r["io_waited"] / r["io_busy"])
            print(f"| {system} | {rank} | {_mib(achieved)} | {achieved / raw_mean:.2f} | {hidden:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

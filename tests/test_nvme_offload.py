"""NVMe optimizer offload (``offload_optimizer.device: "nvme"``, ZeRO-Infinity):
masters and states in files, swapped per sub-group through host buffers.

Training equals CPU offload bit for bit (the same element-wise arithmetic on
the same values) and the single-process eager reference at rtol 1e-5, at
world 1 (eager ``zerograph.shard``) and world 2 (compiled, gloo), with
gradient accumulation and clipping, with and without pipelined swapping and
with ``ratio`` < 1; the swap files hold the states and the process's resident
memory does not (measured); the errors before training."""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import zerograph
from tests import _harness, _models
from zerograph.runtime.aio import NvmeOffloadError, SwapDir
from zerograph.runtime.launch import spawn
from zerograph.runtime.nvme_optimizer import NvmeOptimizer
from zerograph.runtime.optimizer import HostOptimizer, make_optimizer

TIMEOUT = 300
STEPS, ACCUMULATION, CLIP = 3, 2, 0.5
# the test GPT has 28 parameters, ~26k elements: sub-groups of 3000 elements give 13
SUB_GROUP = 3000


def _nvme(path, **extra):
    return {"device": "nvme", "nvme_path": str(path), **extra}


def _config(offload_optimizer, stage=3, **zero):
    return {"zero_optimization": {"stage": stage, "sub_group_size": SUB_GROUP, "offload_optimizer": offload_optimizer,
                                  **zero},
            "gradient_clipping": CLIP, "gradient_accumulation_steps": ACCUMULATION}


def _train(model, opt, steps=STEPS, check=None):
    """This rank's rows of each global batch, in ACCUMULATION micro-batches; the mean losses."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    losses = []
    for step in range(steps):
        idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
        idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
        total = torch.zeros(())
        for micro_idx, micro_targets in zip(idx.chunk(ACCUMULATION), targets.chunk(ACCUMULATION)):
            loss = model(micro_idx, micro_targets).loss
            loss.backward()
            total += loss.detach() / ACCUMULATION
        opt.step()
        if check is not None:
            check(model, opt)
        opt.zero_grad()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def _build(config, entry="shard"):
    torch._dynamo.reset()
    model = getattr(zerograph, entry)(_models.make_gpt(), config)
    opt = make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)
    return model, opt


def _params(model):
    return {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()}


def _states(opt):
    """The wrapped optimizer's states by position, in memory (a swapped one read from its file)."""
    return {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
            for i, values in opt.state_dict()["state"].items()}


def _assert_same(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key], f"{what}: {key}")
        else:
            assert torch.equal(a[key], b[key]), f"{what}: {key}"


def _check_swapped(model, opt):
    """After a step: every swapped master holds no memory, and the swap files
    cover the masters and Adam's two moments of the swapped sub-groups."""
    assert isinstance(opt, NvmeOptimizer)
    swapped = [e for g in opt.groups if g.swapped for e in g.entries]
    assert swapped and all(opt.masters[e.index].numel() == 0 for e in swapped if e.master == "file")
    states = opt.optimizer.state
    for e in swapped:
        values = states[opt.masters[e.index]]
        assert values["exp_avg"].numel() == values["exp_avg_sq"].numel() == 0  # placeholders
    elements = sum(torch.Size(e.shape).numel() for e in swapped)
    masters = sum(torch.Size(e.shape).numel() for e in swapped if e.master == "file")
    on_disk = sum(f.stat().st_size for f in opt.swap_dir.iterdir())
    assert on_disk == opt.file_bytes() >= 4 * (2 * elements + masters)


# --------------------------------------------------------------------------- world 1

CASES_WORLD1 = {
    "plain": {},
    "pipelined": {"pipeline_read": True, "pipeline_write": True, "buffer_count": 3},
    "ratio_fast_init": {"ratio": 0.5, "fast_init": True, "pipeline_write": True},
}


def test_optimizer_nvme_matches_cpu_offload_world1(tmp_path):
    ref_losses, ref_params = _harness.reference_run("gpt", 1, steps=STEPS, accumulation=ACCUMULATION, clip=CLIP)
    model, opt = _build(_config({"device": "cpu"}))
    assert isinstance(opt, HostOptimizer)
    cpu = (_train(model, opt), _params(model), _states(opt))
    _harness.assert_same_training({"losses": cpu[0], "params": cpu[1]}, ref_losses, ref_params)
    for name, extra in CASES_WORLD1.items():
        model, opt = _build(_config(_nvme(tmp_path, **extra)))
        assert len(opt.groups) == 13 and sum(g.swapped for g in opt.groups) == (6 if "ratio" in extra else 13)
        losses = _train(model, opt, check=_check_swapped)
        assert losses == cpu[0], name
        _assert_same(_params(model), cpu[1], name)
        _assert_same(_states(opt), cpu[2], name)
        stats = opt.io.stats
        # each step reads and writes every swapped sub-group's file image once
        assert stats.read_bytes == stats.write_bytes == STEPS * opt.file_bytes(), name
        rank_dir = opt.swap_dir.parent
        del model, opt
        gc.collect()
        assert not rank_dir.exists(), name  # removed with the optimizer
    assert os.listdir(tmp_path) == []


def test_sub_groups_follow_sub_group_size():
    from zerograph.runtime.nvme_optimizer import sub_groups, swapped_groups

    assert sub_groups([5, 3, 4, 10, 1, 1], 8) == [[0, 1], [2], [3], [4, 5]]
    assert sub_groups([5, 3], 10**9) == [[0, 1]]
    assert [swapped_groups(13, r) for r in (1.0, 0.5, 0.0)] == [13, 6, 0]


def test_fast_init_decides_when_blocks_are_allocated(tmp_path):
    """fast_init false reserves every swap file's blocks when the optimizer is
    built; true leaves the files sparse until the first step writes them."""
    for fast_init in (False, True):
        model, opt = _build(_config(_nvme(tmp_path, fast_init=fast_init)))
        allocated = sum(f.stat().st_blocks * 512 for f in opt.swap_dir.iterdir())
        if fast_init:
            assert allocated == 0
        else:
            assert allocated >= opt.file_bytes() > 0
        _train(model, opt, steps=1)
        assert sum(f.stat().st_blocks * 512 for f in opt.swap_dir.iterdir()) >= opt.file_bytes()
        del model, opt
        gc.collect()


# --------------------------------------------------------------------------- world 2

# the optimizer is the same object compiled or not: eager ZeRO (zerograph.shard) keeps this test short;
# the compiled graphs are trained with NVMe offload in tests/test_nvme_params.py
CASES_WORLD2 = [
    ("cpu", {"device": "cpu"}, 3),
    ("nvme pipelined", "nvme pipelined", 3),
    ("nvme stage 2", "nvme", 2),
]


def _world2_rank(root):
    import torch.distributed as dist

    out = {}
    for name, section, stage in CASES_WORLD2:
        if section == "nvme":
            section = _nvme(root)
        elif section == "nvme pipelined":
            section = _nvme(root, pipeline_read=True, pipeline_write=True, buffer_count=2)
        model, opt = _build(_config(section, stage=stage))
        check = _check_swapped if section["device"] == "nvme" else None
        out[name] = (_train(model, opt, check=check), _params(model), _states(opt))
        if check is not None:
            rank_dir = opt.swap_dir.parent
            assert rank_dir.name.endswith(f"rank{dist.get_rank()}")
        del model, opt
        gc.collect()
        if check is not None:
            assert not rank_dir.exists()
    return out


@pytest.mark.timeout(TIMEOUT + 30)
def test_optimizer_nvme_matches_cpu_offload_world2(tmp_path):
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=STEPS, accumulation=ACCUMULATION, clip=CLIP)
    ranks = spawn(_world2_rank, 2, str(tmp_path), timeout=TIMEOUT)
    for rank in ranks:
        cpu = rank["cpu"]
        _harness.assert_same_training({"losses": cpu[0], "params": cpu[1]}, ref_losses, ref_params)
        for name in ("nvme pipelined",):
            losses, params, states = rank[name]
            assert losses == cpu[0], name
            _assert_same(params, cpu[1], name)
            _assert_same(states, cpu[2], name)
        losses, params, _ = rank["nvme stage 2"]
        _harness.assert_same_training({"losses": losses, "params": params}, ref_losses, ref_params)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- resident memory

def _rss_bytes() -> int:
    """This process's resident set, after glibc returned its free heap pages
    to the system (``malloc_trim``: freed memory the allocator keeps is not live)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set (VmHWM)
        f.write("5")


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _rss_rank(section, sub_group_size):
    """A 4.2M-parameter MLP (4 x Linear(1024, 1024)), world 1, gradients
    already allocated: the growth of the resident set from before the
    optimizer is built to after two steps (now, and its peak meanwhile), and
    the optimizer's bytes on disk and in buffers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    model = zerograph.shard(model, {"zero_optimization": {"stage": 3, "sub_group_size": sub_group_size,
                                                           "offload_optimizer": section}})
    x = torch.randn(8, 1024)
    model(x).square().mean().backward()  # the gradients exist before the baseline (never set to None below)
    before = _rss_bytes()
    opt = make_optimizer(model, torch.optim.AdamW, lr=1e-3)
    peak = 0
    for _ in range(2):
        _rss_bytes()  # trimmed: the peak below starts from live memory
        _reset_peak()
        opt.step()
        peak = max(peak, _peak_bytes())  # of the optimizer steps (the forward's gathered copies are not theirs)
        model(x).square().mean().backward()
    now = _rss_bytes()
    numel = sum(p.numel() for p in model.parameters())
    on_disk = opt.file_bytes() if isinstance(opt, NvmeOptimizer) else 0
    buffers = opt.buffer_bytes() if isinstance(opt, NvmeOptimizer) else 0
    return {"growth": now - before, "peak_growth": peak - before, "numel": numel, "on_disk": on_disk,
            "buffers": buffers}


@pytest.mark.timeout(TIMEOUT)
def test_resident_memory_holds_no_swapped_states(tmp_path, monkeypatch):
    """Measured (world 1, 4.2M fp32 parameters, AdamW, sub-groups of one
    layer, gradients allocated before the baseline): with CPU offload the
    resident set grows by the fp32 masters, the two moments and the host
    copies of the gradients (16 bytes per element, 67 MB); with NVMe offload
    by one slot (one layer's master and moments, 12.6 MB): the 50 MB of
    masters and moments are in the files. The peak adds the step's
    temporaries: the moments of one sub-group that its first step creates in
    memory before they are written, and AdamW's two temporaries of a shard.
    The ranks run with glibc's mmap threshold fixed at 128 KiB, so a freed
    tensor's pages leave the resident set at once and the peak is the peak of
    live memory (glibc's dynamic threshold would keep freed heap pages)."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    # resident memory of new interpreters, not of ranks forked from the test's forkserver
    cpu = spawn(_rss_rank, 1, {"device": "cpu"}, 1_100_000, timeout=TIMEOUT, start_method="spawn")[0]
    nvme = spawn(_rss_rank, 1, _nvme(tmp_path), 1_100_000, timeout=TIMEOUT, start_method="spawn")[0]
    numel = nvme["numel"]
    states = 12 * numel  # masters + exp_avg + exp_avg_sq
    layer = 1024 * 1024 + 1024
    slack = 4 << 20
    print(f"\nresident set growth (MiB): cpu offload {cpu['growth'] / 2**20:.1f} (peak {cpu['peak_growth'] / 2**20:.1f}),"
          f" nvme {nvme['growth'] / 2**20:.1f} (peak {nvme['peak_growth'] / 2**20:.1f}); swapped states "
          f"{states / 2**20:.1f}, slot {nvme['buffers'] / 2**20:.1f}")
    assert nvme["on_disk"] >= states
    assert nvme["buffers"] == 12 * layer  # one sub-group: one layer's master and moments
    assert cpu["growth"] >= 16 * numel - slack, cpu  # the measurement sees states where they are
    assert nvme["growth"] <= nvme["buffers"] + slack, nvme
    assert nvme["peak_growth"] <= nvme["buffers"] + 8 * layer + 8 * 1024 * 1024 + slack, nvme


# --------------------------------------------------------------------------- errors before training

def _build_error(tmp_path, **section) -> str:
    with pytest.raises(NvmeOffloadError) as info:
        _build(_config({"device": "nvme", **section}))
    return str(info.value)


def test_errors_name_the_path_and_the_bytes(tmp_path):
    model, opt = _build(_config(_nvme(tmp_path)))
    needed = opt.file_bytes()
    del model, opt
    gc.collect()
    # a path that does not exist, and one that is a file
    missing = tmp_path / "nope"
    assert _build_error(tmp_path, nvme_path=str(missing)) == (
        f"zerograph: zero_optimization.offload_optimizer.nvme_path {missing} does not exist; create it (rank 0 needs "
        f"{needed:,} bytes there) or point zero_optimization.offload_optimizer.nvme_path at an existing directory")
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert f"nvme_path {a_file} is not a directory" in _build_error(tmp_path, nvme_path=str(a_file))
    # a directory this process cannot write to (root: immutable; else read-only permissions)
    locked = tmp_path / "locked"
    locked.mkdir()
    root = os.geteuid() == 0
    subprocess.run(["chattr", "+i", str(locked)], check=True) if root else locked.chmod(0o500)
    try:
        message = _build_error(tmp_path, nvme_path=str(locked))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True) if root else locked.chmod(0o700)
    assert message.startswith(f"zerograph: zero_optimization.offload_optimizer.nvme_path {locked} is not writable "
                              "by this process (")
    assert f"rank 0 needs to write {needed:,} bytes there" in message


def test_error_when_another_run_holds_the_directory(tmp_path, caplog):
    """The rank directory of a live process (here: a sleeping child) is an
    error naming it; one left by an ended process is removed and reused."""
    rank_dir = tmp_path / "zerograph-zg0-rank0"
    rank_dir.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (rank_dir / "LOCK").write_text(f"{child.pid} {socket.gethostname()}")
        with pytest.raises(NvmeOffloadError) as info:
            SwapDir(tmp_path, key="zero_optimization.offload_optimizer", tag="zg0", rank=0, kind="optimizer",
                    needed_bytes=12345)
        assert str(info.value) == (
            f"zerograph: {rank_dir} is in use by process {child.pid} on {socket.gethostname()} (lock file "
            f"{rank_dir / 'LOCK'}); this run needs 12,345 bytes there. Stop that run, or give this one another "
            "zero_optimization.offload_optimizer.nvme_path")
    finally:
        child.kill()
        child.wait()
    (rank_dir / "optimizer").mkdir()
    (rank_dir / "optimizer" / "old.swp").write_text("left over")
    swap = SwapDir(tmp_path, key="k", tag="zg0", rank=0, kind="optimizer", needed_bytes=1)
    assert f"removing {rank_dir}, left by process {child.pid}, which has ended" in caplog.text
    assert list(swap.path.iterdir()) == [] and (rank_dir / "LOCK").read_text() == f"{os.getpid()} {socket.gethostname()}"
    swap.close()
    assert not rank_dir.exists()


def test_error_when_the_disk_is_too_small(tmp_path):
    """The check compares the bytes needed with the free space of the real
    filesystem (shutil.disk_usage): one byte more than is free fails."""
    free = shutil.disk_usage(tmp_path).free
    needed = free + (1 << 30)  # the filesystem's free space moves a little while the test runs
    with pytest.raises(NvmeOffloadError) as info:
        SwapDir(tmp_path, key="zero_optimization.offload_optimizer", tag="zg0", rank=1, kind="optimizer",
                needed_bytes=needed)
    message = str(info.value)
    assert message.startswith(f"zerograph: not enough space in zero_optimization.offload_optimizer.nvme_path "
                              f"{tmp_path}: rank 1 needs {needed:,} bytes for its optimizer files, ")
    assert message.endswith("are free. Free space there, point zero_optimization.offload_optimizer.nvme_path at a "
                            "larger drive, or shard over more ranks")
    assert os.listdir(tmp_path) == []  # nothing left behind


def test_config_errors():
    from zerograph.config import Config, ConfigError

    def error(config) -> str:
        with pytest.raises(ConfigError) as info:
            Config.load(config)
        return str(info.value)

    assert error({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}}) == (
        'zero_optimization.offload_optimizer.device is "nvme" but zero_optimization.offload_optimizer.nvme_path is '
        "not set: set it to a directory on a local NVMe drive (each rank writes its offloaded states there)")
    assert error({"aio": {"use_gds": True}}).startswith("aio.use_gds=true: GPUDirect Storage needs an NVIDIA GPU")
    assert error({"aio": {"block_size": 1000}}) == (
        "aio.block_size=1000: must be a multiple of 4096 (the O_DIRECT alignment), e.g. 4096")
    assert error({"zero_optimization": {"offload_optimizer": {"device": "cpu", "ratio": 0.5}}}).startswith(
        "zero_optimization.offload_optimizer.ratio=0.5: partial optimizer offload (ZeRO-Offload++) is supported with "
        'device "nvme" only')
    assert Config.load({"aio": {"thread_count": 3}}).aio.intra_op_parallelism == 3  # DeepSpeed's older name

"""NVMe parameter offload (``offload_param.device: "nvme"``, ZeRO-Infinity):
stage-3 parameter shards in a memory-mapped file per rank, read ahead and
released per compiled graph, written after the optimizer step.

World 2 (compiled, gloo): training equals CPU parameter offload bit for bit
and the single-process eager reference at rtol 1e-5 (5 steps), alone and
with ``offload_optimizer.device: "nvme"``; the file holds the shards (its
bytes are the parameters'), its size is the planner's (and the formula's),
no page of it stays mapped between graphs; a checkpoint saved from NVMe
shards resumes bit for bit after the swap files are gone, and resharded at
world 1 (CPU offload, no offload, NVMe) like the uninterrupted run; the
errors before training (world 1)."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

import zerograph
from tests import _harness, _models, _pool
from tests._harness import TIMEOUT
from zerograph.planner.nvme import graph_reads
from zerograph.runtime.aio import NvmeOffloadError, align_up
from zerograph.runtime.launch import spawn
from zerograph.runtime.nvme_optimizer import NvmeOptimizer
from zerograph.runtime.optimizer import HostOptimizer, make_optimizer
from zerograph.runtime.shard_optimizer import ShardOptimizer

STEPS = 5


def _zero(root, optimizer="none", param="nvme", **extra):
    param_section = {"device": param}
    if param == "nvme":
        param_section.update(nvme_path=str(root), max_in_cpu=0)
    opt_section = {"device": optimizer}
    if optimizer == "nvme":
        opt_section["nvme_path"] = str(root)
    return {"zero_optimization": {"stage": 3, "offload_param": param_section, "offload_optimizer": opt_section,
                                  **extra}}


def _make_opt(model):
    return make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)


def _local(p):
    return (p.to_local() if isinstance(p, DTensor) else p).detach()


def _mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = line.rstrip("\n").endswith(str(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def _report(model, opt):
    """After training: what is on disk, against the planner and the formula;
    the file's bytes against the parameters; mapped pages around one step."""
    ctx = model._zg_runtime.ctx
    store = ctx.nvme_params
    plan = zerograph.inspect(model).nvme
    named = dict(model.named_parameters())
    formula = sum(align_up(_local(p).numel() * 4) for n, p in named.items() if ctx.specs[n].offloaded)
    in_file = 0
    with open(store.path, "rb") as f:
        for name, (offset, nbytes) in store.layout.items():
            local = _local(named[name])
            on_disk = torch.frombuffer(bytearray(os.pread(f.fileno(), nbytes, offset)), dtype=torch.float32)
            in_file += torch.equal(on_disk, local.reshape(-1).cpu())
    idx, targets = _models.global_batch(0, _harness.PER_RANK_BATCH)
    counts = [store.reads]  # regions announced ahead (read-ahead) so far
    loss = model(idx, targets).loss
    counts.append(store.reads)
    mapped = [_mapped_rss(store.path)]
    loss.backward()
    counts.append(store.reads)
    mapped.append(_mapped_rss(store.path))
    info = zerograph.inspect(model)
    # each graph announced the regions of the shards it copies, once each
    expected = [len([n for n in graph_reads(gm) if store.holds(n)]) for gm in (info.forward[0], info.backward[0])]
    announced = [counts[1] - counts[0], counts[2] - counts[1]]
    opt.zero_grad()
    swap = [Path(opt.swap_dir)] if isinstance(opt, NvmeOptimizer) and opt.swap_dir else []
    return {"file_size": os.path.getsize(store.path), "plan": plan, "formula": formula, "shards": len(store.layout),
            "in_file": in_file, "mapped": mapped, "announced": announced, "expected_reads": expected, "optimizer": type(opt).__name__,
            "optimizer_files": sum(p.stat().st_size for d in swap for p in d.iterdir()),
            "peak_by_graph": dict(plan.mapped_by_graph)}


def _report_if_nvme(model, opt):
    return _report(model, opt) if model._zg_runtime.ctx.nvme_params is not None else {}


def _check_nvme_result(result, rank, name):
    plan = result["plan"]
    # every shard of the 28 is in the file, holding the parameter's bytes
    assert result["shards"] == result["in_file"] == plan.params_in_file == 28, name
    assert result["file_size"] == plan.param_file_bytes == result["formula"], name
    assert result["optimizer"] == "NvmeOptimizer", name
    assert result["optimizer_files"] == plan.optimizer_file_bytes, name
    # each graph's pages are released when it ends (checked after the forward and after the backward)
    assert result["mapped"] == [0, 0], name
    assert result["announced"] == result["expected_reads"] and result["announced"][0] == 28, name
    assert 0 < plan.peak_mapped_bytes <= plan.param_file_bytes, name
    assert plan.peak_mapped_bytes == max(result["peak_by_graph"].values()), name
    assert result["peak_by_graph"][(0, "backward")] > 0, name  # stage 3 re-gathers in the backward


@pytest.mark.timeout(TIMEOUT + 60)
def test_param_and_optimizer_nvme_train_like_eager_world2(tmp_path):
    """The CI case: parameters and optimizer states on NVMe together, 5 steps."""
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=STEPS)
    ranks = _harness.train("gpt", _zero(tmp_path, optimizer="nvme", sub_group_size=3000), steps=STEPS,
                           optimizer=_make_opt, report=_report)
    assert os.listdir(tmp_path) == []  # every rank's swap directory is removed with its model
    for rank, result in enumerate(ranks):
        _harness.assert_same_training(result, ref_losses, ref_params)
        _check_nvme_result(result, rank, "param + optimizer nvme")
        # AdamW's two moments of every element, in fp32: the masters are the parameter file's shards
        assert result["optimizer_files"] == sum(2 * align_up(n * 4) for n in _gpt_local_numels(rank))


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_param_nvme_equals_cpu_offload_world2(tmp_path):
    """Bit for bit the CPU parameter offload's training, with the optimizer's
    states in memory and on NVMe (nightly: three compiled models)."""
    configs = [_zero(tmp_path, param="cpu"), _zero(tmp_path), _zero(tmp_path, optimizer="nvme", sub_group_size=3000)]
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=STEPS)
    ranks = _harness.train("gpt", configs, steps=STEPS, optimizer=_make_opt,
                           report=_report_if_nvme)
    assert os.listdir(tmp_path) == []
    for rank, (cpu, *nvme) in enumerate(ranks):
        _harness.assert_same_training(cpu, ref_losses, ref_params)
        for name, result in zip(("param nvme", "param + optimizer nvme"), nvme):
            assert result["losses"] == cpu["losses"], name  # the same arithmetic on the same values
            for key, value in cpu["params"].items():
                assert torch.equal(result["params"][key], value), f"{name}: {key}"
            _check_nvme_result(result, rank, name)
        assert nvme[0]["optimizer_files"] == 0


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 60)
def test_param_nvme_world2_with_accumulation_and_clipping(tmp_path):
    """World 2, compiled, 2 accumulation micro-batches and clipping:
    parameters on NVMe, alone and with the optimizer's states there, train
    bit for bit like CPU parameter offload, which equals the eager reference
    (nightly: three compiled models)."""
    extra = {"gradient_accumulation_steps": 2, "gradient_clipping": 0.5}
    configs = [{**_zero(tmp_path, param="cpu"), **extra}, {**_zero(tmp_path), **extra},
               {**_zero(tmp_path, optimizer="nvme", sub_group_size=3000), **extra}]
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=STEPS, accumulation=2, clip=0.5)
    ranks = _harness.train("gpt", configs, steps=STEPS, optimizer=_make_opt)
    assert os.listdir(tmp_path) == []
    for cpu, *nvme in ranks:
        _harness.assert_same_training(cpu, ref_losses, ref_params)
        for name, result in zip(("param nvme", "param + optimizer nvme"), nvme):
            assert result["losses"] == cpu["losses"], name
            for key, value in cpu["params"].items():
                assert torch.equal(result["params"][key], value), f"{name}: {key}"


def _gpt_local_numels(rank, world=2):
    """This rank's shard sizes of the test GPT (chunks of dim 0, as DTensor Shard(0))."""
    out = []
    for p in _models.make_gpt().parameters():
        rows = p.shape[0] if p.dim() else 1
        chunk = -(-rows // world)
        mine = max(0, min(chunk, rows - rank * chunk))
        out.append(mine * (p.numel() // rows if rows else 0))
    return out


# --------------------------------------------------------------------------- checkpoints

SAVE_AT, END = 2, 4


def _ckpt_rank(root, entry="shard"):
    """Train steps 0-1 with parameters (and states) on NVMe, save, train
    steps 2-3; drop the model (its swap files go); a fresh model loads the
    checkpoint and trains steps 2-3. Eager ZeRO (``zerograph.shard``) by
    default: the storage is the compiled models' (the test above), without
    two compiles."""
    import torch.distributed as dist

    config = _zero(Path(root) / "nvme", optimizer="nvme")
    (Path(root) / "nvme").mkdir(exist_ok=True)
    torch._dynamo.reset()
    model = getattr(zerograph, entry)(_models.make_gpt(), config)
    opt = _make_opt(model)
    first = _harness.train_global_batches(model, opt, range(SAVE_AT))
    zerograph.save_checkpoint(f"{root}/ckpt", model, opt, step=SAVE_AT)
    straight = _harness.train_global_batches(model, opt, range(SAVE_AT, END))
    straight_params = {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}
    rank_dir = Path(model._zg_runtime.ctx.nvme_params.path).parent.parent
    del model, opt
    gc.collect()
    gone = not rank_dir.exists()
    dist.barrier()
    torch._dynamo.reset()
    model = getattr(zerograph, entry)(_models.make_gpt(), config)
    opt = _make_opt(model)
    assert zerograph.load_checkpoint(f"{root}/ckpt", model, opt) == {"step": SAVE_AT}
    second = _harness.train_global_batches(model, opt, range(SAVE_AT, END))
    params = {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}
    del model, opt
    gc.collect()
    return {"first": first, "straight": straight, "straight_params": straight_params, "second": second,
            "params": params, "gone": gone}


@pytest.mark.timeout(TIMEOUT + 60)
def test_checkpoint_round_trip_with_nvme_params(tmp_path):
    """Eager ZeRO (CI): world 2 NVMe -> world 2 NVMe bit for bit; resharded to world 1."""
    _check_round_trip(tmp_path, "shard")


@pytest.mark.slow  # four compiles per rank at world 2, three at world 1
@pytest.mark.timeout(TIMEOUT + 60)
def test_checkpoint_round_trip_with_nvme_params_compiled(tmp_path):
    """The same with compiled models (``zerograph.compile``: read-ahead nodes, the graphs' host copies)."""
    _check_round_trip(tmp_path, "compile")


def _check_round_trip(tmp_path, entry):
    ranks = _pool.run(_ckpt_rank, 2, str(tmp_path), entry, timeout=TIMEOUT)
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=END)
    for r in ranks:
        assert r["gone"]  # the first model's swap files were removed before the load
        assert r["second"] == r["straight"]
        for key, value in r["straight_params"].items():
            assert torch.equal(r["params"][key], value), key
        _harness.assert_same_training({"losses": r["first"] + r["second"], "params": r["params"]},
                                      ref_losses, ref_params)
    saved = [p.name for p in (tmp_path / "ckpt").rglob("*")]
    assert saved and not any(name.endswith(".swp") for name in saved)  # the checkpoint is not the swap files
    assert os.listdir(tmp_path / "nvme") == []
    # resharded: the world-2 checkpoint (parameters and optimizer states saved from NVMe) continues in
    # this single process, with CPU offload, without offload and with NVMe offload again
    first, straight = ranks[0]["first"], ranks[0]["straight"]
    resumed = {name: _resume_world1(tmp_path, name, entry) for name in RESUME_WORLD1}
    for name, (losses, params) in resumed.items():
        try:
            # the world-1 reductions sum in another order than world 2's: fp32 round-off, not bits
            _harness.assert_same_training({"losses": losses, "params": params},
                                          straight, ranks[0]["straight_params"])
            _harness.assert_same_training({"losses": first + losses, "params": params}, ref_losses, ref_params)
        except AssertionError as err:
            raise AssertionError(f"resumed at world 1 with {name}: {err}") from err
    # NVMe at world 1 is the CPU offload's arithmetic on the same values: bit for bit
    assert resumed["nvme"][0] == resumed["cpu offload"][0]
    for key, value in resumed["cpu offload"][1].items():
        assert torch.equal(resumed["nvme"][1][key], value), key
    gc.collect()
    assert os.listdir(tmp_path / "nvme") == []


RESUME_WORLD1 = ("cpu offload", "no offload", "nvme")


def _resume_world1(root, name, entry):
    """Load ``root/ckpt`` (saved at world 2 by :func:`_ckpt_rank`) into a
    single-process model (``zerograph.<entry>``, world 1) with ``name``'s
    offload and train steps SAVE_AT..END; the losses and full parameters."""
    config = {"cpu offload": _zero(root, optimizer="cpu", param="cpu"),
              "no offload": {"zero_optimization": {"stage": 3}},
              "nvme": _zero(Path(root) / "nvme", optimizer="nvme")}[name]
    torch._dynamo.reset()
    model = getattr(zerograph, entry)(_models.make_gpt(), config)
    opt = _make_opt(model)
    assert type(opt) is {"cpu offload": HostOptimizer, "no offload": ShardOptimizer, "nvme": NvmeOptimizer}[name]
    assert zerograph.load_checkpoint(f"{root}/ckpt", model, opt) == {"step": SAVE_AT}
    losses = _harness.train_global_batches(model, opt, range(SAVE_AT, END))
    params = {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}
    del model, opt
    return losses, params


# --------------------------------------------------------------------------- errors (world 1)

def _gpt_file_bytes() -> int:
    return sum(align_up(p.numel() * 4) for p in _models.make_gpt().parameters())


def _error(config) -> str:
    torch._dynamo.reset()
    with pytest.raises(NvmeOffloadError) as info:
        zerograph.shard(_models.make_gpt(), config)
    return str(info.value)


def test_errors_name_the_path_and_the_bytes(tmp_path, monkeypatch):
    needed = _gpt_file_bytes()
    key = "zero_optimization.offload_param"
    missing = tmp_path / "nope"
    assert _error(_zero(missing)) == (
        f"zerograph: {key}.nvme_path {missing} does not exist; create it (rank 0 needs {needed:,} bytes there) or "
        f"point {key}.nvme_path at an existing directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    root = os.geteuid() == 0
    subprocess.run(["chattr", "+i", str(locked)], check=True) if root else locked.chmod(0o500)
    try:
        message = _error(_zero(locked))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True) if root else locked.chmod(0o700)
    assert message.startswith(f"zerograph: {key}.nvme_path {locked} is not writable by this process (")
    assert f"rank 0 needs to write {needed:,} bytes there" in message
    # a disk with less free space than the file needs (the free space is what statvfs says: faked here)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=needed - 1))
    assert _error(_zero(tmp_path)) == (
        f"zerograph: not enough space in {key}.nvme_path {tmp_path}: rank 0 needs {needed:,} bytes for its params "
        f"files, {needed - 1:,} are free. Free space there, point {key}.nvme_path at a larger drive, or shard over "
        "more ranks")
    monkeypatch.undo()
    # DeepSpeed's buffer check: a shard larger than buffer_size elements
    config = _zero(tmp_path)
    config["zero_optimization"]["offload_param"]["buffer_size"] = 1000
    message = _error(config)
    assert message.startswith(f"zerograph: {key}.buffer_size=1,000 elements is smaller than this rank's shard of ")
    assert "set zero_optimization.offload_param.buffer_size to at least" in message
    assert os.listdir(tmp_path) == ["locked"]  # nothing left behind


def test_param_file_errors_lock_stage_and_not_a_directory(tmp_path):
    """The parameter side's other errors before training: a directory another
    live run holds (its lock names the process), ``nvme_path`` naming a file,
    and device "nvme" below stage 3 (a config error, as in DeepSpeed)."""
    import socket
    import sys

    from zerograph.config import Config, ConfigError
    from zerograph.runtime.nvme_params import ParamStore

    key = "zero_optimization.offload_param"
    config = Config.load(_zero(tmp_path))
    rank_dir = tmp_path / "zerograph-zgtest-rank0"
    rank_dir.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (rank_dir / "LOCK").write_text(f"{child.pid} {socket.gethostname()}")
        with pytest.raises(NvmeOffloadError) as info:
            ParamStore(config, {"w": (0, 8192)}, "zgtest")
        assert str(info.value) == (
            f"zerograph: {rank_dir} is in use by process {child.pid} on {socket.gethostname()} (lock file "
            f"{rank_dir / 'LOCK'}); this run needs 8,192 bytes there. Stop that run, or give this one another "
            f"{key}.nvme_path")
    finally:
        child.kill()
        child.wait()
    shutil.rmtree(rank_dir)
    a_file = tmp_path / "file"
    a_file.write_text("")
    needed = _gpt_file_bytes()
    assert _error(_zero(a_file)) == (
        f"zerograph: {key}.nvme_path {a_file} is not a directory; create it (rank 0 needs {needed:,} bytes there) "
        f"or point {key}.nvme_path at an existing directory")
    with pytest.raises(ConfigError, match=r'offload_param.device="nvme" needs zero_optimization.stage 3 \(now 2\)'):
        Config.load({"zero_optimization": {"stage": 2, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}})
    assert os.listdir(tmp_path) == ["file"]


def test_max_in_cpu_keeps_the_first_shards_in_memory(tmp_path):
    """DeepSpeed's ``max_in_cpu``: the first offloaded shards up to that many
    elements stay in host memory (as with device "cpu"); the default (1e9)
    keeps a small model entirely there, with no file."""
    from zerograph.runtime.nvme_params import param_layout

    torch._dynamo.reset()
    model = zerograph.shard(_models.make_gpt(), _zero(tmp_path))
    specs = list(model._zg_runtime.ctx.specs.values())
    numels = [s.numel for s in specs]
    assert len(param_layout(specs, 0)) == len(specs)
    cut = numels[0] + numels[1]
    assert list(param_layout(specs, cut)) == [s.name for s in specs[2:]]
    assert list(param_layout(specs, cut + 1)) == [s.name for s in specs[2:]]  # whole shards, in order
    del model
    gc.collect()
    config = _zero(tmp_path)
    del config["zero_optimization"]["offload_param"]["max_in_cpu"]
    model = zerograph.shard(_models.make_gpt(), config)
    assert model._zg_runtime.ctx.nvme_params is None and os.listdir(tmp_path) == []
    assert isinstance(_make_opt(model), (HostOptimizer, NvmeOptimizer))


def test_explain_shows_disk_and_mapped_bytes(tmp_path):
    """``zerograph.explain`` (world 2, rank 0, fake group): the parameter
    file and the optimizer's swap files by the formula, the mapped peak, and
    nothing of them counted in host memory; its traced copy's files are gone
    after it returns."""
    config = _zero(tmp_path, optimizer="nvme", sub_group_size=3000)
    idx, targets = _models.global_batch(0, _harness.PER_RANK_BATCH)
    explanation = zerograph.explain(_models.make_gpt(), config, idx, targets, world_size=2)
    plan = explanation.inspection.nvme
    numels = _gpt_local_numels(0)
    assert plan.param_file_bytes == sum(align_up(n * 4) for n in numels)
    assert plan.optimizer_file_bytes == sum(2 * align_up(n * 4) for n in numels)
    assert plan.params_in_file == 28 and 0 < plan.peak_mapped_bytes <= plan.param_file_bytes
    text = str(explanation)
    assert (f"(parameter file {plan.param_file_bytes:,} bytes, 28 shards; optimizer swap files "
            f"{plan.optimizer_file_bytes:,} bytes, Adam/AdamW)") in text
    assert "NVMe mapped peak" in text
    # every shard is read by the forward, once per step from storage
    assert plan.param_read_bytes_per_step == plan.param_file_bytes
    assert f"(parameter file {plan.param_read_bytes_per_step:,} bytes from storage: each region" in text
    assert plan.swap_bytes_per_step == plan.param_file_bytes + plan.optimizer_file_bytes
    assert f"step ({plan.swap_bytes_per_step:,} bytes: parameter-file regions and swap files, once each)" in text
    host = explanation.host_states
    assert host["params"] == host["optimizer_states"] == host["masters"] == 0 < host["grads"]
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_param_nvme_world1_with_accumulation_and_clipping_equals_cpu_offload(tmp_path):
    """World 1 (eager ``zerograph.shard``), 2 accumulation micro-batches and
    clipping: parameters on NVMe, alone and with the optimizer states there
    too, train bit for bit like CPU parameter offload, which equals the
    single-process eager reference at fp32 rtol 1e-5."""
    from tests.test_nvme_offload import ACCUMULATION, CLIP, _assert_same, _build, _config, _params, _states, _train
    from tests.test_nvme_offload import STEPS as steps  # _train's

    ref_losses, ref_params = _harness.reference_run("gpt", 1, steps=steps, accumulation=ACCUMULATION, clip=CLIP)
    param_nvme = {"device": "nvme", "nvme_path": str(tmp_path), "max_in_cpu": 0}
    model, opt = _build(_config({"device": "cpu"}, offload_param={"device": "cpu"}))
    cpu = (_train(model, opt), _params(model), _states(opt))
    _harness.assert_same_training({"losses": cpu[0], "params": cpu[1]}, ref_losses, ref_params)
    del model, opt
    for name, optimizer in (("params", {"device": "cpu"}),
                            ("params + optimizer", {"device": "nvme", "nvme_path": str(tmp_path)})):
        model, opt = _build(_config(optimizer, offload_param=param_nvme))
        store = model._zg_runtime.ctx.nvme_params
        assert store is not None and len(store.layout) == len(list(model.parameters())), name
        losses = _train(model, opt)
        assert losses == cpu[0], name
        _assert_same(_params(model), cpu[1], name)
        _assert_same(_states(opt), cpu[2], name)
        del model, opt, store
        gc.collect()
        assert os.listdir(tmp_path) == [], name  # the swap directories go with the model


# --------------------------------------------------------------------------- reads per step (world 1)

def _storage_reads() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def _reads_are_accounted(root) -> bool:
    """Whether reading a file under ``root`` from storage shows in this
    process's ``read_bytes`` (a block-device filesystem; not tmpfs)."""
    probe = Path(root) / "probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"\1" * 65536, 0)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        before = _storage_reads()
        os.pread(fd, 65536, 0)
        return _storage_reads() - before == 65536
    finally:
        os.close(fd)
        probe.unlink()


def test_storage_reads_per_step_equal_the_prediction(tmp_path):
    """World 1, compiled GPT, parameters on NVMe (the optimizer's states in
    memory): from the second step on, each step reads exactly the planner's
    ``param_read_bytes_per_step`` from storage (every shard region once: the
    forward's read-ahead; the backward's re-gathers and the optimizer's reads
    hit the page cache until the step drops it). The first step reads at most
    that (the pages written at sharding are still cached)."""
    if not _reads_are_accounted(tmp_path):
        pytest.skip(f"{tmp_path} is not on a block device: storage reads are not counted (tmpfs)")
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), _zero(tmp_path, optimizer="cpu"))
    opt = _make_opt(model)
    reads, swapped = [], []
    for step in range(4):
        before, io_before = _storage_reads(), opt.io.stats.snapshot()
        _harness.train_global_batches(model, opt, [step])
        reads.append(_storage_reads() - before)
        io = opt.io.stats.since(io_before)
        swapped.append((io.read_bytes, io.write_bytes))
    plan = zerograph.inspect(model).nvme
    assert plan.param_read_bytes_per_step == plan.param_file_bytes  # the forward reads every shard
    assert reads[1:] == [plan.param_read_bytes_per_step] * 3, reads
    assert reads[0] <= plan.param_read_bytes_per_step
    # the optimizer's own I/O (through the page cache here): every region read and written once a step
    assert swapped == [(plan.swap_bytes_per_step, plan.swap_bytes_per_step)] * 4 and plan.optimizer_file_bytes == 0
    del model, opt
    gc.collect()


# --------------------------------------------------------------------------- resident memory (world 1)

RSS_CASES = {"cpu offload": ("cpu", "cpu"), "param nvme": ("nvme", "cpu"), "param + optimizer nvme": ("nvme", "nvme")}


def _rss_rank(param, optimizer, root):
    """A 4.2M-parameter MLP (4 x Linear(1024, 1024)), world 1, eager ZeRO-3,
    AdamW by ``make_optimizer`` (sub-groups of one layer): the growth of the
    resident set from before the model is built to after three steps, its
    peak during the last two, and the optimizer's host slots."""
    from tests.test_nvme_offload import _peak_bytes, _reset_peak, _rss_bytes

    torch.manual_seed(0)
    x = torch.randn(8, 1024)
    before = _rss_bytes()
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    config = _zero(Path(root), optimizer=optimizer, param=param, sub_group_size=1_100_000)
    model = zerograph.shard(model, config)
    opt = make_optimizer(model, torch.optim.AdamW, lr=1e-3)
    model(x).square().mean().backward()  # gradients and states exist from the first step on
    opt.step()
    peak = 0
    for _ in range(2):
        _rss_bytes()  # trimmed: the peak below starts from live memory
        _reset_peak()
        model(x).square().mean().backward()
        opt.step()
        peak = max(peak, _peak_bytes())
    now = _rss_bytes()
    store = model._zg_runtime.ctx.nvme_params
    out = {"growth": now - before, "peak_growth": peak - before,
           "slots": opt.buffer_bytes() if isinstance(opt, NvmeOptimizer) else 0,
           "file": store.nbytes if store is not None else 0, "numel": sum(p.numel() for p in model.parameters())}
    del model, opt, store
    gc.collect()
    return out


@pytest.mark.slow  # three fresh processes (about 45 s here); in CI: no file page stays mapped between graphs
@pytest.mark.timeout(TIMEOUT)
def test_resident_memory_with_parameters_on_nvme(tmp_path, monkeypatch):
    """Measured, fresh processes (glibc's mmap threshold fixed so freed
    tensors leave the resident set): with the parameter shards in the file
    the resident set between steps holds none of them (the step releases the
    mapping and drops the file's pages) and one optimizer slot instead; with
    the optimizer's states there too, none of the moments either. During a
    step eager ZeRO keeps the file's pages mapped until the optimizer step
    (they count in the resident set then), so the peak is CPU offload's plus
    the slot: the shards' bytes move from anonymous memory to file pages."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 << 10))
    runs = {name: spawn(_rss_rank, 1, param, optimizer, str(tmp_path), timeout=TIMEOUT,
                             start_method="spawn")[0]
            for name, (param, optimizer) in RSS_CASES.items()}
    cpu, param, both = runs.values()
    shards = 4 * cpu["numel"]  # fp32
    moments = 8 * cpu["numel"]
    slack = 4 << 20
    print("\nresident set growth (MiB), between steps / peak: " + ", ".join(
        f"{name} {r['growth'] / 2**20:.1f} / {r['peak_growth'] / 2**20:.1f} (slots {r['slots'] / 2**20:.1f})"
        for name, r in runs.items()))
    assert param["file"] == both["file"] >= shards
    assert cpu["growth"] >= shards + moments  # the measurement sees the states where they are
    assert param["growth"] <= cpu["growth"] - shards + param["slots"] + slack, runs
    assert both["growth"] <= cpu["growth"] - shards - moments + both["slots"] + slack, runs
    assert param["peak_growth"] <= cpu["peak_growth"] + param["slots"] + slack, runs
    assert both["peak_growth"] <= cpu["peak_growth"] - moments + both["slots"] + slack, runs
    assert os.listdir(tmp_path) == []

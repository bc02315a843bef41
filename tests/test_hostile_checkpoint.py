"""Checkpoint faults a careless or hostile user (or a bad disk) causes
(project issue 23, items 4-6): flipped bytes, truncated or missing files,
a save below a regular file, rank 0 failing to write the commit marker,
rank 0 killed between its two renames. Every one is a CheckpointError (an
Exception, never torch's BaseException CheckpointException) on every rank,
naming the file, the rank and what to do, or, for the interrupted save, a
load of the newest complete checkpoint. Real gloo processes at world 2;
the corruption trials load in this process (world 1)."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest
import torch

import zerograph
from tests import _harness, _models
from zerograph.runtime.errors import CheckpointError, RankFailureError
from zerograph.runtime.launch import RankFailed, spawn

# one xdist worker runs this module: its module-scoped fixture saves and breaks checkpoints once (tests/_xdist.py)
pytestmark = pytest.mark.xdist_group("hostile_checkpoint")
TIMEOUT_S = 5.0
CONFIG = {"train_micro_batch_size_per_gpu": _harness.PER_RANK_BATCH, "zero_optimization": {"stage": 3},
          "zerograph": {"collective_timeout_s": TIMEOUT_S}}


def _step(model, opt, step: int) -> None:
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
    model(idx.chunk(world)[rank], targets.chunk(world)[rank]).loss.backward()
    opt.step()
    opt.zero_grad()


def _full(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()}


def _caught(fn) -> dict:
    """What ``fn()`` raised, as data; a BaseException that is not an
    Exception (torch's CheckpointException) is reported as escaped."""
    start = time.monotonic()
    try:
        fn()
        return {"error": None}
    except Exception as exc:  # noqa: BLE001 -- reported to the test
        return {"error": type(exc).__name__, "message": str(exc), "file": getattr(exc, "file", None),
                "ranks": getattr(exc, "ranks", None), "s": time.monotonic() - start}
    except BaseException as exc:  # noqa: BLE001
        return {"error": f"escaped {type(exc).__name__}", "message": str(exc)[:2000]}


def _flip(path: Path, offset: int, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _faults_run(workdir: str):
    import torch.distributed as dist

    import zerograph.checkpoint.dcp as dcp_module

    rank = dist.get_rank()
    work = Path(workdir)
    model = zerograph.shard(_models.make_gpt(), CONFIG)  # eager: the checkpoint code is the same
    opt = _harness._optimizer(model.parameters())
    out: dict = {}
    _step(model, opt, 0)
    zerograph.save_checkpoint(work / "ckpt_a", model, opt, step=1)
    out["a"] = _full(model)
    _step(model, opt, 1)
    zerograph.save_checkpoint(work / "ckpt_b", model, opt, step=2)
    out["b"] = _full(model)

    # 5. a path below a regular file: the cause and the path, not a CheckpointException
    if rank == 0:
        (work / "a_file").write_text("not a folder")
    dist.barrier()
    out["below_file"] = _caught(lambda: zerograph.save_checkpoint(work / "a_file" / "ckpt", model, opt))

    # 6. rank 0 cannot write the commit marker (ENOSPC) while overwriting ckpt_a
    real_commit = dcp_module._commit

    def no_space(tmp, path, marker):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "ZEROGRAPH_COMMITTED"))

    if rank == 0:
        dcp_module._commit = no_space
    out["commit"] = _caught(lambda: zerograph.save_checkpoint(work / "ckpt_a", model, opt, step=3))
    dcp_module._commit = real_commit
    dist.barrier()
    out["after_commit_failure"] = sorted(p.name for p in work.iterdir())

    # 4. a corrupted shard, loaded on both ranks: every rank raises the same error
    if rank == 0:
        shutil.copytree(work / "ckpt_b", work / "ckpt_b_bad")
        _flip(work / "ckpt_b_bad" / "__1_0.distcp", 4000)
    dist.barrier()
    out["corrupt"] = _caught(lambda: zerograph.load_checkpoint(work / "ckpt_b_bad", model, opt))

    # 6. rank 0 dies between its two renames while overwriting ckpt_a (last: it ends rank 0)
    _step(model, opt, 2)
    out["c"] = _full(model)
    real_rename = dcp_module._rename

    def die_after_first(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            os._exit(9)

    if rank == 0:
        dcp_module._rename = die_after_first
    died = time.time()
    try:
        zerograph.save_checkpoint(work / "ckpt_a", model, opt, step=4)
        out["between"] = "no error"
    except RankFailureError as exc:
        out["between"] = {"ranks": exc.ranks, "phase": exc.phase, "s": time.time() - died}
    return out


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    work = tmp_path_factory.mktemp("hostile_ckpt")
    results = spawn(_faults_run, 2, str(work), timeout=170, raise_on_failure=False)
    return work, results


@pytest.mark.timeout(180)
def test_checkpoint_write_faults_are_checkpoint_errors_on_every_rank(faults):
    work, results = faults
    assert isinstance(results[0], RankFailed) and results[0].exitcode == 9, results[0]  # killed mid-commit
    out = results[1]
    assert isinstance(out, dict), out
    below = out["below_file"]
    assert below["error"] == "CheckpointError", below
    assert f"{work / 'a_file' / 'ckpt'}" in below["message"] and "NotADirectoryError" in below["message"]
    assert "regular file" in below["message"] and below["ranks"], below
    commit = out["commit"]
    assert commit["error"] == "CheckpointError" and commit["ranks"] == [0], commit
    assert "rank 0 could not commit the checkpoint" in commit["message"] and "No space left" in commit["message"]
    assert f"{work / 'ckpt_a'} still holds the checkpoint saved before" in commit["message"], commit["message"]
    assert commit["s"] < TIMEOUT_S, commit
    assert not [n for n in out["after_commit_failure"] if ".tmp-" in n], out["after_commit_failure"]
    corrupt = out["corrupt"]
    assert corrupt["error"] == "CheckpointError" and corrupt["ranks"] == [1], corrupt
    assert corrupt["file"] == str(work / "ckpt_b_bad" / "__1_0.distcp"), corrupt
    assert "(written by rank 1) is corrupt" in corrupt["message"] and "nothing was loaded" in corrupt["message"]
    assert "load the previous complete checkpoint instead" in corrupt["message"], corrupt["message"]
    assert corrupt["s"] < TIMEOUT_S, corrupt
    # rank 0 died between its renames: rank 1 names it
    assert out["between"]["ranks"] == [0] and out["between"]["phase"] == "zerograph.save_checkpoint", out


@pytest.mark.timeout(180)
def test_a_save_killed_between_its_renames_loads_the_newest_complete_checkpoint(faults, caplog):
    work, results = faults
    out = results[1]
    assert not (work / "ckpt_a").exists()
    newest = [p for p in work.glob("ckpt_a.tmp-*")]
    assert len(newest) == 1 and (newest[0] / "ZEROGRAPH_COMMITTED").is_file(), list(work.iterdir())
    model = zerograph.shard(_models.make_gpt(), {})
    with caplog.at_level("WARNING", logger="zerograph"):
        extra = zerograph.load_checkpoint(work / "ckpt_a", model)
    assert extra == {"step": 4}, extra
    assert f"loading the newest complete checkpoint that save left, {newest[0]}" in caplog.text, caplog.text
    for key, value in zerograph.full_state_dict(model).items():
        assert torch.equal(value, out["c"][key]), key
    # the next save to that path clears what the interrupted one left
    zerograph.save_checkpoint(work / "ckpt_a", model, step=5)
    assert sorted(p.name for p in work.glob("ckpt_a*")) == ["ckpt_a"]
    assert zerograph.load_checkpoint(work / "ckpt_a", model) == {"step": 5}


@pytest.mark.timeout(120)
def test_flipped_bytes_at_random_offsets_never_load_silently(faults, tmp_path):
    """8 flipped bytes at 30 random offsets of the shards and .metadata of a
    world-2 checkpoint: every load is a CheckpointError naming the file, the
    rank that wrote it and the previous complete checkpoint."""
    work, results = faults
    rng = random.Random(23)
    files = sorted(p.name for p in (work / "ckpt_b").iterdir() if p.name != "ZEROGRAPH_COMMITTED")
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"], files
    model = zerograph.shard(_models.make_gpt(), {})
    opt = _harness._optimizer(model.parameters())
    for trial in range(30):
        folder = tmp_path / f"trial{trial}"
        shutil.copytree(work / "ckpt_b", folder / "step-2")
        name = rng.choice(files)
        target = folder / "step-2" / name
        _flip(target, rng.randrange(0, target.stat().st_size - 8))
        (folder / "step-1").mkdir()
        shutil.copy(work / "ckpt_b" / "ZEROGRAPH_COMMITTED", folder / "step-1")  # a complete sibling, in name
        start = time.monotonic()
        with pytest.raises(CheckpointError) as info:
            zerograph.load_checkpoint(folder / "step-2", model, opt)
        assert time.monotonic() - start < 5
        writer = "rank 0" if name in (".metadata", "__0_0.distcp") else "rank 1"
        assert info.value.file == str(target) and f"(written by {writer}) is corrupt" in str(info.value)
        assert f"load the previous complete checkpoint instead: {folder / 'step-1'}" in str(info.value)
        shutil.rmtree(folder)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage, expected", [
    ("truncate_shard", "has 1000 bytes, the save wrote"),
    ("remove_metadata", ".metadata (written by rank 0) is missing"),
    ("remove_shard", "__1_0.distcp (written by rank 1) is missing"),
    ("corrupt_marker", "cannot be read (corrupt)"),
    ("remove_marker", "has no ZEROGRAPH_COMMITTED marker"),
])
def test_truncated_or_missing_files_are_checkpoint_errors(faults, tmp_path, damage, expected):
    work, _ = faults
    ckpt = tmp_path / "ckpt"
    shutil.copytree(work / "ckpt_b", ckpt)
    if damage == "truncate_shard":
        data = (ckpt / "__1_0.distcp").read_bytes()
        (ckpt / "__1_0.distcp").write_bytes(data[:1000])
    elif damage == "remove_metadata":
        (ckpt / ".metadata").unlink()
    elif damage == "remove_shard":
        (ckpt / "__1_0.distcp").unlink()
    elif damage == "corrupt_marker":
        _flip(ckpt / "ZEROGRAPH_COMMITTED", 1)
    else:
        (ckpt / "ZEROGRAPH_COMMITTED").unlink()
    model = zerograph.shard(_models.make_gpt(), {})
    with pytest.raises(CheckpointError, match="no other complete zerograph checkpoint|previous complete") as info:
        zerograph.load_checkpoint(ckpt, model)
    assert expected in str(info.value), str(info.value)


def test_without_verification_a_torn_metadata_file_is_still_a_checkpoint_error(faults, tmp_path):
    work, _ = faults
    ckpt = tmp_path / "ckpt"
    shutil.copytree(work / "ckpt_b", ckpt)
    (ckpt / ".metadata").write_bytes((ckpt / ".metadata").read_bytes()[:100])
    model = zerograph.shard(_models.make_gpt(), {})
    with pytest.raises(CheckpointError, match=r"cannot read .*\.metadata: UnpicklingError|cannot read .*\.metadata"):
        zerograph.load_checkpoint(ckpt, model, verify=False)


def test_marker_records_a_checksum_of_every_file(faults):
    work, results = faults
    marker = json.loads((work / "ckpt_b" / "ZEROGRAPH_COMMITTED").read_text())
    assert sorted(marker["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert marker["step"] == 2 and marker["world_size"] == 2
    model = zerograph.shard(_models.make_gpt(), {})
    assert zerograph.load_checkpoint(work / "ckpt_b", model) == {"step": 2}
    for key, value in zerograph.full_state_dict(model).items():
        assert torch.equal(value, results[1]["b"][key]), key

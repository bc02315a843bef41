"""Faults: a rank killed mid-step ends the other ranks with a
RankFailureError naming it within zerograph.collective_timeout_s, never a
hang, in compiled graphs and in the collectives zerograph runs outside them
(eager marker ops, full_state_dict, checkpoints); a checkpoint saved before
the crash still loads (real gloo ranks)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

import zerograph
from tests import _harness, _models
from zerograph.runtime.errors import RankFailureError, is_collective_failure
from zerograph.runtime.launch import RankFailed, spawn

TIMEOUT_S = 10.0  # zerograph.collective_timeout_s in these runs


def _config(timeout_s=TIMEOUT_S):
    return {
        "train_micro_batch_size_per_gpu": _harness.PER_RANK_BATCH,
        "zero_optimization": {"stage": 3},
        "zerograph": {"collective_timeout_s": timeout_s},
    }


def _crash_run(victim: int, phase: str, workdir: str, save_at: int | None, timeout_s: float = TIMEOUT_S,
               freeze_s: float = 0.0):
    """Train up to 4 steps; ``victim`` kills itself (os._exit) in optimizer
    step 3, after its forward (``phase="backward"``) or before it
    (``"forward"``); with ``freeze_s`` it sleeps that long first (a hung
    rank). Survivors return what the RankFailureError says."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), _config(timeout_s))
    opt = _harness._optimizer(model.parameters())
    saved = None
    try:
        for step in range(4):
            if save_at is not None and step == save_at:
                zerograph.save_checkpoint(os.path.join(workdir, "ckpt"), model, opt, step=step)
                saved = {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}
            idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
            idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
            if step == 2 and rank == victim and phase == "forward":
                _die(workdir, freeze_s)
            loss = model(idx, targets).loss
            if step == 2 and rank == victim and phase == "backward":
                _die(workdir, freeze_s)
            loss.backward()
            opt.step()
            opt.zero_grad()
    except RankFailureError as exc:
        return _reported(workdir, {"ranks": exc.ranks, "step": exc.step, "phase": exc.phase, "message": str(exc),
                                   "at": time.time(), "saved": saved})
    return {"finished": True}


def _die(workdir: str, freeze_s: float = 0.0) -> None:
    """Record the time, stay hung up to ``freeze_s`` (only until a survivor
    has reported, ``_reported``: what it saw does not change after that, and
    waiting out the rest would only make the test longer; every hung-rank
    test here has one survivor), then exit."""
    with open(os.path.join(workdir, "died_at"), "w") as f:
        json.dump(time.time(), f)
    until = time.monotonic() + freeze_s
    while time.monotonic() < until and not os.path.exists(os.path.join(workdir, "reported")):
        time.sleep(0.05)
    os._exit(7)  # no cleanup, no exception: like a SIGKILL or an OOM kill


def _reported(workdir: str, result: dict) -> dict:
    """A survivor's result; the hung rank may exit now (see ``_die``)."""
    open(os.path.join(workdir, "reported"), "a").close()
    return result


def _check_survivors(results, victim: int, phase: str, workdir: str, world: int):
    died_at = json.load(open(os.path.join(workdir, "died_at")))
    dead = results[victim]
    assert isinstance(dead, RankFailed) and dead.exitcode == 7, dead
    for rank, res in enumerate(results):
        if rank == victim:
            continue
        assert isinstance(res, dict) and "ranks" in res, f"rank {rank}: {res}"
        assert res["ranks"] == [victim], res["message"]
        assert res["step"] == 3 and res["phase"] == phase, res
        assert f"rank {victim} stopped responding in the {phase} of optimizer step 3" in res["message"] or (
            victim == 0 and "rank 0 (it hosts the process group's store) probably died" in res["message"]
        ), res["message"]
        assert "collective_timeout_s" in res["message"] and "log" in res["message"]
        # Within the configured timeout of the death, never a hang.
        assert res["at"] - died_at < TIMEOUT_S, (rank, res["at"] - died_at)
    return [r for i, r in enumerate(results) if i != victim]


@pytest.mark.timeout(60)
def test_dead_rank_in_backward_is_named_and_checkpoint_survives(tmp_path):
    start = time.monotonic()
    results = spawn(_crash_run, 2, 1, "backward", str(tmp_path), 1, timeout=50, raise_on_failure=False)
    (survivor,) = _check_survivors(results, 1, "backward", str(tmp_path), 2)
    # Nothing the user saved is lost: the checkpoint from step 1 loads whole.
    model = zerograph.shard(_models.make_gpt(), {"zero_optimization": {"stage": 0}})
    assert zerograph.load_checkpoint(tmp_path / "ckpt", model)["step"] == 1
    for key, value in zerograph.full_state_dict(model).items():
        assert torch.equal(value, survivor["saved"][key]), key
    assert time.monotonic() - start < 60


@pytest.mark.timeout(60)
def test_dead_store_host_in_forward_is_named(tmp_path):
    results = spawn(_crash_run, 2, 0, "forward", str(tmp_path), None, timeout=50, raise_on_failure=False)
    _check_survivors(results, 0, "forward", str(tmp_path), 2)


@pytest.mark.slow  # ~40 s on 2 cores; the world-2 cases above run in CI
@pytest.mark.timeout(60)
def test_dead_rank_at_world_size_4_is_named_by_every_survivor(tmp_path):
    results = spawn(_crash_run, 4, 2, "backward", str(tmp_path), None, timeout=55, raise_on_failure=False)
    _check_survivors(results, 2, "backward", str(tmp_path), 4)


@pytest.mark.timing  # bounds the time to the error on both sides (tests/_xdist.py)
@pytest.mark.timeout(60)
def test_hung_rank_times_out_at_the_configured_timeout(tmp_path):
    """Rank 1 stops (sleeps) in step 3 without dying: rank 0's collective
    fails after zerograph.collective_timeout_s (5 s here; the process group
    itself was created with 50 s), and the error says every rank is alive.
    (5 s, not less: the per-phase position check also waits this long, and
    two ranks may finish their first compile a few seconds apart.)"""
    timeout_s = 5.0
    results = spawn(_crash_run, 2, 1, "backward", str(tmp_path), None, timeout_s, 14.0, timeout=50,
                    raise_on_failure=False)
    died_at = json.load(open(tmp_path / "died_at"))
    res = results[0]
    assert isinstance(res, dict) and "ranks" in res, res
    assert res["ranks"] == [] and res["step"] == 3 and res["phase"] == "backward", res
    assert "every rank is alive" in res["message"] and "collective_timeout_s (now 5 s)" in res["message"]
    # The configured timeout, then the heartbeat check (4 x 0.1 s) and rank 0's wait for rank 1 (1.2 s).
    assert timeout_s * 0.9 < res["at"] - died_at < timeout_s + 6, res["at"] - died_at


def _outside_graph_run(where: str, workdir: str, timeout_s: float = TIMEOUT_S, freeze_s: float = 0.0):
    """Stage 3 without compiling (every parameter gather and gradient
    reduction runs in the eager marker ops): one optimizer step on both
    ranks, then rank 1 dies (os._exit; after sleeping ``freeze_s``: a hung
    rank) just before rank 0 runs ``where``: the forward or backward of
    step 2, full_state_dict or save_checkpoint. Rank 0 returns what the
    RankFailureError says."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model = zerograph.shard(_models.make_gpt(), _config(timeout_s))
    opt = _harness._optimizer(model.parameters())
    loss = None
    try:
        for step in range(2):
            idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
            idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
            if step == 1 and rank == 1 and where != "backward":
                _die(workdir, freeze_s)
            if step == 1 and where in ("full_state_dict", "save_checkpoint"):
                break
            loss = model(idx, targets).loss
            if step == 1 and rank == 1:
                _die(workdir, freeze_s)
            loss.backward()
            opt.step()
            opt.zero_grad()
        if where == "full_state_dict":
            zerograph.full_state_dict(model)
        else:
            zerograph.save_checkpoint(os.path.join(workdir, "ckpt"), model, opt)
    except RankFailureError as exc:
        return _reported(workdir, {"ranks": exc.ranks, "step": exc.step, "phase": exc.phase, "message": str(exc),
                                   "at": time.time(), "cause": type(exc.__cause__).__name__})
    return {"finished": True}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where, phase", [
    ("forward", "forward"),  # the eager zerograph::unshard marker
    ("backward", "backward"),  # the eager zerograph::reduce_grad marker
    ("full_state_dict", "zerograph.full_state_dict"),
    ("save_checkpoint", "zerograph.save_checkpoint"),
])
def test_dead_rank_outside_compiled_graphs_is_named(tmp_path, where, phase):
    results = spawn(_outside_graph_run, 2, where, str(tmp_path), timeout=50, raise_on_failure=False)
    died_at = json.load(open(tmp_path / "died_at"))
    assert isinstance(results[1], RankFailed) and results[1].exitcode == 7, results[1]
    res = results[0]
    assert isinstance(res, dict) and "ranks" in res, res
    assert res["ranks"] == [1] and res["step"] == 2 and res["phase"] == phase, res
    if phase.startswith("zerograph."):
        assert f"rank 1 stopped responding in {phase} after optimizer step 1 (" in res["message"], res["message"]
    else:
        assert f"rank 1 stopped responding in the {phase} of optimizer step 2" in res["message"], res["message"]
    assert "collective_timeout_s" in res["message"] and res["cause"] != "NoneType"
    assert res["at"] - died_at < TIMEOUT_S, res["at"] - died_at  # within the configured timeout, never a hang


@pytest.mark.timing  # bounds the time to the error on both sides (tests/_xdist.py)
@pytest.mark.timeout(60)
def test_hung_rank_in_save_checkpoint_times_out_at_the_configured_timeout(tmp_path):
    """Rank 1 freezes instead of saving: rank 0's checkpoint collectives
    fail after zerograph.collective_timeout_s (2 s), not after the timeout
    the process group was created with (50 s here; a data-parallel group of
    every rank is the default group, whose timeout zerograph sets), and the
    error says every rank is alive."""
    timeout_s = 2.0
    results = spawn(_outside_graph_run, 2, "save_checkpoint", str(tmp_path), timeout_s, 6.0, timeout=50,
                    raise_on_failure=False)
    died_at = json.load(open(tmp_path / "died_at"))
    res = results[0]
    assert isinstance(res, dict) and "ranks" in res, res
    assert res["ranks"] == [] and res["phase"] == "zerograph.save_checkpoint", res
    assert "every rank is alive" in res["message"] and "collective_timeout_s (now 2 s)" in res["message"]
    # The configured timeout, then the heartbeat check (4 x 0.1 s) and rank 0's wait for rank 1 (1.2 s).
    assert timeout_s * 0.9 < res["at"] - died_at < timeout_s + 6, res["at"] - died_at
    assert not list(tmp_path.glob("ckpt*")), "a failed save leaves no checkpoint behind"


def test_collective_failure_classification():
    assert is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    assert is_collective_failure(RuntimeError("Timed out waiting 8000ms for recv operation to complete"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not is_collective_failure(ValueError("Connection closed"))
    err = RankFailureError("zerograph: rank 1 stopped responding", [1], 3, "backward")
    assert not is_collective_failure(err)  # never wrapped twice
    import pickle

    back = pickle.loads(pickle.dumps(err))
    assert (back.ranks, back.step, back.phase, str(back)) == ([1], 3, "backward", str(err))


def test_naming_failed_ranks_translates_collective_failures_once():
    """The single translation point: a collective failure becomes what the
    model's runtime makes of it (chained), anything else passes unchanged,
    and without a model context nothing is translated."""
    from types import SimpleNamespace

    from zerograph.runtime.errors import explain_collective_failure, naming_failed_ranks

    def translate(exc, phase):
        if not is_collective_failure(exc):
            return exc
        return explain_collective_failure(exc, None, step=3, phase=phase, timeout_s=10, rank=0)

    ctx = SimpleNamespace(collective_failure=translate)
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")
    with pytest.raises(RankFailureError) as info:
        with naming_failed_ranks(ctx, "zerograph.full_state_dict"):
            with naming_failed_ranks(ctx, "forward"):  # nested: translated once, by the inner one
                raise gloo
    assert info.value.__cause__ is gloo and info.value.phase == "forward"
    with pytest.raises(RankFailureError, match="in zerograph.save_checkpoint after optimizer step 2:"):
        with naming_failed_ranks(ctx, "zerograph.save_checkpoint"):
            raise gloo
    other = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    for context in (ctx, None):
        with pytest.raises(RuntimeError) as info:
            with naming_failed_ranks(context, "forward"):
                raise other
        assert info.value is other
    with pytest.raises(RuntimeError) as info:
        with naming_failed_ranks(None, "forward"):
            raise gloo
    assert info.value is gloo


# -- pipeline parallelism: sends and receives between stages -------------------

def _pipeline_crash_run(workdir: str, timeout_s: float, freeze_s: float):
    """p=2 stages on 2 ranks: rank 1 dies (after sleeping ``freeze_s``: a hung
    rank) before optimizer step 2; rank 0 runs its forwards and then waits
    for rank 1's gradient in its first backward. Rank 0 returns what the
    RankFailureError says."""
    import torch.distributed as dist

    torch._dynamo.reset()
    config = {"pipeline": {"stages": 2, "micro_batches": 2}, "zerograph": {"collective_timeout_s": timeout_s}}
    model = zerograph.compile(_models.make_gpt(), config, example_batch=_models.global_batch(0, 4))
    opt = _harness._optimizer(model.parameters())
    try:
        for step in range(3):
            if step == 1 and dist.get_rank() == 1:
                _die(workdir, freeze_s)
            model.train_step(_models.global_batch(step, 4))
            opt.step()
            opt.zero_grad()
    except RankFailureError as exc:
        return _reported(workdir, {"ranks": exc.ranks, "step": exc.step, "phase": exc.phase, "message": str(exc),
                                   "at": time.time()})
    except Exception as exc:  # noqa: BLE001 -- reported to the test
        return _reported(workdir, {"error": f"{type(exc).__name__}: {exc}"})
    return {"finished": True}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("freeze_s", [
    pytest.param(0.0, id="dead"),
    # bounds the time to the error on both sides (tests/_xdist.py)
    pytest.param(30.0, id="hung", marks=pytest.mark.timing),
])
def test_dead_or_hung_pipeline_stage_is_named_within_the_timeout(tmp_path, freeze_s):
    """A stage's receive from a dead rank raises RankFailureError naming it;
    from a hung one, it fails after zerograph.collective_timeout_s (gloo's
    point-to-point waits ignore the group's timeout: 80 s here) and says
    every rank is alive."""
    timeout_s = 3.0
    results = spawn(_pipeline_crash_run, 2, str(tmp_path), timeout_s, freeze_s, timeout=80, raise_on_failure=False)
    died_at = json.load(open(tmp_path / "died_at"))
    res = results[0]
    assert isinstance(res, dict) and "ranks" in res, res
    assert res["step"] == 2 and res["phase"] == "backward", res
    assert "collective_timeout_s (now 3 s)" in res["message"], res["message"]
    if freeze_s:
        assert res["ranks"] == [] and "every rank is alive" in res["message"], res
        assert timeout_s * 0.9 < res["at"] - died_at < timeout_s + 8, res["at"] - died_at
    else:
        assert res["ranks"] == [1], res
        assert "rank 1 stopped responding in the backward of optimizer step 2" in res["message"], res["message"]
        assert res["at"] - died_at < timeout_s + 5, res["at"] - died_at

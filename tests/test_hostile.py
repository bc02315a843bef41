"""What a careless or hostile user does at world 2 (real gloo processes),
and what zerograph must answer (project issue 23): a frozen rank (SIGSTOP),
any rank, ends the others within zerograph.collective_timeout_s plus the
documented margin; ranks with different configs or models raise
RankMismatchError naming the key before any collective; a rank that skips a
backward makes every rank raise a Python error instead of gloo aborting the
process; compile on one rank only is named. Checkpoint faults are in
tests/test_hostile_checkpoint.py."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

import zerograph
from tests import _harness, _models
from zerograph.runtime.dist import detection_margin_s
from zerograph.runtime.errors import RankFailureError, RankMismatchError
from zerograph.runtime.launch import RankFailed, spawn

TIMEOUT_S = 5.0  # zerograph.collective_timeout_s in these runs


def _config(stage=3, **over):
    cfg = {"train_micro_batch_size_per_gpu": _harness.PER_RANK_BATCH, "zero_optimization": {"stage": stage},
           "zerograph": {"collective_timeout_s": TIMEOUT_S}}
    cfg.update(over)
    return cfg


def _batch(step: int):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
    return idx.chunk(world)[rank], targets.chunk(world)[rank]


def _wait_for(path: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


def _failure(exc: RankFailureError) -> dict:
    return {"ranks": exc.ranks, "phase": exc.phase, "step": exc.step, "message": str(exc), "at": time.time()}


# -- 1. a frozen rank, any rank, never hangs the others -------------------------------

def _freeze_run(victim: int, how: str, workdir: str):
    """Train; in optimizer step 2 the victim, before its forward, stops
    itself with SIGSTOP (``how="freeze"``: the whole process, heartbeat and,
    on rank 0, the process group's store included) or sleeps in other code
    (``"stuck"``: alive, heartbeat moving). A survivor returns what its
    RankFailureError says, then kills a frozen victim by pid."""
    import torch.distributed as dist

    rank = dist.get_rank()
    # zerograph.shard: the eager marker ops run the same checks and collectives, without compile time
    # (tests/test_faults.py kills ranks in compiled graphs)
    model = zerograph.shard(_models.make_gpt(), _config())
    opt = _harness._optimizer(model.parameters())
    try:
        for step in range(3):
            if step == 1 and rank == victim:
                with open(os.path.join(workdir, "victim"), "w") as f:
                    json.dump({"pid": os.getpid(), "at": time.time()}, f)
                if how == "freeze":
                    os.kill(os.getpid(), signal.SIGSTOP)
                _wait_for(os.path.join(workdir, "reported"), 4 * TIMEOUT_S)  # stuck elsewhere, alive
                return {"stuck": True}
            model(*_batch(step)).loss.backward()
            opt.step()
            opt.zero_grad()
    except RankFailureError as exc:
        out = _failure(exc)
        open(os.path.join(workdir, "reported"), "w").close()
        if how == "freeze":
            os.kill(json.load(open(os.path.join(workdir, "victim")))["pid"], signal.SIGKILL)
        return out
    return {"finished": True}


@pytest.mark.timing  # bounds the time to the error on both sides (tests/_xdist.py)
@pytest.mark.timeout(130)
@pytest.mark.parametrize("victim, how", [
    (0, "freeze"),  # the store's host: the dead-rank check's store calls must not block
    pytest.param(1, "freeze", marks=pytest.mark.slow),  # heartbeat stops: named from the store
    (1, "stuck"),  # alive elsewhere: no wait for a rank that never checks
])
def test_frozen_or_stuck_rank_ends_the_others_within_the_timeout_and_margin(tmp_path, victim, how):
    results = spawn(_freeze_run, 2, victim, how, str(tmp_path), timeout=120, raise_on_failure=False)
    frozen_at = json.load(open(tmp_path / "victim"))["at"]
    survivor = results[1 - victim]
    assert isinstance(survivor, dict) and "ranks" in survivor, survivor
    assert survivor["step"] == 2 and survivor["phase"] == "forward", survivor
    elapsed = survivor["at"] - frozen_at
    # never before the configured timeout, never later than the documented margin after it
    assert TIMEOUT_S * 0.9 < elapsed < TIMEOUT_S + detection_margin_s(TIMEOUT_S), elapsed
    if how == "freeze":
        assert survivor["ranks"] == [victim], survivor["message"]
        assert isinstance(results[victim], RankFailed) and results[victim].exitcode == -signal.SIGKILL
        if victim == 0:
            assert "rank 0 (it hosts the process group's store) probably died or froze" in survivor["message"]
        else:
            assert "rank 1 stopped responding in the forward of optimizer step 2" in survivor["message"]
    else:
        assert survivor["ranks"] == [] and "every rank is alive" in survivor["message"], survivor["message"]
        assert results[victim] == {"stuck": True}


# -- 2, 3, 6. ranks that disagree -------------------------------------------------------

def _llama_or_gpt(kind: str, rank: int):
    from zerograph.models import GPT, GPTConfig

    sizes = {"n_layer": 2, "n_embd": 30, "vocab_size": _models.VOCAB}
    if kind == "layers":
        sizes["n_layer"] = 2 + rank
    elif kind == "n_embd":
        sizes["n_embd"] = 30 + 2 * rank
    elif kind == "vocab":
        sizes["vocab_size"] = _models.VOCAB + rank
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=_models.SEQ, n_head=2, **sizes))


# (name, rank 0's config, rank 1's config, model difference, the key named first)
MISMATCHES = [
    ("stage 1 vs 2", _config(1), _config(2), None, "config.zero_optimization.stage"),
    ("stage 3 vs 2", _config(3), _config(2), None, "config.zero_optimization.stage"),
    ("accumulation 1 vs 2", _config(gradient_accumulation_steps=1), _config(gradient_accumulation_steps=2), None,
     "config.gradient_accumulation_steps"),
    ("clipping on rank 1", _config(), _config(gradient_clipping=1.0), None, "config.gradient_clipping"),
    ("bf16 on rank 1", _config(), _config(bf16={"enabled": True}), None, "config.bf16.enabled"),
    ("pipeline on rank 0", _config(0, pipeline={"stages": 2}), _config(0), None, "config.pipeline.stages"),
    ("layer count", _config(), _config(), "layers", "model.module.h.2"),
    ("n_embd", _config(), _config(), "n_embd", "model.param.h.0.attn.proj.weight"),
    ("vocabulary", _config(), _config(), "vocab", "model.param.wte.weight"),
]


def _disagreeing_run(workdir: str):
    """Each case of MISMATCHES, then a rank that skips a backward, then
    full_state_dict on rank 0 only, then compile on rank 0 only; every
    error as data. Ends with a matched run of 2 steps."""
    import torch.distributed as dist

    rank = dist.get_rank()
    out: dict = {"mismatch": {}}
    for name, cfg0, cfg1, model_kind, _ in MISMATCHES:
        torch._dynamo.reset()
        start = time.monotonic()
        model = _llama_or_gpt(model_kind, rank) if model_kind else _models.make_gpt()
        try:
            example = _models.global_batch(0, 4) if (cfg0 if rank == 0 else cfg1).get("pipeline") else None
            zerograph.compile(model, cfg0 if rank == 0 else cfg1, example_batch=example)
            out["mismatch"][name] = "no error"
        except RankMismatchError as exc:
            out["mismatch"][name] = {"key": exc.key, "values": exc.values, "ranks": exc.ranks,
                                     "keys": sorted(exc.differences), "message": str(exc),
                                     "s": time.monotonic() - start}

    # a rank catches an exception after its forward and skips the backward (zerograph.shard: the
    # same runtime checks as compiled graphs, without compile time)
    model = zerograph.shard(_models.make_gpt(), _config())
    opt = _harness._optimizer(model.parameters())
    start = time.monotonic()
    try:
        for step in range(3):
            loss = model(*_batch(step)).loss
            try:
                if rank == 1 and step == 1:
                    raise ValueError("bad batch")
            except ValueError:
                continue  # the careless part: rank 0 runs the backward of this batch
            loss.backward()
            opt.step()
            opt.zero_grad()
        out["skip"] = "no error"
    except RankMismatchError as exc:
        out["skip"] = {"key": exc.key, "values": exc.values, "ranks": exc.ranks, "message": str(exc),
                       "s": time.monotonic() - start}

    # full_state_dict on rank 0 only, while rank 1 trains on
    model = zerograph.shard(_models.make_gpt(), _config())
    start = time.monotonic()
    try:
        if rank == 0:
            zerograph.full_state_dict(model)
        model(*_batch(0)).loss.backward()
        out["one_rank_call"] = "no error"
    except RankMismatchError as exc:
        out["one_rank_call"] = {"key": exc.key, "values": exc.values, "ranks": exc.ranks, "message": str(exc),
                                "s": time.monotonic() - start}

    # matched configs still train like eager PyTorch
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), _config())
    opt = _harness._optimizer(model.parameters())
    out["losses"] = _harness.train_global_batches(model, opt, range(2))
    out["params"] = {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()}

    # compile on rank 0 only: rank 1 goes on with other work (alive: its model's heartbeat moves)
    torch._dynamo.reset()
    start = time.monotonic()
    if rank == 0:
        try:
            zerograph.compile(_models.make_gpt(), _config())
            out["one_rank_compile"] = "no error"
        except RankFailureError as exc:
            out["one_rank_compile"] = {**_failure(exc), "s": time.monotonic() - start}
        open(os.path.join(workdir, "reported"), "w").close()
    else:
        _wait_for(os.path.join(workdir, "reported"), 4 * TIMEOUT_S)
    return out


@pytest.mark.timing  # bounds the lone compile's time to the error on both sides (see above)
@pytest.mark.timeout(150)
def test_ranks_that_disagree_raise_naming_the_rank_and_the_difference(tmp_path):
    results = spawn(_disagreeing_run, 2, str(tmp_path), timeout=140, raise_on_failure=False)
    for rank, res in enumerate(results):
        assert isinstance(res, dict), res
        for name, _, _, _, key in MISMATCHES:
            got = res["mismatch"][name]
            assert isinstance(got, dict), (rank, name, got)
            assert key in got["keys"] and got["ranks"] == [1], (rank, name, got)
            assert got["key"].startswith("config.") or not key.startswith("config."), got  # config named first
            assert set(got["values"]) == {0, 1} and got["values"][0] != got["values"][1], (name, got)
            assert f"rank {rank}: the ranks disagree" in got["message"] and "rank 1 has" in got["message"]
            assert got["s"] < TIMEOUT_S, (name, got["s"])  # agreed before any collective could wait

        skip = res["skip"]
        assert isinstance(skip, dict) and skip["key"] == "position" and skip["ranks"] == [1], (rank, skip)
        assert skip["values"] == {0: "backward of micro-batch 2 (optimizer step 2)",
                                  1: "forward of micro-batch 3 (optimizer step 2)"}, skip["values"]
        assert "restart every rank from the last checkpoint" in skip["message"]

        call = res["one_rank_call"]
        assert isinstance(call, dict) and call["key"] == "position" and call["ranks"] == [1], (rank, call)
        assert call["values"][0].startswith("zerograph.full_state_dict"), call["values"]
        assert call["values"][1].startswith("forward of micro-batch 1"), call["values"]

    # rank 0 alone in compile: a RankFailureError from the setup, not a raw gloo timeout
    lone = results[0]["one_rank_compile"]
    assert isinstance(lone, dict) and lone["ranks"] == [] and lone["phase"] == "zerograph.compile/shard", lone
    assert "in zerograph.compile/shard before the first optimizer step, but every rank is alive" in lone["message"]
    assert TIMEOUT_S * 0.9 < lone["s"] < TIMEOUT_S + detection_margin_s(TIMEOUT_S), lone["s"]

    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=2)
    _harness.assert_same_training(results[0], ref_losses, ref_params)


def test_a_rank_without_any_heartbeat_is_named_as_never_having_compiled():
    """A rank whose heartbeat counter never moved (it runs no zerograph
    model: it skipped zerograph.compile) is named with that cause."""
    from types import SimpleNamespace

    from zerograph.runtime.errors import explain_collective_failure

    monitor = SimpleNamespace(unresponsive=lambda: {1: "never started"}, interval=0.25)
    err = explain_collective_failure(RuntimeError("[gloo] Timed out waiting 5000ms"), monitor, step=1,
                                     phase="zerograph.compile/shard", timeout_s=5, rank=0)
    assert err.ranks == [1] and "never reached zerograph.compile/shard" in str(err), str(err)


# -- small things --------------------------------------------------------------------

def test_float_token_ids_get_dtype_advice():
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), {})
    idx, targets = _models.global_batch(0, 4)
    with pytest.raises(zerograph.TraceError) as info:
        model(idx.float(), targets)
    text = str(info.value)
    assert "wrong dtype" in text and "torch.long" in text and "register_fake" not in text, text
    torch._dynamo.reset()


@pytest.mark.parametrize("section, key, value, text", [
    ("zerograph", "collective_timeout_s", 1e300, "got 1e+300; must be between 1 and 604800 seconds"),
    ("zerograph", "collective_timeout_s", 1e-9, "got 1e-09; must be between 1 and 604800 seconds"),
    ("zero_optimization", "reduce_bucket_size", -5, "got -5; must be between 0 and 9223372036854775807"),
    ("zero_optimization", "allgather_bucket_size", 1e30, "must be between 0 and 9223372036854775807"),
    ("zerograph", "memory_limit_bytes", 1e30, "must be between 0 and 9223372036854775807"),
])
def test_config_values_outside_their_range_name_the_range(section, key, value, text):
    with pytest.raises(zerograph.ConfigError) as info:
        zerograph.Config.load({section: {key: value}})
    assert f"{section}.{key}: " in str(info.value) and text in str(info.value), str(info.value)

"""Checkpoints of tensor-parallel models: stored whole, so a checkpoint saved
at tp=2 loads at tp=1 and back, and at tp=2 x dp=2 (ZeRO), and training
continues like an uninterrupted single-process eager run (fp32, rtol 1e-5).
Real gloo ranks from the rank pool; the box arithmetic on its own below."""

from __future__ import annotations

import pytest
import torch

import zerograph
from tests import _harness, _models, _pool
from zerograph.checkpoint.tp import whole_boxes
from zerograph.runtime.launch import spawn
from zerograph.runtime.tp_layout import TpLayout

SAVE_AT, END = 3, 5
ROWS = _harness.PER_RANK_BATCH  # the global batch: the same rows at every layout


def _config(stage: int, tp: int) -> dict:
    config = {"zero_optimization": {"stage": stage}}
    if tp > 1:
        config["tensor_parallel"] = {"autotp_size": tp}
    return config


def _train(model, opt, steps, rows) -> list[float]:
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    losses = []
    for step in steps:
        idx, targets = _models.global_batch(step, ROWS)
        loss = model(idx[rows], targets[rows]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
        losses.append(mean.item() / world)
    return losses


def tp_checkpoint_run(model_name: str, config: dict, path: str, phase: str, load_from: str | None = None):
    """phase "save": steps [0, SAVE_AT) then save to ``path``; "resume": load
    ``path`` then steps [SAVE_AT, END). Returns (losses, full parameters,
    this rank's local parameter shapes)."""
    torch._dynamo.reset()
    idx, targets = _models.global_batch(0, ROWS)
    model = _models.MODELS[model_name]()
    if "tensor_parallel" in config:
        model = zerograph.compile(model, config, example_batch=(idx, targets))
    else:  # the side without tensor parallelism runs eagerly (no compile: cheaper)
        model = zerograph.shard(model, config)
    rows = zerograph.batch_rows(model, ROWS)
    opt = _harness._optimizer(model.parameters())
    if phase == "save":
        losses = _train(model, opt, range(SAVE_AT), rows)
        zerograph.save_checkpoint(path, model, opt, step=SAVE_AT)
    else:
        assert zerograph.load_checkpoint(path, model, opt) == {"step": SAVE_AT}
        losses = _train(model, opt, range(SAVE_AT, END), rows)
    full = {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()}
    return losses, full, {n: _harness.tp_local_shape(p) for n, p in model.named_parameters()}


def _assert_continues(result, ref_losses, ref_params, what):
    losses, params, _ = result
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{what}: losses: {m}")
    assert params.keys() == ref_params.keys()
    for key, ref in ref_params.items():
        torch.testing.assert_close(params[key], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {key}: {m}")


@pytest.mark.timeout(_harness.TIMEOUT + 30)
def test_tp2_checkpoint_loads_at_tp1_and_back(tmp_path):
    """Saved at tp=2 (world 2, ZeRO-3) after 3 steps, loaded by one process
    without tensor parallelism (ZeRO-0), 2 more steps: the losses and the
    whole parameters of an uninterrupted eager run. Then the other way: a
    tp=1 checkpoint loads at tp=2 and continues the same."""
    ref_losses, ref_params = _harness.reference_run("gpt", 1, steps=END)
    tp2 = str(tmp_path / "tp2")
    saved = _pool.run(tp_checkpoint_run, 2, "gpt", _config(3, 2), tp2, "save", timeout=_harness.TIMEOUT)[0]
    torch.testing.assert_close(torch.tensor(saved[0]), torch.tensor(ref_losses[:SAVE_AT]), rtol=1e-5, atol=1e-6)
    assert saved[2]["h.0.attn.qkv.weight"] == (45, 30)  # really split at save time

    resumed = tp_checkpoint_run("gpt", _config(0, 1), tp2, "resume")
    assert resumed[2]["h.0.attn.qkv.weight"] == (90, 30)
    _assert_continues(resumed, ref_losses[SAVE_AT:], ref_params, "tp=2 -> tp=1")

    tp1 = str(tmp_path / "tp1")
    tp_checkpoint_run("gpt", _config(0, 1), tp1, "save")
    back = _pool.run(tp_checkpoint_run, 2, "gpt", _config(3, 2), tp1, "resume", timeout=_harness.TIMEOUT)
    for rank_result in back:
        _assert_continues(rank_result, ref_losses[SAVE_AT:], ref_params, "tp=1 -> tp=2")


@pytest.mark.slow  # world 4 on the 2-core machine
@pytest.mark.timeout(2 * _harness.TIMEOUT + 30)
def test_tp2_dp2_zero3_checkpoint_loads_at_tp2_and_at_tp1(tmp_path):
    """tp=2 x dp=2 (ZeRO-3: the split parameters are DTensor rows of the tp
    slices) saves; tp=2 x dp=1 (ZeRO-1) and one process load it and go on
    like the eager run; and a tp=2 checkpoint loads at tp=2 x dp=2."""
    # world 4 on fresh processes (spawn): a pool rank that built a (dp=2, tp=2) mesh in an earlier call can
    # find torch's device-mesh cache pointing at that call's destroyed groups
    ref_losses, ref_params = _harness.reference_run("gpt", 1, steps=END)
    path = str(tmp_path / "tp2dp2")
    spawn(tp_checkpoint_run, 4, "gpt", _config(3, 2), path, "save", timeout=_harness.TIMEOUT)
    result = _pool.run(tp_checkpoint_run, 2, "gpt", _config(1, 2), path, "resume", timeout=_harness.TIMEOUT)[0]
    _assert_continues(result, ref_losses[SAVE_AT:], ref_params, "tp2 x dp2 -> tp2")
    _assert_continues(tp_checkpoint_run("gpt", _config(0, 1), path, "resume"), ref_losses[SAVE_AT:], ref_params,
                      "tp2 x dp2 -> tp1")
    path = str(tmp_path / "tp2")
    _pool.run(tp_checkpoint_run, 2, "gpt", _config(0, 2), path, "save", timeout=_harness.TIMEOUT)
    result = spawn(tp_checkpoint_run, 4, "gpt", _config(3, 2), path, "resume", timeout=_harness.TIMEOUT)[0]
    _assert_continues(result, ref_losses[SAVE_AT:], ref_params, "tp2 -> tp2 x dp2")


@pytest.mark.parametrize("dim, parts", [(0, (6, 6, 6)), (1, (8,)), (1, (4, 2, 2)), (0, (12, 4, 4))])
def test_boxes_of_every_tp_and_zero_rank_cover_the_whole_tensor_once(dim, parts):
    """Every (tp index, ZeRO row block) of a split weight names its boxes of
    the whole tensor: together they hold each element exactly once, with its
    value."""
    shape = [10, 10]
    shape[dim] = sum(parts)
    whole = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
    for dp in (1, 2, 3):
        seen = torch.zeros(shape)
        rebuilt = torch.full(shape, -1.0)
        for index in range(2):
            layout = TpLayout("column", "m", dim, parts, tuple(shape), 2, index)
            local = layout.local_part(whole)
            row = 0
            for rows in local.chunk(dp, 0):  # ZeRO's Shard(0) of the tp slice
                for at, size, data in whole_boxes(layout, rows, (row, 0)):
                    box = tuple(slice(a, a + s) for a, s in zip(at, size))
                    seen[box] += 1
                    rebuilt[box] = data
                row += rows.shape[0]
        assert torch.equal(seen, torch.ones(shape)), (dim, parts, dp)
        assert torch.equal(rebuilt, whole), (dim, parts, dp)

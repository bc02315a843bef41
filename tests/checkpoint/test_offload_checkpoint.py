"""Checkpoints of ZeRO-Offload runs: ``zerograph.save_checkpoint`` /
``load_checkpoint`` with the host optimizer of ``offload_param`` (stage 3)
and of ``offload_optimizer`` (real gloo ranks, world 2).

Each case trains steps 0-1 and saves; fresh processes build a fresh model and
optimizer, load, and train steps 2-3. The result must equal an uninterrupted
run of steps 0-3 (bit-exact losses and parameters: same processes count, same
graphs, same order of operations) and the single-process eager reference
(fp32 round-off, rtol 1e-5). One case saves with ``offload_param`` and
resumes without any offload (a plain ``torch.optim.AdamW``): the host
optimizer's checkpoint has the plain optimizer's layout; and the world-2
checkpoint continues in one process (resharded)."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

import zerograph
from tests import _harness, _models, _pool
from tests._harness import TIMEOUT
from zerograph.runtime.launch import spawn
from zerograph.runtime.optimizer import HostOptimizer, make_optimizer

SAVE_AT, END = 2, 4
OFFLOAD_PARAM = {"stage": 3, "offload_param": {"device": "cpu"}}
OFFLOAD_OPTIMIZER = {"stage": 3, "offload_optimizer": {"device": "cpu"}}
PLAIN = {"stage": 3}

# checkpoint name: zero section of the saving run
SAVED = {"offload_param": OFFLOAD_PARAM, "offload_optimizer": OFFLOAD_OPTIMIZER}
# (checkpoint name, zero section of the resuming run)
RESUMED = [("offload_param", OFFLOAD_PARAM), ("offload_optimizer", OFFLOAD_OPTIMIZER), ("offload_param", PLAIN)]


def _build(zero, lr=_harness.LR):
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), {"zero_optimization": zero})
    opt = make_optimizer(model, torch.optim.AdamW, lr=lr, eps=_harness.EPS, foreach=False)
    offloaded = "offload_param" in zero or "offload_optimizer" in zero
    assert isinstance(opt, HostOptimizer) == offloaded
    return model, opt


def _params(model):
    return {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()}


def _save_rank(root):
    """Per saved config: the uninterrupted run (steps 0-3), then a run of
    steps 0-1 that saves. Returns {checkpoint name: (losses of steps 0-3,
    parameters after step 3, losses of steps 0-1)}."""
    out = {}
    for name, zero in SAVED.items():
        model, opt = _build(zero)
        straight = _harness.train_global_batches(model, opt, range(END))
        straight_params = _params(model)
        del model, opt
        model, opt = _build(zero)
        first = _harness.train_global_batches(model, opt, range(SAVE_AT))
        zerograph.save_checkpoint(f"{root}/{name}", model, opt, step=SAVE_AT)
        out[name] = (straight, straight_params, first)
    return out


def _resume_rank(root):
    """Per entry of RESUMED: a fresh model and optimizer (the resuming run's
    config, built with another learning rate: the checkpoint's param groups
    replace it) load the checkpoint and train steps 2-3."""
    out = []
    for name, zero in RESUMED:
        model, opt = _build(zero, lr=3 * _harness.LR)
        assert zerograph.load_checkpoint(f"{root}/{name}", model, opt) == {"step": SAVE_AT}
        assert model._zg_runtime.ctx.step == SAVE_AT
        assert [group["lr"] for group in opt.param_groups] == [_harness.LR]
        if isinstance(opt, HostOptimizer):
            # the loaded moments sit in the host optimizer; its masters are the loaded parameters
            state = opt.state[opt.masters[0]]
            assert state["exp_avg"].device.type == "cpu" and not isinstance(state["exp_avg"], DTensor)
            assert int(state["step"]) == SAVE_AT
            for dev, host in zip(opt.device_params, opt.masters):
                assert torch.equal(dev.detach().to_local(), host.detach())
        out.append((_harness.train_global_batches(model, opt, range(SAVE_AT, END)), _params(model)))
    return out


@pytest.mark.timeout(2 * TIMEOUT + 60)
def test_resume_with_host_optimizer_is_exact(tmp_path):
    saved = _pool.run(_save_rank, 2, str(tmp_path), timeout=TIMEOUT)[0]
    resumed = spawn(_resume_rank, 2, str(tmp_path), timeout=TIMEOUT)[0]  # in new processes
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=END)
    for (saved_with, zero), (second, params) in zip(RESUMED, resumed):
        straight, straight_params, first = saved[saved_with]
        name = f"saved with {saved_with}, resumed with {zero}"
        assert first == straight[:SAVE_AT], name
        if zero == SAVED[saved_with]:
            # the same config before and after: bit-exact
            assert first + second == straight, name
            for key, ref in straight_params.items():
                assert torch.equal(params[key], ref), f"{name}: {key}"
        try:
            _harness.assert_same_training({"losses": first + second, "params": params}, ref_losses, ref_params)
            _harness.assert_same_training({"losses": straight, "params": straight_params}, ref_losses, ref_params)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err

    # Resharding: the world-2 offload_param checkpoint continues in this single
    # process with offload_optimizer (its host optimizer holds unsharded states)
    model, opt = _build(OFFLOAD_OPTIMIZER)
    assert zerograph.load_checkpoint(f"{tmp_path}/offload_param", model, opt) == {"step": SAVE_AT}
    losses = _harness.train_global_batches(model, opt, range(SAVE_AT, END))
    _harness.assert_same_training({"losses": saved["offload_param"][2] + losses, "params": _params(model)},
                                  ref_losses, ref_params)


def test_host_master_follows_weights_loaded_after_it_was_built():
    """A copied master (offload_optimizer) whose parameter is overwritten
    after the optimizer was built (here by ``load_full_state_dict``) is
    refreshed before the next step: the step starts from the loaded weights,
    as with an optimizer built after the load (world 1)."""
    config = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    loaded = {k: v + 0.01 for k, v in zerograph.full_state_dict(_models.make_gpt()).items()}
    idx, targets = _models.global_batch(0, _harness.PER_RANK_BATCH)
    params = []
    for build_first in (True, False):
        model = zerograph.compile(_models.make_gpt(), config)
        if build_first:
            opt = make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)
            assert isinstance(opt, HostOptimizer) and not any(opt.resident)
        zerograph.load_full_state_dict(model, loaded)
        if not build_first:
            opt = make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)
        _harness.step_mean_loss(model(idx, targets).loss, opt)
        params.append(_params(model))
    for key, value in params[1].items():
        assert torch.equal(params[0][key], value), key
        assert not torch.equal(value, loaded[key]), key  # the step changed it

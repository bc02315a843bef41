"""zerograph.make_optimizer without offload: a ShardOptimizer that steps the
local shards as plain tensors. Same arithmetic on the same elements as the
optimizer over the DTensor parameters, so training is bitwise equal to it,
and equal to the single-process eager reference."""

from __future__ import annotations

import functools
import logging

import pytest
import torch

import zerograph
from tests import _harness, _models
from tests._harness import TIMEOUT
from zerograph.runtime.optimizer import ShardOptimizer, make_optimizer


OPTIMIZERS = {
    "adamw": (torch.optim.AdamW, dict(lr=_harness.LR, eps=_harness.EPS, foreach=False)),
    "adamw_foreach": (torch.optim.AdamW, dict(lr=_harness.LR, eps=_harness.EPS, foreach=True)),
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
}


def _build_optimizer(optimizer, builder, model):
    cls, kwargs = OPTIMIZERS[optimizer]
    if builder == "make_optimizer":
        opt = make_optimizer(model, cls, **kwargs)
        assert isinstance(opt, ShardOptimizer) and isinstance(opt.optimizer, cls)
        # every master shares its parameter's shard: no second copy, no copies per step
        assert all(m.data_ptr() == p.to_local().data_ptr() for m, p in zip(opt.masters, opt.device_params))
        return opt
    return cls(model.parameters(), **kwargs)


def _states(model, opt):
    return {"states": sum(1 for _ in opt.state.values())}


def _train(stage, optimizer, builder, steps=3):
    return _harness.train("gpt", {"zero_optimization": {"stage": stage}}, steps, 2,
                          optimizer=functools.partial(_build_optimizer, optimizer, builder), report=_states)


@pytest.mark.timeout(2 * TIMEOUT + 30)
@pytest.mark.parametrize("stage,optimizer", [(3, "adamw"), (3, "sgd"), (1, "adamw_foreach")])
def test_shard_optimizer_equals_the_optimizer_over_dtensors(stage, optimizer):
    shard = _train(stage, optimizer, "make_optimizer")
    plain = _train(stage, optimizer, "plain")
    for s, p in zip(shard, plain):
        assert s["losses"] == p["losses"]  # bitwise: the same ops on the same elements
        assert s["params"].keys() == p["params"].keys()
        for key in s["params"]:
            assert torch.equal(s["params"][key], p["params"][key]), key
        assert s["states"] == p["states"] > 0
    if optimizer == "adamw":  # and the single-process eager reference
        ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=3)
        _harness.assert_same_training(shard[0], ref_losses, ref_params)


def test_make_optimizer_lr_scheduler_and_zero_grad():
    """Schedulers drive the wrapped optimizer; zero_grad clears the model's gradients."""
    model = zerograph.compile(_models.TinyMLP(), {})
    opt = make_optimizer(model, torch.optim.SGD, lr=0.1)
    assert isinstance(opt, ShardOptimizer) and opt.param_groups is opt.optimizer.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda step: 0.5 ** step)
    before = {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}
    model(torch.randn(2, 4)).backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert any(not torch.equal(before[k], v) for k, v in zerograph.full_state_dict(model).items())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_make_optimizer_keeps_whole_parameter_optimizers_on_dtensors(caplog):
    """An optimizer that reads whole parameters (Adafactor's row and column
    statistics) cannot step shards: make_optimizer builds it over the DTensors,
    and offload, which must step shards, rejects it by name."""
    caplog.set_level(logging.INFO, logger="zerograph")
    model = zerograph.compile(_models.TinyMLP(), {})
    opt = make_optimizer(model, torch.optim.Adafactor, lr=0.01)
    assert type(opt) is torch.optim.Adafactor
    assert any("Adafactor is not element-wise" in r.getMessage() for r in caplog.records)
    offloaded = zerograph.compile(_models.TinyMLP(), {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    with pytest.raises(ValueError, match=r"Adafactor cannot step parameter shards on their own: only the element-wise"):
        make_optimizer(offloaded, torch.optim.Adafactor, lr=0.01)
    with pytest.raises(ValueError, match="zerograph.compile"):
        make_optimizer(_models.TinyMLP(), torch.optim.SGD, lr=0.1)

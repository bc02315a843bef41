"""zerograph.runtime.ds_optim: the torch optimizer and LR schedule of a config's
DeepSpeed ``optimizer`` and ``scheduler`` sections, checked against
hand-written torch optimizers and schedules (DeepSpeed's formulas written out)."""

from __future__ import annotations

import math

import pytest
import torch

import zerograph
from tests import _models
from zerograph.config import Config, ConfigError
from zerograph.runtime.ds_optim import build_optimizer, build_scheduler, optimizer_class_and_kwargs
from zerograph.runtime.optimizer import ShardOptimizer


def _sgd(lr=0.5):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(optimizer, scheduler, steps):
    """The learning rate each of ``steps`` optimizer steps uses (the scheduler steps after each)."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _schedule(kind, steps, optimizer=None, **params):
    optimizer = optimizer or _sgd()
    sched = build_scheduler(optimizer, {"scheduler": {"type": kind, "params": params}})
    return _lrs(optimizer, sched, steps)


def _reference(lr_of_iteration, steps, base=0.5):
    """A hand-written torch LambdaLR: DeepSpeed's lr as a function of its
    last_batch_iteration, which is torch's last_epoch minus one."""
    opt = _sgd(base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: lr_of_iteration(epoch - 1) / base)
    return _lrs(opt, sched, steps)


# -- schedules ---------------------------------------------------------------------


def test_warmup_lr_linear_by_hand():
    # DeepSpeed's first two optimizer steps both run at warmup_min_lr (iterations -1 and 0)
    lrs = _schedule("WarmupLR", 8, warmup_min_lr=0.1, warmup_max_lr=0.5, warmup_num_steps=4, warmup_type="linear")
    assert lrs == pytest.approx([0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5])


def test_warmup_lr_log_defaults_to_the_optimizer_lr():
    lrs = _schedule("warmuplr", 30, warmup_num_steps=10)  # any case; warmup_max_lr: the optimizer's 0.5
    ref = _reference(lambda it: 0.0 if it < 0 else 0.5 * (math.log(it + 1) / math.log(10) if it < 10 else 1.0), 30)
    assert lrs == pytest.approx(ref)


def test_warmup_decay_lr_by_hand():
    lrs = _schedule("WarmupDecayLR", 11, warmup_min_lr=0.0, warmup_max_lr=1.0, warmup_num_steps=3,
                    warmup_type="linear", total_num_steps=7)
    assert lrs == pytest.approx([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0, 0.0])


def test_warmup_cosine_lr_against_hand_written_schedule():
    def lr(it, base=0.5, n=5, total=20, floor=0.01):
        if it < 0:
            return 0.0
        if it < n:
            return base * (0.1 + 0.9 * math.log(it + 1) / math.log(n))
        progress = min(1.0, (it - n + 1) / (total - n))
        return base * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)

    lrs = _schedule("WarmupCosineLR", 25, warmup_num_steps=5, total_num_steps=20, warmup_min_ratio=0.1,
                    cos_min_ratio=0.01)
    assert lrs == pytest.approx(_reference(lr, 25))


def test_one_cycle_lr_by_hand():
    lrs = _schedule("OneCycle", 7, cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=2,
                    decay_step_size=1, decay_lr_rate=0.5)
    # up over 2 steps, down over 2, then cycle_min_lr / (1 + 0.5 * k)
    assert lrs == pytest.approx([0.1, 0.55, 1.0, 0.55, 0.1, 0.1 / 1.5, 0.1 / 2.0])


def test_one_cycle_cycles_beta1_like_deepspeed():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=0.5)
    sched = build_scheduler(opt, {"scheduler": {"type": "OneCycle", "params": {
        "cycle_min_lr": 0.1, "cycle_max_lr": 1.0, "cycle_first_step_size": 2, "cycle_min_mom": 0.8,
        "cycle_max_mom": 0.9}}})
    betas = []
    for _ in range(5):
        betas.append(opt.param_groups[0]["betas"])
        opt.step()
        sched.step()
    expected = [0.8, 0.85, 0.8, 0.85, 0.9]  # starts at cycle_min_mom, then inversely to the lr
    assert [b[0] for b in betas] == pytest.approx(expected)
    assert {b[1] for b in betas} == {0.99}


def test_one_cycle_stairs_and_lr_range_test():
    lrs = _schedule("OneCycle", 9, cycle_min_lr=0.0, cycle_max_lr=1.0, cycle_first_step_size=4,
                    cycle_first_stair_count=2)
    assert lrs == pytest.approx([0.0, 0.0, 0.5, 0.5, 1.0, 0.5, 0.5, 0.0, 0.0])
    lrs = _schedule("LRRangeTest", 6, lr_range_test_min_lr=0.1, lr_range_test_step_size=2,
                    lr_range_test_step_rate=1.0, lr_range_test_staircase=True)
    assert lrs == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.3])
    lrs = _schedule("LRRangeTest", 3, lr_range_test_min_lr=0.1, lr_range_test_step_size=2)
    assert lrs == pytest.approx([0.1, 0.15, 0.2])


def test_scheduler_state_dict_round_trip():
    opt = _sgd()
    config = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5, "warmup_type": "linear"}}}
    sched = build_scheduler(opt, config)
    _lrs(opt, sched, 3)
    opt2 = _sgd()
    resumed = build_scheduler(opt2, config)
    opt2.load_state_dict(opt.state_dict())  # the optimizer holds the current lr
    resumed.load_state_dict(sched.state_dict())
    assert _lrs(opt2, resumed, 4) == pytest.approx(_lrs(opt, sched, 4))


def test_total_num_steps_auto():
    config = Config.load({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto",
                                                                             "warmup_num_steps": 2}}})
    assert config.auto_keys == ("scheduler.params.total_num_steps",)
    with pytest.raises(ConfigError, match=r'total_num_steps is "auto": pass build_scheduler\(\.\.\., total_num_steps=N\)'):
        build_scheduler(_sgd(), config)
    opt = _sgd()
    by_argument = _lrs(opt, build_scheduler(opt, config, total_num_steps=6), 8)
    assert by_argument == pytest.approx([0.0, 0.0, 0.001, 0.001, 0.00075, 0.0005, 0.00025, 0.0])
    resolved = config.resolve_auto({"scheduler.params.total_num_steps": 6})
    assert resolved.scheduler.params.total_num_steps == 6 and resolved.auto_keys == ()
    opt = _sgd()
    assert _lrs(opt, build_scheduler(opt, resolved), 8) == by_argument


# -- optimizers --------------------------------------------------------------------


@pytest.mark.parametrize("section,cls,kwargs", [
    ({"type": "Adam", "params": {"lr": 1e-3}}, torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.0}),
    ({"type": "adam", "params": {"lr": 1e-3, "adam_w_mode": False, "betas": [0.8, 0.9], "eps": 1e-6}},
     torch.optim.Adam, {"lr": 1e-3, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.0}),
    ({"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1, "torch_adam": True}}, torch.optim.AdamW,
     {"lr": 3e-4, "weight_decay": 0.1}),
    ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}, torch.optim.SGD,
     {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ({"type": "Adagrad", "params": {"lr": 0.01}}, torch.optim.Adagrad, {"lr": 0.01}),
    ({"type": "RMSprop", "params": {"lr": 0.01, "alpha": 0.9}}, torch.optim.RMSprop, {"lr": 0.01, "alpha": 0.9}),
])
def test_optimizer_matches_the_hand_built_torch_optimizer(section, cls, kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    twin = torch.nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    built = build_optimizer(model, {"optimizer": section})
    by_hand = cls(twin.parameters(), **kwargs)
    assert type(built) is cls
    defaults = cls(twin.parameters(), **kwargs).defaults
    assert all(built.defaults[k] == defaults[k] for k in defaults)
    for step in range(3):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, built), (twin, by_hand)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_optimizer_defaults_are_deepspeeds():
    cls, kwargs = optimizer_class_and_kwargs(Config.load({"optimizer": {"type": "AdamW"}}).optimizer)
    assert cls is torch.optim.AdamW and kwargs == {"weight_decay": 0.0, "amsgrad": False}  # torch's AdamW: 0.01


def test_build_optimizer_for_a_compiled_model_trains_like_eager():
    """The config carried by a compiled model builds make_optimizer's ShardOptimizer;
    training equals the eager model with the hand-built AdamW and the schedule."""
    config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.1}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3, "warmup_type": "linear",
                                                           "warmup_min_lr": 1e-3}}}
    torch.manual_seed(0)
    eager = _models.TinyMLP()
    torch._dynamo.reset()
    compiled_model = _models.TinyMLP()
    compiled_model.load_state_dict(eager.state_dict())
    model = zerograph.compile(compiled_model, {**config, "zero_optimization": {"stage": 3}})
    opt = build_optimizer(model)
    assert isinstance(opt, ShardOptimizer) and isinstance(opt.optimizer, torch.optim.AdamW)
    sched = build_scheduler(opt, model._zg_runtime.ctx.config)
    ref_opt = torch.optim.AdamW(eager.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = [1e-3, 1e-3, 1e-3 + (1e-2 - 1e-3) / 3, 1e-3 + 2 * (1e-2 - 1e-3) / 3]  # DeepSpeed's first steps
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda e: warmup[e] / 1e-2 if e < len(warmup) else 1.0)
    for step in range(5):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        losses = []
        for m, o, s in ((model, opt, sched), (eager, ref_opt, ref_sched)):
            loss = m(x)
            losses.append(float(loss.detach()))
            loss.backward()
            o.step()
            o.zero_grad()
            s.step()
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    full = zerograph.full_state_dict(model)
    for name, ref in eager.state_dict().items():
        torch.testing.assert_close(full[name], ref, rtol=1e-5, atol=1e-6)


def test_build_without_sections_says_what_to_add():
    with pytest.raises(ConfigError, match="no 'optimizer' section"):
        build_optimizer(torch.nn.Linear(2, 2), {})
    with pytest.raises(ConfigError, match="no 'scheduler' section"):
        build_scheduler(_sgd(), {})
    with pytest.raises(ConfigError, match="pass the config"):
        build_optimizer(torch.nn.Linear(2, 2))

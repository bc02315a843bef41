"""`zerograph.memory_limit_bytes` and out-of-memory errors name the budget to change."""

from __future__ import annotations

import pytest
import torch

import zerograph
from tests import _harness, _models
from zerograph.planner.step_plan import plan_in_step
from zerograph.runtime.memory import check_region, model_state_bytes


def _train(config: dict, steps: int = 2):
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), config)
    opt = _harness._optimizer(model.parameters())
    losses = []
    for step in range(steps):
        idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH)
        losses.append(_harness.step_mean_loss(model(idx, targets).loss, opt))
    return model, losses


def _predicted_total(model) -> int:
    plan = zerograph.inspect(model).memory
    states, _, _ = model_state_bytes(model._zg_runtime.ctx)
    return sum(states.values()) + plan.regions[0].peak_total


def test_limit_is_checked_against_the_plan_exactly():
    base = {"zero_optimization": {"stage": 3}}
    model, losses = _train(base)
    total = _predicted_total(model)
    assert total > 0

    # exactly the predicted total fits, and training is unchanged by the check
    _, fitted = _train({**base, "zerograph": {"memory_limit_bytes": total}})
    assert fitted == losses

    # one byte less does not: the error comes before the first backward runs
    with pytest.raises(zerograph.MemoryBudgetError) as info:
        _train({**base, "zerograph": {"memory_limit_bytes": total - 1}}, steps=1)
    message = str(info.value)
    assert "> zerograph.memory_limit_bytes" in message
    assert "<- largest" in message
    assert "To fit, change:" in message
    assert "zerograph.explain" in message


def _broken(config: dict, x: torch.Tensor, steps: int = 1):
    """``BrokenBlocks`` in two regions (a graph break between its groups):
    region 0 saves three 1024x64 ``tanh`` outputs for its backward, which it
    holds while region 1 runs forward and backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = zerograph.compile(_models.BrokenBlocks([8, 64, 64, 64], [64, 64, 4]), config)
    opt = _harness._optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        losses.append(_harness.step_mean_loss(model(x), opt))
    return model, losses


def test_limit_composes_the_regions_of_graph_breaks():
    base = {"zero_optimization": {"stage": 3}}
    x = torch.randn(1024, 8, generator=torch.Generator().manual_seed(0))
    model, losses = _broken(base, x, steps=2)
    plan = zerograph.inspect(model).memory
    assert plan.order == [0, 1] and len(plan.regions) == 2
    states = sum(model_state_bytes(model._zg_runtime.ctx)[0].values())
    r0, r1 = plan.regions
    per_region = states + max(r0.peak_total, r1.peak_total)  # what the check added before
    composed = states + plan.peak_total_bytes  # what zerograph.explain reports
    # region 1 runs while region 0 holds its saved values: the step's peak is there
    assert plan.in_step(1).peak_total == r1.peak_total + sum(r0.held.values()) == plan.peak_total_bytes
    assert composed > per_region

    # a limit between the two: each region fits on its own, the step does not
    limit = (per_region + composed) // 2
    with pytest.raises(zerograph.MemoryBudgetError) as info:
        _broken({**base, "zerograph": {"memory_limit_bytes": limit}}, x)
    budget = info.value.budget
    assert budget.total == composed  # the composed numbers, equal to the plan's
    assert budget.earlier == (0,) and budget.earlier_held == r0.held
    assert budget.step_peak == r1.peak and budget.step_peak_total == r1.peak_total
    message = str(info.value)
    assert message.startswith("rank 0, region 1: predicted ")
    largest = next(line for line in message.splitlines() if "<- largest" in line).strip()
    assert largest.startswith("saved by earlier regions (0) for their backward"), message
    assert "execution order: forward 0 -> 1, then backward 1 -> 0" in message
    fix = message.split("To fit, change:")[1]
    assert fix.startswith(' activation_checkpointing.policy (now \'none\') to "per_layer" or "memory_budget"; '
                          "or activation_checkpointing.offload_activations to true"), fix

    # the composed total itself fits, and the check changes nothing
    _, fitted = _broken({**base, "zerograph": {"memory_limit_bytes": composed}}, x, steps=2)
    assert fitted == losses

    # with the order unknown (not recorded; a pipeline stage) a region is
    # checked on its own, as before, and the message says so
    ctx = model._zg_runtime.ctx
    alone = plan_in_step(ctx.regions, 1, None, "not recorded by the runtime")
    assert check_region(ctx, alone, limit, 0).total == states + r1.peak_total
    with pytest.raises(zerograph.MemoryBudgetError) as info:
        check_region(ctx, alone, states + r1.peak_total - 1, 0)
    assert "saved by earlier regions" not in str(info.value)
    assert ("execution order unknown (not recorded by the runtime): region 1 checked on its own; what other "
            "regions hold for their backward while it runs is not added (a lower bound)") in str(info.value)


def _advice(config: dict, batch: int) -> tuple[str, str]:
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), config)
    idx, targets = _models.global_batch(0, batch)
    with pytest.raises(zerograph.MemoryBudgetError) as info:
        model(idx, targets).loss.backward()
    message = str(info.value)
    largest = next(line for line in message.splitlines() if "<- largest" in line).strip()
    return largest, message.split("To fit, change:")[1]


def test_the_largest_consumer_decides_the_advice():
    limit = {"memory_limit_bytes": 1}
    # 2 rows: the model states (16 bytes per parameter at stage 0) dominate
    largest, fix = _advice({"zero_optimization": {"stage": 0}, "zerograph": limit}, 2)
    assert largest.startswith("model states"), largest
    assert fix.startswith(" zero_optimization.stage (now 0) higher; or zero_optimization.offload_optimizer.device")
    # 256 rows at stage 3: the saved activations dominate
    largest, fix = _advice({"zero_optimization": {"stage": 3}, "zerograph": limit}, 256)
    assert largest.startswith("saved activations"), largest
    assert fix.startswith(' activation_checkpointing.policy (now \'none\') to "per_layer" or "memory_budget"')
    assert "train_micro_batch_size_per_gpu" in fix


@torch.library.custom_op("zerograph_test::allocate_too_much", mutates_args=())
def _allocate_too_much(x: torch.Tensor) -> torch.Tensor:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")


@_allocate_too_much.register_fake
def _(x):
    return torch.empty_like(x)


_allocate_too_much.register_autograd(lambda ctx, grad: grad)


class _Hungry(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.ops.zerograph_test.allocate_too_much(self.fc(x)).sum()


def test_out_of_memory_in_a_graph_names_the_budgets():
    model = zerograph.compile(_Hungry(), {"zero_optimization": {"stage": 2}})
    with pytest.raises(zerograph.MemoryBudgetError) as info:
        model(torch.randn(4, 8))
    message = str(info.value)
    assert "out of memory (CUDA out of memory. Tried to allocate 80.00 GiB)" in message
    assert "zero_optimization.stage (now 2) higher" in message
    assert "activation_checkpointing.policy (now 'none')" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)

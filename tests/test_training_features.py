"""Gradient accumulation, clipping, mixed precision and graph breaks, each
against a single-process eager reference on real gloo ranks."""

from __future__ import annotations

import pytest
import torch

from tests import _harness, _pool
from tests._harness import TIMEOUT


def _check(model_name, world, configs, *, ref_kwargs=None, rtol=1e-5, atol=1e-6, lr=_harness.LR):
    ref_losses, ref_params = _harness.reference_run(model_name, world, lr=lr, **(ref_kwargs or {}))
    results = _harness.train(model_name, configs, _harness.STEPS, world, lr=lr)
    for config, result in zip(configs, results[0]):
        try:
            _harness.assert_same_training(result, ref_losses, ref_params, rtol=rtol, atol=atol)
        except AssertionError as exc:
            raise AssertionError(f"config {config}: {exc}") from None
    return results[0]


@pytest.mark.timeout(TIMEOUT + 30)
def test_gradient_accumulation_matches_one_big_batch():
    def config(stage, accumulation):
        return {"zero_optimization": {"stage": stage}, "gradient_accumulation_steps": accumulation,
                "train_micro_batch_size_per_gpu": 4 // accumulation, "train_batch_size": 8}

    configs = [config(s, 2) for s in (0, 1, 2, 3)] + [config(s, 1) for s in (0, 1)]
    results = _check("gpt", 2, configs)
    by_config = {(c["zero_optimization"]["stage"], c["gradient_accumulation_steps"]): r
                 for c, r in zip(configs, results)}
    # Stages 0/1 reduce gradients once per optimizer step, however many
    # micro-batches: the same gradient traffic as without accumulation.
    # (Stage 1 stores parameter shards, so each forward still gathers them.)
    def grad_traffic(result):
        return {k: v for k, v in result["comm"].items() if k in ("all_reduce", "reduce_scatter")}

    for stage in (0, 1):
        assert grad_traffic(by_config[stage, 2]) == grad_traffic(by_config[stage, 1]), stage
        assert grad_traffic(by_config[stage, 2]).get("all_reduce", 0) > 0
    # Stages 2/3 keep only gradient shards and reduce every micro-batch.
    assert by_config[3, 2]["comm"]["reduce_scatter"] > 0


@pytest.mark.timeout(TIMEOUT + 30)
def test_gradient_clipping_matches_clip_grad_norm():
    configs = [{"zero_optimization": {"stage": s}, "gradient_clipping": 0.05} for s in (0, 1, 3)]
    _check("gpt", 2, configs, ref_kwargs={"clip": 0.05})


@pytest.mark.timeout(TIMEOUT + 30)
def test_graph_breaks_and_eager_parameters_train_correctly():
    configs = [{"zero_optimization": {"stage": s}} for s in (2, 3)]
    results = _check("breaky", 2, configs)
    assert all(r["regions"] >= 2 for r in results), [r["regions"] for r in results]


@pytest.mark.timeout(TIMEOUT + 30)
def test_bf16_stage3_matches_bf16_eager():
    # bf16 keeps 8 mantissa bits: each rank's partial gradient is rounded to
    # bf16 before the fp32 reduction, where the reference rounds the sum once,
    # so the tolerance is a few bf16 ulps. Adam turns a rounding difference in
    # a tiny gradient into a step difference of up to lr, so lr is 1e-3 here.
    configs = [{"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}]
    _check("gpt", 2, configs, ref_kwargs={"dtype": torch.bfloat16}, rtol=2e-2, atol=2e-3, lr=1e-3)


def _fp16_overflow_run():
    """Start from a loss scale that overflows fp16, check steps are skipped
    (parameters and optimizer untouched) until the scale is small enough."""
    import torch.distributed as dist

    import zerograph
    from tests import _models

    rank, world = dist.get_rank(), dist.get_world_size()
    model = zerograph.compile(
        _models.make_gpt(),
        {"zero_optimization": {"stage": 3},
         "fp16": {"enabled": True, "initial_scale_power": 32, "hysteresis": 1, "loss_scale_window": 1000}},
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}
    scaler = model._zg_runtime.scaler
    scales, skipped, losses = [], [], []
    for step in range(20):
        idx, targets = _models.global_batch(step, 4 * world)
        loss = model(idx.chunk(world)[rank], targets.chunk(world)[rank]).loss
        loss.backward()
        skipped.append(all(p.grad is None for p in model.parameters()))
        opt.step()
        opt.zero_grad()
        scales.append(scaler.scale)
        losses.append(loss.item())
        if step == 0:
            after_first = {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}
            state_after_first = len(opt.state)
    return {"scales": scales, "skipped": skipped, "before": before, "after_first": after_first,
            "state_after_first": state_after_first, "final": zerograph.full_state_dict(model), "losses": losses}


@pytest.mark.timeout(TIMEOUT + 30)
def test_fp16_overflow_skips_step_and_lowers_scale():
    results = _pool.run(_fp16_overflow_run, 2, timeout=TIMEOUT)
    r = results[0]
    assert r["skipped"][0], "a 2**32 loss scale must overflow fp16 on the first step"
    assert r["state_after_first"] == 0, "the optimizer must not step on an overflow"
    for key in r["before"]:
        assert torch.equal(r["before"][key], r["after_first"][key]), key
    # the scale halves on every overflow, then stays once gradients are finite
    n_skipped = sum(r["skipped"])
    assert r["skipped"] == [True] * n_skipped + [False] * (20 - n_skipped)
    assert r["scales"][:n_skipped] == [2.0 ** (31 - i) for i in range(n_skipped)]
    assert n_skipped < 20 and r["scales"][-1] == r["scales"][n_skipped - 1]
    assert any(not torch.equal(r["before"][k], r["final"][k]) for k in r["before"]), "training must resume"
    assert results[1]["skipped"] == r["skipped"], "all ranks agree on skipping"


def _nonfinite_run(mode, precision="fp32"):
    """Stage 3: rank 1's loss turns nan at step 3 (index 2). Returns the
    error text, whether step 3 left the parameters unchanged and (fp16) the
    loss scale before and after it."""
    import torch.distributed as dist

    import zerograph
    from tests import _models

    rank, world = dist.get_rank(), dist.get_world_size()
    config = {"zero_optimization": {"stage": 3}, "zerograph": {"nonfinite_grads": mode}}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":  # hysteresis 1: the first overflow lowers the scale
        config["fp16"] = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1}
    model = zerograph.compile(_models.make_gpt(), config)
    scaler = model._zg_runtime.scaler
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = {"error": None, "skipped_unchanged": None, "scales": None}
    for step in range(4):
        idx, targets = _models.global_batch(step, 4 * world)
        loss = model(idx.chunk(world)[rank], targets.chunk(world)[rank]).loss
        if step == 2 and rank == 1:
            loss = loss * float("nan")
        before = {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}
        scale_before = scaler.scale if scaler is not None else None
        try:
            loss.backward()
        except FloatingPointError as exc:
            out["error"] = str(exc)
            return out
        opt.step()
        opt.zero_grad()
        if step == 2:
            after = zerograph.full_state_dict(model)
            out["skipped_unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
            out["scales"] = (scale_before, scaler.scale) if scaler is not None else None
    out["finite_at_end"] = all(torch.isfinite(v).all().item() for v in zerograph.full_state_dict(model).values())
    return out


@pytest.mark.timeout(2 * TIMEOUT + 30)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_gradients_raise_with_step_or_skip(precision):
    raised = _pool.run(_nonfinite_run, 2, "raise", precision, timeout=TIMEOUT)
    for rank_result in raised:
        assert rank_result["error"] is not None
        assert "optimizer step 3" in rank_result["error"] and "nonfinite_grads" in rank_result["error"]
    skipped = _pool.run(_nonfinite_run, 2, "skip", precision, timeout=TIMEOUT)
    for rank_result in skipped:
        assert rank_result["error"] is None
        assert rank_result["skipped_unchanged"] is True
        assert rank_result["finite_at_end"] is True


def _huge_finite_run():
    """Gradients of 1e38 per element: each is finite, their fp32 sum is inf."""
    import torch.distributed as dist

    import zerograph

    torch.manual_seed(0)
    model = zerograph.compile(torch.nn.Linear(8, 8, bias=False), {"zero_optimization": {"stage": 3}})
    opt = torch.optim.SGD(model.parameters(), lr=1e-38)
    before = zerograph.full_state_dict(model)["weight"].clone()
    x = torch.ones(4, 8) * (dist.get_rank() + 1)
    (model(x) * 1e38 / 12).sum().backward()  # every weight gradient: 4 * (1 + 2) / 2 * 1e38 / 12 = 0.5e38
    opt.step()
    after = zerograph.full_state_dict(model)["weight"]
    return {"change": (before - after).tolist()}


@pytest.mark.timeout(TIMEOUT + 30)
def test_huge_finite_gradients_are_not_reported_nonfinite():
    # the fast check sums each gradient; a sum that overflows falls back to the element-wise check
    for rank_result in _pool.run(_huge_finite_run, 2, timeout=TIMEOUT):
        change = torch.tensor(rank_result["change"])
        torch.testing.assert_close(change, torch.full((8, 8), 0.5), rtol=1e-5, atol=0)


@pytest.mark.timeout(TIMEOUT + 30)
def test_fp16_nan_skips_the_step_and_lowers_the_scale_even_with_raise():
    # fp16 treats nan like an overflow whatever zerograph.nonfinite_grads says.
    for rank_result in _pool.run(_nonfinite_run, 2, "raise", "fp16", timeout=TIMEOUT):
        assert rank_result["error"] is None
        assert rank_result["skipped_unchanged"] is True
        assert rank_result["scales"] == (256.0, 128.0), rank_result["scales"]
        assert rank_result["finite_at_end"] is True


@pytest.mark.timeout(TIMEOUT + 30)
def test_inductor_compiler_matches_eager():
    # Inductor fuses and reorders float arithmetic (e.g. in the layer norms and
    # AdamW-visible gradients), so fp32 agreement is to a few ulps, not bitwise.
    configs = [{"zero_optimization": {"stage": 3}, "zerograph": {"compiler": "inductor"}}]
    _check("gpt", 2, configs, rtol=1e-5, atol=1e-5)


class _TwoHeads(torch.nn.Module):
    """Micro-batch 0 of a step reads head ``a``, micro-batch 1 head ``b``: at
    the accumulation boundary ``a``'s stashed gradients are flushed. The heads
    have 97 rows, which 2 ranks shard unevenly (49 + 48)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(97, 16)
        self.a = torch.nn.Linear(16, 97)
        self.b = torch.nn.Linear(16, 97)

    def forward(self, idx, targets, head: str):
        logits = (self.a if head == "a" else self.b)(self.emb(idx))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _two_heads_run(steps):
    import torch.distributed as dist

    import zerograph
    from tests import _models

    rank, world = dist.get_rank(), dist.get_world_size()
    model = zerograph.compile(_TwoHeads(), {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 2})
    opt = _harness._optimizer(model.parameters())
    for step in range(steps):
        idx, targets = _models.global_batch(step, 4 * world)
        for head, micro_idx, micro_t in zip("ab", idx.chunk(world)[rank].chunk(2), targets.chunk(world)[rank].chunk(2)):
            model(micro_idx, micro_t, head).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}


@pytest.mark.timeout(TIMEOUT + 30)
def test_accumulation_flushes_unevenly_sharded_gradients_of_parameters_the_last_micro_batch_skips():
    from tests import _models

    params = _pool.run(_two_heads_run, 2, 2, timeout=TIMEOUT)[0]
    model = _TwoHeads()
    opt = _harness._optimizer(model.parameters())
    for step in range(2):
        idx, targets = _models.global_batch(step, 8)
        for rank_idx, rank_t in zip(idx.chunk(2), targets.chunk(2)):
            for head, micro_idx, micro_t in zip("ab", rank_idx.chunk(2), rank_t.chunk(2)):
                (model(micro_idx, micro_t, head) / 4).backward()
        opt.step()
        opt.zero_grad()
    for key, ref in model.state_dict().items():
        torch.testing.assert_close(params[key], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")

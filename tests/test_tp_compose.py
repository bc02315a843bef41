"""Tensor parallelism composed with the features that existed before it:
activation recompute policies, gradient accumulation, bf16/fp16 and the
fusion passes. Each case trains tp=2 (world 2, one tp group: both ranks read
the whole global batch) on the rank pool against single-process eager
(tests/_harness.py) and compares every step's loss and every full parameter:
fp32 at rtol 1e-5; bf16/fp16 at the tolerances tests/test_properties.py
derives (eager computes in the same dtype, with fp32 masters and the same
fp16 loss scale).
"""

from __future__ import annotations

import gc

import pytest
import torch

import zerograph
from tests import _harness, _models, _pool
from tests.test_properties import FP16_SCALE_POWER, TOLERANCES

TP = 2
LAYERS = 2  # _models' GPT


def _config(stage: int = 3, **extra) -> dict:
    return {"zero_optimization": {"stage": stage}, "tensor_parallel": {"autotp_size": TP},
            "zerograph": {"verify_graphs": True, **extra.pop("zerograph", {})}, **extra}


def compose_run(model_name: str, config: dict, lr: float, loss_scale: float = 1.0):
    """On each rank: train a fresh model for ``_harness.STEPS`` steps on the
    rows of its data-parallel index, in ``gradient_accumulation_steps``
    micro-batches (the loss times ``loss_scale`` for fp16's static scale)."""
    import torch.distributed as dist

    torch._dynamo.reset()
    world = dist.get_world_size()
    dp = world // TP
    rows = _harness.PER_RANK_BATCH * dp
    accumulation = config.get("gradient_accumulation_steps", 1)
    idx, targets = _models.global_batch(0, rows)
    model = zerograph.compile(_models.MODELS[model_name](), config, example_batch=(idx[:1], targets[:1]))
    mine = zerograph.batch_rows(model, rows)
    opt = _harness._optimizer(model.parameters(), lr)
    losses = []
    for step in range(_harness.STEPS):
        idx, targets = _models.global_batch(step, rows)
        total = 0.0
        for micro_idx, micro_t in zip(idx[mine].chunk(accumulation), targets[mine].chunk(accumulation)):
            loss = _models.loss_of(model_name, model, micro_idx, micro_t)
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            total += loss.detach().float().item() / accumulation
        opt.step()
        opt.zero_grad()
        mean = torch.tensor(total)
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    info = zerograph.inspect(model)
    fused: dict[str, int] = {}
    for record in info.passes:  # only the fusion passes count matches
        for pattern, count in record.counts.items():
            fused[pattern] = fused.get(pattern, 0) + count
    scaler = model._zg_runtime.scaler
    result = {
        "losses": losses,
        "params": {k: v.detach().float().clone() for k, v in zerograph.full_state_dict(model).items()},
        "comm_by_phase": _harness._comm_by_phase(info),
        "fused": fused,
        "recomputed": sum(r.details.get("recompute", 0) for r in info.passes if r.name == "activation_checkpointing"),
        "skipped_steps": scaler.skipped_steps if scaler is not None else 0,
    }
    del model, opt
    gc.collect()
    return result


def _run(config: dict, lr: float = _harness.LR, loss_scale: float = 1.0, model_name: str = "gpt"):
    results = _pool.run(compose_run, TP, model_name, config, lr, loss_scale, timeout=_harness.TIMEOUT)
    _harness.assert_ranks_agree(results)  # the ranks of one tp group end with the same full parameters
    return results[0]


def _tp_all_reduce(result, phase: str) -> int:
    return result["comm_by_phase"].get(phase, {}).get("tp_all_reduce", 0)


@pytest.mark.timeout(_harness.TIMEOUT + 30)
@pytest.mark.parametrize("policy", ["per_layer", "selective"])
def test_tp2_recompute_policies_match_eager_and_repeat_no_tp_all_reduce(policy):
    """Activation recompute under tp: the backward recomputes layers but never
    a tp all-reduce (its result is saved instead), so the backward moves
    exactly Megatron's two all-reduces of b*s*h per layer, as without
    recompute, and the forward its two."""
    result = _run(_config(3, activation_checkpointing={"policy": policy}))
    ref_losses, ref_params = _harness.reference_run("gpt", 1)
    _harness.assert_same_training(result, ref_losses, ref_params)
    assert result["recomputed"] > 0  # the policy did recompute something
    b, s, h = _harness.PER_RANK_BATCH, _models.SEQ, _models.MODELS["gpt"]().config.n_embd
    per_phase = 2 * LAYERS * b * s * h * 4
    assert _tp_all_reduce(result, "forward") == per_phase
    assert _tp_all_reduce(result, "backward") == per_phase, result["comm_by_phase"]


@pytest.mark.timeout(_harness.TIMEOUT + 30)
def test_tp2_gradient_accumulation_matches_eager():
    """Two micro-batches per step at ZeRO-2 (gradients reduced once, at the
    boundary) equal eager on the whole batch: the micro-batches are equal in
    size, so the mean of their mean losses is the batch's mean loss."""
    result = _run(_config(2, gradient_accumulation_steps=2))
    ref_losses, ref_params = _harness.reference_run("gpt", 1)
    _harness.assert_same_training(result, ref_losses, ref_params)


@pytest.mark.timeout(_harness.TIMEOUT + 30)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tp2_low_precision_matches_eager_in_that_precision(precision):
    """bf16 and fp16 (static loss scale 2**10, no step skipped) compute in
    that dtype on each rank's slices; eager computes in the same dtype on the
    whole layers, so each row-split product is rounded once per rank before
    the fp32 sum: within tests/test_properties.py's bound for the dtype."""
    dtype, lr, rtol, atol = TOLERANCES[precision]
    scale = 2.0**FP16_SCALE_POWER if precision == "fp16" else 1.0
    section = {"enabled": True, **({"loss_scale": scale} if precision == "fp16" else {})}
    result = _run(_config(3, **{precision: section}), lr=lr)
    assert result["skipped_steps"] == 0
    ref_losses, ref_params = _harness.reference_run("gpt", 1, dtype=dtype, lr=lr)
    _harness.assert_same_training(result, ref_losses, ref_params, rtol=rtol, atol=atol)
    fp32_losses, _ = _harness.reference_run("gpt", 1, lr=lr)
    # the run computed in the low precision: its losses are not the fp32 run's
    assert max(abs(a - b) for a, b in zip(result["losses"], fp32_losses)) > 1e-5


@pytest.mark.timeout(_harness.TIMEOUT + 30)
def test_tp2_with_fusion_matches_eager_on_local_shapes():
    """The fusion passes run after the tp pass, so the fused kernels (their
    pure-torch paths on CPU) see each rank's heads and feature slices."""
    result = _run(_config(3, zerograph={"fusion": True}))
    ref_losses, ref_params = _harness.reference_run("gpt", 1)
    _harness.assert_same_training(result, ref_losses, ref_params)
    # every pattern of this GPT was fused (tests/passes/test_fusion.py counts them without tp)
    assert result["fused"] == {"layer_norm": 5, "sdpa": 2, "gelu": 2, "cross_entropy": 1}, result["fused"]

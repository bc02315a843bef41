"""3D parallelism: pipeline stages x data parallelism (ZeRO) x tensor
parallelism on one (pp, dp, tp) mesh, global rank = (pp_i * dp + dp_i) * tp
+ tp_i (docs/tensor_parallel.md#3d-parallelism-pipeline-x-data-x-tensor).

Real gloo ranks train 5 AdamW steps with ``train_step`` on the same global
batches as single-process eager PyTorch (``tests/_harness.reference_run``),
each rank reading its data-parallel index's rows (``zerograph.batch_rows``);
every step's loss and every full parameter afterwards must match (fp32,
rtol 1e-5).
"""

from __future__ import annotations

import pytest
import torch

import zerograph
from tests import _harness, _models, _pool
from tests._harness import TIMEOUT

GLOBAL_ROWS = 8  # rows per step: _harness.reference_run(model, world=2)


def _batch(name: str, step: int, rows: int):
    idx, targets = _models.global_batch(step, rows)
    return (idx, targets) if name.startswith("gpt") else {"input_ids": idx, "labels": idx}


def _rows(batch, rows: slice):
    if isinstance(batch, tuple):
        return tuple(t[rows] for t in batch)
    return {k: v[rows] for k, v in batch.items()}


def _train(runs: list[tuple[str, dict]], steps: int = _harness.STEPS):
    """On each rank: for each (model, config), train ``steps`` steps with
    ``train_step`` on this rank's rows; the losses, the full parameters, this
    rank's local parameter shapes and the mesh as the plan sees it."""
    import torch.distributed as dist

    out = []
    for name, config in runs:
        torch._dynamo.reset()
        pp, tp = config["pipeline"]["stages"], config["tensor_parallel"]["autotp_size"]
        dp = dist.get_world_size() // (pp * tp)
        dp_index = dist.get_rank() // tp % dp
        per = GLOBAL_ROWS // dp
        example = _rows(_batch(name, 0, GLOBAL_ROWS), slice(dp_index * per, (dp_index + 1) * per))
        model = zerograph.compile(_models.MODELS[name](), config, example_batch=example)
        rows = zerograph.batch_rows(model, GLOBAL_ROWS)
        assert rows == slice(dp_index * per, (dp_index + 1) * per), rows
        opt = _harness._optimizer(model.parameters())
        losses = []
        for step in range(steps):
            losses.append(model.train_step(_rows(_batch(name, step, GLOBAL_ROWS), rows)))
            opt.step()
            opt.zero_grad()
        plan = model._zg_runtime.ctx.plan
        out.append({
            "losses": losses,
            "params": {k: v.float().clone() for k, v in zerograph.full_state_dict(model).items()},
            "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()},
            "mesh": {d: (plan.mesh.size(d), plan.mesh.index(d)) for d in ("pp", "dp", "tp")},
            "grad_norm": model._zg_runtime.ctx.last_grad_norm,
        })
    return out


def _check(results, runs):
    for i, (name, config) in enumerate(runs):
        ref_losses, ref_params = _harness.reference_run(name, 2, clip=config.get("gradient_clipping", 0.0))
        for rank, rank_results in enumerate(results):
            try:
                _harness.assert_same_training(rank_results[i], ref_losses, ref_params)
            except AssertionError as exc:
                raise AssertionError(f"{name} {config}, rank {rank}: {exc}") from None


def _config(stage: int, micro_batches: int = 2, **extra) -> dict:
    return {"pipeline": {"stages": 2, "micro_batches": micro_batches}, "tensor_parallel": {"autotp_size": 2},
            "zero_optimization": {"stage": stage}, **extra}


@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_tp2_matches_eager():
    """pp=2 x tp=2 (world 4) on the nanoGPT model at ZeRO 0 and 3."""
    runs = [("gpt", _config(0)), ("gpt", _config(3))]
    results = _pool.run(_train, 4, runs, timeout=TIMEOUT)
    _check(results, runs)
    for rank, rank_results in enumerate(results):
        stage, tp_index = divmod(rank, 2)
        assert rank_results[0]["mesh"] == {"pp": (2, stage), "dp": (1, 0), "tp": (2, tp_index)}

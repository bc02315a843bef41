"""Inputs whose shapes change between steps: correct training, at most one
recompile (Dynamo's automatic dynamic shapes), and no hang when ranks see
different shapes in the same step (collectives depend on parameters only)."""

from __future__ import annotations

import pytest
import torch

from tests import _harness, _models
from zerograph.runtime.launch import spawn

TIMEOUT = 300
# Sequence length per step; 16 twice, to show the static graph is reused.
LENGTHS = (16, 12, 9, 16, 14)


def _batch(step, rows, length):
    idx, targets = _models.global_batch(step, rows)
    return idx[:, :length].contiguous(), targets[:, :length].contiguous()


def _reference(world):
    model = _models.make_gpt()
    opt = _harness._optimizer(model.parameters())
    losses = []
    for step, length in enumerate(LENGTHS):
        idx, targets = _batch(step, _harness.PER_RANK_BATCH * world, length)
        loss = model(idx, targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _zerograph_run(per_rank_lengths: bool):
    import torch.distributed as dist

    import zerograph

    rank, world = dist.get_rank(), dist.get_world_size()
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), {"zero_optimization": {"stage": 3}})
    opt = _harness._optimizer(model.parameters())
    losses = []
    for step, length in enumerate(LENGTHS):
        if per_rank_lengths:  # rank r sees a different length in the same step
            length = LENGTHS[(step + rank) % len(LENGTHS)]
        idx, targets = _batch(step, _harness.PER_RANK_BATCH * world, length)
        losses.append(_harness.step_mean_loss(model(idx.chunk(world)[rank], targets.chunk(world)[rank]).loss, opt))
    params = {k: v.float().clone() for k, v in zerograph.full_state_dict(model).items()}
    return {"losses": losses, "params": params, "regions": len(zerograph.inspect(model).regions)}


@pytest.mark.timeout(2 * TIMEOUT + 30)
def test_changing_sequence_length_recompiles_once_and_matches_eager():
    ref_losses, ref_params = _reference(2)
    same = spawn(_zerograph_run, 2, False, timeout=TIMEOUT)[0]
    _harness.assert_same_training(same, ref_losses, ref_params)
    assert same["regions"] == 2, same["regions"]  # the static graph, then one dynamic graph
    # Ranks with different lengths in one step: no hang, finite training, and
    # still one recompile on every rank.
    mixed = spawn(_zerograph_run, 2, True, timeout=TIMEOUT)
    for result in mixed:
        assert result["regions"] == 2, result["regions"]
        assert all(torch.isfinite(torch.tensor(result["losses"])))

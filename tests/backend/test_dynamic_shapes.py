"""Inputs whose shapes change between steps: correct training, at most one
recompile (Dynamo's automatic dynamic shapes), and no hang when ranks see
different shapes in the same step (collectives depend on parameters only)."""

from __future__ import annotations

import functools

import pytest
import torch

from tests import _harness, _models
from tests._harness import TIMEOUT

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


def _length_of_step(per_rank_lengths: bool, step: int, rows: int):
    """The global batch of ``step`` at its sequence length; with
    ``per_rank_lengths`` rank r sees a different length in the same step."""
    import torch.distributed as dist

    length = LENGTHS[(step + dist.get_rank()) % len(LENGTHS)] if per_rank_lengths else LENGTHS[step]
    return _batch(step, rows, length)


def _train(per_rank_lengths: bool):
    return _harness.train("gpt", {"zero_optimization": {"stage": 3}}, len(LENGTHS), 2,
                          batch=functools.partial(_length_of_step, per_rank_lengths))


@pytest.mark.timeout(2 * TIMEOUT + 30)
def test_changing_sequence_length_recompiles_once_and_matches_eager():
    ref_losses, ref_params = _reference(2)
    same = _train(False)[0]
    _harness.assert_same_training(same, ref_losses, ref_params)
    assert same["regions"] == 2, same["regions"]  # the static graph, then one dynamic graph
    # Ranks with different lengths in one step: no hang, finite training, and
    # still one recompile on every rank.
    mixed = _train(True)
    for result in mixed:
        assert result["regions"] == 2, result["regions"]
        assert all(torch.isfinite(torch.tensor(result["losses"])))

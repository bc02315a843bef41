"""The ways in: ``zerograph.shard`` run eagerly, ``torch.compile(model,
backend="zerograph")`` found through the entry point, on sharded and plain
models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests import _harness, _models
from zerograph.runtime.launch import spawn

TIMEOUT = 300


def test_backend_registered_through_entry_point_without_import():
    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "fn = lookup_backend('zerograph')\n"
        "assert fn.__module__ == 'zerograph.backend', fn.__module__\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("entry", ["torch_compile", "eager"])
def test_sharded_model_trains_like_eager_via(entry):
    world = 2
    ref_losses, ref_params = _harness.reference_run("gpt", world)
    configs = [{"zero_optimization": {"stage": 3}}]
    results = spawn(_harness.zerograph_run, world, "gpt", configs, _harness.STEPS, _harness.LR, entry, timeout=TIMEOUT)
    result = results[0][0]
    _harness.assert_same_training(result, ref_losses, ref_params)
    if entry == "torch_compile":
        assert result["regions"] >= 1
        assert result["comm_by_phase"]["forward"]["all_gather"] > 0, "collectives must be in the compiled graphs"
    else:
        assert result["regions"] == 0
        assert result["comm"]["all_gather"] > 0 and result["comm"]["reduce_scatter"] > 0


def test_plain_model_with_zerograph_backend_matches_eager():
    torch.manual_seed(0)
    ref = _models.make_gpt()
    model = _models.make_gpt()
    compiled = torch.compile(model, backend="zerograph")
    idx, targets = _models.global_batch(0, 4)
    torch.testing.assert_close(compiled(idx, targets).loss, ref(idx, targets).loss, rtol=1e-6, atol=1e-6)

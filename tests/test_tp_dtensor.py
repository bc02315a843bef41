"""With tensor parallelism every parameter is a DTensor on the ``("dp",
"tp")`` mesh (docs/tensor_parallel.md, "What each rank holds"): its
placements say how tp and ZeRO cut it, ``full_tensor()`` is the user's whole
parameter (a fused qkv that ZeRO cuts along its rows: the tp slices stacked,
documented), torch's own ``clip_grad_norm_`` over ``model.parameters()``
measures the same norm as eager, and a plain torch optimizer steps them.

Real gloo ranks, nanoGPT (fused qkv), 5 AdamW steps against single-process
eager (fp32: rtol 1e-5)."""

from __future__ import annotations

import gc
import math
import re

import pytest
import torch

import zerograph
from tests import _harness, _models, _pool
from zerograph.runtime.state import context_of

TP = 2
STEPS = _harness.STEPS
BIG = 1e9  # clip_grad_norm_'s max_norm: it measures, never clips


def _config(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "tensor_parallel": {"autotp_size": TP},
            "zerograph": {"verify_graphs": True}}


def dtensor_run(stage: int):
    """On each rank: train nanoGPT at tp=2 over the world, measuring the
    gradient norm with torch's ``clip_grad_norm_`` before each step."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(), dist.get_world_size()
    dp = world // TP
    torch._dynamo.reset()
    rows = _harness.PER_RANK_BATCH * dp
    mine = slice((rank // TP) * _harness.PER_RANK_BATCH, (rank // TP + 1) * _harness.PER_RANK_BATCH)
    idx, targets = _models.global_batch(0, rows)
    model = zerograph.compile(_models.MODELS["gpt"](), _config(stage), example_batch=(idx[mine], targets[mine]))
    ctx = context_of(model)
    named = dict(model.named_parameters())
    opt = _harness._optimizer(model.parameters())
    losses, norms, grads, state_bytes = [], [], {}, 0
    for step in range(STEPS):
        idx, targets = _models.global_batch(step, rows)
        loss = _models.loss_of("gpt", model, idx[mine], targets[mine])
        loss.backward()
        if step == 0:
            grads = {n: (type(p.grad).__name__, tuple(p.grad.placements)) for n, p in named.items()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), BIG)
        norms.append(float(norm.full_tensor() if isinstance(norm, DTensor) else norm))
        opt.step()
        if step == 0:
            state_bytes = _harness.model_state_bytes(model, opt)
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    out = {
        "losses": losses,
        "norms": norms,
        "grads": grads,
        "state_bytes": state_bytes,
        "kind": {n: (type(p).__name__, tuple(p.device_mesh.mesh_dim_names) if isinstance(p, DTensor) else None,
                     tuple(p.placements) if isinstance(p, DTensor) else None) for n, p in named.items()},
        "storage": {n: ctx.specs[n].storage for n in named},
        "layouts": {n: ctx.specs[n].tp for n in named},
        "full_tensor": {n: p.detach().full_tensor().clone() for n, p in named.items()},
        "params": {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()},
    }
    del model, opt
    gc.collect()
    return out


def _eager_norms(dp: int) -> list[float]:
    """Eager's total gradient norm (torch's clip_grad_norm_) at each step."""
    model = _harness.build_model("gpt")
    opt = _harness._optimizer(model.parameters())
    norms = []
    for step in range(STEPS):
        idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * dp)
        _harness.model_loss("gpt", model, idx, targets).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), BIG)))
        opt.step()
        opt.zero_grad()
    return norms


def _expected_placements(name: str, sharded: bool):
    """The placements docs/tensor_parallel.md lists for nanoGPT's parameters."""
    from torch.distributed.tensor import Replicate, Shard

    from zerograph._torch_private import strided_shard

    dp = Shard(0) if sharded else Replicate()
    rows_first = strided_shard(0, TP) if sharded else Replicate()  # tp cut the rows first, ZeRO its slice's
    if re.search(r"attn\.qkv\.", name):  # fused [q | k | v], per part: a strided tp split unless ZeRO cuts the rows
        return (rows_first, Shard(0)) if sharded else (dp, strided_shard(0, 3))
    if re.search(r"mlp\.fc\.", name):  # column split
        return rows_first, Shard(0)
    if re.search(r"(attn|mlp)\.proj\.weight", name):  # row split
        return dp, Shard(1)
    return dp, Replicate()


def _check(results, world: int, stage: int):
    dp = world // TP
    ref_losses, ref_params = _harness.reference_run("gpt", dp)
    eager_norms = _eager_norms(dp)
    for result in results:
        _harness.assert_same_training(result, ref_losses, ref_params)
        torch.testing.assert_close(result["norms"], eager_norms, rtol=1e-5, atol=0)
        for name, (kind, mesh, placements) in result["kind"].items():
            sharded = result["storage"][name] == "sharded"
            assert sharded == (stage == 3 and dp > 1), (name, result["storage"][name])
            assert (kind, mesh) == ("DTensor", ("dp", "tp")), name
            assert placements == _expected_placements(name, sharded), (name, placements)
            assert result["grads"][name] == ("DTensor", placements), name
            layout, whole = result["layouts"][name], ref_params[name]
            if "attn.qkv" in name and sharded:  # the tp slices stacked in tp-rank order (documented)
                stacked = torch.cat([layout.local_part(whole, i) for i in range(TP)], layout.dim)
                torch.testing.assert_close(result["full_tensor"][name], stacked, rtol=1e-5, atol=1e-6)
            else:
                torch.testing.assert_close(result["full_tensor"][name], whole, rtol=1e-5, atol=1e-6)


def _split_and_whole_elements() -> tuple[int, int]:
    model = _harness.build_model("gpt")
    split = sum(p.numel() for n, p in model.named_parameters() if re.search(r"attn\.qkv|mlp\.fc|proj\.weight", n))
    return split, sum(p.numel() for p in model.parameters()) - split


@pytest.mark.slow
@pytest.mark.timeout(_harness.TIMEOUT + 30)
def test_tp2_dp2_zero3_parameters_are_2d_dtensors():
    """tp=2 x dp=2 (world 4), ZeRO-3: placements on ("dp", "tp"), full_tensor()
    = eager's parameter after 5 AdamW steps, torch's clip_grad_norm_ = eager's
    norm, and model states per rank = 16 bytes x (split / (tp dp) + whole / dp)
    (summed over the ranks: exact; a rank's share differs by ZeRO's uneven rows)."""
    world = 4
    results = _pool.run(dtensor_run, world, 3, timeout=_harness.TIMEOUT)
    _check(results, world, 3)
    split, whole = _split_and_whole_elements()
    scalars = 4 * len(results[0]["kind"])  # AdamW's step per parameter
    total = sum(r["state_bytes"] - scalars for r in results)
    assert total == 16 * (split + TP * whole)
    per_rank = 16 * (split / (TP * (world // TP)) + whole / (world // TP))
    for r in results:
        assert abs(r["state_bytes"] - scalars - per_rank) / per_rank < 0.02


@pytest.mark.timeout(_harness.TIMEOUT + 30)
def test_tp2_zero0_parameters_are_2d_dtensors():
    """tp=2 on world 2 at ZeRO 0: ("dp", "tp") of size (1, 2), Replicate on
    dp, the fused qkv a per-part strided split whose full_tensor() is exact
    (the CI case; world 4 runs nightly)."""
    results = _pool.run(dtensor_run, 2, 0, timeout=_harness.TIMEOUT)
    _check(results, 2, 0)


# (name, whole shape, split dim, fused parts (None: not split), replicas)
CASES = [
    ("unsplit", (5, 3), None, None, 1),
    ("column, uneven ZeRO rows", (10, 3), 0, (10,), 1),
    ("row", (6, 4), 1, (4,), 1),
    ("fused rows", (12, 3), 0, (4, 4, 4), 1),
    ("fused columns (Conv1D c_attn)", (5, 12), 1, (4, 4, 4), 1),
    ("fused, unequal parts", (16, 3), 0, (8, 4, 4), 1),
    ("kv heads on every tp rank", (4, 3), 0, (4,), TP),
]


def placements_run():
    """On each of 4 ranks ((dp, tp) = (2, 2)): every row of the placements
    table, for ZeRO storing shards and storing whole, built from this
    rank's data as the runtime builds it. Returns, per case, whether the
    whole tensor, ``full_tensor()``, the norm and the DCP offsets are right."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    from zerograph.runtime.specs import ParamSpec
    from zerograph.runtime.tp_layout import TpLayout
    from zerograph.runtime.tp_params import (as_dtensor, local_of_whole, placement_for, tp_slice_offsets,
                                             whole_tensor)

    rank = dist.get_rank()
    dp_rank, tp_rank = divmod(rank, TP)
    mesh = DeviceMesh("cpu", torch.arange(4).view(2, TP), mesh_dim_names=("dp", "tp"))
    out = {}
    for name, shape, dim, parts, replicas in CASES:
        whole = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
        layout = None if dim is None else TpLayout("column", name, dim, parts, shape, TP, tp_rank, replicas)
        for storage in ("sharded", "replicated"):
            spec = ParamSpec(name=name, full_shape=layout.local_shape if layout else shape, storage=storage,
                             grad_reduce="reduce_scatter", rank=dp_rank, world_size=2, group_name="",
                             master_dtype=torch.float32, compute_dtype=torch.float32, grad_scale=1.0, tp=layout)
            placement = placement_for(layout, storage == "sharded")
            value = as_dtensor(local_of_whole(whole, spec).clone(), mesh, placement, shape)
            full = value.full_tensor()
            if placement.exact:
                full_ok = torch.equal(full, whole)
            else:  # the tp slices stacked in tp-rank order
                full_ok = torch.equal(full, torch.cat([layout.local_part(whole, i) for i in range(TP)], dim))
            norm = torch.linalg.vector_norm(value).full_tensor()
            tp_slice = layout.local_part(whole) if layout else whole
            at = tp_slice_offsets(value, tuple(tp_slice.shape))[0]
            out[(name, storage)] = {
                "exact": placement.exact,
                "whole": torch.equal(whole_tensor(value, layout, placement), whole),
                "full_tensor": full_ok,
                "norm": torch.allclose(norm, torch.linalg.vector_norm(whole)),
                "offsets": torch.equal(value.to_local(), tp_slice.narrow(0, at, value.to_local().shape[0])),
            }
    return out


@pytest.mark.timeout(_harness.TIMEOUT)
def test_every_row_of_the_placements_table_reassembles_the_whole_tensor():
    """world 4, no model: for each layout and ZeRO storage, the DTensor built
    from a rank's data has the whole tensor, the whole norm and the DCP
    offsets right; ``full_tensor()`` is exact except for the documented
    stacked fused weights."""
    results = _pool.run(placements_run, 4, timeout=_harness.TIMEOUT)
    stacked = {("fused rows", "sharded"), ("fused, unequal parts", "sharded"), ("fused, unequal parts", "replicated")}
    for result in results:
        for key, checks in result.items():
            assert checks["exact"] == (key not in stacked), key
            assert all(v for k, v in checks.items() if k != "exact"), (key, checks)

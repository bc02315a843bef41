"""ZeRO++ (docs/zeropp.md): hpZ, qwZ and qgZ against single-process eager
training and the byte formulas, on real gloo ranks (world 4, nodes of 2),
and the passes' graphs on the fake process group."""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from expecttest import assert_expected_inline

import zerograph
from tests import _harness, _models
from tests._models import TinyMLP
from zerograph.graph.format import format_graph
from zerograph.runtime.launch import spawn

TIMEOUT = 420
WORLD, NODE = 4, 2


def _config(**zero):
    return {"zero_optimization": {"stage": 3, **zero}, "zerograph": {"verify_graphs": True}}


def _rows_padded(rows: int, ranks: int) -> int:
    return -(-rows // ranks) * ranks


def _regathered(model) -> dict[str, torch.nn.Parameter]:
    """The parameters stage 3 gathers again in the backward: all but the
    embedding tables and the linear biases (their gradients do not read their
    values; tests/test_equivalence.py)."""
    return {name: p for name, p in model.named_parameters()
            if name not in ("wte.weight", "wpe.weight") and not (name.endswith(".bias") and "ln_" not in name)}


def _bytes(params, ranks: int) -> int:
    """fp32 bytes of ``params`` each padded to a multiple of ``ranks`` rows."""
    return 4 * sum(_rows_padded(p.shape[0], ranks) * (p.numel() // p.shape[0]) for p in params)


@pytest.mark.timeout(TIMEOUT + 30)
def test_hpz_trains_exactly_like_eager_and_gathers_the_backward_inside_the_node():
    """hpZ is exact: the backward's gather inside the node returns the values
    of the forward's gather over all ranks (fp32, rtol 1e-5, 5 steps). Bytes
    per step and rank: the forward gathers Psi and the gradients are
    reduce-scattered across nodes (each parameter padded to W rows); the
    backward's re-gather moves only inside the node (padded to k rows)."""
    ref_losses, ref_params = _harness.reference_run("gpt_untied", WORLD)
    results = spawn(_harness.zerograph_run, WORLD, "gpt_untied", [_config(zero_hpz_partition_size=NODE)],
                    timeout=TIMEOUT)
    model = _models.MODELS["gpt_untied"]()
    every = _bytes(model.parameters(), WORLD)
    secondary = _bytes(_regathered(model).values(), NODE)
    for rank_results in results:
        result = rank_results[0]
        _harness.assert_same_training(result, ref_losses, ref_params)
        assert result["comm_by_scope"] == {
            "cross_group": {"all_gather": every, "reduce_scatter": every, "all_reduce": 0},
            "intra_group": {"all_gather": secondary, "reduce_scatter": 0, "all_reduce": 0},
        }


@pytest.fixture
def fake_world4():
    """Rank 1 of a four-rank fake process group (nodes of 2: rank 1 is index 1 of node 0)."""
    from zerograph._torch_private import fake_store

    dist.init_process_group("fake", store=fake_store(), rank=1, world_size=WORLD)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    dist.destroy_process_group()


def _graphs(zero: dict):
    torch.manual_seed(0)
    config = {"zero_optimization": {"stage": 3, "allgather_bucket_size": 0, "reduce_bucket_size": 0, **zero},
              "zerograph": {"verify_graphs": True, "device": "cpu"}}
    model = zerograph.compile(TinyMLP(), config)
    model(torch.randn(5, 4)).backward()
    info = zerograph.inspect(model)
    groups = zerograph.api.context_of(model).node_groups

    def fmt(gm):
        text = format_graph(gm, canonical=True)
        if groups is not None:
            text = text.replace(repr(groups.node.group_name), "'<node>'").replace(
                repr(groups.peer.group_name), "'<peer>'")
        return text

    return info, fmt


def test_hpz_golden_graphs(fake_world4):
    """The forward cuts rank 1's secondary shard of fc2.weight (rows 2..3 of
    3: node index 1 of 2) and returns it for the backward instead of the
    shard; the backward gathers it over the node (2 ranks). fc1's weight and
    bias are not read by the backward (its input gradient is not needed)."""
    info, fmt = _graphs({"zero_hpz_partition_size": NODE})
    forward = fmt(info.forward[0])
    assert re.search(r"slice_tensor_\d: f32\[1, 6\] = aten.slice.Tensor\(slice_tensor_2, 0, 2, 3\)  # secondary", forward)
    assert forward.endswith("return [sum, primals_3, relu, detach, clone_default]")
    assert_expected_inline(fmt(info.backward[0]).split("\nt_4")[0], """\
primals_1: f32[5, 4]
relu: f32[5, 6]
detach: f32[5, 6]
clone_default: f32[1, 6]
tangents_1: f32[]
expand: f32[5, 3] = aten.expand(tangents_1, [5, 3])
t: f32[3, 5] = aten.t(expand)
mm: f32[3, 6] = aten.mm(t, relu)
t_1: f32[6, 3] = aten.t(mm)
constant_pad_nd_default: f32[2, 6] = aten.constant_pad_nd(clone_default, [0, 0, 0, 1], 0.0)  # comm_prep fc2.weight
all_gather_into_tensor_default: f32[4, 6] = _c10d_functional.all_gather_into_tensor(constant_pad_nd_default, 2, '<node>')  # all_gather fc2.weight
wait_tensor_default: f32[4, 6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # wait fc2.weight
slice_tensor: f32[3, 6] = aten.slice.Tensor(wait_tensor_default, 0, 0, 3)  # comm_prep fc2.weight
t_2: f32[6, 3] = aten.t(slice_tensor)
t_3: f32[3, 6] = aten.t(t_2)
mm_1: f32[5, 6] = aten.mm(expand, t_3)""")
    records = {r.name: r for r in info.passes if r.phase == "joint"}
    assert records["hpz_secondary"].details == {"secondary": ["fc2.weight"], "secondary_elements": 6, "copied": 2}
    by_scope = info.regions[0]["comm_bytes_by_scope"]["backward"]
    assert by_scope == {"intra_group": {"all_gather": 2 * 2 * 6 * 4}, "cross_group": {"reduce_scatter": (8 * 4 + 8 + 4 * 6) * 4}}


def test_hpz_secondary_memory_is_planned_and_explained():
    """The secondary shards are saved values of the forward: the planner holds
    them (as gathered-parameter bytes) from the forward to the backward, and
    explain shows them; their size is this rank's (rank 0, node index 0) rows
    of every re-gathered parameter split over the node: ceil(R / k) rows each."""
    model = _models.make_gpt_untied()
    idx, targets = _models.global_batch(0, 4)
    report = zerograph.explain(model, _config(zero_hpz_partition_size=NODE), idx, targets, world_size=WORLD)
    expected = 4 * sum(-(-p.shape[0] // NODE) * (p.numel() // p.shape[0]) for p in _regathered(model).values())
    assert report.secondary_bytes() == expected
    assert report.plan.regions[0].held["gathered"] == expected
    text = str(report)
    assert f"hpZ secondary       {expected / 2**20:10.3f} MiB" in text
    scopes = report.communication_by_scope()
    assert scopes["intra_group"]["all_gather"] == _bytes(_regathered(model).values(), NODE)
    assert "intra_group" in text and "cross_group" in text


def test_hpz_config_errors_name_the_fix():
    from zerograph.config import Config, ConfigError
    from zerograph.runtime.plan import ParallelPlan

    with pytest.raises(ConfigError, match="zero_hpz_partition_size=2 needs zero_optimization.stage 3"):
        Config.load({"zero_optimization": {"stage": 2, "zero_hpz_partition_size": 2}})
    cfg = Config.load({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 3}})
    with pytest.raises(ConfigError, match="must divide the data-parallel world size 4"):
        ParallelPlan.build(cfg, {"dp": 4})
    assert ParallelPlan.build(cfg, {"dp": 6}).zero.zeropp.hpz
    # one node holding every rank: nothing to save across nodes, hpZ stays off
    assert not ParallelPlan.build(cfg, {"dp": 3}).zero.zeropp.hpz

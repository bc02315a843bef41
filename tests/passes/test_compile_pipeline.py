"""The compile pipeline as data: named steps in inspect, passes that apply,
requires/ensures order checks, and the typed parallel plan."""

from __future__ import annotations

import pytest
import torch

import zerograph
from tests._models import TinyMLP
from zerograph.passes.manager import PassOrderError
from zerograph.runtime.plan import ParallelPlan

UNBUCKETED = {"allgather_bucket_size": 0, "reduce_bucket_size": 0}


def _compile(stage, passes=None, **zg):
    torch.manual_seed(0)
    config = {"zero_optimization": {"stage": stage, **UNBUCKETED}, "zerograph": {"device": "cpu", **zg}}
    model = zerograph.compile(TinyMLP(), config, passes=passes)
    model(torch.randn(5, 4)).backward()
    return model, zerograph.inspect(model)


def test_summary_lists_compile_steps_in_order_and_only_passes_that_ran(fake_world):
    _, info = _compile(3)
    names = [(s.phase, s.name) for s in info.steps]
    assert names == [
        ("dynamo", "dynamo_passes"),
        ("joint", "aot_trace"),
        ("joint", "joint_passes"), ("joint", "partition"), ("joint", "unwrap_rng"), ("joint", "count_saved"),
        *[(phase, step) for phase in ("forward", "backward")
          for step in ("graph_passes", "count_comm", "check_memory_limit", "lower", "wrap_executor")],
    ]
    assert all(s.seconds >= 0 for s in info.steps)
    ran = {r.name for r in info.passes}
    # fusion is off, overlap_comm on, no accumulation, no activation checkpointing
    assert ran == {"dedupe_markers", "tag_nodes", "zero_policy", "lower_markers", "schedule_collectives", "dce",
                   "reuse_comm_buffers", "comm_analysis", "liveness"}
    summary = info.summary()
    for step in ("dynamo_passes", "aot_trace", "partition", "lower", "wrap_executor"):
        assert step in summary
    for absent in ("fuse_attention", "defer_grad_sync", "activation_checkpointing"):
        assert absent not in summary
    # every pass record is printed under its phase's passes step
    lines = summary.splitlines()
    joint = lines.index(next(line for line in lines if "joint_passes" in line))
    assert "tag_nodes" in lines[joint + 1] and "zero_policy" in lines[joint + 2]


def test_stage2_runs_no_zero_policy_and_inductor_no_buffer_reuse(fake_world):
    _, info = _compile(2)
    assert "zero_policy" not in {r.name for r in info.passes}
    cfg = zerograph.Config.load({"zero_optimization": {"stage": 3}, "zerograph": {"compiler": "inductor"}})
    assert "reuse_comm_buffers" not in zerograph.default_passes(cfg).names


def test_default_passes_follow_the_config():
    all_names = zerograph.default_passes().names
    assert "fuse_attention" in all_names and "defer_grad_sync" in all_names
    plain = zerograph.default_passes({"zero_optimization": {"stage": 1}}).names
    assert "fuse_attention" not in plain and "zero_policy" not in plain and "defer_grad_sync" not in plain
    fused = zerograph.default_passes({"zerograph": {"fusion": True},
                                      "activation_checkpointing": {"policy": "per_layer"}}).names
    assert {"fuse_attention", "fuse_norms", "activation_checkpointing"} <= set(fused)
    plan = ParallelPlan.build(zerograph.Config.load({"zero_optimization": {"stage": 1},
                                                     "gradient_accumulation_steps": 2}), {"dp": 2})
    assert "defer_grad_sync" in zerograph.default_passes({"zero_optimization": {"stage": 1},
                                                          "gradient_accumulation_steps": 2}, plan).names
    unsharded = zerograph.default_passes({}, sharded=False).names
    assert "lower_markers" not in unsharded and "tag_nodes" in unsharded


def _noop(gm, ctx):
    return None


def test_custom_pass_requiring_a_later_pass_is_an_error_naming_both(fake_world):
    passes = zerograph.default_passes().insert_before(
        "lower_markers", zerograph.GraphPass("count_waits", _noop, phases=("backward",), requires=("collectives",)))
    with pytest.raises(PassOrderError, match=r"'count_waits' requires 'collectives'.*'lower_markers'.*runs after"):
        zerograph.compile(TinyMLP(), {"zero_optimization": {"stage": 3}, "zerograph": {"device": "cpu"}},
                          passes=passes)


def test_requirements_met_by_an_earlier_phase_and_misspelt_properties(fake_world):
    # tags ensured on the joint graph hold for a joint pass after tag_nodes
    ok = zerograph.default_passes().insert_after(
        "tag_nodes", zerograph.GraphPass("after_tags", _noop, phases=("joint",), requires=("tagged",)))
    ok.check_order()
    # a forward pass placed before lower_markers may require a dynamo-phase property
    ok2 = zerograph.default_passes().insert_before(
        "lower_markers", zerograph.GraphPass("reads_dedupe", _noop, requires=("markers_deduplicated",)))
    ok2.check_order()
    typo = zerograph.default_passes().append(zerograph.GraphPass("typo", _noop, requires=("colectives",)))
    with pytest.raises(PassOrderError, match="'colectives', which no pass ensures"):
        typo.check_order()
    with pytest.raises(TypeError, match="tuple of property names"):
        zerograph.GraphPass("bad", _noop, requires="tagged")


def test_pass_whose_prerequisite_is_disabled_does_not_run(fake_world):
    passes = zerograph.default_passes().disable("lower_markers")
    _, info = _compile(3, passes=passes)
    ran = {r.name for r in info.passes}
    assert "schedule_collectives" not in ran and "reuse_comm_buffers" not in ran and "tag_nodes" in ran


def test_parallel_plan_decodes_stages_and_mesh():
    cfg = zerograph.Config.load({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10}})
    plan = ParallelPlan.build(cfg, {"pp": 2, "dp": 2}, {"pp": 1, "dp": 1})
    assert plan.zero.regathers_in_backward and plan.zero.grad_reduce == "reduce_scatter"
    assert plan.zero.shards_gradients and plan.zero.shards_optimizer_states
    assert plan.mesh.global_rank() == 3 and plan.mesh.global_rank(pp=0) == 1 and plan.mesh.world_size == 4
    assert plan.placement(numel=100, dim=2).on == (("dp", "shard(0)"),)
    assert plan.placement(numel=10, dim=1).storage == "replicated"  # persistent
    assert plan.placement(numel=100, dim=0).storage == "replicated"  # 0-dim
    for stage, reduce in ((0, "all_reduce"), (1, "all_reduce_slice"), (2, "reduce_scatter")):
        p = ParallelPlan.build(zerograph.Config.load({"zero_optimization": {"stage": stage},
                                                      "gradient_accumulation_steps": 2}), {"dp": 2})
        assert p.zero.grad_reduce == reduce and not p.zero.regathers_in_backward
        assert p.defers_grad_sync == (stage <= 1) and p.grad_scale == 0.25
        assert p.placement(numel=100, dim=2).storage == ("sharded" if stage else "replicated")
    assert not ParallelPlan.build(cfg, {"dp": 1}).placement(100, 2).storage == "sharded"
    with pytest.raises(ValueError, match="unknown mesh dimension"):
        ParallelPlan.build(cfg, {"ep": 2})
    with pytest.raises(ValueError, match="index 2 of size 2"):
        ParallelPlan.build(cfg, {"dp": 2}, {"dp": 2})


def test_model_state_carries_the_plan(fake_world):
    model, _ = _compile(3)
    state = model._zg_runtime.ctx
    assert state.plan.dp_size == 2 and state.plan.zero.stage == 3
    assert state.backend is not None and state.pipeline_stage is None
    assert not hasattr(state, "extra")

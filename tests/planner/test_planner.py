"""The memory/communication planner: the liveness analysis against a measured
run, reuse distance, and ``zerograph.explain`` (docs/planner.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import zerograph
from tests._models import Blocks, BrokenBlocks
from tests import _harness
from tests._harness import TIMEOUT
from zerograph.planner.liveness import KINDS, held_by_forward
from zerograph.planner.step_plan import plan_in_step, plan_model

INF = 10**9
BASE = {"zerograph": {"verify_graphs": True, "track_memory": True}}


def _cfg(**zero):
    return {"zero_optimization": {"stage": 3, **zero}, **BASE}


CONFIGS = {
    "default": _cfg(),
    "unbucketed": _cfg(allgather_bucket_size=0, reduce_bucket_size=0),
    "tight_max_live": _cfg(stage3_max_live_parameters=1000, allgather_bucket_size=0, reduce_bucket_size=0),
    "reuse_inf": _cfg(stage3_max_reuse_distance=INF),
    "reuse_inf_unbucketed": _cfg(stage3_max_reuse_distance=INF, allgather_bucket_size=0, reduce_bucket_size=0),
}


def _tracked(model, opt):
    """After training with the measuring interpreter on: the predicted and
    measured timelines and communication of the last step."""
    info = zerograph.inspect(model)
    plan = info.memory
    return {
        "predicted": [(e.phase, e.name, e.live["gathered"], e.total) for e in plan.step],
        "measured": list(info.memory_measured.last_step_composed),
        "peak_gathered": (plan.peak_gathered_bytes, info.memory_measured.peak_gathered_bytes),
        "comm_predicted": plan.comm_bytes_per_step,
        "comm_stats": dict(info.comm_bytes_last_step),
        "comm_executed": dict(info.memory_measured.comm_last_step),
        "policy": [r.details for r in info.passes if r.name == "zero_policy"],
    }


@pytest.mark.timeout(TIMEOUT + 30)
def test_prediction_equals_measurement_and_reuse_distance_trains_like_eager():
    world, steps = 2, 2
    ref_losses, ref_params = _harness.reference_run("gpt", world, steps=steps)
    results = [dict(zip(CONFIGS, rank_results))
               for rank_results in _harness.train("gpt", list(CONFIGS.values()), steps, world, report=_tracked)]
    for rank_results in results:
        for name, r in rank_results.items():
            assert r["regions"] == 1, name
            # live gathered-parameter bytes (and all live bytes) after every node, both graphs
            assert r["predicted"] == r["measured"], name
            assert r["peak_gathered"][0] == r["peak_gathered"][1] > 0, name
            # communication per step: analysis == CommStats == collectives really run
            assert r["comm_predicted"] == r["comm_stats"] == r["comm_executed"], name
            # fp32, same global batches as the single-process reference
            _harness.assert_same_training(r, ref_losses, ref_params)
    r = results[0]
    # gathered buffers are padded alike, so every rank predicts the same gathered
    # peak and traffic (the graphs differ a little: rank 1 pads its shorter shards)
    for name in CONFIGS:
        assert results[0][name]["peak_gathered"] == results[1][name]["peak_gathered"], name
        assert results[0][name]["comm_predicted"] == results[1][name]["comm_predicted"], name
    peaks = {name: x["peak_gathered"][0] for name, x in r.items()}
    assert peaks["tight_max_live"] < peaks["unbucketed"] < peaks["default"] < peaks["reuse_inf"], peaks
    # reuse distance 0 vs infinity: the all-gather bytes per step drop by
    # exactly the backward re-gathers the policy skipped, as the analysis predicts
    for zero, inf in (("default", "reuse_inf"), ("unbucketed", "reuse_inf_unbucketed")):
        measured = r[zero]["comm_stats"]["all_gather"] - r[inf]["comm_stats"]["all_gather"]
        predicted = r[zero]["comm_predicted"]["all_gather"] - r[inf]["comm_predicted"]["all_gather"]
        kept = r[inf]["policy"][0]["kept_gather_elements"] * 4  # fp32
        assert measured == predicted == kept > 0, (zero, measured, predicted, kept)
        assert "kept" not in r[zero]["policy"][0]
        assert r[zero]["comm_stats"]["reduce_scatter"] == r[inf]["comm_stats"]["reduce_scatter"]


# -- pass level (fake process group) -------------------------------------------


def _policy(**zero):
    torch.manual_seed(0)
    model = zerograph.compile(Blocks(), {"zero_optimization": {"stage": 3, **zero},
                                         "zerograph": {"verify_graphs": True, "device": "cpu"}})
    model(torch.randn(4, 8)).backward()
    info = zerograph.inspect(model)
    details = next(r.details for r in info.passes if r.name == "zero_policy")
    return details, info


@pytest.mark.parametrize("distance, kept", [
    (0, []),
    (1, ["blocks.2.weight"]),  # nothing is used between its last forward and first backward use
    (72, ["blocks.2.weight"]),  # blocks.1.weight's distance is 64 + 8 (block 2's weight and bias)
    (73, ["blocks.1.weight", "blocks.2.weight"]),
    (INF, ["blocks.1.weight", "blocks.2.weight"]),  # block 0's backward never reads its weight
])
def test_reuse_distance_keeps_the_last_layers(fake_world, distance, kept):
    details, info = _policy(stage3_max_reuse_distance=distance)
    assert details.get("kept", []) == kept
    assert details.get("kept_gather_elements", 0) == 64 * len(kept)
    # the forward gathers every block (72 elements each); the backward re-gathers
    # the weights it reads (blocks 1 and 2) unless the policy kept them
    regathered = {"blocks.1.weight", "blocks.2.weight"} - set(kept)
    assert info.memory.regions[0].comm_elements["all_gather"] == 3 * 72 + 64 * len(regathered)
    # a kept weight stays alive from the forward into the backward
    assert info.memory.regions[0].peak["gathered"] >= 4 * 64 * len(kept)


def test_reuse_distance_respects_max_live_parameters(fake_world):
    # block 2's weight (64 gathered elements) fits, block 1's would exceed 100
    details, _ = _policy(stage3_max_reuse_distance=INF, stage3_max_live_parameters=100)
    assert details["kept"] == ["blocks.2.weight"]


def test_liveness_pass_never_mutates_and_reports_peaks(fake_world):
    _, info = _policy()
    records = [r for r in info.passes if r.name == "liveness"]
    assert {r.phase for r in records} == {"forward", "backward"}
    forward = next(r for r in records if r.phase == "forward")
    # forward, bucketed per block (72 elements, fp32): one bucket in use and the next prefetched
    assert forward.details["peak_bytes"]["gathered"] == info.memory.regions[0].peak["gathered"] > 0
    assert forward.details["comm_elements"] == {"all_gather": 3 * 72, "reduce_scatter": 0, "all_reduce": 0}


# -- explain -----------------------------------------------------------------------


def _gpt():
    from zerograph.models import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32))


def test_explain_reports_memory_and_communication_without_training(tmp_path):
    model = _gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(0, 97, (2, 16))
    report = zerograph.explain(model, {"zero_optimization": {"stage": 3}}, idx, idx, world_size=2)
    assert not dist.is_initialized()  # its own fake group is gone again
    for k, v in model.state_dict().items():  # the model passed in is untouched
        assert torch.equal(v, before[k]), k
    psi = sum(p.numel() for p in model.parameters())
    assert report.num_params == psi
    assert report.ddp_model_states == 16 * psi and report.fsdp2_model_states == 8 * psi
    # ZeRO-3 on 2 ranks: shards (rank 0 holds the larger half of each odd row count)
    assert 16 * psi // 2 <= sum(report.model_states.values()) < 16 * psi // 2 + 16 * 97
    e = report.plan.comm_elements_per_step
    assert e["reduce_scatter"] >= psi and psi < e["all_gather"] <= 2 * psi + 2 * 97 and e["all_reduce"] == 0
    text = str(report)
    for needle in ("zero_policy", "lower_markers", "gathered-param peak", "activation peak", "DDP model states",
                   "FSDP2 model states", "all_gather", "(= 2Ψ, all-reduce)"):
        assert needle in text, needle
    path = tmp_path / "trace.json"
    report.write_chrome_trace(path)
    events = json.loads(path.read_text())["traceEvents"]
    counters = [ev for ev in events if ev["ph"] == "C"]
    comm = [ev for ev in events if ev["ph"] == "X" and ev["tid"] == 2]
    compute = [ev for ev in events if ev["ph"] == "X" and ev["tid"] == 1]
    assert counters and comm and compute
    assert max(ev["args"]["gathered"] for ev in counters) == report.plan.peak_gathered_bytes
    assert {ev["name"] for ev in comm} == {"all_gather", "reduce_scatter"}
    assert sum(ev["args"]["bytes"] for ev in comm) == sum(report.communication().values())


def test_explain_with_tensor_parallelism_traces_the_graph_rule_on_the_example():
    """``explain`` hands its example to compile as the batch tensor
    parallelism's graph rule traces (nanoGPT has no layer specs or Hugging
    Face plan); the tp traffic is Megatron's: per layer two all-reduces of
    b*s*h forward and two backward."""
    from zerograph.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 97, (2, 16))
    exp = zerograph.explain(model, {"zero_optimization": {"stage": 3}, "tensor_parallel": {"autotp_size": 2}},
                            idx, idx, world_size=4)
    assert exp.communication()["tp_all_reduce"] == 4 * 2 * (2 * 16 * 32) * 4


def test_explain_rejects_missing_inputs():
    with pytest.raises(TypeError, match="pass at least one example input"):
        zerograph.explain(_gpt(), {"zero_optimization": {"stage": 3}})


@pytest.mark.timeout(180)
def test_explain_cli(tmp_path):
    trace = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "-m", "zerograph", "explain", '{"zero_optimization": {"stage": 3}}', "--model", "gpt-tiny",
         "--world-size", "2", "--trace", str(trace)],
        capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ZeRO stage 3, world size 2" in proc.stdout and "gathered-param peak" in proc.stdout
    assert json.loads(trace.read_text())["traceEvents"]
    bad = subprocess.run([sys.executable, "-m", "zerograph", "explain", '{"zero_optimization": {"stag": 3}}'],
                         capture_output=True, text=True, timeout=170)
    assert bad.returncode == 2 and "stage" in bad.stderr


@pytest.mark.timeout(120)
def test_explain_cli_bad_options_are_errors_not_tracebacks(tmp_path, capsys):
    import zerograph.__main__ as cli

    stage3 = '{"zero_optimization": {"stage": 3}}'
    for flag, value in (("--batch-size", "-1"), ("--batch-size", "0"), ("--seq-len", "0")):
        assert cli.main(["explain", stage3, flag, value]) == 2, flag
        assert f"{flag} must be >= 1, got {value}" in capsys.readouterr().err
    assert cli.main(["explain", '{"pipeline": {"stages": 2}}']) == 2
    assert "does not split pipelines (pipeline.stages=2)" in capsys.readouterr().err
    assert cli.main(["explain", "[1, 2]"]) == 2  # inline JSON that is not an object, not a file name
    assert "inline config: expected a JSON object" in capsys.readouterr().err
    assert cli.main(["explain", '{"zero_optimization": ']) == 2
    assert "inline config: invalid JSON at column" in capsys.readouterr().err
    missing = tmp_path / "no-such-dir" / "trace.json"
    assert cli.main(["explain", stage3, "--trace", str(missing)]) == 2
    assert f"--trace {missing}: cannot write the Chrome trace" in capsys.readouterr().err


def _saved_bytes(graphs) -> int:
    """Bytes of the distinct storages a region's forward saves for its
    backward, read from the graphs' fake values: AOTAutograd returns them last
    from the forward and passes them first to the backward; inputs (parameter
    shards, the batch, values from an earlier region) and their views are left out."""
    forward, backward = graphs["forward"], graphs["backward"]
    outputs = list(forward.graph.nodes)[-1].args[0]
    n_saved = sum(1 for n in backward.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents"))
    inputs = {id(n.meta["val"].untyped_storage()) for n in forward.graph.nodes
              if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)}
    sizes = {}
    for node in outputs[len(outputs) - n_saved:]:
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and id(val.untyped_storage()) not in inputs:
            sizes[id(val.untyped_storage())] = val.untyped_storage().nbytes()
    return sum(sizes.values())


def test_graph_break_regions_compose_in_execution_order(fake_world):
    torch.manual_seed(0)
    model = zerograph.compile(BrokenBlocks([8, 16], [16, 12, 6]), {
        "zero_optimization": {"stage": 3}, "zerograph": {"verify_graphs": True, "device": "cpu"}})
    model(torch.randn(4, 8)).backward()
    info = zerograph.inspect(model)
    plan = info.memory
    assert len(info.regions) == 2
    assert plan.order == [0, 1] and plan.order_known  # recorded by the runtime
    r0, r1 = plan.regions
    saved0 = _saved_bytes(info.regions[0]["graphs"])
    # reuse distance 0: nothing gathered is saved, region 0 holds activations only
    assert r0.held == {"gathered": 0, "activation": saved0, "gradient": 0, "other": 0} and saved0 > 0
    assert sum(r1.held.values()) == _saved_bytes(info.regions[1]["graphs"]) > 0
    # while region 1 runs, forward and backward, region 0's saved values are held
    assert plan.peak_activation_bytes == saved0 + r1.peak["activation"]
    assert plan.peak_activation_bytes > max(r0.peak["activation"], r1.peak["activation"])
    assert plan.peak_total_bytes == max(r0.peak_total, saved0 + r1.peak_total)
    assert plan.peak_gathered_bytes == max(r0.peak["gathered"], r1.peak["gathered"])
    assert [(seg.region.index, seg.phase, seg.held["activation"]) for seg in plan.segments()] == [
        (0, "forward", 0), (1, "forward", saved0), (1, "backward", saved0), (0, "backward", 0)]
    # per-region values are unchanged: the step entries carry them, plus what others hold
    for entry in plan.step:
        own = next(r for r in plan.regions if r.index == entry.region).timeline
        assert entry.node in own
        assert entry.live == {k: entry.node.live[k] + entry.held[k] for k in KINDS}
    # without the order the plan says so and falls back to per-region peaks
    unknown = plan_model(info.regions)
    assert not unknown.order_known and "execution order unknown" in unknown.summary()
    assert unknown.peak == {k: max(r0.peak[k], r1.peak[k]) for k in KINDS}
    assert "forward 0 -> 1, backward 1 -> 0" in plan.summary()


def test_explain_shows_graph_break_regions_back_to_back(tmp_path):
    torch.manual_seed(0)
    report = zerograph.explain(BrokenBlocks([8, 16], [16, 12, 6]), {"zero_optimization": {"stage": 3}},
                               torch.randn(4, 8), world_size=2)
    plan = report.plan
    assert plan.order == [0, 1]
    text = str(report)
    assert "forward 0 -> 1, backward 1 -> 0" in text
    r0, r1 = plan.regions
    assert plan.peak_activation_bytes == r0.held["activation"] + r1.peak["activation"]
    assert f"activation peak     {plan.peak_activation_bytes / 2**20:10.3f} MiB" in text
    path = tmp_path / "trace.json"
    report.write_chrome_trace(path)
    events = json.loads(path.read_text())["traceEvents"]
    counters = sorted((ev for ev in events if ev["ph"] == "C"), key=lambda ev: ev["ts"])
    compute = sorted((ev for ev in events if ev["ph"] == "X" and ev["tid"] == 1), key=lambda ev: ev["ts"])
    # the graphs back to back: forward 0, forward 1, backward 1, backward 0
    runs = []
    for ev in compute:
        run = (ev["args"]["region"], ev["cat"].split()[0])
        if not runs or runs[-1] != run:
            runs.append(run)
    assert runs == [(0, "forward"), (1, "forward"), (1, "backward"), (0, "backward")]
    held = {ev["args"]["region"]: set() for ev in compute}
    for ev in compute:
        held[ev["args"]["region"]].add((ev["cat"].split()[0], ev["args"]["held_by_other_regions"]))
    assert held == {0: {("forward", 0), ("backward", 0)},
                    1: {("forward", sum(r0.held.values())), ("backward", sum(r0.held.values()))}}
    # the counters are the composed step, held bytes of region 0 included
    assert [ev["args"] for ev in counters] == [e.live for e in plan.step]
    assert max(ev["args"]["activation"] for ev in counters) == plan.peak_activation_bytes


def _groups(widths, cuts):
    """``widths`` split into up to three groups of blocks at the block indices ``cuts``."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(widths) - 1), len(widths) - 1]
    return [widths[a:b + 1] for a, b in zip(bounds, bounds[1:])]


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.integers(1, 9), min_size=2, max_size=5), max_live=st.integers(1, 300),
       reuse=st.sampled_from([0, 50, INF]), bucketed=st.booleans(), cuts=st.sets(st.integers(1, 3), max_size=2))
def test_prediction_equals_measurement_on_random_models(fake_world, widths, max_live, reuse, bucketed, cuts):
    """Fake process group (one process): the collectives return uninitialized
    buffers, but every storage and its lifetime are real. ``cuts`` put graph
    breaks between blocks: the regions compose in execution order."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    zero = {"stage": 3, "stage3_max_live_parameters": max_live, "stage3_max_reuse_distance": reuse}
    if not bucketed:
        zero.update(allgather_bucket_size=0, reduce_bucket_size=0)
    groups = _groups(widths, cuts)
    model = zerograph.compile(BrokenBlocks(*groups), {"zero_optimization": zero,
                                                      "zerograph": {"device": "cpu", "track_memory": True}})
    x = torch.randn(3, widths[0])
    # measured independently of the tracker: every storage autograd holds for
    # the backward, once, parameter shards and the batch left out
    shards = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    outside = {t.untyped_storage().data_ptr() for t in (x, *shards)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in outside:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x)
    loss.backward()
    info = zerograph.inspect(model)
    plan, measured = info.memory, info.memory_measured
    assert len(info.regions) == len(groups)
    assert plan.order == list(range(len(groups)))
    # the graphs ran forward 0..n-1, then backward n-1..0, as the plan composes them
    assert measured.last_step_region_order == [(s.phase, s.region.index) for s in plan.segments()]
    # each graph's own live bytes after every node, then with what the other regions hold
    own = [(e.phase, e.name, e.node.live["gathered"], e.node.total) for e in plan.step]
    assert own == measured.last_step
    composed = [(e.phase, e.name, e.live["gathered"], e.total) for e in plan.step]
    assert composed == measured.last_step_composed
    assert plan.peak_gathered_bytes == measured.peak_gathered_bytes
    assert plan.peak_total_bytes == measured.peak_total_bytes
    # saved bytes: what autograd held for the backward == the regions' held bytes;
    # the activation peak (the end of the last forward) holds every region's activations
    assert sum(saved.values()) == sum(sum(r.held.values()) for r in plan.regions)
    assert plan.peak_activation_bytes == sum(r.held["activation"] for r in plan.regions)
    if len(groups) > 1 and reuse == 0:
        assert plan.peak_activation_bytes > max(r.peak["activation"] for r in plan.regions)
    # the memory limit's view at compile time: what each region holds, read
    # from its forward graph alone (and the count of saved values recorded at
    # partition), and each region composed with the regions run before it
    regions = model._zg_runtime.ctx.regions
    for region, compiled in zip(plan.regions, regions):
        assert held_by_forward(compiled.graphs["forward"], compiled.num_saved) == region.held
        assert plan_in_step(regions, region.index, plan.order) == plan.in_step(region.index)
    assert max(plan.in_step(r.index).peak_total for r in plan.regions) == plan.peak_total_bytes
    assert info.memory.comm_bytes_per_step == info.comm_bytes_last_step == info.memory_measured.comm_last_step
    kept = next(r.details for r in info.passes if r.name == "zero_policy").get("kept_gather_elements", 0)
    assert kept <= max_live


OFFLOADS = {
    "offload_activations": ({"stage": 3}, {"offload_activations": True}),
    "offload_param": ({"stage": 3, "offload_param": {"device": "cpu"}}, {}),
    "both": ({"stage": 3, "offload_param": {"device": "cpu"}}, {"offload_activations": True}),
}


@pytest.mark.parametrize("offload", list(OFFLOADS))
def test_measured_device_and_host_bytes_equal_the_plan_with_offload(fake_world, offload):
    """With offload copies in host memory the measuring interpreter counts
    device and host bytes apart, as the plan does: the device timeline (each
    graph's own, and composed across the graph break) and each graph's host
    bytes equal the plan's entry for entry. On this CPU-only run host memory
    is the compute device's, so the graphs' ``location`` tags say which is
    which; the bytes and lifetimes are measured."""
    torch.manual_seed(0)
    zero, ac = OFFLOADS[offload]
    model = zerograph.compile(BrokenBlocks([4, 6, 5], [5, 3]), {
        "zero_optimization": {**zero, "allgather_bucket_size": 0, "reduce_bucket_size": 0},
        "activation_checkpointing": ac, "zerograph": {"device": "cpu", "track_memory": True}})
    model(torch.randn(3, 4)).backward()
    info = zerograph.inspect(model)
    plan, measured = info.memory, info.memory_measured
    assert len(info.regions) == 2 and measured.last_step_region_order == [(s.phase, s.region.index)
                                                                          for s in plan.segments()]
    assert [(e.phase, e.name, e.node.live["gathered"], e.node.total) for e in plan.step] == measured.last_step
    assert [(e.phase, e.name, e.live["gathered"], e.total) for e in plan.step] == measured.last_step_composed
    assert [(e.phase, e.name, e.node.host_total) for e in plan.step] == measured.last_step_host
    assert plan.peak_total_bytes == measured.peak_total_bytes
    assert plan.peak_host_total_bytes == measured.peak_host_total_bytes > 0

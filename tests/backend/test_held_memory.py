"""What a compiled model keeps beyond its states (benchmarks/bench_memory.py,
docs/benchmarks.md "Resident memory vs FSDP2"): the graphs kept for
``zerograph.inspect`` and the planner carry no trace-only metadata and no
real tensors, the joint graph is not kept (unless ``zerograph.debug``), no
FX graph or node made by the compile outlives it beyond those, and no
gathered parameter outlives the step."""

from __future__ import annotations

import gc

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor

import zerograph
from tests._models import TinyMLP
from zerograph.graph.trace_meta import COMPILE_ONLY_KEYS, TRACE_ONLY_KEYS
from zerograph.runtime.state import context_of


def _values(obj):
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _values(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _values(o)
    else:
        yield obj


def test_kept_graphs_hold_no_trace_metadata_and_no_real_tensors(fake_world):
    torch.manual_seed(0)
    config = {"zero_optimization": {"stage": 3, "allgather_bucket_size": 0, "reduce_bucket_size": 0},
              "zerograph": {"device": "cpu"}}
    model = zerograph.compile(TinyMLP(), config)
    model(torch.randn(5, 4)).backward()
    regions = context_of(model).regions
    phases = {phase for r in regions for phase in r.graphs}
    assert phases == {"dynamo", "forward", "backward"}  # the joint graph only with zerograph.debug
    kept, vals = [], 0
    graphs = [(phase, gm) for r in regions for phase, gm in r.graphs.items()]
    # the backward graph as partitioned, which AOTAutograd keeps for its lazy compile
    aot_backward = [r.partitioned_backward() for r in regions if r.partitioned_backward is not None]
    assert any(gm is not None for gm in aot_backward)
    graphs += [("aot backward", gm) for gm in aot_backward if gm is not None]
    for phase, gm in graphs:
        for node in gm.graph.nodes:
            kept += [(phase, node.name, k) for k in TRACE_ONLY_KEYS if k in node.meta]
            if phase in ("forward", "backward"):  # compiled: what only the partitioner and lowering read is gone
                kept += [(phase, node.name, k) for k in COMPILE_ONLY_KEYS if k in node.meta]
            for value in _values(dict(node.meta)):
                if isinstance(value, torch.Tensor):
                    vals += 1
                    value = value._local_tensor if isinstance(value, DTensor) else value
                    assert isinstance(value, FakeTensor), (phase, node.name, type(value))
    assert kept == [], kept[:5]
    assert vals > 0  # the fake values inspect and the planner read are still there


def _graph_objects():
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, (torch.fx.GraphModule, torch.fx.Graph, torch.fx.Node))]


@pytest.mark.parametrize("debug", [False, True])
def test_compile_keeps_only_the_graphs_it_shows(fake_world, debug):
    """The FX graphs and nodes made while compiling that are still alive
    after a step are exactly: per region, Dynamo's graph, the forward and the
    backward (``zerograph.inspect``), AOTAutograd's copy of the backward, and
    the joint graph only with ``zerograph.debug``; no other graph or node
    (a count, not a size: what the 109M GPT's resident memory has beyond
    FSDP2's is mostly these graphs, docs/benchmarks.md)."""
    torch.manual_seed(0)
    config = {"zero_optimization": {"stage": 3}, "zerograph": {"device": "cpu", "debug": debug}}
    before = {id(o) for o in _graph_objects()}
    model = zerograph.compile(TinyMLP(), config)
    model(torch.randn(5, 4)).sum().backward()
    made = [o for o in _graph_objects() if id(o) not in before]
    modules = [o for o in made if isinstance(o, torch.fx.GraphModule)]
    regions = context_of(model).regions
    expected = [gm for r in regions for gm in r.graphs.values()]
    expected += [r.partitioned_backward() for r in regions if r.partitioned_backward is not None]
    assert len(regions) == 1 and all(gm is not None for gm in expected)
    assert sorted(regions[0].graphs) == (["backward", "dynamo", "forward", "joint"] if debug
                                         else ["backward", "dynamo", "forward"])
    assert {id(gm) for gm in modules} == {id(gm) for gm in expected}
    graphs = {id(gm.graph) for gm in expected}
    assert {id(o) for o in made if isinstance(o, torch.fx.Graph)} == graphs
    # every node alive belongs to one of those graphs (also its root sentinel and erased nodes still referenced)
    assert {id(o.graph) for o in made if isinstance(o, torch.fx.Node)} == graphs


def test_no_full_parameter_outlives_the_step(fake_world):
    """After forward + backward, every tensor the garbage collector reaches
    whose shape is a parameter's full shape is that parameter's own storage
    (fake world of 2: the shards are half the rows), not a gathered copy."""
    torch.manual_seed(0)
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "zerograph": {"device": "cpu"}}
    model = zerograph.compile(TinyMLP(), config)
    full_shapes = {tuple(p.shape) for p in model.parameters() if isinstance(p, DTensor)}
    model(torch.randn(5, 4)).backward()
    gc.collect()
    own = {id(t) for p in model.parameters() for t in (p, p.grad) if t is not None}
    gathered = [tuple(o.shape) for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and not isinstance(o, (DTensor, FakeTensor)) and id(o) not in own
                and not o.is_meta and tuple(o.shape) in full_shapes]
    assert gathered == []


def test_tied_weight_gradient_sum_runs_in_place(fake_world):
    """The tied embedding's two gradient contributions are summed into the
    first (``add_``) right before their reduction, not into a third
    parameter-sized tensor (the 109M GPT's step peak, docs/benchmarks.md);
    the residual sums of the blocks, which no reduction reads, stay as they are."""
    from tests._models import SEQ, VOCAB, make_gpt
    from zerograph.graph.tags import get_tag

    model = zerograph.compile(make_gpt(), {"zero_optimization": {"stage": 3}, "zerograph": {"device": "cpu"}})
    idx = torch.randint(0, VOCAB, (2, SEQ))
    model(idx, idx).loss.backward()
    backward = context_of(model).regions[0].graphs["backward"]
    aten = torch.ops.aten

    def feeds_reduction(node):
        return any(get_tag(u) is not None and get_tag(u).role in ("reduce_scatter", "all_reduce", "comm_prep")
                   for u in node.users)

    sums = [n for n in backward.graph.nodes if n.op == "call_function" and n.target in (aten.add.Tensor, aten.add_.Tensor)]
    in_place = [n.name for n in sums if n.target is aten.add_.Tensor]
    assert len(in_place) == 1 and feeds_reduction(next(n for n in sums if n.name == in_place[0]))
    assert [n.name for n in sums if n.target is aten.add.Tensor and feeds_reduction(n)] == []
    assert any(n.target is aten.add.Tensor for n in sums)  # residual-stream sums untouched

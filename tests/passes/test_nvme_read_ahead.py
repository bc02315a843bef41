"""``nvme_read_ahead``: with ``offload_param.device: "nvme"`` the lowered
graphs request the parameter file's reads themselves, a ``read_ahead`` node
per file shard placed by :func:`zerograph.planner.nvme.read_ahead_points`
ahead of the shard's ``host_copy``.

Golden graphs of TinyMLP (fake process group, rank 0 of 2), the policy's
window, ``dce`` keeping the nodes, the pass listed only with NVMe parameter
offload, and the runtime: the graph's nodes issue the reads (the executor's
per-graph request only where the pass did not run)."""

from __future__ import annotations

import gc

import pytest
import torch
from expecttest import assert_expected_inline

import zerograph
from tests._models import TinyMLP
from zerograph.graph.format import format_graph
from zerograph.graph.nvme_ops import READ_AHEAD
from zerograph.graph.tags import get_tag
from zerograph.planner.nvme import announced_reads, graph_reads, read_ahead_points


def _config(root, buffer_count=1, bucketed=False, **param):
    zero = {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(root), "max_in_cpu": 0,
                                          "buffer_count": buffer_count, **param}}
    if not bucketed:
        zero.update(allgather_bucket_size=0, reduce_bucket_size=0)
    return {"zero_optimization": zero, "zerograph": {"verify_graphs": True, "device": "cpu"}}


def _compiled(config, passes=None):
    torch.manual_seed(0)
    model = zerograph.compile(TinyMLP(), config, passes=passes)
    store = model._zg_runtime.ctx.nvme_params
    before = store.reads
    model(torch.randn(5, 4)).backward()
    info = zerograph.inspect(model)
    assert len(info.forward) == 1 and len(info.backward) == 1
    return model, info, store.reads - before


def _read_aheads(gm):
    return [n for n in gm.graph.nodes if n.target is READ_AHEAD]


def test_golden_read_ahead_nodes(fake_world, tmp_path):
    """``buffer_count: 1``: one shard requested ahead at a time; each read is
    requested right after the previous shard's copy (the first at the top),
    so it runs while that shard is gathered. The backward's one re-gather
    (fc2.weight) is requested at the graph's start, ahead of the gradient
    computation that precedes its copy."""
    model, info, reads = _compiled(_config(tmp_path))
    assert_expected_inline(format_graph(info.forward[0], canonical=True), """\
primals_1: f32[3, 4]
primals_2: f32[3]
primals_3: f32[5, 4]
primals_4: f32[2, 6]
read_ahead_default:  = zerograph.read_ahead(primals_1, 'zg0', 'fc1.weight')  # read_ahead fc1.weight
_to_copy_default: f32[3, 4] = aten._to_copy(primals_1, device=device(type='cpu'), non_blocking=True)  # host_copy fc1.weight
read_ahead_default_1:  = zerograph.read_ahead(primals_2, 'zg0', 'fc1.bias')  # read_ahead fc1.bias
all_gather_into_tensor_default: f32[6, 4] = _c10d_functional.all_gather_into_tensor(_to_copy_default, 2, '0')  # all_gather fc1.weight
wait_tensor_default: f32[6, 4] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # wait fc1.weight
_to_copy_default_1: f32[3] = aten._to_copy(primals_2, device=device(type='cpu'), non_blocking=True)  # host_copy fc1.bias
read_ahead_default_2:  = zerograph.read_ahead(primals_4, 'zg0', 'fc2.weight')  # read_ahead fc2.weight
all_gather_into_tensor_default_1: f32[6] = _c10d_functional.all_gather_into_tensor(_to_copy_default_1, 2, '0')  # all_gather fc1.bias
wait_tensor_default_1: f32[6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_1)  # wait fc1.bias
_to_copy_default_2: f32[2, 6] = aten._to_copy(primals_4, device=device(type='cpu'), non_blocking=True)  # host_copy fc2.weight
all_gather_into_tensor_default_2: f32[4, 6] = _c10d_functional.all_gather_into_tensor(_to_copy_default_2, 2, '0')  # all_gather fc2.weight
t: f32[4, 6] = aten.t(wait_tensor_default)
addmm: f32[5, 6] = aten.addmm(wait_tensor_default_1, primals_3, t)
relu: f32[5, 6] = aten.relu(addmm)
detach: f32[5, 6] = aten.detach(relu)
wait_tensor_default_2: f32[4, 6] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_2)  # wait fc2.weight
slice_tensor: f32[3, 6] = aten.slice.Tensor(wait_tensor_default_2, 0, 0, 3)  # comm_prep fc2.weight
t_1: f32[6, 3] = aten.t(slice_tensor)
mm: f32[5, 3] = aten.mm(relu, t_1)
sum: f32[] = aten.sum(mm)
return [sum, primals_3, relu, detach, primals_4]""")
    backward = format_graph(info.backward[0], canonical=True).splitlines()
    assert_expected_inline("\n".join(backward[:12]), """\
primals_1: f32[5, 4]
relu: f32[5, 6]
detach: f32[5, 6]
view: f32[2, 6]
tangents_1: f32[]
read_ahead_default:  = zerograph.read_ahead(view, 'zg0', 'fc2.weight')  # read_ahead fc2.weight
expand: f32[5, 3] = aten.expand(tangents_1, [5, 3])
t: f32[3, 5] = aten.t(expand)
mm: f32[3, 6] = aten.mm(t, relu)
t_1: f32[6, 3] = aten.t(mm)
_to_copy_default: f32[2, 6] = aten._to_copy(view, device=device(type='cpu'), non_blocking=True)  # host_copy fc2.weight
all_gather_into_tensor_default: f32[4, 6] = _c10d_functional.all_gather_into_tensor(_to_copy_default, 2, '0')  # all_gather fc2.weight""")
    # the graphs' nodes requested every read of the step (3 forward, 1 backward); the executor none
    assert reads == 4
    for gm in (info.forward[0], info.backward[0]):
        assert announced_reads(gm) == graph_reads(gm)
    records = {(r.phase, r.name): r for r in info.passes}
    assert records[("forward", "nvme_read_ahead")].details["read_ahead_nodes"] == 3
    assert records[("backward", "nvme_read_ahead")].details["after_copy"] == {None: ["fc2.weight"]}
    del model
    gc.collect()


def test_dce_keeps_read_ahead_nodes(fake_world, tmp_path):
    """The op returns nothing and nothing uses it: registered as
    side-effecting, so FX's dead-code elimination (the ``dce`` pass) and
    Inductor keep it."""
    model, info, _ = _compiled(_config(tmp_path))
    gm = info.forward[0]
    nodes = _read_aheads(gm)
    assert len(nodes) == 3 and all(not n.users for n in nodes)
    assert READ_AHEAD._schema.returns == [] and nodes[0].is_impure()
    gm.graph.eliminate_dead_code()
    assert _read_aheads(gm) == nodes
    del model
    gc.collect()


def test_bucketed_window_and_executor_fallback(fake_world, tmp_path):
    """Bucketed gathers: each member of a bucket gets its own read. With the
    default window (5 shards) every read of TinyMLP's forward is requested at
    the top, in copy order. With the pass disabled the executor requests the
    same reads before the graph runs: the same count."""
    model, info, reads = _compiled(_config(tmp_path, buffer_count=5, bucketed=True))
    forward = info.forward[0]
    nodes = list(forward.graph.nodes)
    first_copy = next(i for i, n in enumerate(nodes) if (get_tag(n) and get_tag(n).role == "host_copy"))
    assert [n.args[2] for n in nodes[:first_copy] if n.target is READ_AHEAD] == [
        "fc1.weight", "fc1.bias", "fc2.weight"] == graph_reads(forward)
    del model
    gc.collect()
    passes = zerograph.default_passes().disable("nvme_read_ahead")
    model, info, fallback_reads = _compiled(_config(tmp_path, buffer_count=5, bucketed=True), passes=passes)
    assert not _read_aheads(info.forward[0]) and announced_reads(info.forward[0]) == []
    assert fallback_reads == reads == 4
    del model
    gc.collect()


def test_window_policy():
    copies = [("a", 10), ("b", 10), ("c", 30), ("d", 10), ("e", 10)]
    # at most 2 shards requested and not copied: the first two at the start, then one per copy
    assert read_ahead_points(copies, 2, 100) == [["a", "b"], ["c"], ["d"], ["e"], [], []]
    # and at most 2 * 15 elements: c (30) waits until a and b are copied, d and e until c is
    assert read_ahead_points(copies, 2, 15) == [["a", "b"], [], ["c"], ["d", "e"], [], []]
    # one shard always goes, even if the window holds less
    assert read_ahead_points([("a", 50)], 1, 20) == [["a"], []]
    assert read_ahead_points(copies, 10, 100) == [["a", "b", "c", "d", "e"], [], [], [], [], []]


def test_listed_only_with_nvme_params(tmp_path):
    assert "nvme_read_ahead" in zerograph.default_passes().names
    nvme = _config(tmp_path)
    cpu = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert "nvme_read_ahead" in zerograph.default_passes(nvme).names
    assert "nvme_read_ahead" not in zerograph.default_passes(cpu).names
    assert "nvme_read_ahead" not in zerograph.default_passes({"zero_optimization": {"stage": 3}}).names


@pytest.mark.slow  # Inductor compiles (about 20 s on a loaded 2-core machine)
def test_inductor_keeps_the_reads(tmp_path):
    """World 1: with ``zerograph.compiler: "inductor"`` the ``read_ahead``
    nodes survive Inductor's lowering (the executor requests nothing: every
    file shard of the graphs has its node) and issue the same reads as with
    the eager executor; the losses agree (Inductor's kernels: fp32
    round-off, rtol 1e-5)."""
    runs = {}
    for compiler in ("eager", "inductor"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        config = _config(tmp_path)
        config["zerograph"] = {"compiler": compiler}
        model = zerograph.compile(TinyMLP(), config)
        opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=1e-2)
        store = model._zg_runtime.ctx.nvme_params
        losses = []
        for step in range(3):
            torch.manual_seed(step)
            loss = model(torch.randn(5, 4))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        info = zerograph.inspect(model)
        assert all(announced_reads(gm) == graph_reads(gm) and graph_reads(gm) for gm in info.forward)
        runs[compiler] = (losses, store.reads)
        del model, opt, store
        gc.collect()
    assert runs["inductor"][1] == runs["eager"][1] > 0
    torch.testing.assert_close(torch.tensor(runs["inductor"][0]), torch.tensor(runs["eager"][0]), rtol=1e-5, atol=1e-6)

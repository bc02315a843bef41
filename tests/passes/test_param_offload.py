"""Parameter offload (``zero_optimization.offload_param.device: "cpu"``):
parameter shards live in host memory; the lowered graphs copy each one to the
compute device ahead of its all-gather and copy its gradient shard back.

Golden graphs with the fake process group, training equal to the eager
reference at world 2 (alone, with ``offload_optimizer``, and with a plain
torch optimizer) and at world 1 (compiled, eager, and with gradient
accumulation), and the config errors. On a CPU-only machine the compute
device is the CPU: the copies are cpu -> cpu, but every copy is made and the
graphs compute on the copies, so an optimizer that updated anything but the
host shards (which the next step copies) would change the result; where each
copy sits and which way it goes is checked on the graphs."""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline
from torch import nn

import zerograph
from tests import _harness, _models, _pool
from tests._harness import TIMEOUT
from tests._models import TinyMLP
from zerograph.config import Config, ConfigError
from zerograph.graph.format import format_graph
from zerograph.graph.tags import get_tag
from zerograph.planner.liveness import saved_inputs

OFFLOAD = {"offload_param": {"device": "cpu"}}
COPY = torch.ops.aten._to_copy.default


def _graphs(bucketed: bool):
    torch.manual_seed(0)
    zero = {"stage": 3, **OFFLOAD, **({} if bucketed else {"allgather_bucket_size": 0, "reduce_bucket_size": 0})}
    model = zerograph.compile(TinyMLP(), {"zero_optimization": zero, "zerograph": {"verify_graphs": True, "device": "cpu"}})
    model(torch.randn(5, 4)).backward()
    info = zerograph.inspect(model)
    assert len(info.forward) == 1 and len(info.backward) == 1
    return model, info


def _role(node) -> str | None:
    tag = get_tag(node)
    return tag.role if tag is not None else None


def _source(node):
    """The node a chain of views starts from (the node itself if none)."""
    while node.op == "call_function" and node.target.is_view:
        node = node.args[0]
    return node


def _feeds(node, target) -> bool:
    """Whether ``target`` depends on ``node``."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return False


def test_golden_host_copy_before_each_all_gather(fake_world):
    model, info = _graphs(bucketed=False)
    # each shard is copied to the compute device, then gathered; the gathers
    # (with their copies) are prefetched to the top, ahead of their uses
    assert_expected_inline(format_graph(info.forward[0], canonical=True), """\
primals_1: f32[3, 4]
primals_2: f32[3]
primals_3: f32[5, 4]
primals_4: f32[2, 6]
_to_copy_default: f32[3, 4] = aten._to_copy(primals_1, device=device(type='cpu'), non_blocking=True)  # host_copy fc1.weight
all_gather_into_tensor_default: f32[6, 4] = _c10d_functional.all_gather_into_tensor(_to_copy_default, 2, '0')  # all_gather fc1.weight
wait_tensor_default: f32[6, 4] = _c10d_functional.wait_tensor(all_gather_into_tensor_default)  # wait fc1.weight
_to_copy_default_1: f32[3] = aten._to_copy(primals_2, device=device(type='cpu'), non_blocking=True)  # host_copy fc1.bias
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
    # the forward saves the host shard (primals_4) for the backward, never its device copy
    backward = info.backward[0]
    host_copies = [n for n in backward.graph.nodes if _role(n) == "host_copy"]
    # backward: fc2.weight's re-gather copies its saved host shard to the device ...
    to_device = [n for n in host_copies if _source(n.args[0]).op == "placeholder"]
    saved = saved_inputs(info.forward[0], backward)
    fwd_nodes = {n.name: n for n in info.forward[0].graph.nodes}
    assert [(_source(fwd_nodes[saved[n.args[0].name]]).op, get_tag(n).param, n.kwargs) for n in to_device] == [
        ("placeholder", "fc2.weight", {"device": torch.device("cpu"), "non_blocking": True})]
    assert next(iter(to_device[0].users)).target is torch.ops._c10d_functional.all_gather_into_tensor.default
    # ... and every reduced gradient shard is copied back to the host, then returned
    # (the DTensor gradients are returned as views of them, next to non-tensor inputs)
    out = next(n for n in backward.graph.nodes if n.op == "output").args[0]
    returned = [_source(a) for a in out if a is not None and a.op != "placeholder"]
    assert all(a.target is COPY and _role(a) == "host_copy" and a.kwargs == {"device": torch.device("cpu")}
               for a in returned)
    assert sorted(get_tag(a).param for a in returned) == ["fc1.bias", "fc1.weight", "fc2.weight"]
    # the stored shards are distinct tensors from what the graphs compute with, and their grads are on the host
    for name, p in model.named_parameters():
        assert p.to_local().device.type == "cpu" and p.grad.to_local().device.type == "cpu", name


def test_bucketed_gather_copies_every_member_first(fake_world):
    _, info = _graphs(bucketed=True)
    forward = info.forward[0]
    order = {n: i for i, n in enumerate(forward.graph.nodes)}
    gathers = [n for n in forward.graph.nodes if _role(n) == "all_gather"]
    copies = [n for n in forward.graph.nodes if _role(n) == "host_copy"]
    assert len(copies) == 3 and all(_source(c.args[0]).op == "placeholder" for c in copies)
    # one gather per module; each member's copy feeds the packed buffer before its gather
    assert [get_tag(g).bucket for g in gathers] == [("fc1.weight", "fc1.bias"), ("fc2.weight",)]
    for gather in gathers:
        members = [c for c in copies if get_tag(c).bucket == get_tag(gather).bucket]
        assert len(members) == len(get_tag(gather).bucket)
        assert all(order[c] < order[gather] and _feeds(c, gather) for c in members)
    # the bucket's reduced shards are copied back once per reduction
    backward = info.backward[0]
    reductions = [n for n in backward.graph.nodes if _role(n) == "reduce_scatter"]
    back = [n for n in backward.graph.nodes if _role(n) == "host_copy" and "non_blocking" not in n.kwargs]
    assert len(back) == len(reductions) == 2


# --------------------------------------------------------------------------- memory plan

def _host_copy_storages(info) -> str:
    """One line per storage a ``host_copy`` node makes: phase, node, kind,
    location, bytes, and the nodes it lives from .. to."""
    region = info.memory.regions[0]
    rows = []
    for phase, stores in region.storages.items():
        graph = (info.forward[0] if phase == "forward" else info.backward[0]).graph
        nodes = list(graph.nodes)
        for st in stores:
            node = nodes[st.birth]
            if node.name == st.root and _role(node) == "host_copy":
                rows.append(f"{phase} {st.root} {get_tag(node).param}: {st.kind} on the {st.location}, "
                            f"{st.nbytes} B, {nodes[st.birth].name} .. {nodes[st.death].name}")
    return "\n".join(rows)


def test_planner_splits_host_and_device_bytes(fake_world):
    """The memory plan of an offload_param step: the host shards are graph
    inputs (no device bytes); each copy to the device is a device temporary
    (``other``) from the copy to its all-gather; the gradient shards copied
    back are host bytes, outside the device peaks, reported apart."""
    _, info = _graphs(bucketed=False)
    assert_expected_inline(_host_copy_storages(info), """\
forward _to_copy_default fc1.weight: other on the device, 48 B, _to_copy_default .. all_gather_into_tensor_default
forward _to_copy_default_1 fc1.bias: other on the device, 12 B, _to_copy_default_1 .. all_gather_into_tensor_default_1
forward _to_copy_default_2 fc2.weight: other on the device, 48 B, _to_copy_default_2 .. all_gather_into_tensor_default_2
backward _to_copy_default fc2.weight: other on the device, 48 B, _to_copy_default .. all_gather_into_tensor_default
backward _to_copy_default_1 fc2.weight: gradient on the host, 48 B, _to_copy_default_1 .. output
backward _to_copy_default_2 fc1.bias: gradient on the host, 12 B, _to_copy_default_2 .. output
backward _to_copy_default_3 fc1.weight: gradient on the host, 48 B, _to_copy_default_3 .. output""")
    plan = info.memory
    assert plan.peak == {"gathered": 216, "activation": 120, "gradient": 0, "other": 288}
    assert plan.peak_total_bytes == 408
    assert plan.peak_host == {"gathered": 0, "activation": 0, "gradient": 108, "other": 0}  # 4 B x (12 + 3 + 12)
    assert plan.peak_host_total_bytes == 108
    assert plan.summary().splitlines()[1] == (
        "predicted peak host bytes per rank (offload copies, not in the above): "
        "gathered=0, activation=0, gradient=108, other=0, total=108")
    region = plan.regions[0]
    first = next(e for e in region.timeline if e.role == "host_copy")
    assert first.live == {"gathered": 0, "activation": 0, "gradient": 0, "other": 48} and first.host_total == 0
    # without offload the same step holds the same device bytes, plus the gradient shards
    torch._dynamo.reset()
    torch.manual_seed(0)
    zero = {"stage": 3, "allgather_bucket_size": 0, "reduce_bucket_size": 0}
    model = zerograph.compile(TinyMLP(), {"zero_optimization": zero, "zerograph": {"device": "cpu"}})
    model(torch.randn(5, 4)).backward()
    device = zerograph.inspect(model).memory
    assert device.peak == {**plan.peak, "gradient": plan.peak_host["gradient"]}
    assert device.peak_host_total_bytes == 0
    # explain: a host line next to the device peaks, and "host bytes" counters in the trace
    report = zerograph.explain(TinyMLP(), {"zero_optimization": {**zero, **OFFLOAD}, "zerograph": {"device": "cpu"}},
                               torch.randn(5, 4))
    assert report.plan.peak_host == plan.peak_host and report.plan.peak == plan.peak
    lines = [line for line in str(report).splitlines() if "host in-step peak" in line]
    assert lines == ["  host in-step peak        0.000 MiB   "
                     "(offload copies, not in the device peaks above: gradient 0.000)"]
    host_counters = [e["args"] for e in report.chrome_trace()["traceEvents"] if e["name"] == "host bytes"]
    assert max(sum(c.values()) for c in host_counters) == plan.peak_host_total_bytes


# --------------------------------------------------------------------------- training equivalence

def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _offload_rank(cases, steps=2):
    """On each rank: train one fresh GPT per (zero section, optimizer builder);
    return (losses, full state dict) per case, after checking where shards live."""
    import torch.distributed as dist

    from zerograph.runtime.optimizer import HostOptimizer, make_optimizer

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for zero, builder in cases:
        torch._dynamo.reset()
        model = zerograph.compile(_models.make_gpt(), {"zero_optimization": zero})
        if builder == "make_optimizer":
            opt = make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)
            assert isinstance(opt, HostOptimizer) and all(opt.resident)
            # the optimizer steps the host shards themselves: no second master copy
            assert all(_local(h).data_ptr() == _local(p).data_ptr()
                       for h, p in zip(opt.masters, opt.device_params))
        else:
            opt = _harness._optimizer(model.parameters())
        losses = []
        for step in range(steps):
            idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
            idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
            loss = model(idx, targets).loss
            loss.backward()
            assert all(_local(p.grad).device.type == "cpu" for p in model.parameters())
            losses.append(_step(loss, opt, world))
        info = zerograph.inspect(model)
        gathers = sum(_role(n) == "all_gather" for g in info.forward for n in g.graph.nodes)
        to_device = [n for g in info.forward for n in g.graph.nodes if _role(n) == "host_copy"]
        assert gathers > 0 and len(to_device) == len(list(model.parameters()))
        out.append((losses, {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}))
    return out


def _step(loss, opt, world) -> float:
    """The optimizer step after ``loss.backward()``; the loss averaged over ranks."""
    import torch.distributed as dist

    opt.step()
    opt.zero_grad()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return mean.item() / world


CASES = [
    ({"stage": 3, **OFFLOAD}, "make_optimizer"),
    ({"stage": 3, **OFFLOAD, "offload_optimizer": {"device": "cpu", "pin_memory": True}}, "make_optimizer"),
    ({"stage": 3, **OFFLOAD, "allgather_bucket_size": 0, "reduce_bucket_size": 0}, "torch.optim.AdamW"),
]


@pytest.mark.timeout(TIMEOUT + 30)
def test_offload_param_matches_eager_world2():
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=2)
    results = _pool.run(_offload_rank, 2, CASES, timeout=TIMEOUT)[0]
    for (zero, builder), (losses, params) in zip(CASES, results):
        try:
            _harness.assert_same_training({"losses": losses, "params": params}, ref_losses, ref_params)
        except AssertionError as err:
            raise AssertionError(f"{zero}, {builder}: {err}") from err


@pytest.mark.parametrize("entry,accumulation", [("compile", 1), ("eager", 1), ("compile", 2)])
def test_offload_param_matches_eager_world1(entry, accumulation):
    """World size 1: nothing is gathered, but every shard still lives on the
    host and is copied to the device before use (eagerly: inside ``unshard``);
    with accumulation, the host gradients of two micro-batches add up."""
    from zerograph.runtime.optimizer import make_optimizer

    ref_losses, ref_params = _harness.reference_run("gpt", 1, steps=2, accumulation=accumulation)
    torch._dynamo.reset()
    config = {"zero_optimization": {"stage": 3, **OFFLOAD}, "gradient_accumulation_steps": accumulation}
    model = _models.make_gpt()
    model = zerograph.compile(model, config) if entry == "compile" else zerograph.shard(model, config)
    opt = make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)
    assert all(opt.resident)
    losses = []
    for step in range(2):
        idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH)
        total = 0.0
        for micro_idx, micro_targets in zip(idx.chunk(accumulation), targets.chunk(accumulation)):
            loss = model(micro_idx, micro_targets).loss
            loss.backward()
            total += loss.item() / accumulation
        opt.step()
        opt.zero_grad()
        losses.append(total)
    params = {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()}
    _harness.assert_same_training({"losses": losses, "params": params}, ref_losses, ref_params)
    if entry == "compile":
        forward = zerograph.inspect(model).forward[0]
        assert sum(_role(n) == "host_copy" for n in forward.graph.nodes) == len(list(model.parameters()))


# --------------------------------------------------------------------------- config

def _load_error(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Config.load(cfg)
    return str(info.value).splitlines()[-1].strip()


def test_offload_param_config_errors():
    assert_expected_inline(
        _load_error({"zero_optimization": {"stage": 2, **OFFLOAD}}),
        """zero_optimization.offload_param.device="cpu" needs zero_optimization.stage 3 (now 2): only stage 3 gathers parameters from shards, so only there can they live on the host; set stage to 3, or use offload_optimizer.device "cpu" (optimizer states on the host) instead""",
    )
    assert "needs zero_optimization.stage 3 (now 0)" in _load_error({"zero_optimization": OFFLOAD})
    assert "needs zero_optimization.stage 3 (now 2)" in _load_error(
        {"zero_optimization": {"stage": 2, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}})
    cfg = Config.load({"zero_optimization": {"stage": 3, **OFFLOAD}})
    assert cfg.zero_optimization.offload_param.device == "cpu"
    assert cfg.zero_optimization.offload_optimizer.device == "none"  # not rewritten: the host step is implied


# --------------------------------------------------------------------------- Inductor

class MLPLM(nn.Module):
    """A small language model (uneven vocabulary rows: padded shards) whose
    graphs Inductor compiles in seconds."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(_models.VOCAB, 24)
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, _models.VOCAB)

    def forward(self, idx, targets):
        logits = self.fc2(torch.relu(self.fc1(self.emb(idx))))
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _make_mlp_lm():
    torch.manual_seed(1234)
    return MLPLM()


def _mlp_lm_reference(world: int, steps: int):
    """Single-process eager training on the whole global batch of each step."""
    model = _make_mlp_lm()
    opt = _harness._optimizer(model.parameters())
    losses = []
    for step in range(steps):
        idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
        losses.append(_harness.step_mean_loss(model(idx, targets), opt))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _inductor_offload_rank(steps: int):
    """Train MLPLM with offload_param and the Inductor compiler; return the
    losses, the full parameters, the number of ``aten._to_copy`` nodes
    Inductor got decomposed per compiled graph, and the number of
    ``host_copy`` nodes in zerograph's graphs."""
    import torch._inductor.config as inductor_config
    import torch.distributed as dist

    import zerograph.backend.lowering as lowering
    from zerograph.runtime.optimizer import make_optimizer

    inductor_config.fx_graph_cache = False  # compile every graph (the test's cache dir is fresh, too)
    decomposed = []
    original = lowering.decompose_copies

    def counting(gm):
        decomposed.append(original(gm))
        assert not any(n.target is COPY for n in gm.graph.nodes)
        return decomposed[-1]

    lowering.decompose_copies = counting
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        torch._dynamo.reset()
        config = {"zero_optimization": {"stage": 3, **OFFLOAD}, "zerograph": {"compiler": "inductor"}}
        model = zerograph.compile(_make_mlp_lm(), config)
        opt = make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)
        assert all(opt.resident)
        losses = []
        for step in range(steps):
            idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
            idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
            losses.append(_harness.step_mean_loss(model(idx, targets), opt))
        info = zerograph.inspect(model)
        graphs = info.forward + info.backward
        host_copies = [sum(_role(n) == "host_copy" for n in g.graph.nodes) for g in graphs]
        gathers = sum(_role(n) == "all_gather" for g in graphs for n in g.graph.nodes)
        params = {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()}
    finally:  # the rank process runs other tests' bodies next
        lowering.decompose_copies = original
    return losses, params, decomposed, host_copies, gathers


@pytest.mark.slow  # CI: test_decompose_copies_for_inductor, test_offload.py's Inductor test
@pytest.mark.timeout(TIMEOUT + 30)
def test_offload_param_with_inductor_matches_eager_world2(tmp_path):
    """offload_param with ``zerograph.compiler: inductor``: the lowered graphs'
    host copies (``aten._to_copy``, which Inductor has no lowering for) reach
    Inductor decomposed; training equals the eager reference. A fresh Inductor
    cache directory and no FX graph cache: every graph is compiled."""
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    steps = 2
    losses, params, decomposed, host_copies, gathers = _pool.run(_inductor_offload_rank, 2, steps, timeout=TIMEOUT,
                                                                 env=env)[0]
    # forward and backward compiled by Inductor, each with every host copy decomposed
    assert len(decomposed) == 2 and decomposed == host_copies, (decomposed, host_copies)
    assert host_copies[0] == len(list(_make_mlp_lm().parameters())) and gathers > 0
    ref_losses, ref_params = _mlp_lm_reference(2, steps)
    # Inductor fuses and reorders float arithmetic: fp32 agreement to a few ulps
    _harness.assert_same_training({"losses": losses, "params": params}, ref_losses, ref_params)


def test_decompose_copies_for_inductor():
    """The ``aten._to_copy`` nodes zerograph inserts become what Inductor's
    decomposition traces to (a dtype cast, or a clone where nothing changes:
    a cpu -> cpu host copy); the graph computes the same values."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from zerograph.graph.decompose_copies import decompose_copies

    def f(x):
        cast = COPY(x, dtype=torch.bfloat16)
        host = COPY(x, device=torch.device("cpu"), pin_memory=False, non_blocking=True)
        return cast, host * 2

    x = torch.randn(3, 5)
    gm = make_fx(f, tracing_mode="fake")(x)
    assert sum(n.target is COPY for n in gm.graph.nodes) == 2
    assert decompose_copies(gm) == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.prims.convert_element_type.default, torch.ops.aten.clone.default,
                       torch.ops.aten.mul.Tensor], targets
    cast, doubled = gm(x)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, x.to(torch.bfloat16))
    assert torch.equal(doubled, x * 2)

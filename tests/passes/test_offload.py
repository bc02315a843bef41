"""Activation offload (``activation_checkpointing.offload_activations``): graph
nodes inserted, training equal to eager, alone and with checkpoint policies, at
world 1 and at world 2 with ZeRO stages 2 and 3."""

from __future__ import annotations

import logging

import pytest
import torch
from expecttest import assert_expected_inline

import zerograph
from tests import _harness, _models
from tests._harness import TIMEOUT
from tests.passes.test_checkpointing import _eager_step, saved_bytes
from zerograph.config import Config
from zerograph.graph.format import format_graph


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(4, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).sum()


def _copies(gm) -> str:
    return "\n".join(f"{n.name} = {n.target}({n.args[0]}, {', '.join(f'{k}={v}' for k, v in n.kwargs.items())})"
                     for n in gm.graph.nodes if n.target is torch.ops.aten._to_copy.default)


def _offloaded(model, x, ref):
    """Forward and backward with offload, gradients checked against eager; the graphs."""
    model(x).backward()
    ref(x).backward()
    for (key, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=0, msg=key)
    return zerograph.inspect(model).regions[0]["graphs"]


def test_golden_offload_and_reload_nodes():
    """relu's storage is saved once, as its host copy: threshold_backward reads
    AOTAutograd's ``detach(relu)``, which the backward re-creates from the
    copy back (``detach_realias``) instead of the forward saving ``detach``
    (the same storage, on the device)."""
    model = zerograph.compile(TinyMLP(), {"activation_checkpointing": {"offload_activations": True}})
    graphs = _offloaded(model, torch.randn(2, 4), TinyMLP())
    assert_expected_inline(format_graph(graphs["forward"]), """\
primals_1: f32[8, 4]
primals_2: f32[8]
primals_3: f32[2, 4]
primals_4: f32[3, 8]
primals_5: f32[3]
t: f32[4, 8] = aten.t(primals_1)
addmm: f32[2, 8] = aten.addmm(primals_2, primals_3, t)
relu: f32[2, 8] = aten.relu(addmm)
relu_offload: f32[2, 8] = aten._to_copy(relu, device=device(type='cpu'), pin_memory=False, non_blocking=False)
t_1: f32[8, 3] = aten.t(primals_4)
addmm_1: f32[2, 3] = aten.addmm(primals_5, relu, t_1)
sum_1: f32[] = aten.sum(addmm_1)
return [sum_1, primals_3, relu_offload, t_1]""")
    assert_expected_inline(format_graph(graphs["backward"]), """\
primals_3: f32[2, 4]
relu_offload: f32[2, 8]
t_1: f32[8, 3]
tangents_1: f32[]
expand: f32[2, 3] = aten.expand(tangents_1, [2, 3])
t_2: f32[3, 8] = aten.t(t_1)
mm: f32[2, 8] = aten.mm(expand, t_2)
t_3: f32[3, 2] = aten.t(expand)
relu_reload: f32[2, 8] = aten._to_copy(relu_offload, device=device(type='cpu'), non_blocking=False)
detach_realias: f32[2, 8] = aten.detach(relu_reload)
mm_1: f32[3, 8] = aten.mm(t_3, relu_reload)
t_4: f32[8, 3] = aten.t(mm_1)
sum_2: f32[1, 3] = aten.sum.dim_IntList(expand, [0], True)
view: f32[3] = aten.view(sum_2, [3])
t_5: f32[3, 8] = aten.t(t_4)
detach_1: f32[2, 8] = aten.detach(detach_realias)
threshold_backward: f32[2, 8] = aten.threshold_backward(mm, detach_1, 0)
t_6: f32[8, 2] = aten.t(threshold_backward)
mm_2: f32[8, 4] = aten.mm(t_6, primals_3)
t_7: f32[4, 8] = aten.t(mm_2)
sum_3: f32[1, 8] = aten.sum.dim_IntList(threshold_backward, [0], True)
view_1: f32[8] = aten.view(sum_3, [8])
t_8: f32[8, 4] = aten.t(t_7)
return [t_8, view_1, None, t_5, view]""")


class ViewMLP(torch.nn.Module):
    """The backward reads tanh's output through four aliases: detach
    (tanh_backward), view (bmm), t and slice (mm)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(4, 8)
        self.w = torch.nn.Parameter(torch.randn(2, 4, 3))

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        y = torch.bmm(h.view(2, 2, 4), self.w)
        z = h.t() @ h[:, :3]
        return y.sum() + z.sum()


def test_offload_recreates_aliases_in_backward():
    """One host copy of tanh for all its aliases; the backward re-creates each
    alias it reads from the copy back, and the forward saves no alias."""
    model = zerograph.compile(ViewMLP(), {"activation_checkpointing": {"offload_activations": True}})
    graphs = _offloaded(model, torch.randn(2, 4), ViewMLP())
    fw_out = next(n for n in graphs["forward"].graph.nodes if n.op == "output").args[0]
    assert_expected_inline(str([a.name for a in fw_out]), """['add', 'primals_3', 'tanh_offload', 'primals_4']""")
    assert_expected_inline(_copies(graphs["forward"]), """tanh_offload = aten._to_copy.default(tanh, device=cpu, pin_memory=False, non_blocking=False)""")
    backward = graphs["backward"]
    assert_expected_inline("\n".join(format_graph(backward).splitlines()[4:11]), """\
expand: f32[8, 3] = aten.expand(tangents_1, [8, 3])
expand_1: f32[2, 2, 3] = aten.expand(tangents_1, [2, 2, 3])
tanh_reload: f32[2, 8] = aten._to_copy(tanh_offload, device=device(type='cpu'), non_blocking=False)
detach_realias: f32[2, 8] = aten.detach(tanh_reload)
view_realias: f32[2, 2, 4] = aten.view(tanh_reload, [2, 2, 4])
t_1_realias: f32[8, 2] = aten.t(tanh_reload)
slice_1_realias: f32[2, 3] = aten.slice.Tensor(tanh_reload, 1, 0, 3)""")
    details = next(r.details for r in zerograph.inspect(model).passes if r.name == "activation_checkpointing")
    assert (details["offloaded"], details["realiased"]) == (1, 4)
    assert zerograph.inspect(model).memory.regions[0].held["activation"] == 0


def test_plan_counts_offloaded_activations_as_host_bytes():
    """The memory plan: the saved host copy (relu_offload, 2 x 8 fp32) is host
    memory from the forward to its reload; nothing of relu stays saved on the
    device (without offload the forward saves ``detach(relu)``, 64 device
    bytes held into the backward); the reload, and the ``detach`` the backward
    re-creates from it, is a device temporary."""
    plans = []
    for offload in (True, False):
        torch._dynamo.reset()
        model = zerograph.compile(TinyMLP(), {"activation_checkpointing": {"offload_activations": offload}})
        model(torch.randn(2, 4)).backward()
        plans.append(zerograph.inspect(model).memory)
    plan, device = plans
    region = plan.regions[0]
    where = {(phase, st.root): (st.kind, st.location, st.nbytes, st.members)
             for phase, stores in region.storages.items() for st in stores}
    host_copy = ("activation", "host", 64)
    assert where[("forward", "relu_offload")][:3] == where[("backward", "relu_offload")][:3] == host_copy
    assert where[("backward", "relu_reload")] == ("other", "device", 64, ("relu_reload", "detach_realias", "detach_1"))
    assert plan.peak_host == {"gathered": 0, "activation": 64, "gradient": 0, "other": 0}
    assert plan.peak_host_total_bytes == 64 and device.peak_host_total_bytes == 0
    # device: saved activation bytes drop from 64 to 0
    assert region.held == {"gathered": 0, "activation": 0, "gradient": 0, "other": 0}
    assert device.regions[0].held == {"gathered": 0, "activation": 64, "gradient": 0, "other": 0}
    assert plan.peak["activation"] == 0 and device.peak["activation"] == 64
    # the step's peak is in the backward, where the reload takes the place of the saved detach
    assert plan.peak_total_bytes == device.peak_total_bytes == 332


def test_offload_with_inductor_matches_eager(tmp_path, monkeypatch):
    """With ``zerograph.compiler: inductor`` the host copy and the reload
    (``aten._to_copy``, which Inductor has no lowering for) reach Inductor
    decomposed; gradients equal eager's. Inductor's FX graph cache is off."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    torch._dynamo.reset()
    config = {"activation_checkpointing": {"offload_activations": True}, "zerograph": {"compiler": "inductor"}}
    model = zerograph.compile(TinyMLP(), config)
    x = torch.randn(2, 4)
    model(x).backward()
    graphs = zerograph.inspect(model).regions[0]["graphs"]
    assert "relu_offload" in _copies(graphs["forward"]) and "relu_reload" in _copies(graphs["backward"])
    ref = TinyMLP()
    ref(x).backward()
    for (key, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("dropout,policy", [(0.0, "none"), (0.1, "per_layer"), (0.1, "memory_budget")])
def test_offload_matches_eager_world1(dropout, policy):
    section = {"policy": policy, "offload_activations": True}
    if policy == "memory_budget":
        section["memory_budget"] = 0.5
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(dropout), {"activation_checkpointing": section})
    idx, targets = _models.global_batch(0, 4)
    torch.manual_seed(7)
    loss = model(idx, targets).loss
    loss.backward()
    ref_loss, ref_grads = _eager_step(dropout)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    for key, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    insp = zerograph.inspect(model)
    details = next(r.details for r in insp.passes if r.name == "activation_checkpointing")
    assert details["offloaded"] > 0
    backward = insp.regions[0]["graphs"]["backward"]
    reloads = [n for n in backward.graph.nodes if n.name.endswith("_reload")]
    assert len(reloads) == details["offloaded"]
    # every reload reads a host copy handed over by the forward (a backward input)
    assert all(n.args[0].op == "placeholder" and n.args[0].name.endswith("_offload") for n in reloads)
    assert saved_bytes(model) > 0


def test_cpu_checkpointing_maps_to_offload():
    cfg = Config.load({"activation_checkpointing": {"cpu_checkpointing": True, "policy": "per_layer"}})
    assert cfg.activation_checkpointing.offload_activations


SECTIONS = [{"offload_activations": True}, {"policy": "memory_budget", "memory_budget": 0.5, "offload_activations": True}]


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])  # CI: stage 3
def test_offload_matches_eager_world2(stage):
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=2)
    configs = [{"zero_optimization": {"stage": stage}, "activation_checkpointing": s} for s in SECTIONS]
    results = _harness.train("gpt", configs, 2, 2)[0]
    for section, result in zip(SECTIONS, results):
        try:
            _harness.assert_same_training(result, ref_losses, ref_params)
        except AssertionError as err:
            raise AssertionError(f"{section}, stage {stage}: {err}") from err


# --------------------------------------------------------------------------- optimizer offload

def _host_optimizer(model):
    from zerograph.runtime.optimizer import HostOptimizer, make_optimizer

    opt = make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)
    assert isinstance(opt, HostOptimizer)
    return opt


def _states_on_the_host(model, opt):
    """After training with offload_optimizer: the optimizer's states belong to
    the host copies, not to the model's parameters."""
    host_ids = {id(h) for h in opt.masters}
    assert all(id(p) in host_ids for p in opt.state) and len(opt.state) == len(opt.masters)
    assert all(h.data_ptr() != p.to_local().data_ptr() if hasattr(p, "to_local") else h.data_ptr() != p.data_ptr()
               for h, p in zip(opt.masters, opt.device_params))
    return {}


@pytest.mark.timeout(TIMEOUT + 30)
# CI: stage 2; stage 3's host optimizer also trains (and resumes) in tests/checkpoint/test_offload_checkpoint.py
@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_offload_optimizer_matches_eager_world2(stage):
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=2)
    config = {"zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": True}}}
    result = _harness.train("gpt", config, 2, 2, optimizer=_host_optimizer, report=_states_on_the_host)[0]
    _harness.assert_same_training(result, ref_losses, ref_params)


def _offload_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "takes effect only" in r.getMessage()]


@pytest.mark.parametrize("builder", ["make_optimizer", "plain"])
def test_offload_optimizer_warns_only_when_a_plain_optimizer_steps(builder, caplog):
    """The warning that offload_optimizer needs make_optimizer comes from the
    first step of a torch optimizer that holds the model's parameters, once;
    never at compile time, never for make_optimizer's HostOptimizer."""
    from zerograph.runtime.optimizer import make_optimizer

    caplog.set_level(logging.WARNING, logger="zerograph")
    model = zerograph.compile(TinyMLP(), {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert _offload_warnings(caplog) == []
    other = torch.optim.SGD(TinyMLP().parameters(), lr=0.1)  # another model's parameters: not this model's business
    other.step()
    if builder == "make_optimizer":
        opt = make_optimizer(model, torch.optim.SGD, lr=0.1)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert _offload_warnings(caplog) == []
    for _ in range(2):
        model(torch.randn(2, 4)).backward()
        opt.step()
        opt.zero_grad()
    message = ("zerograph: offload_optimizer.device='cpu' takes effect only for an optimizer built with "
               "zerograph.make_optimizer(model, torch.optim.SGD, ...); this SGD steps the parameters of TinyMLP "
               "directly and keeps its states on the parameters' device")
    assert _offload_warnings(caplog) == ([] if builder == "make_optimizer" else [message])
    torch.optim.SGD(model.parameters(), lr=0.0).step()  # a plain optimizer now: warned about once per model
    assert _offload_warnings(caplog) == [message]

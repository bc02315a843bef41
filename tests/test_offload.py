"""Activation offload (``activation_checkpointing.offload_activations``): graph
nodes inserted, training equal to eager, alone and with checkpoint policies, at
world 1 and at world 2 with ZeRO stages 2 and 3."""

from __future__ import annotations

import pytest
import torch
from expecttest import assert_expected_inline

import zerograph
from tests import _harness, _models
from tests.test_checkpointing import _eager_step, saved_bytes
from zerograph.config import Config
from zerograph.runtime.launch import spawn

TIMEOUT = 300


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


def test_golden_offload_and_reload_nodes():
    torch._dynamo.reset()
    model = zerograph.compile(TinyMLP(), {"activation_checkpointing": {"offload_activations": True}})
    x = torch.randn(2, 4)
    model(x).backward()
    graphs = zerograph.inspect(model).regions[0]["graphs"]
    fw_out = [a.name for a in next(n for n in graphs["forward"].graph.nodes if n.op == "output").args[0][1:]]
    # the forward saves the host copy of relu, not relu itself
    assert "relu_offload" in fw_out and "relu" not in fw_out
    assert_expected_inline(_copies(graphs["forward"]), """relu_offload = aten._to_copy.default(relu, device=cpu, pin_memory=False, non_blocking=False)""")
    assert_expected_inline(_copies(graphs["backward"]), """relu_reload = aten._to_copy.default(relu_offload, device=cpu, non_blocking=False)""")
    ref = TinyMLP()
    ref(x).backward()
    for (key, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=key)


def test_plan_counts_offloaded_activations_as_host_bytes():
    """The memory plan: the saved host copy (relu_offload, 2 x 8 fp32) is host
    memory from the forward to its reload, outside the device peaks (which
    equal those without offload: relu's ``detach``, read by
    threshold_backward, is still saved on the device); the reload is a device
    temporary."""
    plans = []
    for offload in (True, False):
        torch._dynamo.reset()
        model = zerograph.compile(TinyMLP(), {"activation_checkpointing": {"offload_activations": offload}})
        model(torch.randn(2, 4)).backward()
        plans.append(zerograph.inspect(model).memory)
    plan, device = plans
    region = plan.regions[0]
    where = {(phase, st.root): (st.kind, st.location, st.nbytes) for phase, stores in region.storages.items()
             for st in stores}
    assert where[("forward", "relu_offload")] == where[("backward", "relu_offload")] == ("activation", "host", 64)
    assert where[("backward", "relu_reload")] == ("other", "device", 64)
    assert plan.peak_host == {"gathered": 0, "activation": 64, "gradient": 0, "other": 0}
    assert plan.peak_host_total_bytes == 64 and device.peak_host_total_bytes == 0
    assert plan.peak == device.peak and plan.peak_total_bytes == device.peak_total_bytes
    assert region.held == device.regions[0].held == {"gathered": 0, "activation": 64, "gradient": 0, "other": 0}


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
@pytest.mark.parametrize("stage", [2, 3])
def test_offload_matches_eager_world2(stage):
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=2)
    configs = [{"zero_optimization": {"stage": stage}, "activation_checkpointing": s} for s in SECTIONS]
    results = spawn(_harness.zerograph_run, 2, "gpt", configs, 2, timeout=TIMEOUT)[0]
    for section, result in zip(SECTIONS, results):
        try:
            _harness.assert_same_training(result, ref_losses, ref_params)
        except AssertionError as err:
            raise AssertionError(f"{section}, stage {stage}: {err}") from err


# --------------------------------------------------------------------------- optimizer offload

def _offload_optimizer_rank(stage, steps=2):
    """Train with offload_optimizer on the host; return (losses, full state dict, where states live)."""
    import torch.distributed as dist

    from zerograph.runtime.offload import HostOptimizer, make_optimizer

    torch._dynamo.reset()
    world = dist.get_world_size()
    model = zerograph.compile(_models.make_gpt(), {"zero_optimization": {
        "stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": True}}})
    opt = make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)
    assert isinstance(opt, HostOptimizer)
    losses = []
    for step in range(steps):
        idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
        rank = dist.get_rank()
        idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
        losses.append(_harness.step_mean_loss(model(idx, targets).loss, opt))
    # the optimizer's states belong to the host copies, not to the model's parameters
    host_ids = {id(h) for h in opt.host_params}
    assert all(id(p) in host_ids for p in opt.state) and len(opt.state) == len(opt.host_params)
    assert all(h.data_ptr() != p.to_local().data_ptr() if hasattr(p, "to_local") else h.data_ptr() != p.data_ptr()
               for h, p in zip(opt.host_params, opt.device_params))
    return losses, {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("stage", [2, 3])
def test_offload_optimizer_matches_eager_world2(stage):
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=2)
    losses, params = spawn(_offload_optimizer_rank, 2, stage, timeout=TIMEOUT)[0]
    _harness.assert_same_training({"losses": losses, "params": params}, ref_losses, ref_params)


def test_make_optimizer_plain_without_offload():
    model = zerograph.compile(TinyMLP(), {})
    from zerograph.runtime.offload import make_optimizer

    assert isinstance(make_optimizer(model, torch.optim.SGD, lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="zerograph.compile"):
        make_optimizer(TinyMLP(), torch.optim.SGD, lr=0.1)

"""Train a model with zerograph on spawned ranks and with single-process
eager PyTorch, on the same global batches, so tests can compare the two."""

from __future__ import annotations

import gc

import torch

import zerograph
from tests import _models  # noqa: E402

STEPS = 5
LR = 1e-2
# Adam divides each gradient by its running RMS. Some gradients are exactly
# zero in exact arithmetic (e.g. GPT-2's key bias: softmax ignores a shift of
# the keys) and are float round-off in practice, which Adam would blow up to
# steps of size ~LR. eps=1e-4 keeps those steps below 1e-7 and leaves every
# real gradient's update Adam-like.
EPS = 1e-4
PER_RANK_BATCH = 4


def _optimizer(params, lr=LR):
    return torch.optim.AdamW(params, lr=lr, eps=EPS, foreach=False)


def _compute_params(model, dtype):
    if dtype == torch.float32:
        return None
    return {k: v.to(dtype) for k, v in dict(model.named_parameters()).items()}


def reference_run(model_name: str, world: int, *, accumulation: int = 1, clip: float = 0.0,
                  dtype: torch.dtype = torch.float32, steps: int = STEPS, lr: float = LR):
    """Single-process eager training on the whole global batch of each step.

    For bf16/fp16 the parameters are cast to the compute dtype inside the
    forward (``functional_call``), the same math zerograph's gather does."""
    model = _models.MODELS[model_name]()
    opt = _optimizer(model.parameters(), lr)
    losses = []
    for step in range(steps):
        idx, targets = _models.global_batch(step, PER_RANK_BATCH * world)
        cast = _compute_params(model, dtype)
        if cast is None:
            loss = _models.loss_of(model_name, model, idx, targets)
        else:
            loss = _models.loss_of(model_name, _Cast(model, cast), idx, targets)
        loss.float().backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()}


class _Cast:
    """Calls ``model`` with its parameters replaced by ``params``."""

    def __init__(self, model, params):
        self.model, self.params = model, params

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.params, args, kwargs, tie_weights=True)


def model_state_bytes(model, opt) -> int:
    """This rank's bytes of parameter shards, gradient shards and optimizer states."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    seen, total = set(), 0
    tensors = []
    for p in opt.param_groups[0]["params"]:
        tensors.append(p)
        if p.grad is not None:
            tensors.append(p.grad)
        tensors += [v for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        t = local(t)
        key = (t.data_ptr(), t.numel())  # views into one bucket buffer are distinct tensors
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _prepare(model, config, entry: str):
    if entry == "compile":
        return zerograph.compile(model, config)
    model = zerograph.shard(model, config)
    if entry == "torch_compile":
        return torch.compile(model, backend="zerograph")
    assert entry == "eager", entry
    return model


def zerograph_run(model_name: str, configs: list[dict], steps: int = STEPS, lr: float = LR, entry: str = "compile"):
    """On each spawned rank: train one fresh model per config; return per
    config (mean loss per step, full state dict, bytes, comm, regions)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for config in configs:
        torch._dynamo.reset()
        accumulation = config.get("gradient_accumulation_steps", 1)
        model = _prepare(_models.MODELS[model_name](), config, entry)
        opt = _optimizer(model.parameters(), lr)
        losses = []
        state_bytes = 0
        for step in range(steps):
            idx, targets = _models.global_batch(step, PER_RANK_BATCH * world)
            idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
            total = 0.0
            for micro_idx, micro_t in zip(idx.chunk(accumulation), targets.chunk(accumulation)):
                loss = _models.loss_of(model_name, model, micro_idx, micro_t)
                loss.backward()
                total += loss.detach().float() / accumulation
            if step == 0:
                opt.step()
                state_bytes = model_state_bytes(model, opt)
            else:
                opt.step()
            opt.zero_grad()
            mean = torch.tensor(float(total))
            if world > 1:
                dist.all_reduce(mean)
            losses.append(mean.item() / world)
        info = zerograph.inspect(model)
        results.append(
            {
                "losses": losses,
                "params": {k: v.detach().float().clone() for k, v in zerograph.full_state_dict(model).items()},
                "state_bytes": state_bytes,
                "comm": dict(info.comm_bytes_last_step),
                "comm_by_scope": dict(info.comm_bytes_by_scope_last_step),
                "regions": len(info.regions),
                "comm_by_phase": _comm_by_phase(info),
            }
        )
        del model, opt
        gc.collect()
    return results


def _comm_by_phase(info) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for region in info.regions:
        for phase, by_kind in region["comm_bytes"].items():
            for kind, nbytes in by_kind.items():
                out.setdefault(phase, {}).setdefault(kind, 0)
                out[phase][kind] += nbytes
    return out


def assert_same_training(result, ref_losses, ref_params, *, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=rtol, atol=atol)
    assert result["params"].keys() == ref_params.keys()
    for key, ref in ref_params.items():
        torch.testing.assert_close(result["params"][key], ref, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def step_mean_loss(loss: torch.Tensor, opt) -> float:
    """``loss.backward()``, one optimizer step and ``zero_grad``; returns the loss
    averaged over the ranks of the default group (every rank gets the same value)."""
    import torch.distributed as dist

    loss.backward()
    opt.step()
    opt.zero_grad()
    mean = loss.detach().clone()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(mean)
    return mean.item() / world


def train_global_batches(model, opt, steps) -> list[float]:
    """Train on the global batches of ``steps`` (the same at every world size):
    this rank's rows of each, one optimizer step each; the mean losses."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    losses = []
    for step in steps:
        idx, targets = _models.global_batch(step, PER_RANK_BATCH * 2)
        idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
        losses.append(step_mean_loss(model(idx, targets).loss, opt))
    return losses

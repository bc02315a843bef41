"""Train a model with zerograph on spawned ranks and with single-process
eager PyTorch, on the same global batches, so tests can compare the two."""

from __future__ import annotations

import functools
import gc
import os

import torch

import zerograph
from tests import _models  # noqa: E402

# Every distributed call's timeout (spawn, tests/_pool.py, subprocesses), and
# with a margin the tests' own (pytest-timeout). ZEROGRAPH_TEST_TIMEOUT
# raises it on a machine too loaded for 420 s (timeouts only catch hangs).
TIMEOUT = int(os.environ.get("ZEROGRAPH_TEST_TIMEOUT", "420"))
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


def reference_run(model_name, world: int, *, accumulation: int = 1, clip: float = 0.0,
                  dtype: torch.dtype = torch.float32, steps: int = STEPS, lr: float = LR):
    """Single-process eager training on the whole global batch of each step:
    the losses and the final state dict (fp32).

    For bf16/fp16 the parameters are cast to the compute dtype inside the
    forward (``functional_call``), the same math zerograph's gather does.
    A named model's run is computed once per session (many tests compare
    against the same one); every caller gets its own copy."""
    if not isinstance(model_name, str):
        return _reference(model_name, world, clip, dtype, steps, lr)
    losses, params = _reference_of_named(model_name, world, clip, dtype, steps, lr)
    return list(losses), {k: v.clone() for k, v in params.items()}


@functools.lru_cache(maxsize=64)
def _reference_of_named(model_name: str, world: int, clip: float, dtype: torch.dtype, steps: int, lr: float):
    return _reference(model_name, world, clip, dtype, steps, lr)


def _reference(model_name, world: int, clip: float, dtype: torch.dtype, steps: int, lr: float):
    model = build_model(model_name)
    opt = _optimizer(model.parameters(), lr)
    losses = []
    for step in range(steps):
        idx, targets = _models.global_batch(step, PER_RANK_BATCH * world)
        cast = _compute_params(model, dtype)
        if cast is None:
            loss = model_loss(model_name, model, idx, targets)
        else:
            loss = model_loss(model_name, _Cast(model, cast), idx, targets)
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


def tp_local_shape(p) -> tuple[int, ...]:
    """The shape of this rank's tensor-parallel slice of parameter ``p``: a
    DTensor on the ``("dp", "tp")`` mesh has the whole shape, cut here along
    the dim its ``"tp"`` placement shards; any other tensor's own shape."""
    from torch.distributed.tensor import DTensor

    names = p.device_mesh.mesh_dim_names or () if isinstance(p, DTensor) else ()
    if "tp" not in names:
        return tuple(p.shape)
    shape = list(p.shape)
    at = names.index("tp")
    placement = p.placements[at]
    if hasattr(placement, "dim"):  # Shard or _StridedShard
        shape[placement.dim] //= p.device_mesh.size(at)
    return tuple(shape)


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


def build_model(model):
    """A fresh model: ``model`` is a name in ``_models.MODELS`` or a factory
    (importable by the ranks: module-level, or a ``functools.partial`` of one)."""
    return _models.MODELS[model]() if isinstance(model, str) else model()


def model_loss(model_key, model, idx, targets):
    """The training loss of ``model`` (built from ``model_key``) on one batch:
    ``_models.loss_of`` for a named model; otherwise the model's output, or its
    ``.loss``, called as ``model(idx, targets)``."""
    if isinstance(model_key, str):
        return _models.loss_of(model_key, model, idx, targets)
    out = model(idx, targets)
    return out.loss if hasattr(out, "loss") else out


def zerograph_run(model, configs: list[dict], steps: int = STEPS, lr: float = LR, entry: str = "compile",
                  optimizer=None, batch=None, loss=None, report=None):
    """On each rank: train one fresh model per config; return per config
    (mean loss per step, full state dict, bytes, comm, regions, and what
    ``report`` adds).

    ``model``: see :func:`build_model`. ``optimizer(model)``: the optimizer
    (default AdamW at ``lr``). ``batch(step, rows)``: the global batch of a
    step (default ``_models.global_batch``); each rank trains its rows of it,
    in ``gradient_accumulation_steps`` micro-batches. ``loss(model, idx,
    targets)``: the loss (default :func:`model_loss`). ``report(model, opt)``:
    a dict of more results, after training. Every hook must be importable by
    the ranks."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for config in configs:
        torch._dynamo.reset()
        accumulation = config.get("gradient_accumulation_steps", 1)
        net = _prepare(build_model(model), config, entry)
        opt = optimizer(net) if optimizer is not None else _optimizer(net.parameters(), lr)
        losses = []
        state_bytes = 0
        for step in range(steps):
            idx, targets = (batch or _models.global_batch)(step, PER_RANK_BATCH * world)
            idx, targets = idx.chunk(world)[rank], targets.chunk(world)[rank]
            total = 0.0
            for micro_idx, micro_t in zip(idx.chunk(accumulation), targets.chunk(accumulation)):
                micro_loss = (loss or functools.partial(model_loss, model))(net, micro_idx, micro_t)
                micro_loss.backward()
                total += micro_loss.detach().float() / accumulation
            if step == 0:
                opt.step()
                state_bytes = model_state_bytes(net, opt)
            else:
                opt.step()
            opt.zero_grad()
            mean = torch.tensor(float(total))
            if world > 1:
                dist.all_reduce(mean)
            losses.append(mean.item() / world)
        info = zerograph.inspect(net)
        results.append(
            {
                "losses": losses,
                "params": {k: v.detach().float().clone() for k, v in zerograph.full_state_dict(net).items()},
                "state_bytes": state_bytes,
                "comm": dict(info.comm_bytes_last_step),
                "comm_by_scope": dict(info.comm_bytes_by_scope_last_step),
                "regions": len(info.regions),
                "comm_by_phase": _comm_by_phase(info),
                **(report(net, opt) if report is not None else {}),
            }
        )
        del net, opt
        gc.collect()
    return results


def train(model, config, steps: int = STEPS, world: int = 2, *, lr: float = LR, entry: str = "compile",
          optimizer=None, batch=None, loss=None, report=None, timeout: float = TIMEOUT):
    """Train ``model`` with zerograph on ``world`` ranks of the test pool
    (tests/_pool.py) for ``steps`` steps on the global batches the eager
    reference (:func:`reference_run`) trains on; see :func:`zerograph_run`.

    ``config``: one config (each rank's result is a dict) or a list of them
    (a fresh model each; each rank's result is a list of dicts). Returns
    each rank's result, by rank."""
    from tests import _pool

    configs = config if isinstance(config, list) else [config]
    results = _pool.run(zerograph_run, world, model, configs, steps, lr, entry, optimizer, batch, loss, report,
                        timeout=timeout)
    return results if isinstance(config, list) else [r[0] for r in results]


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


def assert_ranks_agree(results) -> None:
    """Every rank ends with the same full parameters, bit for bit: ``results``
    by rank, each one result dict or a list of them (one per config)."""
    first = results[0] if isinstance(results[0], list) else [results[0]]
    for other in results[1:]:
        for mine, theirs in zip(first, other if isinstance(other, list) else [other]):
            for key in mine["params"]:
                assert torch.equal(mine["params"][key], theirs["params"][key]), key


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

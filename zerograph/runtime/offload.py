"""ZeRO-Offload: optimizer states (``zero_optimization.offload_optimizer.device:
"cpu"``) and parameter shards (``offload_param.device: "cpu"``) in host memory.

Where "the host" is, and whether host buffers are pinned, is decided here and
nowhere else (:data:`HOST`, :func:`pin_host_memory`); the lowering of
``offload_param`` (the copies in :mod:`zerograph.collectives`) and the
parameter storage (:func:`host_shard`) read it from here.

:class:`HostOptimizer` keeps, for every parameter, an fp32 master copy of this
rank's shard on the host, with its own ``.grad``; the wrapped optimizer (any
``torch.optim`` class) is built over those host copies, so its states (Adam's
moments) live on the host too. Each :meth:`~HostOptimizer.step`:

1. copies the device gradient shards to the host masters' ``.grad``
   (pinned, non-blocking on CUDA, then one synchronize);
2. runs the optimizer step on the host;
3. copies the updated masters back into the device shards.

Device memory then holds only the parameter shards and gradients (no optimizer
states, no second copy of the masters). On a CPU-only machine host and device
are the same, but the copies and the host-side step still happen, so the
mechanism is exercised there too.

With ``offload_param`` the parameter shards already live on the host in the
master dtype: :class:`HostOptimizer` then uses each such shard itself as its
master (``host_resident``), steps it in place and copies nothing (the compiled
backward already copied its gradient shard to the host, see
:func:`zerograph.collectives.reduce_param_grad`).

Build it with :func:`zerograph.runtime.offload.make_optimizer`, which returns a
plain optimizer when the config does not offload.

Checkpoints (:mod:`zerograph.checkpoint`) see a :class:`HostOptimizer` through
:meth:`~HostOptimizer.sharded_state_dict` and
:meth:`~HostOptimizer.load_sharded_state_dict`: the layout that
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` gives a
plain optimizer of the same model (states keyed by parameter name, each
shard-shaped state a DTensor like its parameter), with the host tensors as
the local shards. So a checkpoint saved with optimizer offload loads into a
run without it and the other way round, at any world size or stage. Masters
that are copies are not saved: they equal their fp32 parameters, and a
master is refreshed from its parameter whenever something else (a loaded
checkpoint, ``load_full_state_dict``) wrote into the parameter.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from zerograph._torch_private import dtensor_with_local, tensor_version

log = logging.getLogger(__name__)

# Host memory: where offloaded parameter shards, their gradients, master
# copies and optimizer states live. The compute device is the model's
# (``ShardingContext.dp.device``); on a CPU-only build the two are the same
# device and every copy between them is still made (a distinct tensor).
HOST = torch.device("cpu")


def pin_host_memory(requested: bool = True) -> bool:
    """Whether host buffers are pinned: when ``requested`` (the config's
    ``pin_memory``) and an accelerator exists (CPU builds cannot pin)."""
    return requested and torch.cuda.is_available()


def host_shard(stored: torch.Tensor, *, pin: bool) -> torch.Tensor:
    """``stored`` (a DTensor or a plain tensor) with its local shard in host
    memory: itself if it is already there and need not be pinned, else a
    copy (pinned when ``pin``), as the same kind of tensor."""
    local = _local(stored)
    if local.device == HOST and (not pin or local.is_pinned()):
        return stored
    host = torch.empty(local.shape, dtype=local.dtype, device=HOST, pin_memory=pin)
    host.copy_(local)
    if isinstance(stored, DTensor):
        return dtensor_with_local(stored, host)
    return host


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class HostOptimizer:
    """An optimizer whose fp32 master shards and states live in host memory.

    ``host_resident``: parameters whose shard already is an fp32 tensor in
    host memory (``offload_param``); each is its own master, stepped in place,
    with no copies. The others get a host master copy."""

    def __init__(self, params, optimizer_cls: Callable[..., torch.optim.Optimizer], *,
                 pin_memory: bool = False, host_resident=(), **optimizer_kwargs: Any):
        self.device_params = [p for p in params if p.requires_grad]
        if not self.device_params:
            raise ValueError("HostOptimizer got no parameters that require gradients; pass model.parameters()")
        self.pin = pin_host_memory(pin_memory)
        resident_ids = {id(p) for p in host_resident}
        self.resident = [id(p) in resident_ids and _is_host_master(p) for p in self.device_params]
        self.host_params = [self._master(p, resident) for p, resident in zip(self.device_params, self.resident)]
        # version of each copied master's parameter when the two last agreed (None: resident)
        self._synced = [None if resident else tensor_version(_local(p.detach()))
                        for p, resident in zip(self.device_params, self.resident)]
        self.optimizer = optimizer_cls(self.host_params, **optimizer_kwargs)
        log.info("zerograph: optimizer offload: %d master shards (%d bytes, %d of them the parameter shards "
                 "themselves) and %s states on the host", len(self.host_params),
                 sum(h.numel() * 4 for h in self.host_params), sum(self.resident), optimizer_cls.__name__)

    def _master(self, param: torch.Tensor, resident: bool) -> torch.nn.Parameter:
        """The host fp32 master of ``param``'s shard: the shard itself (same
        storage) when resident, else a copy (even where host == device)."""
        local = _local(param.detach())
        if resident:
            return torch.nn.Parameter(local)
        host = torch.empty(local.shape, dtype=torch.float32, device=HOST, pin_memory=self.pin)
        host.copy_(local)
        return torch.nn.Parameter(host)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("HostOptimizer.step does not take a closure; compute the loss before step()")
        self._refresh_masters()
        synchronize = any(self.resident) and torch.cuda.is_available()  # graphs' async reads of resident shards
        for dev, host, resident in zip(self.device_params, self.host_params, self.resident):
            if dev.grad is None:
                host.grad = None
                continue
            grad = _local(dev.grad)
            if resident:
                host.grad = grad  # already on the host: the backward copied it there
                continue
            synchronize = synchronize or grad.is_cuda
            if host.grad is None:
                host.grad = torch.empty(host.shape, dtype=torch.float32, device=HOST, pin_memory=self.pin)
            host.grad.copy_(grad, non_blocking=grad.is_cuda and self.pin)
        if synchronize:
            torch.cuda.synchronize()
        self.optimizer.step()
        for i, (dev, host, resident) in enumerate(zip(self.device_params, self.host_params, self.resident)):
            if not resident:
                local = _local(dev.detach())
                local.copy_(host.detach(), non_blocking=local.is_cuda and self.pin)
                self._synced[i] = tensor_version(local)

    @torch.no_grad()
    def _refresh_masters(self, force: bool = False) -> None:
        """Copy into each copied master its parameter's shard where something
        other than :meth:`step` wrote the parameter since (its version
        counter moved): a loaded checkpoint, ``load_full_state_dict``, an
        in-place edit. Else the next step would write the old master back."""
        for i, (dev, host, synced) in enumerate(zip(self.device_params, self.host_params, self._synced)):
            if synced is None:
                continue
            local = _local(dev.detach())
            if force or tensor_version(local) != synced:
                host.detach().copy_(local)
                self._synced[i] = tensor_version(local)

    def zero_grad(self, set_to_none: bool = True):
        for p in self.device_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    # -- checkpoints ---------------------------------------------------------
    def _names(self, model: torch.nn.Module) -> list[str]:
        """The model's name of each parameter of this optimizer."""
        by_id = {id(p): name for name, p in getattr(model, "_orig_mod", model).named_parameters()}
        missing = [i for i, p in enumerate(self.device_params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"zerograph: {len(missing)} parameter(s) of this HostOptimizer are not parameters of "
                             f"{type(model).__name__}; save and load it with the model it was built for")
        return [by_id[id(p)] for p in self.device_params]

    @torch.no_grad()
    def _init_state(self) -> None:
        """Create the wrapped optimizer's states if no step made them yet,
        as ``torch.distributed.checkpoint`` does for a plain optimizer: one
        step with zero gradients and learning rate 0 (which leaves the
        parameters bitwise unchanged for Adam/AdamW/SGD)."""
        if self.optimizer.state:
            return
        for host in self.host_params:
            host.grad = torch.zeros_like(host)
        lrs = [group.get("lr") for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            if "lr" in group:
                group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if lr is not None:
                group["lr"] = lr
        for host in self.host_params:
            host.grad = None

    def _flat_order(self) -> dict[int, int]:
        """id(host master) -> its index in the wrapped optimizer's state dict."""
        flat = [p for group in self.optimizer.param_groups for p in group["params"]]
        return {id(p): i for i, p in enumerate(flat)}

    def sharded_state_dict(self, model: torch.nn.Module) -> dict:
        """The optimizer state in ``get_optimizer_state_dict``'s layout for a
        plain optimizer of ``model``: ``{"state": {name: {key: value}},
        "param_groups": [{..., "params": [names]}]}``, where every state of
        its parameter's shard shape is a DTensor with the parameter's mesh
        and placements whose local shard is the host tensor itself (so
        ``torch.distributed.checkpoint.load`` fills it in place)."""
        names = self._names(model)
        self._init_state()
        inner = self.optimizer.state_dict()
        flat = [p for group in self.optimizer.param_groups for p in group["params"]]
        which = {id(h): i for i, h in enumerate(self.host_params)}
        state = {}
        for index, values in inner["state"].items():
            i = which[id(flat[index])]
            state[names[i]] = {key: _like_param(self.device_params[i], key, value) for key, value in values.items()}
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [names[which[id(flat[index])]] for index in group["params"]]}
                  for group in inner["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_sharded_state_dict(self, model: torch.nn.Module, state_dict: dict) -> None:
        """Load what :meth:`sharded_state_dict` (or ``get_optimizer_state_dict``
        for a plain optimizer of the same model) gave, after
        ``torch.distributed.checkpoint.load`` filled it; then refresh the
        copied masters from the (loaded) parameters."""
        names = self._names(model)
        self._init_state()
        position = {name: i for i, name in enumerate(names)}
        flat = self._flat_order()
        saved_group = {name: group for group in state_dict["param_groups"] for name in group["params"]}
        state = {}
        for name, values in state_dict["state"].items():
            if name not in position:
                raise KeyError(f"zerograph: the checkpoint has optimizer state for {name}, which this optimizer "
                               "does not hold")
            host = self.host_params[position[name]]
            state[flat[id(host)]] = {key: _local(v) if isinstance(v, torch.Tensor) else v for key, v in values.items()}
        name_of = {id(h): name for h, name in zip(self.host_params, names)}
        groups = []
        for group in self.optimizer.param_groups:
            group_names = [name_of[id(h)] for h in group["params"]]
            source = next((saved_group[n] for n in group_names if n in saved_group), None)
            if source is None:
                raise KeyError(f"zerograph: the checkpoint has no optimizer param group for {group_names[:3]}")
            groups.append({**{k: v for k, v in source.items() if k != "params"},
                           "params": [flat[id(h)] for h in group["params"]]})
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self._refresh_masters(force=True)


# models whose offload_optimizer has not been defeated yet -> (ids of their
# parameters, {optimizer: number of parameters it had when looked at})
_WATCHED: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[frozenset[int], weakref.WeakKeyDictionary]]" = (
    weakref.WeakKeyDictionary())
_HOOK = None


def watch_plain_optimizer(model: torch.nn.Module, params) -> None:
    """With ``offload_optimizer.device: "cpu"``: warn, once per model, when a
    ``torch.optim`` optimizer steps this model's parameters directly (one not
    built by :func:`make_optimizer`): its states stay on the parameters'
    device, so the offload does nothing.

    One global optimizer step pre-hook (``register_optimizer_step_pre_hook``,
    registered at the first call) looks, at an optimizer's step, whether it
    holds one of ``params`` (by identity). A :class:`HostOptimizer` never
    does: its wrapped optimizer holds host masters, which are new tensors.
    An optimizer is looked at again only when its number of parameters
    changed, so a later step costs one ``len`` per param group. A model is
    forgotten once warned about, or when it is garbage collected."""
    global _HOOK
    _WATCHED[model] = (frozenset(id(p) for p in params), weakref.WeakKeyDictionary())
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(_check_plain_optimizer)


def _check_plain_optimizer(optimizer, args, kwargs) -> None:
    if not _WATCHED:
        return None
    count = sum(len(g["params"]) for g in optimizer.param_groups)
    for model, (ids, seen) in list(_WATCHED.items()):
        if seen.get(optimizer) == count:
            continue
        seen[optimizer] = count
        if any(id(p) in ids for g in optimizer.param_groups for p in g["params"]):
            del _WATCHED[model]
            name = type(optimizer).__name__
            log.warning(
                "zerograph: offload_optimizer.device='cpu' takes effect only for an optimizer built with "
                "zerograph.make_optimizer(model, torch.optim.%s, ...); this %s steps the parameters of %s "
                "directly and keeps its states on the parameters' device", name, name, type(model).__name__)
    return None


def make_optimizer(model: torch.nn.Module, optimizer_cls: Callable[..., torch.optim.Optimizer],
                   **optimizer_kwargs: Any):
    """The optimizer the model's config asks for: a :class:`HostOptimizer` when
    ``zero_optimization.offload_optimizer.device`` or ``offload_param.device``
    is ``"cpu"`` (with ``offload_param`` the host parameter shards are their
    own masters), else ``optimizer_cls(model.parameters(), **optimizer_kwargs)``."""
    ctx = getattr(getattr(model, "_zg_runtime", None), "ctx", None)
    if ctx is None:
        raise ValueError("make_optimizer needs a model prepared by zerograph.compile or zerograph.shard")
    zero = ctx.config.zero_optimization
    if zero.offload_optimizer.device != "cpu" and zero.offload_param.device != "cpu":
        return optimizer_cls(model.parameters(), **optimizer_kwargs)
    named = dict(getattr(model, "_orig_mod", model).named_parameters())
    resident = [p for name, p in named.items() if name in ctx.specs and ctx.specs[name].compute_device is not None]
    pin = zero.offload_optimizer.pin_memory or zero.offload_param.pin_memory
    return HostOptimizer(named.values(), optimizer_cls, pin_memory=pin, host_resident=resident, **optimizer_kwargs)


def _like_param(param: torch.Tensor, key: str, value):
    """An optimizer state ``value`` of ``param``'s shard as a plain optimizer
    of the sharded model would hold it: a state of the shard's shape (Adam's
    moments; never ``step``) as a DTensor like ``param`` around the host
    tensor; anything else as is."""
    if not isinstance(param, DTensor) or not isinstance(value, torch.Tensor) or key == "step":
        return value
    if value.shape != _local(param.detach()).shape:
        return value
    return dtensor_with_local(param, value, requires_grad=False)


def _is_host_master(param: torch.Tensor) -> bool:
    local = _local(param.detach())
    return local.device == HOST and local.dtype == torch.float32

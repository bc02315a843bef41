"""The optimizer step on parameter shards (built by :func:`zerograph.runtime.optimizer.make_optimizer`).

zerograph stores every parameter as a DTensor (its shard, or a replica), so
any ``torch.optim`` optimizer over ``model.parameters()`` works unchanged.
It pays DTensor's dispatch on every op of every parameter, though: on a CPU
the single-tensor AdamW step of the 3.45M-parameter benchmark GPT under
ZeRO-3 (52 parameters) took 12.4 ms through DTensors and 5.2 ms on the same
local shards as plain tensors (docs/benchmarks.md).

:class:`ShardOptimizer` steps the local shards directly: the wrapped
optimizer (``optimizer_cls``) is built over one plain ``nn.Parameter`` per
parameter that shares its shard's storage (the *master*), each step binds
the gradient shards to them and steps them in place. This is the same
arithmetic on the same elements as the optimizer over the DTensors, so the
results are bitwise equal, for the optimizers whose update is element-wise
(:data:`ELEMENTWISE`: SGD, Adam, AdamW, ... and their subclasses). An
optimizer that reads a whole parameter (a norm, a row or column statistic:
Adafactor, LBFGS, Muon) would see only a shard, so :func:`make_optimizer`
builds it over the DTensors instead.

With ``offload_optimizer`` (``on_host``, :class:`HostOptimizer`) each master
is an fp32 copy of the shard in host memory, with its own ``.grad``, so the
wrapped optimizer's states (Adam's moments) live on the host too. Each
:meth:`~ShardOptimizer.step`:

1. copies the device gradient shards to the host masters' ``.grad``
   (pinned, non-blocking on CUDA, then one synchronize);
2. runs the optimizer step on the host;
3. copies the updated masters back into the device shards.

Device memory then holds only the parameter shards and gradients (no optimizer
states, no second copy of the masters). On a CPU-only machine host and device
are the same, but the copies and the host-side step still happen, so the
mechanism is exercised there too. With ``offload_param`` the parameter shards
already live on the host in the master dtype: each such shard is its own
master (``host_resident``), stepped in place with no copies (the compiled
backward already copied its gradient shard to the host, see
:func:`zerograph.graph.collectives.reduce_param_grad`).

Checkpoints (:mod:`zerograph.checkpoint`) see a :class:`ShardOptimizer`
through :meth:`~ShardOptimizer.sharded_state_dict` and
:meth:`~ShardOptimizer.load_sharded_state_dict`: the layout that
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` gives a
plain optimizer of the same model (states keyed by parameter name, each
shard-shaped state a DTensor like its parameter), with the masters' states as
the local shards. So a checkpoint saved with either loads into a run with a
plain optimizer, with or without offload, at any world size or stage, and the
other way round. Masters that are copies are not saved: they equal their fp32
parameters, and a master is refreshed from its parameter whenever something
else (a loaded checkpoint, ``load_full_state_dict``) wrote into the parameter.

Learning-rate schedulers take the wrapped optimizer:
``LambdaLR(opt.optimizer, ...)`` (``opt.param_groups`` is its list).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

from zerograph._torch_private import dtensor_with_local, tensor_version
from zerograph.runtime.offload import HOST, _local, pin_host_memory

log = logging.getLogger(__name__)

# optimizers whose update of an element reads only that element's parameter,
# gradient and states (so stepping shards equals stepping whole parameters)
ELEMENTWISE = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.Adadelta,
    torch.optim.Adamax, torch.optim.ASGD, torch.optim.NAdam, torch.optim.RAdam, torch.optim.RMSprop,
    torch.optim.Rprop,
)


def is_elementwise(optimizer_cls) -> bool:
    return isinstance(optimizer_cls, type) and issubclass(optimizer_cls, ELEMENTWISE)


def check_elementwise(optimizer_cls) -> None:
    if not is_elementwise(optimizer_cls):
        name = getattr(optimizer_cls, "__name__", repr(optimizer_cls))
        raise ValueError(
            f"zerograph: {name} cannot step parameter shards on their own: only the element-wise torch.optim "
            f"optimizers ({', '.join(c.__name__ for c in ELEMENTWISE)}, and their subclasses) can. Use one of them "
            "with offload_optimizer/offload_param, or turn the offload off and build the optimizer over "
            "model.parameters() (zerograph.make_optimizer does that for you)")


class ShardOptimizer:
    """``optimizer_cls`` stepping every parameter's local shard as a plain
    tensor (module docstring): the shard itself, stepped in place, or with
    ``on_host`` a host fp32 master copy of it (``offload_optimizer``).

    ``host_resident`` (with ``on_host``): parameters whose shard already is
    an fp32 tensor in host memory (``offload_param``); each is its own master,
    stepped in place, with no copies. The others get a host master copy."""

    def __init__(self, params, optimizer_cls: Callable[..., torch.optim.Optimizer], *, on_host: bool = False,
                 pin_memory: bool = False, host_resident=(), **optimizer_kwargs: Any):
        check_elementwise(optimizer_cls)
        groups = _param_groups(params)
        self.device_params = [p for group in groups for p in group["params"]]
        if not self.device_params:
            raise ValueError(f"{type(self).__name__} got no parameters that require gradients; pass model.parameters()")
        self.on_host = on_host
        self.pin = pin_host_memory(pin_memory) if on_host else False
        resident_ids = {id(p) for p in host_resident}
        self.resident = [not on_host or (id(p) in resident_ids and _is_host_master(p)) for p in self.device_params]
        self.masters = [self._master(p, resident) for p, resident in zip(self.device_params, self.resident)]
        # version of each copied master's parameter when the two last agreed (None: resident)
        self._synced = [None if resident else tensor_version(_local(p.detach()))
                        for p, resident in zip(self.device_params, self.resident)]
        master_of = {id(p): m for p, m in zip(self.device_params, self.masters)}
        self.optimizer = optimizer_cls([{**{k: v for k, v in group.items() if k != "params"},
                                         "params": [master_of[id(p)] for p in group["params"]]}
                                        for group in groups], **optimizer_kwargs)
        if on_host:
            log.info("zerograph: optimizer offload: %d master shards (%d bytes, %d of them the parameter shards "
                     "themselves) and %s states on the host", len(self.masters),
                     sum(h.numel() * h.element_size() for h in self.masters), sum(self.resident), optimizer_cls.__name__)

    def _master(self, param: torch.Tensor, resident: bool) -> torch.nn.Parameter:
        """The master of ``param``'s shard: the shard itself (same storage)
        when resident, else an fp32 copy on the host (even where host ==
        device)."""
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
            raise ValueError(f"{type(self).__name__}.step does not take a closure; compute the loss before step()")
        self._refresh_masters()
        # graphs' async reads of host-resident shards (offload_param)
        synchronize = self.on_host and any(self.resident) and torch.cuda.is_available()
        for dev, host, resident in zip(self.device_params, self.masters, self.resident):
            if dev.grad is None:
                host.grad = None
                continue
            grad = _local(dev.grad)
            if resident:
                host.grad = grad  # the shard's own gradient (offload_param: the backward copied it to the host)
                continue
            synchronize = synchronize or grad.is_cuda
            if host.grad is None:
                host.grad = torch.empty(host.shape, dtype=torch.float32, device=HOST, pin_memory=self.pin)
            host.grad.copy_(grad, non_blocking=grad.is_cuda and self.pin)
        if synchronize:
            torch.cuda.synchronize()
        self.optimizer.step()
        for i, (dev, host, resident) in enumerate(zip(self.device_params, self.masters, self.resident)):
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
        for i, (dev, host, synced) in enumerate(zip(self.device_params, self.masters, self._synced)):
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
            raise ValueError(f"zerograph: {len(missing)} parameter(s) of this {type(self).__name__} are not parameters of "
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
        for host in self.masters:
            host.grad = torch.zeros_like(host)
        lrs = [group.get("lr") for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            if "lr" in group:
                group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        self.optimizer.step()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if lr is not None:
                group["lr"] = lr
        for host in self.masters:
            host.grad = None

    def _inner_state_dict(self) -> dict:
        """The wrapped optimizer's state dict, with every state in it (a
        subclass that keeps states elsewhere puts them in)."""
        return self.optimizer.state_dict()

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
        inner = self._inner_state_dict()
        flat = [p for group in self.optimizer.param_groups for p in group["params"]]
        which = {id(h): i for i, h in enumerate(self.masters)}
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
            host = self.masters[position[name]]
            state[flat[id(host)]] = {key: _local(v) if isinstance(v, torch.Tensor) else v for key, v in values.items()}
        name_of = {id(h): name for h, name in zip(self.masters, names)}
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


class HostOptimizer(ShardOptimizer):
    """A :class:`ShardOptimizer` whose fp32 masters and states live in host
    memory (``offload_optimizer`` / ``offload_param``)."""

    def __init__(self, params, optimizer_cls: Callable[..., torch.optim.Optimizer], *,
                 pin_memory: bool = False, host_resident=(), **optimizer_kwargs: Any):
        super().__init__(params, optimizer_cls, on_host=True, pin_memory=pin_memory,
                         host_resident=host_resident, **optimizer_kwargs)


def _param_groups(params) -> list[dict[str, Any]]:
    """``params`` (tensors, or dicts with ``"params"`` and per-group options)
    as parameter groups of the parameters that require gradients; groups left
    empty are dropped (as DeepSpeed does)."""
    items = list(params)
    if not items or not isinstance(items[0], dict):
        items = [{"params": items}]
    groups = []
    for group in items:
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("parameters must be tensors or parameter groups (dicts with 'params'), not a mix")
        members = group["params"]
        members = [members] if isinstance(members, torch.Tensor) else list(members)
        members = [p for p in members if p.requires_grad]
        if members:
            groups.append({**group, "params": members})
    return groups


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

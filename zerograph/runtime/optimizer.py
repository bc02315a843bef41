"""``make_optimizer``: the optimizer for a prepared model, chosen from its
config (the classes are in :mod:`zerograph.runtime.shard_optimizer` and
:mod:`zerograph.runtime.nvme_optimizer`)."""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from zerograph.runtime.shard_optimizer import (  # noqa: F401  (the classes' historical home)
    ELEMENTWISE,
    HostOptimizer,
    ShardOptimizer,
    _param_groups,
    check_elementwise,
    is_elementwise,
)

log = logging.getLogger(__name__)


def make_optimizer(model: torch.nn.Module, optimizer_cls: Callable[..., torch.optim.Optimizer],
                   params=None, **optimizer_kwargs: Any):
    """The optimizer for a model prepared by ``zerograph.compile``/``shard``
    over ``params`` (its parameters or parameter groups, dicts with
    ``"params"`` and per-group options such as ``weight_decay``; default: every
    parameter):

    * a :class:`HostOptimizer` when ``zero_optimization.offload_optimizer.device``
      or ``offload_param.device`` is ``"cpu"`` (with ``offload_param`` the
      host parameter shards are their own masters);
    * a :class:`~zerograph.runtime.nvme_optimizer.NvmeOptimizer` when either
      is ``"nvme"`` (masters and states swapped from files per sub-group);
    * else a :class:`ShardOptimizer` stepping the local shards in place, for
      the element-wise optimizers (:data:`ELEMENTWISE`);
    * else ``optimizer_cls(model.parameters(), **optimizer_kwargs)`` over the
      DTensors."""
    ctx = getattr(getattr(model, "_zg_runtime", None), "ctx", None)
    if ctx is None:
        raise ValueError("make_optimizer needs a model prepared by zerograph.compile or zerograph.shard")
    zero = ctx.config.zero_optimization
    named = dict(getattr(model, "_orig_mod", model).named_parameters())
    if params is None:
        params = list(named.values())
    else:
        params = _param_groups(params)
        own = {id(p) for p in named.values()}
        foreign = sum(id(p) not in own for group in params for p in group["params"])
        if foreign:
            raise ValueError(f"make_optimizer: {foreign} of the parameters given are not parameters of the prepared "
                             f"{type(model).__name__} (zerograph.compile replaces them by shards): pass "
                             "model.parameters() or groups of them, taken after zerograph.compile")
    devices = (zero.offload_optimizer.device, zero.offload_param.device)
    if "cpu" in devices or "nvme" in devices:
        resident = [p for name, p in named.items() if name in ctx.specs and ctx.specs[name].compute_device is not None]
        pin = zero.offload_optimizer.pin_memory or zero.offload_param.pin_memory
        if "nvme" in devices:
            from zerograph.runtime.nvme_optimizer import NvmeOptimizer

            return NvmeOptimizer(named, optimizer_cls, ctx=ctx, pin_memory=pin, host_resident=resident,
                                 **optimizer_kwargs)
        return HostOptimizer(params, optimizer_cls, pin_memory=pin, host_resident=resident,
                             **optimizer_kwargs)
    if is_elementwise(optimizer_cls):
        return ShardOptimizer(params, optimizer_cls, **optimizer_kwargs)
    log.info("zerograph: %s is not element-wise; it steps the parameters as DTensors",
             getattr(optimizer_cls, "__name__", optimizer_cls))
    return optimizer_cls(params, **optimizer_kwargs)

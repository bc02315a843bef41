"""ZeRO-Offload: optimizer states (``zero_optimization.offload_optimizer.device:
"cpu"``) and parameter shards (``offload_param.device: "cpu"``) in host memory.

Where "the host" is, and whether host buffers are pinned, is decided here and
nowhere else (:data:`HOST`, :func:`pin_host_memory`); the lowering of
``offload_param`` (the copies in :mod:`zerograph.graph.collectives`) and the
parameter storage (:func:`host_shard`) read it from here.

The optimizer side (host fp32 masters and states, the step on the host) is
:class:`zerograph.runtime.optimizer.HostOptimizer`, built by
:func:`zerograph.make_optimizer`. :func:`watch_plain_optimizer` warns when a
plain ``torch.optim`` optimizer steps an offloading model's parameters
instead.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from zerograph._torch_private import dtensor_with_local

log = logging.getLogger(__name__)

# Host memory: where offloaded parameter shards, their gradients, master
# copies and optimizer states live. The compute device is the model's
# (``ModelState.dp.device``); on a CPU-only build the two are the same
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

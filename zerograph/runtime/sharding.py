"""Parameter storage: shards as DTensors, reads through the ``unshard`` marker.

After :func:`shard_parameters`, each parameter of the model is stored as a
DTensor ``Shard(0)`` on the data-parallel mesh (ZeRO stages 1-3) or kept
replicated (stage 0, a 0-dim parameter, or at stage 3 a parameter of at most
``stage3_param_persistence_threshold`` elements: it is never gathered, and
its gradient is all-reduced). The optimizer, ``clip_grad_norm_``
and ``torch.distributed.checkpoint`` see these. State-dict keys stay the
original ones. With tensor parallelism every parameter is instead a DTensor
on the ``("dp", "tp")`` mesh (:mod:`zerograph.runtime.tp_params`). With
``offload_param`` (stage 3) the local shard of every parameter that is not
persistent is a tensor in host memory
(:func:`zerograph.runtime.offload.host_shard`); the lowered graphs copy it to
the compute device before its gather; with ``offload_param.device: "nvme"``
that host tensor is a view of a memory-mapped file
(:mod:`zerograph.runtime.nvme_params`).

Reading ``module.weight`` returns ``zerograph::unshard(shard, tag, fqn)`` (the
op is registered by :mod:`zerograph.graph.markers`, which :mod:`zerograph.api` imports):
each module with parameters gets a subclass of its own class whose
properties route parameter reads through the marker. Only the user's module
instances change class; nothing in PyTorch is patched.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from zerograph.runtime.state import ModelState, context_of
from zerograph.runtime.tp_layout import TpLayout
from zerograph.runtime.tp_params import as_dtensor, is_tp_dtensor, local_of_whole, param_mesh, placement_for, whole_tensor
from zerograph.runtime.nvme_params import create_store
from zerograph.runtime.offload import host_shard, pin_host_memory
from zerograph.runtime.specs import ParamSpec

log = logging.getLogger(__name__)

def _make_getter(local_name: str, whole: bool = False):
    """The property reading ``local_name``: ``unshard``, or for a parameter split
    over tensor-parallel ranks ``unshard_whole`` (zerograph.graph.tp_markers)."""
    if whole:
        def read_parameter(module: nn.Module) -> torch.Tensor:
            param = module._parameters[local_name]
            local = param.to_local() if isinstance(param, DTensor) else param
            return torch.ops.zerograph.unshard_whole(local, module._zg_read.tag, module._zg_fqns[local_name])

        read_parameter.__name__ = f"read_{local_name}"
        return read_parameter

    def read_parameter(module: nn.Module) -> torch.Tensor:
        param = module._parameters[local_name]
        local = param.to_local() if isinstance(param, DTensor) else param
        return torch.ops.zerograph.unshard(local, module._zg_read.tag, module._zg_fqns[local_name])

    read_parameter.__name__ = f"read_{local_name}"
    return read_parameter


def _spec_for(fqn: str, param: nn.Parameter, ctx: ModelState, tp: TpLayout | None = None) -> ParamSpec:
    shape = tp.local_shape if tp is not None else tuple(param.shape)  # ZeRO shards this rank's tp slice
    placement = ctx.plan.placement(math.prod(shape), param.dim())
    compute = ctx.config.compute_dtype if param.is_floating_point() else param.dtype
    return ParamSpec(
        name=fqn,
        full_shape=shape,
        storage=placement.storage,
        grad_reduce=placement.grad_reduce,
        rank=ctx.rank,
        world_size=ctx.world_size,
        group_name=ctx.dp.group_name,
        master_dtype=param.dtype,
        compute_dtype=compute,
        grad_scale=ctx.plan.grad_scale,
        # offload_param (stage 3): every parameter that stage 3 would shard
        # lives on the host; persistent ones stay on the device
        compute_device=ctx.dp.device if placement.offloaded else None,
        tp=tp,
    )


def _stored(param: nn.Parameter, spec: ParamSpec, ctx: ModelState) -> nn.Parameter:
    stored = _placed(param, spec, ctx)
    if not spec.offloaded:
        return stored
    store = ctx.nvme_params
    if store is not None and store.holds(spec.name):  # offload_param "nvme": a view of its region of the file
        return nn.Parameter(store.place(spec.name, stored.data), requires_grad=param.requires_grad)
    pin = pin_host_memory(ctx.config.zero_optimization.offload_param.pin_memory)
    return nn.Parameter(host_shard(stored.data, pin=pin), requires_grad=param.requires_grad)


def _placed(param: nn.Parameter, spec: ParamSpec, ctx: ModelState) -> nn.Parameter:
    """The parameter as stored on the compute device: a DTensor ``Shard(0)``
    or ``Replicate()``, or a plain tensor (stage 0, or world size 1)."""
    if ctx.tp is not None:
        return _placed_tensor_parallel(param, spec, ctx)
    if ctx.world_size == 1 and param.device == ctx.dp.device:
        return param
    data = param.detach().to(ctx.dp.device)
    if ctx.world_size == 1:
        return nn.Parameter(data, requires_grad=param.requires_grad)
    src = 0 if ctx.config.zerograph.seed_from_rank0 else None
    if spec.storage == "sharded":
        stored = distribute_tensor(data, ctx.dp.mesh, [Shard(0)], src_data_rank=src)
    elif ctx.plan.zero.shards_parameters:  # a DTensor Replicate() next to the shards
        stored = distribute_tensor(data, ctx.dp.mesh, [Replicate()], src_data_rank=src)
    else:
        if src is not None:
            dist.broadcast(data, src=dist.get_global_rank(ctx.dp.group, 0), group=ctx.dp.group)
        stored = data
    return nn.Parameter(stored, requires_grad=param.requires_grad)


def _placed_tensor_parallel(param: nn.Parameter, spec: ParamSpec, ctx: ModelState) -> nn.Parameter:
    """With tensor parallelism: every rank starts from global rank 0's values
    (``seed_from_rank0``), keeps ZeRO's rows of its tp slice of the parameter,
    and stores that as a DTensor on the ``("dp", "tp")`` mesh with the
    placements of :func:`zerograph.runtime.tp_params.placement_for`."""
    data = param.detach().to(ctx.dp.device)
    if ctx.config.zerograph.seed_from_rank0:
        dist.broadcast(data, src=0, group=ctx.model_group)
    placement = placement_for(spec.tp, spec.storage == "sharded")
    if placement is not None:  # a copy: the whole tensor is not kept alive
        local = local_of_whole(data, spec).clone()
        return nn.Parameter(as_dtensor(local, param_mesh(ctx.tp), placement, tuple(param.shape)),
                            requires_grad=param.requires_grad)
    # key/value heads on some tp ranks (1 < replicas < tp): no placement says so; the tp slice as ZeRO stores it
    data = spec.tp.local_part(data).clone()
    if ctx.world_size > 1 and spec.storage == "sharded":
        data = distribute_tensor(data, ctx.dp.mesh, [Shard(0)], src_data_rank=None)
    elif ctx.world_size > 1 and ctx.plan.zero.shards_parameters:
        data = distribute_tensor(data, ctx.dp.mesh, [Replicate()], src_data_rank=None)
    return nn.Parameter(data, requires_grad=param.requires_grad)


def shard_parameters(model: nn.Module, ctx: ModelState, tp_layouts: dict[str, TpLayout] | None = None) -> None:
    """Replace every parameter by its stored form and route reads through
    ``unshard`` (``unshard_whole`` for the parameters in ``tp_layouts``, which
    are split over the tensor-parallel ranks as each layout says)."""
    tp_layouts = tp_layouts or {}
    if ctx.config.zero_optimization.offload_param.device == "nvme" and ctx.nvme_params is None:
        # the parameter file is laid out, sized and checked before any shard is made
        specs = [_spec_for(fqn, p, ctx, tp_layouts.get(fqn)) for fqn, p in model.named_parameters()]
        ctx.nvme_params = create_store(ctx, specs, model)
    new_params: dict[int, tuple[nn.Parameter, str]] = {}
    subclasses: dict[tuple[type, tuple[str, ...]], type] = {}
    for mod_name, module in model.named_modules():
        for buf_name, buf in module._buffers.items():
            if buf is not None and buf.device != ctx.dp.device:
                module._buffers[buf_name] = buf.to(ctx.dp.device)
        names = [n for n, p in module._parameters.items() if p is not None]
        if not names:
            continue
        fqns = {}
        for local_name in names:
            param = module._parameters[local_name]
            if id(param) not in new_params:
                fqn = f"{mod_name}.{local_name}" if mod_name else local_name
                spec = _spec_for(fqn, param, ctx, tp_layouts.get(fqn))
                ctx.specs[fqn] = spec
                new_params[id(param)] = (_stored(param, spec, ctx), fqn)
            stored, fqn = new_params[id(param)]
            module._parameters[local_name] = stored
            fqns[local_name] = fqn
        module._zg_tag = ctx.tag
        module._zg_read = ctx.read_state
        module._zg_fqns = fqns
        whole = tuple(ctx.specs[fqns[n]].tp is not None for n in names)
        key = (type(module), tuple(names), whole)
        if key not in subclasses:
            base = type(module)
            attrs = {n: property(_make_getter(n, w)) for n, w in zip(names, whole)}
            attrs.update(__module__=base.__module__, __qualname__=base.__qualname__, _zg_base_class=base)
            subclasses[key] = type(base.__name__, (base,), attrs)
        module.__class__ = subclasses[key]
    if ctx.tp is not None:
        local = [n for n, s in ctx.specs.items() if s.tp is not None and placement_for(s.tp, s.storage == "sharded") is None]
        if local:
            log.info("zerograph: %d parameter(s) stay tp-local, not (dp, tp) DTensors: their key/value heads sit on "
                     "some but not all tp ranks (docs/tensor_parallel.md, \"What each rank holds\"); use "
                     "gradient_clipping rather than torch's clip_grad_norm_: %s", len(local), ", ".join(local[:4]))
    log.info(
        "zerograph: %d parameters (%d sharded) on %d rank(s)",
        len(ctx.specs),
        sum(s.storage == "sharded" for s in ctx.specs.values()),
        ctx.world_size,
    )


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered (collective:
    call it on every rank). Keys are the original model's keys."""
    model = getattr(model, "_orig_mod", model)
    ctx = context_of(model)
    specs = {}  # id(parameter) -> its spec, with tensor parallelism
    if ctx is not None and ctx.tp is not None:
        specs = {id(p): ctx.specs[n] for n, p in model.named_parameters() if n in ctx.specs}
    out = {}
    for key, value in model.state_dict(keep_vars=True).items():
        spec = specs.get(id(value))
        if spec is not None and is_tp_dtensor(value):  # the 2-D (dp, tp) DTensor
            out[key] = whole_tensor(value.detach(), spec.tp, placement_for(spec.tp, spec.storage == "sharded"))
            continue
        full = value.detach().full_tensor() if isinstance(value, DTensor) else value.detach()
        if spec is not None and spec.tp is not None:  # this rank's tp slice: gather the others' and reassemble
            parts = [torch.empty_like(full) for _ in range(spec.tp.size)]
            dist.all_gather(parts, full.contiguous(), group=ctx.tp.group)
            full = spec.tp.assemble(parts)
        out[key] = full
    return out

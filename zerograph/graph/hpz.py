"""ZeRO++ hpZ: the secondary partition of a parameter over this rank's node.

With nodes of ``k`` ranks (:mod:`zerograph.runtime.hierarchy`), the
secondary partition of a parameter of ``R`` rows splits it in ``torch.chunk``
order over the node's ``k`` ranks: the rank at index ``j`` of its node keeps
rows ``[j * c, j * c + local_rows)`` with ``c = ceil(R / k)``, in the compute
dtype. It is described by a :class:`~zerograph.runtime.specs.ParamSpec` like
a primary shard (:func:`secondary_spec`: ``world_size=k``, ``rank=j``, the
node's group, ``comm_group="node"``), so the backward re-gathers it with the
same op sequence as a primary shard, only over the node's ranks.

* :func:`secondary_shard` cuts it from the full parameter of the forward's
  all-gather (``aten.slice`` and an ``aten.clone``, so the saved shard does
  not keep the full parameter alive);
* the marker op ``zerograph::hpz_unshard(secondary, tag, name)`` is the
  backward's full parameter gathered from it; ``lower_markers`` lowers it like
  ``unshard`` (bucketed with the other secondary gathers of its block).
"""

from __future__ import annotations

import dataclasses

import torch

from zerograph.graph import collectives
from zerograph.runtime import registry
from zerograph.runtime.errors import naming_failed_ranks
from zerograph.runtime.specs import ParamSpec

aten = torch.ops.aten


def secondary_spec(spec: ParamSpec, node) -> ParamSpec:
    """The secondary partition of ``spec``'s parameter over ``node``
    (:class:`~zerograph.runtime.hierarchy.SubGroup`), stored in the compute dtype."""
    return dataclasses.replace(spec, storage="sharded", rank=node.rank, world_size=node.size,
                               group_name=node.group_name, master_dtype=spec.compute_dtype, compute_device=None,
                               comm_group="node")


def secondary_rows(spec: ParamSpec) -> tuple[int, int]:
    """``(start, stop)``: the rows of the full parameter in this rank's secondary shard."""
    return spec.row_start, spec.row_start + spec.local_rows


def secondary_shard(full, sec: ParamSpec, emit=collectives._noop_emit):
    """This rank's secondary shard (``sec``: :func:`secondary_spec`) cut from the full parameter."""
    start, stop = secondary_rows(sec)
    part = emit("secondary", aten.slice.Tensor(full, 0, start, stop))
    return emit("secondary", aten.clone.default(part, memory_format=torch.contiguous_format))


def _secondary_of(tag: str, name: str) -> ParamSpec:
    ctx = registry.lookup(tag)
    if ctx.node_groups is None:
        raise RuntimeError(f"zerograph::hpz_unshard({name!r}): the model has no node groups (hpZ is off)")
    return secondary_spec(ctx.specs[name], ctx.node_groups.node)


@torch.library.custom_op("zerograph::hpz_unshard", mutates_args=())
def hpz_unshard(secondary: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    """The full parameter ``name`` gathered from the secondary shards of this rank's node."""
    ctx = registry.lookup(tag)
    with naming_failed_ranks(ctx, "backward"):
        full = collectives.gather_param(secondary, _secondary_of(tag, name))
    return full.clone() if full is secondary else full.contiguous()


@hpz_unshard.register_fake
def _hpz_unshard_fake(secondary: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    spec = _secondary_of(tag, name)
    return secondary.new_empty(spec.full_shape, dtype=spec.compute_dtype)


HPZ_UNSHARD = torch.ops.zerograph.hpz_unshard.default


def secondary_bytes(forward) -> int:
    """Bytes of the secondary shards a forward graph (``torch.fx.GraphModule``)
    cuts and keeps for its backward: hpZ's memory cost per micro-batch."""
    from zerograph.graph.tags import get_tag

    total = 0
    for node in forward.graph.nodes:
        tag, val = get_tag(node), node.meta.get("val")
        if tag is not None and tag.role == "secondary" and node.target is aten.clone.default and val is not None:
            total += val.numel() * val.element_size()
    return total

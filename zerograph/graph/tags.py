"""The one schema of zerograph's FX node metadata.

Every node that zerograph tags carries a :class:`NodeTag` under
``node.meta["zerograph"]``. Passes read these tags; they never guess a node's
role from the graph's shape.

Tags are set at trace time (from Dynamo's ``nn_module_stack`` and from the
arguments of zerograph's marker ops) and by the passes that insert nodes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import torch.fx as fx

META_KEY = "zerograph"

Phase = Literal["forward", "backward"]
Role = Literal[
    "compute",  # an op of the user's model
    "unshard",  # marker: a full parameter is needed here
    "reduce_grad",  # marker: this gradient belongs to a parameter shard
    "comm_prep",  # cast / pad / slice / scale around a collective
    "all_gather",
    "reduce_scatter",
    "all_reduce",
    "all_to_all",  # ZeRO++ qgZ: one hop of the quantized gradient reduction
    "wait",
    "host_copy",  # offload_param: a host shard copied to the compute device, or a gradient shard back
    "read_ahead",  # offload_param nvme: parameter-file reads requested ahead of their host_copy nodes
    "secondary",  # ZeRO++ hpZ: the secondary shard cut from a gathered parameter (kept for the backward)
]
COLLECTIVE_ROLES = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")
Location = Literal["device", "host"]


@dataclasses.dataclass(frozen=True)
class NodeTag:
    """What zerograph knows about one FX node."""

    phase: Phase
    role: Role = "compute"
    module_path: str | None = None  # e.g. "transformer.h.3.attn"
    layer: int | None = None  # first integer in module_path (block index), if any
    param: str | None = None  # parameter FQN for markers and collectives
    bucket: tuple[str, ...] = ()  # parameters sharing this node's collective
    pass_name: str | None = None  # the pass that inserted the node, if any
    # where the node's output lives: "host" for zerograph's copies into host
    # memory (offload_param's gradient shards, offload_activations' saved
    # copies; their views too), "device" (the compute device) for the rest
    location: Location = "device"
    # the mesh dimension a collective runs over: "dp" (ZeRO) or "tp" (tensor
    # parallelism); its bytes are counted as "<kind>" or "tp_<kind>"
    mesh_dim: str = "dp"
    # a collective's process group: "dp" (the data-parallel ranks), or ZeRO++'s
    # "node" / "peer" subgroups (zerograph.runtime.hierarchy); comm accounting
    # counts "node" as intra-group traffic, the others as cross-group
    group: str = "dp"

    def replace(self, **changes) -> "NodeTag":
        return dataclasses.replace(self, **changes)


def get_tag(node: fx.Node) -> NodeTag | None:
    return node.meta.get(META_KEY)


def set_tag(node: fx.Node, tag: NodeTag) -> None:
    node.meta[META_KEY] = tag


def layer_of(module_path: str | None) -> int | None:
    """The block index in a module path: ``"h.3.attn" -> 3``."""
    if not module_path:
        return None
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", module_path)
    return int(match.group(1)) if match else None


_DYNAMO_PREFIX = re.compile(r"^(L\['self'\]|L\[\"self\"\]|self)\.?")


def clean_module_path(raw: str) -> str:
    """Turn Dynamo's module path (``L['self'].h[0].attn``) into an FQN (``h.0.attn``)."""
    path = _DYNAMO_PREFIX.sub("", raw)
    path = re.sub(r"\[(?:'|\")?([^\]'\"]+)(?:'|\")?\]", r".\1", path)
    path = re.sub(r"\._modules\.", ".", path)
    # a module reached through a bound method (``L['call_impl'].__self__.h.0``)
    path = re.sub(r"^.*__self__(\.|$)", "", path)
    if path.startswith("L.") or path == "L":
        path = path[2:]
    return path.strip(".")


def module_path_from_meta(node: fx.Node) -> str | None:
    """The innermost module that produced ``node``, from Dynamo's ``nn_module_stack``."""
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return None
    raw, _cls = list(stack.values())[-1]
    return clean_module_path(str(raw))

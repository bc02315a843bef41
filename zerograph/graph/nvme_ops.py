"""``zerograph::read_ahead``: a compiled graph asks for parameter-file reads.

``offload_param.device: "nvme"`` keeps parameter shards in a memory-mapped
file (:mod:`zerograph.runtime.nvme_params`). The ``nvme_read_ahead`` pass puts
this op into the lowered graphs, a planner-chosen distance ahead of the
``host_copy`` nodes that read those shards
(:func:`zerograph.planner.nvme.read_ahead_points`)::

    read_ahead = zerograph.read_ahead(primals_2, 'zg0', 'h.0.w')  # read_ahead h.0.w
    ...
    _to_copy = aten._to_copy(primals_2, device=cpu, non_blocking=True)  # host_copy h.0.w

Its implementation starts the asynchronous read of the named shard's region
(``ParamStore.read_ahead``: ``posix_fadvise(WILLNEED)``) and returns nothing.
The shard is its input so that the node names what the copy reads; it does
not read its values. It returns nothing, so it is registered as side-effecting
(``torch.fx.node.has_side_effect``): ``Graph.eliminate_dead_code`` (the
``dce`` pass) and Inductor (``is_impure``) keep it.
"""

from __future__ import annotations

import torch
import torch.fx

from zerograph.runtime import registry


@torch.library.custom_op("zerograph::read_ahead", mutates_args=())
def read_ahead(shard: torch.Tensor, tag: str, name: str) -> None:
    """Start reading the parameter-file region of ``name``'s shard."""
    store = registry.lookup(tag).nvme_params
    if store is not None and store.holds(name):
        store.read_ahead([name])


@read_ahead.register_fake
def _read_ahead_fake(shard: torch.Tensor, tag: str, name: str) -> None:
    return None


READ_AHEAD = torch.ops.zerograph.read_ahead.default
torch.fx.node.has_side_effect(READ_AHEAD)

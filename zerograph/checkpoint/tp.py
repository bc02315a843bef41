"""Tensor-parallel parameters in DCP checkpoints: stored whole, whatever the tp.

A checkpoint holds every parameter (and optimizer state) under its original
name and **whole** shape; tensor parallelism is a layout, not part of the
checkpoint's content. A tp=2 checkpoint therefore loads at tp=1 (and into a
model without zerograph's tensor parallelism), a tp=1 one at tp=2, and one
saved at tp=2 x dp=2 at any other (tp, dp, ZeRO stage).

This rank's data of a split parameter is its tensor-parallel slice
(:class:`~zerograph.runtime.tp_layout.TpLayout`), of which ZeRO may keep only
rows (the local tensor of a DTensor on the ``("dp", "tp")`` mesh,
:mod:`zerograph.runtime.tp_params`; DCP's own chunks of it would be right for
most placements, not for a fused weight, so the boxes are computed here). In the whole
tensor's coordinates that is one box per fused part (q, k and v of a fused
``qkv`` are three): :class:`TpChunks` lists these boxes as DCP chunks of the
whole tensor, with views of this rank's storage as their data. DCP plans
with them as with a DTensor's chunks (it calls ``__create_write_items__`` on
save and ``__create_chunk_list__`` on load: its ``_Checkpointable``
protocol), so saving writes each box once (ranks holding the same box are
deduplicated) and loading reads, for every box, the overlapping pieces of
whatever chunks the saving layout wrote. :class:`TpSavePlanner` and
:class:`TpLoadPlanner` are DCP's default planners that find a box's data by
its offset.

::

    h.0.attn.qkv.weight, whole [90, 30], fused parts [30, 30, 30], tp=2, dp=1
    tp rank 0 holds [45, 30]: boxes rows 0:15, 30:45, 60:75 of the whole tensor
    tp rank 1 holds [45, 30]: boxes rows 15:30, 45:60, 75:90
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor
from torch import nn

from zerograph.runtime.state import context_of
from zerograph.runtime.tp_layout import TpLayout
from zerograph.runtime.tp_params import is_tp_dtensor, tp_slice_offsets

__all__ = ["TpChunks", "TpSavePlanner", "TpLoadPlanner", "tp_layouts", "whole_boxes", "wrap", "unwrap"]

Box = tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]  # (whole offsets, sizes, this rank's data)


def tp_layouts(model: nn.Module) -> dict[str, TpLayout]:
    """Parameter name -> how it is split over the tp ranks (empty without
    tensor parallelism). A pipeline model's names are the user's keys of
    each of this rank's stages' parameters (pipeline x tensor parallelism)."""
    if hasattr(model, "stage_runtimes") and hasattr(model, "_original_keys"):
        out = {}
        for k, runtime in model.stage_runtimes():
            if getattr(runtime.ctx, "tp", None) is None:
                continue
            for key, spec in runtime.ctx.specs.items():
                for name in model._original_keys[k].get(key, ()) if spec.tp is not None else ():
                    out[name] = spec.tp
        return out
    ctx = context_of(model)
    if ctx is None or getattr(ctx, "tp", None) is None:
        return {}
    return {name: spec.tp for name, spec in ctx.specs.items() if spec.tp is not None}


def whole_boxes(layout: TpLayout, data: torch.Tensor, offsets: tuple[int, ...]) -> list[Box]:
    """The boxes of the whole tensor that ``data`` holds: ``data`` is the
    block of this rank's tp slice (shape ``layout.local_shape``) starting at
    ``offsets`` (ZeRO's rows of it, or all of it)."""
    d = layout.dim
    sizes = tuple(data.shape)
    boxes: list[Box] = []
    local_start = whole_start = 0
    for part, local in zip(layout.parts, layout.local_parts):
        lo, hi = max(offsets[d], local_start), min(offsets[d] + sizes[d], local_start + local)
        if hi > lo and data.numel():
            at = list(offsets)
            at[d] = whole_start + layout.block * local + (lo - local_start)
            size = list(sizes)
            size[d] = hi - lo
            boxes.append((tuple(at), tuple(size), data.narrow(d, lo - offsets[d], hi - lo)))
        local_start += local
        whole_start += part
    return boxes


class TpChunks:
    """This rank's boxes of one whole tensor, for DCP (see the module doc).
    ``target`` is the tensor (or DTensor) they are views of."""

    def __init__(self, target: torch.Tensor, layout: TpLayout):
        self.target = target
        if is_tp_dtensor(target):  # the (dp, tp) DTensor: ZeRO's rows of this rank's tp slice
            data, offsets = target.to_local(), tp_slice_offsets(target, layout.local_shape)
        elif isinstance(target, DTensor):
            chunk = target.__create_chunk_list__()[0]  # this rank's rows of the tp slice
            data, offsets = target.to_local(), tuple(chunk.offsets)
        else:
            data, offsets = target, (0,) * target.dim()
        self.whole_shape = torch.Size(layout.whole_shape)
        self.dtype = data.dtype
        self.boxes = {at: (size, view) for at, size, view in whole_boxes(layout, data.detach(), offsets)}

    # what DCP and zerograph's checks read of a tensor
    @property
    def shape(self) -> torch.Size:
        return self.whole_shape

    def size(self) -> torch.Size:
        return self.whole_shape

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(at)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(at), sizes=torch.Size(size)),
                              properties=TensorProperties.create_from_tensor(view), size=self.whole_shape))
                for at, (size, view) in self.boxes.items()]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(at), sizes=torch.Size(size))
                for at, (size, _) in self.boxes.items()]

    def box(self, offsets) -> torch.Tensor:
        return self.boxes[tuple(offsets)][1]


def _wrap_value(value: Any, layout: TpLayout | None) -> Any:
    if layout is None or not isinstance(value, torch.Tensor):
        return value
    if (is_tp_dtensor(value) and tuple(value.shape) == layout.whole_shape) or tuple(value.shape) == layout.local_shape:
        return TpChunks(value, layout)
    return value


def wrap(state: dict[str, Any], layouts: dict[str, TpLayout]) -> dict[str, Any]:
    """``state`` (``{"model": {name: tensor}, "optim": {"state": {name:
    {key: tensor}}, ...}}``) with every tensor of a split parameter, and
    every optimizer state of its shape, as :class:`TpChunks`."""
    if not layouts:
        return state
    out = dict(state)
    if "model" in state:
        out["model"] = {k: _wrap_value(v, layouts.get(k)) for k, v in state["model"].items()}
    if state.get("optim") is not None:
        optim = state["optim"]
        out["optim"] = {**optim, "state": {
            name: {k: _wrap_value(v, layouts.get(name)) for k, v in values.items()}
            for name, values in optim["state"].items()}}
    return out


def unwrap(tree: Any) -> Any:
    """``tree`` with every :class:`TpChunks` back as the tensor it views."""
    if isinstance(tree, TpChunks):
        return tree.target
    if isinstance(tree, dict):
        return {k: unwrap(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unwrap(v) for v in tree]
    return tree


class TpSavePlanner(DefaultSavePlanner):
    """DCP's default save planner; a :class:`TpChunks` box is found by its
    offset (DCP renumbers the chunk indices when it merges the plans)."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict.get(index.fqn)
        if isinstance(obj, TpChunks):
            view = obj.box(index.offset)
            return view if view.is_contiguous() else view.contiguous()
        return super().lookup_object(index)


def _take_chunks(tree: Any, path: tuple = (), taken: dict | None = None) -> dict[tuple, TpChunks]:
    """Replace every :class:`TpChunks` in the nested dicts ``tree`` by None,
    in place; returns them by their key path."""
    taken = {} if taken is None else taken
    if isinstance(tree, dict):
        for key, value in tree.items():
            if isinstance(value, TpChunks):
                taken[path + (key,)] = value
                tree[key] = None
            else:
                _take_chunks(value, path + (key,), taken)
    return taken


class TpLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner; reads into a :class:`TpChunks` box (a view
    of this rank's storage) found by its offset.

    DCP's set-up walks the state dict and keeps only tensors (it would turn a
    :class:`TpChunks` into None): they are set aside around it."""

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        taken = _take_chunks(state_dict)
        super().set_up_planner(state_dict, metadata, is_coordinator)
        for path, chunks in taken.items():
            container = state_dict
            for key in path[:-1]:
                container = container[key]
            container[path[-1]] = chunks
        if taken and self.flatten_state_dict:
            for fqn, path in self.mappings.items():
                if tuple(path) in taken:
                    self.state_dict[fqn] = taken[tuple(path)]
        elif taken:
            self.state_dict = state_dict

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict.get(index.fqn)
        if isinstance(obj, TpChunks):
            return obj.box(index.offset)
        return super().lookup_tensor(index)


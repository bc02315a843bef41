"""How a tensor-parallel parameter is split over the ``tp`` ranks.

A split parameter is cut along one tensor dimension ``dim``. A fused weight
(GPT-2's ``c_attn`` holds q, k and v; a ``gate_up_proj`` holds gate and up)
is cut per *part*, never as one matrix: the dimension is first divided into
its parts (``parts``: their sizes, in order), each part is cut into ``size``
equal blocks, and tp rank ``i`` holds block ``i`` of every part, concatenated
in part order. A weight that is not fused has one part.

For a ``[q | k | v]`` weight of 3·C rows on 2 ranks, rank 0 holds
``[q[:C/2] | k[:C/2] | v[:C/2]]`` and rank 1 the other halves, so each rank's
output is again ``[q | k | v]`` of its own heads.

Grouped-query attention with fewer key/value heads than tp ranks
(``replicas`` > 1): the k and v projections are cut into ``size / replicas``
blocks (one per key/value head group), and tp ranks ``i·replicas ..
(i+1)·replicas - 1`` each hold block ``i``: the key/value heads their query
heads read. Their gradients are summed over those ranks (the
``tensor_parallel`` pass).

ZeRO then treats this rank's slice as the parameter: it is what the
data-parallel ranks shard (dim 0, ``torch.chunk`` order) and gather.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import torch

SplitKind = Literal["column", "row", "vocab"]


class TensorParallelError(ValueError):
    """The model's graph cannot be split over the tensor-parallel ranks as
    planned (the message names the module and the fix)."""


@dataclasses.dataclass(frozen=True)
class TpLayout:
    """This rank's tensor-parallel slice of one parameter."""

    kind: SplitKind  # the layer's split: "column" (output features), "row" (input features) or "vocab"
    # (an embedding's or LM head's rows: the vocabulary)
    module: str  # the layer's module path, for messages
    dim: int  # the tensor dimension cut over tp
    parts: tuple[int, ...]  # sizes of the fused parts along ``dim`` (one entry: not fused)
    whole_shape: tuple[int, ...]  # the parameter's shape in the user's model
    size: int  # tp ranks
    index: int  # this rank's tp index
    replicas: int = 1  # tp ranks holding each block (key/value heads fewer than tp); divides size

    def __post_init__(self):
        if sum(self.parts) != self.whole_shape[self.dim]:
            raise ValueError(f"{self.module}: parts {self.parts} do not add up to dim {self.dim} of "
                             f"{self.whole_shape}")
        if self.size % self.replicas:
            raise ValueError(f"{self.module}: {self.replicas} replicas of each block do not divide "
                             f"tensor_parallel.autotp_size={self.size}")
        bad = [p for p in self.parts if p % self.blocks]
        if bad:
            what = f"its parts {list(self.parts)}" if len(self.parts) > 1 else f"its {self.parts[0]} features"
            raise ValueError(
                f"{self.module}: tensor_parallel.autotp_size={self.size} does not divide {what} along "
                f"dim {self.dim} of its {tuple(self.whole_shape)} weight; use an autotp_size that divides "
                f"{', '.join(map(str, sorted(set(self.parts))))}")

    @property
    def blocks(self) -> int:
        """Distinct slices over the tp ranks (``size``, or fewer when replicated)."""
        return self.size // self.replicas

    @property
    def block(self) -> int:
        """The block this rank holds."""
        return self.index // self.replicas

    @property
    def local_parts(self) -> tuple[int, ...]:
        return tuple(p // self.blocks for p in self.parts)

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.whole_shape)
        shape[self.dim] //= self.blocks
        return tuple(shape)

    def local_part(self, whole: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """The slice of ``whole`` (the full parameter, or its gradient) that
        tp rank ``index`` (default: this rank) holds."""
        index = self.index if index is None else index
        pieces = [p.chunk(self.blocks, self.dim)[index // self.replicas] for p in whole.split(list(self.parts), self.dim)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim)

    def assemble(self, locals_by_rank: Sequence[torch.Tensor]) -> torch.Tensor:
        """The whole parameter from every tp rank's slice, in tp-rank order."""
        split = [t.split(list(self.local_parts), self.dim) for t in locals_by_rank[::self.replicas]]
        return torch.cat([split[r][j] for j in range(len(self.parts)) for r in range(self.blocks)], self.dim)

    def describe(self) -> str:
        fused = f", {len(self.parts)} fused parts {list(self.parts)}" if len(self.parts) > 1 else ""
        fused += f", each block on {self.replicas} tp ranks" if self.replicas > 1 else ""
        return f"{self.kind} split of dim {self.dim}{fused}: {self.local_shape} of {self.whole_shape}"

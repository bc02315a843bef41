"""Tiled compute along the sequence (ALST): the policy.

``zerograph.sequence_tiling`` says how long a tile is; :func:`tile_sizes`
cuts one rank's sequence (with sequence parallelism, its ``1/sp`` of every
sequence) into tiles; ``passes/sequence_tiling.py`` rewrites the graph.

* an integer ``t``: tiles of ``t`` positions, the last one shorter when
  ``t`` does not divide the length;
* ``"width"``: tiles of ``width`` positions (the MLP's input width, or the
  LM head's), ALST's rule (``ceil(seq / hidden)`` shards): a tile's MLP
  hidden is then ``b · width · 4·width`` elements, of the order of the
  MLP's weights, whatever the sequence length;
* ``None``: off.

A sequence no longer than one tile is not cut (:func:`tile_sizes` returns
``None``). With ``b`` rows of ``s`` local positions, a tile holds
``b · t`` tokens: the largest intermediate of a tiled MLP is
``b · t · hidden`` elements (instead of ``b · s · hidden``), of a tiled
logits+loss ``b · t · vocab``.
"""

from __future__ import annotations

import math


def tile_length(setting, width: int) -> int | None:
    """Positions per tile for the config value ``setting`` (None: off)."""
    if setting is None:
        return None
    if setting == "width":
        return max(1, int(width))
    return int(setting)


def tile_sizes(length: int, setting, width: int) -> list[int] | None:
    """The tile lengths (in order, summing to ``length``) a sequence of
    ``length`` positions is cut into; ``None`` when it is not cut (tiling
    off, or one tile would hold it all)."""
    size = tile_length(setting, width)
    if size is None or length <= size:
        return None
    n = math.ceil(length / size)
    return [size] * (n - 1) + [length - size * (n - 1)]


def largest_tile_elements(rows: int, length: int, setting, width: int, features: int) -> int:
    """Elements of the largest ``[rows, tile, features]`` intermediate of a
    region tiled by ``setting`` (the whole ``[rows, length, features]`` when
    it is not cut): what the tiled pass leaves as its largest value."""
    sizes = tile_sizes(length, setting, width)
    return rows * (max(sizes) if sizes else length) * features

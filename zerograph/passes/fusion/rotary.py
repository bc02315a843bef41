"""The rotary matcher of ``fuse_attention``: Hugging Face
``apply_rotary_pos_emb`` (``q * cos + rotate_half(q) * sin`` and the same for
``k`` on the same ``cos``/``sin``) -> one ``apply_rotary`` with two results
(:func:`match_rotary`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from zerograph.passes.fusion.patterns import Match, _bind, _kernel, _operands, _single_use, kind, val

__all__ = ["match_rotary"]


def _rotate_half(node: Any, x: Any) -> list[fx.Node] | None:
    """Nodes of ``cat((-x[..., h:], x[..., :h]), dim=-1)`` with ``h = D / 2``."""
    if kind(node) != "cat":
        return None
    a = _bind(node, ("tensors", "dim"), {"dim": 0})
    xv = val(x)
    if a is None or xv is None or not isinstance(a["tensors"], (list, tuple)) or len(a["tensors"]) != 2:
        return None
    if not isinstance(a["dim"], int) or a["dim"] % xv.dim() != xv.dim() - 1 or xv.shape[-1] % 2:
        return None
    neg, x1 = a["tensors"]
    half = xv.shape[-1] // 2
    if kind(neg) != "neg" or len(neg.args) != 1 or not _single_use(neg, node) or not _single_use(x1, node):
        return None
    x2 = neg.args[0]
    if not _single_use(x2, neg):
        return None
    for part, want in ((x1, (Ellipsis, slice(None, half, None))), (x2, (Ellipsis, slice(half, None, None)))):
        if kind(part) != "getitem" or part.args[0] is not x or part.args[1] != want:
            return None
    return [node, neg, x1, x2]


def _rotary_half(node: Any) -> tuple[Any, fx.Node, fx.Node, list[fx.Node]] | None:
    """``(x, cos_u, sin_u, nodes)`` for ``x * cos_u + rotate_half(x) * sin_u``."""
    if kind(node) != "add":
        return None
    ops = _operands(node)
    if ops is None:
        return None
    for xc, rs in (ops, ops[::-1]):
        if kind(xc) != "mul" or kind(rs) != "mul" or not _single_use(xc, node) or not _single_use(rs, node):
            continue
        for x, cos_u in (_operands(xc) or (), (_operands(xc) or ())[::-1]):
            for rot, sin_u in (_operands(rs) or (), (_operands(rs) or ())[::-1]):
                if not isinstance(cos_u, fx.Node) or not isinstance(sin_u, fx.Node) or not isinstance(x, fx.Node):
                    continue
                nodes = _rotate_half(rot, x)
                if nodes is not None:
                    return x, cos_u, sin_u, [xc, rs, *nodes]
    return None


def _unsqueezed(node: fx.Node) -> tuple[Any, int] | None:
    if kind(node) != "unsqueeze":
        return None
    a = _bind(node, ("input", "dim"), {})
    if a is None or not isinstance(a.get("dim"), int) or val(a["input"]) is None:
        return None
    return a["input"], a["dim"]


def match_rotary(node: fx.Node) -> Match | None:
    """Hugging Face ``apply_rotary_pos_emb``: ``q * cos_u + rotate_half(q) * sin_u``
    and ``k * cos_u + rotate_half(k) * sin_u`` on the same ``cos_u =
    cos.unsqueeze(d)``, ``sin_u = sin.unsqueeze(d)`` -> ``apply_rotary(q, k, cos, sin, d)``
    (two outputs). Anchored at the query's sum; the key's is the other rotary
    sum on the same ``cos_u``."""
    first = _rotary_half(node)
    if first is None:
        return None
    q, cos_u, sin_u, q_nodes = first
    cu, su = _unsqueezed(cos_u), _unsqueezed(sin_u)
    if cu is None or su is None or cu[1] != su[1]:
        return None
    sums = []
    for mul in cos_u.users:
        for s in mul.users:
            half = _rotary_half(s)
            if half is not None and half[1] is cos_u and half[2] is sin_u and s not in sums:
                sums.append(s)
    if len(sums) != 2 or node not in sums:
        return None
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    sums.sort(key=order.__getitem__)
    if sums[0] is not node:  # the query's rotation comes first (Hugging Face's order)
        return None
    k, _, _, k_nodes = _rotary_half(sums[1])
    qv, kv, cv, sv = val(q), val(k), val(cu[0]), val(su[0])
    if any(t is None for t in (qv, kv, cv, sv)) or qv.dim() != 4 or kv.dim() != 4 or cv.shape != sv.shape:
        return None
    if cv.dim() != 3 or cu[1] % 4 not in (1, 2):
        return None
    for x, out in ((qv, val(node)), (kv, val(sums[1]))):
        want = torch.promote_types(torch.promote_types(x.dtype, cv.dtype), sv.dtype)
        if out is None or out.shape != x.shape or out.dtype != want:
            return None  # cos/sin broadcast onto the heads only, never widening q or k
    return Match("rotary", node, q_nodes + k_nodes, _kernel("rotary", "apply_rotary"),
                 (q, k, cu[0], su[0], cu[1]), outputs=(node, sums[1]), loose=[cos_u, sin_u])

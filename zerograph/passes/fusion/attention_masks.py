"""Attention masks proved, not guessed, for the attention matchers of
``fuse_attention`` (:mod:`zerograph.passes.fusion.attention`).

A mask is accepted only when its graph is built from ``arange`` position
indices compared as ``kv_idx <= q_idx`` (causal, checked to be the kernel's
bottom-right alignment), a bool ``(B, Sk)`` tensor indexed as
``padding[batch_idx, kv_idx]`` (key padding), ``&`` of those, ``new_ones``
(all-true), ``expand`` and no-op casts, or when it depends on no graph input
and evaluates to the causal or the all-true mask; for additive masks, a
``torch.where(bool_mask, 0, fill)`` with ``fill <= finfo(dtype).min``.
:func:`bool_mask` and :func:`additive_mask` return what was proved (causal,
the key-padding tensor, the mask's nodes) or ``None``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.fx as fx

from zerograph.passes.fusion.patterns import _cast_source, _is_number, _operands, kind, val

__all__ = ["MaskInfo", "additive_mask", "bool_mask"]

log = logging.getLogger(__name__)

_FULL = slice(None, None, None)



@dataclasses.dataclass
class MaskInfo:
    causal: bool = False
    key_padding_mask: fx.Node | None = None
    nodes: list[fx.Node] = dataclasses.field(default_factory=list)


def _arange(node: Any) -> tuple[int, int] | None:
    """``(length, offset)`` of ``torch.arange(length) [+ offset]`` (ints)."""
    offset = 0
    if kind(node) == "add":
        ops = _operands(node)
        if ops is None:
            return None
        for a, c in (ops, ops[::-1]):
            if kind(a) == "arange" and isinstance(c, int) and not isinstance(c, bool):
                node, offset = a, c
                break
        else:
            return None
    if kind(node) != "arange" or len(node.args) != 1 or not isinstance(node.args[0], int):
        return None
    if set(node.kwargs) - {"device", "dtype"} or node.kwargs.get("dtype") not in (None, torch.int64):
        return None
    return node.args[0], offset


def _index(node: Any, position: int) -> tuple[int, int, list[fx.Node]] | None:
    """``(length, offset, nodes)`` of ``arange(length)[+ offset]`` viewed at
    ``position`` of 4 dims (``q_arange[None, None, :, None]`` is position 2)."""
    if kind(node) != "getitem":
        return None
    src, idx = node.args
    want = tuple(_FULL if i == position else None for i in range(4))
    if not isinstance(idx, tuple) or idx != want:
        return None
    found = _arange(src)
    if found is None:
        return None
    nodes = [node, src] + ([src.args[0]] if kind(src) == "add" else [])
    return found[0], found[1], nodes


def _mask_terms(node: Any, info: MaskInfo, B: int, Sq: int, Sk: int) -> bool:
    """Add the causal / key-padding terms of the bool mask ``node`` to ``info``;
    False if it is anything else. Each sub-expression is read structurally or,
    failing that, evaluated when it depends on no graph input."""
    sub = MaskInfo()
    if not (_structural_terms(node, sub, B, Sq, Sk) or _evaluated_terms(node, sub, Sq, Sk)):
        return False
    if info.key_padding_mask is not None and sub.key_padding_mask is not None:
        return False
    info.causal = info.causal or sub.causal
    info.key_padding_mask = info.key_padding_mask if sub.key_padding_mask is None else sub.key_padding_mask
    info.nodes += sub.nodes
    return True


def _structural_terms(node: Any, info: MaskInfo, B: int, Sq: int, Sk: int) -> bool:
    """The terms of a bool mask built as Hugging Face's ``masking_utils`` builds it."""
    if not isinstance(node, fx.Node):
        return False
    k = kind(node)
    info.nodes.append(node)
    if k == "expand":
        return _mask_terms(node.args[0], info, B, Sq, Sk)
    if k == "cast":
        cast = _cast_source(node)
        return cast is not None and cast[1] == torch.bool and val(cast[0]).dtype == torch.bool and _mask_terms(
            cast[0], info, B, Sq, Sk)
    if k == "and":
        ops = _operands(node)
        return ops is not None and all(_mask_terms(o, info, B, Sq, Sk) for o in ops)
    if k == "new_ones":  # all True: `q_indices.new_ones((), dtype=torch.bool)`
        shape = node.args[1] if len(node.args) == 2 else node.kwargs.get("size")
        return shape in ((), []) and node.kwargs.get("dtype") == torch.bool and len(node.args) <= 2
    if k in ("le", "ge"):
        ops = _operands(node)
        if ops is None:
            return False
        kv, q = ops if k == "le" else ops[::-1]  # kv_idx <= q_idx  /  q_idx >= kv_idx
        qi, ki = _index(q, 2), _index(kv, 3)
        if qi is None or ki is None or qi[0] != Sq or ki[0] != Sk:
            return False
        # key j + ck visible iff j + ck <= i + cq: the kernel's j <= i + (Sk - Sq)
        if qi[1] - ki[1] != Sk - Sq:
            return False
        info.causal = True
        info.nodes += qi[2] + ki[2]
        return True
    if k == "getitem":  # padding_mask[batch_idx, kv_idx]
        pm, idx = node.args
        if not isinstance(idx, tuple) or len(idx) != 2 or info.key_padding_mask is not None:
            return False
        bi, ki = _index(idx[0], 0), _index(idx[1], 3)
        pv = val(pm)
        if bi is None or ki is None or bi[:2] != (B, 0) or ki[:2] != (Sk, 0):
            return False
        if pv is None or pv.dtype != torch.bool or tuple(pv.shape) != (B, Sk):
            return False
        info.key_padding_mask = pm
        info.nodes += bi[2] + ki[2]
        return True
    return False



_MAX_EVALUATED_NODES = 64



def _constant(node: fx.Node) -> tuple[torch.Tensor, list[fx.Node]] | None:
    """Evaluate ``node`` when it is computed from constants only (no placeholder,
    parameter or buffer among its inputs, at most 64 ops): ``(value, nodes)``."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op not in ("call_function", "call_method") or len(seen) >= _MAX_EVALUATED_NODES:
            return None
        seen.add(n)
        stack.extend(n.all_input_nodes)
    order = [n for n in node.graph.nodes if n in seen]
    env: dict[fx.Node, Any] = {}
    try:
        with torch.no_grad():
            for n in order:
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                if n.op == "call_function":
                    env[n] = n.target(*args, **kwargs)
                else:
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
    except Exception as e:  # noqa: BLE001 - an op that cannot run here: nothing proved
        log.debug("mask %s not evaluated: %s", node.name, e)
        return None
    value = env[node]
    return (value, order) if isinstance(value, torch.Tensor) else None


def _evaluated_terms(node: Any, info: MaskInfo, Sq: int, Sk: int) -> bool:
    """A bool mask that depends on no graph input (e.g. transformers' packed-sequence
    mask of ``arange`` positions when ``use_cache=False``), evaluated: it is a
    term if it equals the causal mask (bottom-right aligned) or is all true."""
    mv = val(node)
    if not isinstance(node, fx.Node) or mv is None or mv.dtype != torch.bool or mv.dim() > 4:
        return False
    if mv.dim() >= 2 and tuple(mv.shape[-2:]) != (Sq, Sk):
        return False
    found = _constant(node)
    if found is None:
        return False
    value, nodes = found
    value = value.to("cpu")
    if value.dtype != torch.bool or value.shape != mv.shape:
        return False
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    if bool((value == (j <= i + (Sk - Sq))).all()):
        info.causal = True
    elif not bool(value.all()):
        return False
    info.nodes += nodes
    return True


def bool_mask(node: Any, B: int, Sq: int, Sk: int) -> MaskInfo | None:
    mv = val(node)
    if mv is None or mv.dtype != torch.bool or mv.dim() != 4 or tuple(mv.shape[-2:]) != (Sq, Sk):
        return None
    info = MaskInfo()
    return info if _mask_terms(node, info, B, Sq, Sk) else None


def additive_mask(node: Any, dtype: torch.dtype, B: int, Sq: int, Sk: int) -> MaskInfo | None:
    """``torch.where(bool_mask, 0, fill)`` with ``fill`` at most ``finfo(dtype).min``:
    visible scores unchanged, the others' ``exp`` exactly 0. Causal only: with a
    key-padding term a query could see no key, where this mask averages all
    values and the kernel gives 0."""
    if kind(node) != "where" or len(node.args) != 3 or node.kwargs:
        return None
    cond, zero, fill = node.args
    zero_ok = _is_number(zero, 0.0) or (
        kind(zero) == "zeros" and zero.args in (((),), ([],)) and val(zero) is not None and val(zero).dim() == 0)
    if not zero_ok or not isinstance(fill, (int, float)) or not (fill == -math.inf or fill <= torch.finfo(dtype).min):
        return None
    info = bool_mask(cond, B, Sq, Sk)
    if info is None or info.key_padding_mask is not None or Sk < Sq:
        return None
    info.nodes.append(node)
    if isinstance(zero, fx.Node):
        info.nodes.append(zero)
    return info

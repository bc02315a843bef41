"""Attention matchers for ``fuse_attention`` (run on the Dynamo graph).

* :func:`match_sdpa`: ``F.scaled_dot_product_attention``, with no mask or a
  mask that is provably causal and/or a key-padding mask;
* :func:`match_eager_attention`: Hugging Face's ``eager_attention_forward``
  (GPT-2, Llama) and nanoGPT-style code written out as ops,
  ``dropout(softmax(q @ k.transpose(-1, -2) * scale + mask)) @ v``;
* both look through Llama's ``repeat_kv`` (``k[:, :, None].expand(...).reshape(...)``)
  and pass the un-repeated key/value heads to the kernel (native GQA);
* :func:`match_rotary`: Hugging Face ``apply_rotary_pos_emb`` (``q * cos +
  rotate_half(q) * sin`` and the same for ``k``) -> one ``apply_rotary``.

Hugging Face GPT-2 eager attention (transformers 5.x), before::

    transpose_3 = keys.transpose(-1, -2)
    matmul = torch.matmul(query_states_1, transpose_3)
    attn_weights = matmul * 0.25
    attn_weights_1 = attn_weights + mask      # mask = torch.where(kv_idx <= q_idx, zeros, finfo.min)
    attn_weights_2 = torch.nn.functional.softmax(attn_weights_1, dim = -1)
    attn_weights_3 = attn_weights_2.type(torch.float32)
    attn_weights_4 = torch.nn.functional.dropout(attn_weights_3, p = 0.0, training = True)
    attn_output = torch.matmul(attn_weights_4, values)

after::

    attn_output = zerograph.kernels.attention.attention(query_states_1, keys, values,
                                                        causal=True, scale=0.25, dropout_p=0.0)

Masks are proved, not guessed: a mask is accepted only when its graph is built
from ``arange`` position indices compared as ``kv_idx <= q_idx`` (causal,
checked to be the kernel's bottom-right alignment), a bool ``(B, Sk)`` tensor
indexed as ``padding[batch_idx, kv_idx]`` (key padding), ``&`` of those,
``new_ones`` (all-true), ``expand`` and no-op casts; for additive masks, a
``torch.where(bool_mask, 0, fill)`` with ``fill <= finfo(dtype).min``. Any other
mask (a ``tril`` buffer, a user tensor, an additive key-padding mask: there a
row that sees no key averages all values, the kernel gives 0) is left alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from zerograph.passes.fusion.patterns import Match, _bind, _cast_source, _is_number, _kernel, _operands, _single_use, kind, val

log = logging.getLogger(__name__)

_FULL = slice(None, None, None)


# --------------------------------------------------------------------------- masks


@dataclasses.dataclass
class _MaskInfo:
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


def _mask_terms(node: Any, info: _MaskInfo, B: int, Sq: int, Sk: int) -> bool:
    """Add the causal / key-padding terms of the bool mask ``node`` to ``info``;
    False if it is anything else. Each sub-expression is read structurally or,
    failing that, evaluated when it depends on no graph input."""
    sub = _MaskInfo()
    if not (_structural_terms(node, sub, B, Sq, Sk) or _evaluated_terms(node, sub, Sq, Sk)):
        return False
    if info.key_padding_mask is not None and sub.key_padding_mask is not None:
        return False
    info.causal = info.causal or sub.causal
    info.key_padding_mask = info.key_padding_mask if sub.key_padding_mask is None else sub.key_padding_mask
    info.nodes += sub.nodes
    return True


def _structural_terms(node: Any, info: _MaskInfo, B: int, Sq: int, Sk: int) -> bool:
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


def _evaluated_terms(node: Any, info: _MaskInfo, Sq: int, Sk: int) -> bool:
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


def _bool_mask(node: Any, B: int, Sq: int, Sk: int) -> _MaskInfo | None:
    mv = val(node)
    if mv is None or mv.dtype != torch.bool or mv.dim() != 4 or tuple(mv.shape[-2:]) != (Sq, Sk):
        return None
    info = _MaskInfo()
    return info if _mask_terms(node, info, B, Sq, Sk) else None


def _additive_mask(node: Any, dtype: torch.dtype, B: int, Sq: int, Sk: int) -> _MaskInfo | None:
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
    info = _bool_mask(cond, B, Sq, Sk)
    if info is None or info.key_padding_mask is not None or Sk < Sq:
        return None
    info.nodes.append(node)
    if isinstance(zero, fx.Node):
        info.nodes.append(zero)
    return info


# --------------------------------------------------------------------------- GQA


def _strip_repeat_kv(node: Any, user: fx.Node) -> tuple[Any, list[fx.Node]]:
    """``(kv, nodes)`` for Llama's ``repeat_kv(kv, n)`` =
    ``kv[:, :, None, :, :].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)``
    (used only by ``user``), else ``(node, [])``: head ``h`` reads key head
    ``h // n``, as the kernel's GQA does."""
    if kind(node) not in ("reshape", "view") or not _single_use(node, user):
        return node, []
    ex = node.args[0]
    if kind(ex) != "expand" or not _single_use(ex, node):
        return node, []
    gi = ex.args[0]
    if kind(gi) != "getitem" or not _single_use(gi, ex):
        return node, []
    src, idx = gi.args
    if not isinstance(idx, tuple) or idx[:3] != (_FULL, _FULL, None) or any(i != _FULL for i in idx[3:]):
        return node, []
    s, e, o = val(src), val(ex), val(node)
    if s is None or e is None or o is None or s.dim() != 4 or e.dim() != 5:
        return node, []
    B, H, S, D = s.shape
    n = e.shape[2]
    if tuple(e.shape) != (B, H, n, S, D) or tuple(o.shape) != (B, H * n, S, D):
        return node, []
    return src, [node, ex, gi]


# --------------------------------------------------------------------------- kernel limits


def _kernel_takes(q: torch.Tensor, dropout_p: float) -> bool:
    """What :func:`zerograph.kernels.attention.attention` accepts beyond the shapes
    checked by the matchers: head dim up to its maximum (128), dropout in [0, 1)."""
    max_head_dim = getattr(importlib.import_module("zerograph.kernels.attention"), "_MAX_HEAD_DIM", 128)
    return q.shape[-1] <= max_head_dim and 0.0 <= dropout_p < 1.0 and q.is_floating_point()


# --------------------------------------------------------------------------- SDPA


def match_sdpa(node: fx.Node) -> Match | None:
    """``F.scaled_dot_product_attention`` with ``attn_mask`` None, or a bool mask
    that is causal and/or key padding, or an additive causal mask; ``is_causal``
    either way (causal only when query and key lengths are equal); GQA via
    ``enable_gqa`` or ``repeat_kv``."""
    if kind(node) != "sdpa":
        return None
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = _bind(node, names, {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False})
    if a is None:
        return None
    q, k, v = (val(a[n]) for n in ("query", "key", "value"))
    if q is None or k is None or v is None or not (q.dim() == k.dim() == v.dim() == 4):
        return None
    if not isinstance(a["is_causal"], bool) or not isinstance(a["dropout_p"], (int, float)):
        return None
    if not isinstance(a["enable_gqa"], bool) or not (a["scale"] is None or isinstance(a["scale"], (int, float))):
        return None
    if q.dtype != k.dtype or q.dtype != v.dtype or q.shape[-1] != k.shape[-1] or k.shape != v.shape:
        return None
    if q.shape[1] != k.shape[1] and not (a["enable_gqa"] and q.shape[1] % k.shape[1] == 0):
        return None
    B, _, Sq, _ = q.shape
    Sk = k.shape[2]
    if a["is_causal"] and Sq != Sk:  # SDPA aligns top-left, the kernel bottom-right
        return None
    causal, kpm, loose = a["is_causal"], None, []
    if a["attn_mask"] is not None:
        if a["is_causal"]:
            return None
        mask = a["attn_mask"]
        info = _bool_mask(mask, B, Sq, Sk) if val(mask) is not None and val(mask).dtype == torch.bool else (
            _additive_mask(mask, q.dtype, B, Sq, Sk))
        if info is None:
            return None
        causal, kpm, loose = info.causal, info.key_padding_mask, info.nodes
    key, k_nodes = _strip_repeat_kv(a["key"], node)
    value, v_nodes = _strip_repeat_kv(a["value"], node)
    if val(key).shape != val(value).shape:
        key, value, k_nodes, v_nodes = a["key"], a["value"], [], []
    if not _kernel_takes(q, float(a["dropout_p"])):
        return None
    scale = float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    kwargs = {"causal": causal, "scale": scale, "dropout_p": float(a["dropout_p"])}
    if kpm is not None:
        kwargs["key_padding_mask"] = kpm
    pattern = "sdpa" if a["attn_mask"] is None else "sdpa_masked"
    return Match(pattern, node, k_nodes + v_nodes, _kernel("attention", "attention"), (a["query"], key, value),
                 kwargs, loose=loose)


# --------------------------------------------------------------------------- eager attention


def _is_last_two(dims: tuple, ndim: int) -> bool:
    return len(dims) == 2 and all(isinstance(d, int) for d in dims) and {d % ndim for d in dims} == {ndim - 2, ndim - 1}


def _dropout(node: Any) -> tuple[Any, float] | None:
    a = _bind(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
    if a is None or not isinstance(a["p"], (int, float)) or not isinstance(a["training"], bool) or a["inplace"]:
        return None
    return a["input"], float(a["p"]) if a["training"] else 0.0


def _softmax_input(node: Any) -> Any:
    if kind(node) != "softmax":
        return None
    names = ("input", "dim", "_stacklevel", "dtype") if node.target is F.softmax else ("input", "dim", "dtype")
    a = _bind(node, names, {"dtype": None, "_stacklevel": 3})
    x = val(a and a["input"])
    if a is None or x is None or x.dim() != 4 or not isinstance(a.get("dim"), int) or a["dim"] % 4 != 3:
        return None
    if a["dtype"] not in (None, torch.float32, x.dtype):  # an fp32 softmax: the kernel's is fp32 anyway
        return None
    return a["input"]


def _scores(node: Any, user: fx.Node) -> tuple[Any, Any, float, list[fx.Node]] | None:
    """``(q, k_repeated, scale, nodes)`` for ``q @ k.transpose(-1, -2) [* c | / c]``."""
    scale, nodes = 1.0, []
    if kind(node) in ("mul", "div") and _single_use(node, user):
        ops = _operands(node)
        if ops is None:
            return None
        pairs = [ops, ops[::-1]] if kind(node) == "mul" else [ops]
        for x, c in pairs:
            if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0 and kind(x) == "matmul":
                scale = float(c) if kind(node) == "mul" else 1.0 / float(c)
                nodes.append(node)
                user, node = node, x
                break
        else:
            return None
    if kind(node) != "matmul" or not _single_use(node, user) or len(node.args) != 2 or node.kwargs:
        return None
    q, kt = node.args
    if kind(kt) != "transpose" or not _single_use(kt, node) or len(kt.args) != 3 or kt.kwargs:
        return None
    if val(kt.args[0]) is None or not _is_last_two(kt.args[1:], val(kt.args[0]).dim()):
        return None
    return q, kt.args[0], scale, nodes + [node, kt]


def match_eager_attention(node: fx.Node) -> Match | None:
    """``matmul(dropout(cast(softmax(q @ k.transpose(-1, -2) * scale [+ mask], dim=-1))), v)``
    (dropout and cast optional, ``scale`` a number, ``mask`` proved causal) ->
    ``attention(q, k, v, causal=, scale=, dropout_p=)``."""
    if kind(node) != "matmul" or len(node.args) != 2 or node.kwargs or val(node) is None:
        return None
    p, v_rep = node.args
    interior: list[fx.Node] = []
    dropout_p = 0.0
    user = node
    if kind(p) == "dropout":
        d = _dropout(p)
        if d is None or not _single_use(p, user):
            return None
        interior.append(p)
        user, (p, dropout_p) = p, d
    if kind(p) == "cast":
        cast = _cast_source(p)
        if cast is None or not _single_use(p, user):
            return None
        interior.append(p)
        user, p = p, cast[0]
    s = _softmax_input(p)
    if s is None or not _single_use(p, user):
        return None
    interior.append(p)
    user = p
    sv = val(s)
    q_rep = None
    causal, loose = False, []
    if kind(s) == "add" and _single_use(s, user):
        ops = _operands(s)
        for sc, mask in (ops, ops[::-1]) if ops else ():
            found = _scores(sc, s)
            if found is None:
                continue
            qv, kv = val(found[0]), val(found[1])
            if qv is None or kv is None or qv.dim() != 4 or kv.dim() != 4:
                return None
            info = _additive_mask(mask, sv.dtype, qv.shape[0], qv.shape[2], kv.shape[2])
            if info is None:
                return None
            q_rep, k_rep, scale, nodes = found
            causal, loose = info.causal, info.nodes
            interior += [s, *nodes]
            break
    if q_rep is None:
        found = _scores(s, user)
        if found is None:
            return None
        q_rep, k_rep, scale, nodes = found
        interior += nodes
    q, k, v = val(q_rep), val(k_rep), val(v_rep)
    if q is None or k is None or v is None or not (q.dim() == k.dim() == v.dim() == 4):
        return None
    if not (q.dtype == k.dtype == v.dtype == val(node).dtype) or not q.is_floating_point():
        return None
    if q.shape[1] != k.shape[1] or k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        return None
    if tuple(val(node).shape) != tuple(q.shape[:3]) + (v.shape[-1],) or not _kernel_takes(q, dropout_p):
        return None
    transpose = interior[-1]
    key, k_nodes = _strip_repeat_kv(k_rep, transpose)
    value, v_nodes = _strip_repeat_kv(v_rep, node)
    if val(key).shape != val(value).shape:
        key, value, k_nodes, v_nodes = k_rep, v_rep, [], []
    kwargs = {"causal": causal, "scale": scale, "dropout_p": dropout_p}
    return Match("eager_attention", node, interior + k_nodes + v_nodes, _kernel("attention", "attention"),
                 (q_rep, key, value), kwargs, loose=loose)


# --------------------------------------------------------------------------- rotary


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

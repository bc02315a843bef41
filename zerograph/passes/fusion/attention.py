"""Attention matchers for ``fuse_attention`` (run on the Dynamo graph).

* :func:`match_sdpa`: ``F.scaled_dot_product_attention``, with no mask or a
  mask that is provably causal and/or a key-padding mask;
* :func:`match_eager_attention`: Hugging Face's ``eager_attention_forward``
  (GPT-2, Llama) and nanoGPT-style code written out as ops,
  ``dropout(softmax(q @ k.transpose(-1, -2) * scale + mask)) @ v``;
* both look through Llama's ``repeat_kv`` (``k[:, :, None].expand(...).reshape(...)``)
  and pass the un-repeated key/value heads to the kernel (native GQA).

The rotary matcher of the same pass is in :mod:`zerograph.passes.fusion.rotary`.

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

Masks are proved, not guessed (:mod:`zerograph.passes.fusion.attention_masks`):
causal and/or key padding built as transformers builds them, or an additive
causal ``torch.where(bool_mask, 0, fill)`` with ``fill <= finfo(dtype).min``. Any other
mask (a ``tril`` buffer, a user tensor, an additive key-padding mask: there a
row that sees no key averages all values, the kernel gives 0) is left alone.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from zerograph.passes.fusion.attention_masks import _FULL, additive_mask, bool_mask
from zerograph.passes.fusion.patterns import Match, _bind, _cast_source, _kernel, _operands, _single_use, kind, val


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
        info = bool_mask(mask, B, Sq, Sk) if val(mask) is not None and val(mask).dtype == torch.bool else (
            additive_mask(mask, q.dtype, B, Sq, Sk))
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
            info = additive_mask(mask, sv.dtype, qv.shape[0], qv.shape[2], kv.shape[2])
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

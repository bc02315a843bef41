"""A causal mask that ``torch.export`` traced as constants, recognised and
replaced by ``is_causal=True`` (sequence parallelism: after Ulysses'
all-to-all attention sees the whole sequence, where a mask built for the
local one would be wrong).

Hugging Face builds its causal mask from ``arange`` when traced (Dynamo
graphs skip it: ``is_causal``). On a pipeline's export graph, at sp=2 with 8
local positions::

    arange_2 = aten.arange(8); add = aten.add(arange_2, 0); ...
    le = aten.le(unsqueeze_11, unsqueeze_8); expand = aten.expand(le, [4, -1, 8, 8])
    sdpa = aten.scaled_dot_product_attention(q, k, v, expand, scale=...)
->  sdpa = aten.scaled_dot_product_attention(q, k, v, None, is_causal=True, scale=...)
"""

from __future__ import annotations

import torch
import torch.fx as fx


def drop_constant_causal_mask(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An ATen SDPA's ``attn_mask`` computed from constants alone (Hugging
    Face builds its causal mask from ``arange`` when traced by
    ``torch.export``) that evaluates to the causal pattern -> ``attn_mask=None,
    is_causal=True``: after the all-to-all, attention sees the whole
    sequence, where the local mask would be wrong. Any other mask is left
    (the sequence_parallel pass rejects it)."""
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if node.target is not torch.ops.aten.scaled_dot_product_attention.default or not isinstance(mask, fx.Node):
        return False
    seen, stack = set(), [mask]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        if n.op != "call_function":  # a graph input or parameter: not a constant mask
            return False
        seen.add(n)
        stack.extend(n.all_input_nodes)
    values: dict = {}
    for n in gm.graph.nodes:  # graph order: inputs before users
        if n in seen:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values[a])
            values[n] = n.target(*args, **kwargs)
    value = values[mask]
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.dim() < 2 \
            or value.shape[-1] != value.shape[-2]:
        return False
    causal = torch.ones(value.shape[-2:], dtype=torch.bool, device=value.device).tril()
    if not bool((value == causal).all()):
        return False
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > 3:
        args[3] = None
    kwargs.pop("attn_mask", None)
    if len(args) > 5:
        args[5] = True
    else:
        kwargs["is_causal"] = True
    node.args, node.kwargs = tuple(args), kwargs
    for n in reversed(list(gm.graph.nodes)):  # the mask's nodes, now unused
        if n in seen and not n.users:
            gm.graph.erase_node(n)
    return True

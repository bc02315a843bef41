"""Fusion passes: replace transformer subgraphs of the Dynamo graph by one call
of a fused kernel's public function (:mod:`zerograph.kernels`).

They run on the ``"dynamo"`` graph, before AOTAutograd, so AOTAutograd traces
the fused op's own registered backward. One pass per family, each can be
disabled by name: ``fuse_attention``, ``fuse_norms``, ``fuse_mlp_activation``,
``fuse_cross_entropy``. They do nothing unless ``zerograph.fusion`` is true.
The matchers are in :mod:`zerograph.passes.fusion.patterns`,
:mod:`zerograph.passes.fusion.rotary` and :mod:`zerograph.passes.fusion.attention`
(its masks proved in :mod:`zerograph.passes.fusion.attention_masks`); :data:`FAMILIES`
lists them in the order they are tried on each node.

A Llama RMSNorm goes from::

    hidden_states = inputs_embeds.to(torch.float32)
    pow_1 = hidden_states.pow(2)
    variance = pow_1.mean(-1, keepdim = True)
    add_1 = variance + 1e-06
    rsqrt = torch.rsqrt(add_1)
    hidden_states_1 = hidden_states * rsqrt
    to_4 = hidden_states_1.to(torch.float32)
    hidden_states_2 = unshard_1 * to_4

to::

    rms_norm = zerograph.kernels.rms_norm.rms_norm(inputs_embeds, unshard_1, 1e-06)

A fused op with two results (rotary) replaces its two outputs by ``getitem``
nodes::

    apply_rotary = zerograph.kernels.rotary.apply_rotary(query_states, key_states, cos_2, sin_2, 1)
    getitem_1 = apply_rotary[0]       # was q_embed = mul_5 + mul_6
    getitem_2 = apply_rotary[1]       # was k_embed = mul_7 + mul_8

The fused node keeps the replaced output's ``nn_module_stack`` and
``stack_trace``, so ``tag_nodes`` gives the fused ops the module path of the
code they replace. Match counts per pattern are in ``PassResult.counts``.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections import Counter
from typing import Callable

import torch.fx as fx

from zerograph.passes.fusion import attention as attention_patterns, patterns, rotary as rotary_patterns
from zerograph.passes.manager import PassContext, PassResult

log = logging.getLogger(__name__)

_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "example_value")

FAMILIES: dict[str, tuple[Callable[[fx.Node], patterns.Match | None], ...]] = {
    "attention": (rotary_patterns.match_rotary, attention_patterns.match_sdpa,
                  attention_patterns.match_eager_attention),
    "norms": (patterns.match_rms_norm, patterns.match_layer_norm),
    "mlp_activation": (patterns.match_swiglu, patterns.match_gelu, patterns.match_gelu_new),
    "cross_entropy": (patterns.match_linear_cross_entropy, patterns.match_cross_entropy),
}


def _enabled(ctx: PassContext) -> bool:
    opts = getattr(ctx.config, "zerograph", None)
    return bool(getattr(opts, "fusion", False))


def _input_nodes(m: patterns.Match) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((m.args, m.kwargs), found.append)
    return found


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in _META_KEYS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]


def _apply(gm: fx.GraphModule, m: patterns.Match, dead: set[fx.Node]) -> bool:
    outputs = list(m.outputs) or [m.output]
    nodes = [*outputs, *m.interior]
    if any(n in dead for n in nodes):
        return False
    inside = set(nodes)
    for n in m.interior:  # an intermediate used outside the pattern stays
        if not set(n.users) <= inside:
            return False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(outputs, key=order.__getitem__)
    if any(a in dead or a in inside or order[a] >= order[first] for a in _input_nodes(m)):
        return False  # the fused call goes where the first output was: its inputs must exist there
    graph = gm.graph
    with graph.inserting_before(first):
        args = list(m.args)
        for i, (fn, extra) in sorted(m.adapters.items()):
            adapted = graph.call_function(fn, (args[i], *extra))
            _copy_meta(m.output, adapted)
            ev = patterns.val(args[i])
            if ev is not None:
                adapted.meta["example_value"] = fn(ev, *extra)
            args[i] = adapted
        fused = graph.call_function(m.fn, tuple(args), m.kwargs)
        _copy_meta(m.output, fused)
        if m.outputs:
            fused.meta["example_value"] = tuple(o.meta.get("example_value") for o in outputs)
            for i, out in enumerate(outputs):
                item = graph.call_function(operator.getitem, (fused, i))
                _copy_meta(out, item)
                out.replace_all_uses_with(item)
        else:
            m.output.replace_all_uses_with(fused)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted((set(nodes) | set(m.loose)) - dead, key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)
            dead.add(n)
    return True


def rewrite_matches(gm: fx.GraphModule, matchers) -> Counter:
    """Rewrite every match of ``matchers`` (tried in order at each node); the
    count of each pattern rewritten. The caller lints and recompiles."""
    counts: Counter[str] = Counter()
    dead: set[fx.Node] = set()
    for node in list(gm.graph.nodes):
        if node in dead or node.op not in ("call_function", "call_method"):
            continue
        for matcher in matchers:
            m = matcher(node)
            if m is not None and _apply(gm, m, dead):
                counts[m.pattern] += 1
                break
    return counts


def fuse(gm: fx.GraphModule, ctx: PassContext, *, family: str) -> PassResult:
    """Rewrite every match of ``family``'s patterns (see :data:`FAMILIES`)."""
    if not _enabled(ctx):
        return PassResult(details={"skipped": "zerograph.fusion is false"})
    counts = rewrite_matches(gm, FAMILIES[family])
    if counts:
        gm.graph.lint()
        gm.recompile()
        log.debug("fuse_%s: %s", family, dict(counts))
    return PassResult(changed=bool(counts), details={"counts": dict(counts)}, counts=dict(counts))


FUSION_PASSES = tuple((f"fuse_{family}", functools.partial(fuse, family=family)) for family in FAMILIES)

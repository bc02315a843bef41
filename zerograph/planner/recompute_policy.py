"""Activation checkpointing policies: analysis only, no graph changes.

A policy looks at the forward nodes of the joint graph and returns, per node,
a :class:`~torch.utils.checkpoint.CheckpointPolicy` for AOTAutograd's
partitioner. The mechanism (:mod:`zerograph.passes.activation_checkpointing`) writes
these into ``node.meta["recompute"]``.

Rules shared by every policy:

* only ``role == "compute"`` nodes without a parameter are considered, so the
  ZeRO markers and the gathered-parameter chain keep ``zero_policy``'s
  decision (recomputation never adds an all-gather);
* tensor- and sequence-parallel collectives (the tp/sp markers that move data
  in the forward: :func:`communicates`) are always ``MUST_SAVE``: recomputing
  a block never repeats a tp all-reduce, reduce-scatter or all-gather or an
  sp all-to-all (Megatron-SP's re-gather of a column group's input is the one
  exception, tagged before these policies run by ``tp_regather``; tagged
  nodes are not candidates);
* random ops (``nondeterministic_seeded``, e.g. dropout's ``bernoulli``/``rand``,
  and fused attention with ``dropout_p > 0``) are always ``MUST_SAVE``: the backward reuses the forward's random values,
  so gradients equal eager's on every device, without RNG functionalization.
"""

from __future__ import annotations

import logging
import operator
import re
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from zerograph._torch_private import size_hint
from zerograph.graph.tags import get_tag
from zerograph.graph.deterministic_rng import dropout_p, unwrap_deterministic_rng
from zerograph.graph.sp_ops import SP_MARKERS
from zerograph.planner.liveness import is_alias
from zerograph.planner.tp_regather import is_tp_collective

log = logging.getLogger(__name__)

NodePredicate = Callable[[fx.Node], bool]

# outputs worth keeping under the "selective" policy: matmuls and attention
_EXPENSIVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.aten.convolution.default,
}
_EXPENSIVE_PACKETS = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                      "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"}


def is_random(node: fx.Node) -> bool:
    """A random op, or an element of a random op's tuple result (``native_dropout``'s
    output and mask): the partitioner saves tuple elements, not the tuple."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        return is_random(node.args[0])
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded not in tags:
        return False
    return dropout_p(node.target, node.args, node.kwargs) != 0.0


def communicates(node: fx.Node) -> bool:
    """A tensor- or sequence-parallel collective: recomputing it would repeat the collective."""
    return is_tp_collective(node) or (node.op == "call_function" and node.target in SP_MARKERS)


def _must_save(node: fx.Node, no_regather: frozenset[str]) -> bool:
    return is_random(node) or communicates(node) or _reads_param(node, no_regather)


def is_expensive(node: fx.Node) -> bool:
    if node.target in _EXPENSIVE:
        return True
    packet = getattr(node.target, "_overloadpacket", None)
    return getattr(packet, "__name__", "") in _EXPENSIVE_PACKETS


def candidates(gm: fx.GraphModule) -> list[fx.Node]:
    """Forward compute nodes a policy may tag."""
    out = []
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if node.op != "call_function" or tag is None or tag.phase != "forward":
            continue
        if tag.role != "compute" or tag.param is not None or "recompute" in node.meta:
            continue
        out.append(node)
    return out


def block_of(node: fx.Node, pattern: Optional[str]) -> Optional[str]:
    """The block a node belongs to: the module-path prefix matched by ``pattern``,
    or by default the path up to its first integer component (``h.3``)."""
    tag = get_tag(node)
    path = tag.module_path if tag else None
    if not path:
        return None
    regex = pattern or r"^(?:.*?\.)?\d+(?=\.|$)"
    match = re.search(regex, path)
    return match.group(0) if match else None


def params_read_by_backward(gm: fx.GraphModule) -> set[str]:
    """Parameters whose gathered value a backward node of the joint graph reads
    (ZeRO-3 gathers exactly these again in the backward)."""
    out = set()
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.phase != "forward" or tag.param is None or tag.role not in ("unshard", "compute"):
            continue
        if any(get_tag(u) is not None and get_tag(u).phase == "backward" for u in node.users):
            out.add(tag.param)
    return out


def _reads_param(node: fx.Node, params: frozenset[str]) -> bool:
    for arg in node.all_input_nodes:
        tag = get_tag(arg)
        if tag is not None and tag.param in params and tag.role in ("unshard", "compute"):
            return True
    return False


def choose(gm: fx.GraphModule, policy: str, *, block_pattern: Optional[str] = None,
           predicate: Optional[NodePredicate] = None,
           no_regather: frozenset[str] = frozenset()) -> dict[fx.Node, CheckpointPolicy]:
    """Per-node save/recompute decisions for ``policy``.

    ``no_regather``: sharded parameters the backward does not gather (ZeRO-3 biases,
    embeddings); a node reading one is saved, since recomputing it would add an all-gather.
    """
    nodes = candidates(gm)
    decision: dict[fx.Node, CheckpointPolicy] = {}
    if policy == "none" and predicate is None:
        return decision
    block = {n: block_of(n, block_pattern) for n in nodes} if policy == "per_layer" else {}
    for node in nodes:
        if _must_save(node, no_regather):
            decision[node] = CheckpointPolicy.MUST_SAVE
        elif predicate is not None:
            decision[node] = CheckpointPolicy.MUST_SAVE if predicate(node) else CheckpointPolicy.MUST_RECOMPUTE
        elif policy == "selective":
            decision[node] = CheckpointPolicy.MUST_SAVE if is_expensive(node) else CheckpointPolicy.PREFER_RECOMPUTE
        elif policy == "per_layer":
            name = block[node]
            if name is None:
                continue
            leaves = any(u.op == "output" or block.get(u, name) != name for u in node.users
                         if get_tag(u) is None or get_tag(u).phase == "forward")
            decision[node] = CheckpointPolicy.MUST_SAVE if leaves else CheckpointPolicy.MUST_RECOMPUTE
    return decision


# ---------------------------------------------------------------------------
# memory_budget: what to recompute so that the saved bytes fit a budget
# ---------------------------------------------------------------------------

_RECOMPUTE = (CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.PREFER_RECOMPUTE)


def output_bytes(node: fx.Node) -> int:
    """Bytes of a node's result (0 for non-tensors; a tuple's elements summed)."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else (val,)
    return sum(size_hint(v.numel()) * v.element_size() for v in vals if isinstance(v, torch.Tensor))


def recompute_flops(node: fx.Node) -> int:
    """Rough cost of recomputing a node: 2·m·n·k for matmuls, 4·B·H·L²·D for attention,
    one FLOP per output element otherwise."""
    val = node.meta.get("val")
    out = val[0] if isinstance(val, (tuple, list)) and val else val
    numel = size_hint(out.numel()) if isinstance(out, torch.Tensor) else 1
    if node.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                       torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default):
        a = node.args[1] if node.target in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else node.args[0]
        k = a.meta["val"].shape[-1] if isinstance(a, fx.Node) and "val" in a.meta else 1
        return 2 * numel * size_hint(k)
    packet = getattr(getattr(node.target, "_overloadpacket", None), "__name__", "")
    if packet in _EXPENSIVE_PACKETS and isinstance(node.args[0], fx.Node):
        q, k = node.args[0].meta["val"], node.args[1].meta["val"]
        return 4 * size_hint(q.numel()) * size_hint(k.shape[-2])
    return int(numel)


def _phase(node: fx.Node) -> Optional[str]:
    tag = get_tag(node)
    if tag is not None:
        return tag.phase
    if node.op == "placeholder":
        return "backward" if node.name.startswith("tangents") else "forward"
    return None


def num_forward_outputs(gm: fx.GraphModule) -> int:
    """The user outputs of an AOTAutograd joint graph: its outputs are the forward's
    outputs followed by one gradient per primal input."""
    primals = sum(1 for n in gm.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents"))
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return len(_flatten(outputs.args)) - primals


def _flatten(args) -> list:
    """Leaves of nested tuples/lists (``None`` kept: a primal without a gradient)."""
    if isinstance(args, (tuple, list)):
        return [leaf for a in args for leaf in _flatten(a)]
    return [args]


def _forward_and_needed(gm: fx.GraphModule) -> tuple[list[fx.Node], set[fx.Node]]:
    """The forward nodes of a joint graph, and those a backward node reads."""
    forward = [n for n in gm.graph.nodes if _phase(n) == "forward" and n.op != "output"]
    fwd = set(forward)
    needed = {a for n in gm.graph.nodes if n.op != "output" and _phase(n) != "forward"
              for a in n.all_input_nodes if a in fwd}
    return forward, needed


def _capacity(node: fx.Node, recompute: set) -> Optional[int]:
    """Bytes it costs to save ``node`` (``None``: it cannot be saved, e.g. a tuple,
    whose elements are saved instead); 0 for what :func:`_held_anyway` holds."""
    if _held_anyway(node, recomputed=node in recompute):
        return 0
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return None
    return output_bytes(node)


def _aliases_input(node: fx.Node) -> bool:
    """A view of a graph input (``t(weight)``): saving it holds no new memory."""
    while node.op == "call_function" and is_alias(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.op == "placeholder"


def _held_anyway(node: fx.Node, *, recomputed: bool) -> bool:
    """An input or a view of one (parameters, the batch), or a parameter's value
    that is not recomputed (unsharded, or gathered once per forward at stages 1-2):
    the step holds its memory whether or not it is saved."""
    if _aliases_input(node):
        return True
    tag = get_tag(node)
    return tag is not None and tag.param is not None and not recomputed


def min_cut_saved(gm: fx.GraphModule, recompute: set) -> set[fx.Node]:
    """The forward nodes to save so that the backward can run, saving the fewest bytes
    when the nodes in ``recompute`` (and only those) may be recomputed.

    A minimum s-t cut (networkx) over the forward nodes, each split into
    ``in -> out`` with the node's bytes as capacity: the source feeds every node
    that must run in the forward (inputs and nodes not in ``recompute``), the
    nodes a backward node reads feed the sink, and data edges are uncapped. The
    cut edges are the nodes to save; everything between them and the backward is
    recomputed. A larger ``recompute`` never gives a larger cut, so the saved bytes
    are non-increasing along nested sets.
    """
    import networkx as nx

    forward, needed = _forward_and_needed(gm)
    fwd = set(forward)
    graph = nx.DiGraph()
    for node in forward:
        cap = _capacity(node, recompute)
        if cap is None:
            graph.add_edge((node, "in"), (node, "out"))  # no capacity: uncuttable
        else:
            graph.add_edge((node, "in"), (node, "out"), capacity=cap)
        if node.op == "placeholder" or node not in recompute:
            graph.add_edge("source", (node, "in"))
        if node in needed:
            graph.add_edge((node, "out"), "sink")
        for arg in node.all_input_nodes:
            if arg in fwd:
                graph.add_edge((arg, "out"), (node, "in"))
    if "sink" not in graph:
        return set()
    _, (reachable, _) = nx.minimum_cut(graph, "source", "sink")
    return {n for n in forward if (n, "in") in reachable and (n, "out") not in reachable}


def held_anyway(node: fx.Node) -> bool:
    """A saved value whose memory the step holds whether or not it is saved
    (:func:`_held_anyway`, recomputation read from the node's tag)."""
    return _held_anyway(node, recomputed=node.meta.get("recompute") in _RECOMPUTE)


def predict_saved_bytes(gm: fx.GraphModule, decision: Optional[dict] = None, *,
                        activations_only: bool = False) -> int:
    """Exact bytes the forward saves for the backward (analysis: ``gm`` is not changed).

    Partitions a copy of the joint graph ``gm`` (with ``decision`` applied on top of
    its ``node.meta["recompute"]`` tags) with the same partitioner the backend uses,
    and sums the forward graph's outputs beyond the user outputs: exactly the
    tensors AOTAutograd stores with ``save_for_backward``. ``activations_only``
    leaves out what :func:`held_anyway` holds (the unit of ``memory_budget``).
    """
    from zerograph._torch_private import default_partition

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # node.meta copied per node (shallow): gm stays as it is
    clone = fx.GraphModule(gm, graph)
    by_name = {n.name: n for n in clone.graph.nodes}
    for node, policy in (decision or {}).items():
        by_name[node.name].meta["recompute"] = policy
    n_out = num_forward_outputs(gm)
    fw, bw = default_partition(clone, None, num_fwd_outputs=n_out)
    unwrap_deterministic_rng(fw, bw)
    outputs = next(n for n in reversed(fw.graph.nodes) if n.op == "output")
    saved = [n for n in _flatten(outputs.args)[n_out:] if isinstance(n, fx.Node)]
    return sum(output_bytes(n) for n in saved if not (activations_only and held_anyway(n)))


def choose_for_budget(gm: fx.GraphModule, budget, *, no_regather: frozenset[str] = frozenset()
                      ) -> tuple[dict[fx.Node, CheckpointPolicy], dict]:
    """Decisions for ``memory_budget``: a knapsack over the forward compute nodes,
    solved by min-cut.

    Nodes are ranked by recompute FLOPs per saved byte (cheapest first: pointwise
    ops before matmuls). Allowing the first ``k`` to be recomputed, the minimum cut
    (:func:`min_cut_saved`) gives the fewest bytes the forward must save; these are
    non-increasing in ``k``, so a binary search finds the smallest ``k`` whose cut
    fits ``budget`` (a fraction of the activation bytes policy ``none`` saves, or
    bytes; parameters and inputs, held anyway, do not count: :func:`held_anyway`), i.e. the
    fewest expensive nodes allowed to be recomputed; :func:`_spend_slack` then
    takes back the expensive ones the budget can still hold. If none fits, all
    free nodes may be recomputed (the least any choice saves). The cut's nodes
    are saved, the other allowed nodes recomputed. Random ops, tp/sp collectives and reads
    of non-regathered parameters are always saved.
    """
    nodes = candidates(gm)
    must_save = {n for n in nodes if _must_save(n, no_regather)}
    free = [n for n in nodes if n not in must_save]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    free.sort(key=lambda n: (recompute_flops(n) / max(output_bytes(n), 1), order[n]))
    base = {n for n in gm.graph.nodes if n.meta.get("recompute") in _RECOMPUTE}
    none_bytes = predict_saved_bytes(gm, activations_only=True)  # exact: what the graph saves with its tags
    limit = int(budget * none_bytes) if isinstance(budget, float) else int(budget)

    def cut(allowed: set) -> set:
        return min_cut_saved(gm, base | allowed)

    def bytes_of(allowed: set, saved: set) -> int:  # the cut's value: activation bytes
        return sum(_capacity(n, base | allowed) or 0 for n in saved)

    def fits(allowed: set) -> bool:
        saved = bytes_of(allowed, cut(allowed))
        log.debug("memory_budget: %d of %d nodes recomputable: about %d bytes saved (limit %d)",
                  len(allowed), len(free), saved, limit)
        return saved <= limit

    lo, hi = 0, len(free)  # smallest k in [lo, hi] whose cut fits, hi if none
    if fits(set()):
        hi = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(set(free[:mid])):
            hi = mid
        else:
            lo = mid + 1
    best_k = hi
    allowed = set(free[:best_k])

    def decide(allowed: set):
        saved = cut(allowed)
        decision = {n: CheckpointPolicy.MUST_SAVE for n in must_save}
        for node in free:
            recompute = node in allowed and node not in saved
            decision[node] = CheckpointPolicy.MUST_RECOMPUTE if recompute else CheckpointPolicy.MUST_SAVE
        return decision, bytes_of(allowed, saved)

    # the cut models saved views as separate bytes and ignores some of the
    # partitioner's view handling: check the exact figure, allow a few more
    # nodes to be recomputed if it is over the budget
    (decision, estimated), exact, tries = decide(allowed), None, 0
    while True:
        exact = predict_saved_bytes(gm, decision, activations_only=True)
        if exact <= limit or best_k >= len(free) or tries == _MAX_EXACT_TRIES:
            break
        best_k, tries = best_k + 1, tries + 1
        allowed = set(free[:best_k])
        decision, estimated = decide(allowed)
    if exact <= limit:  # spend the rest of the budget on saving expensive ops
        decision, estimated, exact = _spend_slack(allowed, decide,
                                                  lambda d: predict_saved_bytes(gm, d, activations_only=True), limit,
                                                  (decision, estimated, exact), order)
    if exact > limit:
        log.warning("activation_checkpointing: memory_budget of %d bytes not reachable; saving %d bytes",
                    limit, exact)
    recompute = sum(p == CheckpointPolicy.MUST_RECOMPUTE for p in decision.values())
    return decision, {"budget_bytes": limit, "none_bytes": none_bytes, "estimated_bytes": estimated,
                      "predicted_bytes": exact, "fits": exact <= limit, "recompute": recompute}


def _spend_slack(allowed: set, decide, exact_bytes, limit: int, current: tuple, order: dict) -> tuple:
    """Budget left over by the cut goes to the expensive ops: a matmul or attention
    allowed to be recomputed is saved instead when the exact saved bytes still fit,
    best value first (FLOPs no longer recomputed per byte the cut says it adds),
    so the backward recomputes as few FLOPs as the budget permits. The cut's model
    of a change is only a guide (the partitioner saves views and aliases its own
    way), so each step is checked exactly (a partition of the graph each), at most
    ``_MAX_SLACK_TRIES`` times, over the ``_MAX_SLACK_CANDIDATES`` most expensive
    ops (bounded compile time); returns ``(decision, estimated, exact)``."""
    expensive = sorted((n for n in allowed if is_expensive(n)), key=lambda n: (-recompute_flops(n), order[n]))
    ranked, accepted = [], False
    for node in expensive[:_MAX_SLACK_CANDIDATES]:
        decision, estimated = decide(allowed - {node})
        added = estimated - current[1]
        ranked.append((-recompute_flops(node) / max(added, 1), order[node], node, decision, estimated))
    tries = 0
    for _, _, node, decision, estimated in sorted(ranked, key=lambda item: item[:2]):
        if tries == _MAX_SLACK_TRIES:
            break
        if accepted:  # the ranking's cut assumed the set before the last acceptance
            decision, estimated = decide(allowed - {node})
        if estimated - current[1] > limit - current[2]:  # the model already says it will not fit
            continue
        tries += 1
        exact = exact_bytes(decision)
        log.debug("memory_budget: saving %s instead: %d bytes (limit %d)", node.name, exact, limit)
        if exact <= limit:
            allowed, current, accepted = allowed - {node}, (decision, estimated, exact), True
    return current


_MAX_EXACT_TRIES = 8
_MAX_SLACK_CANDIDATES = 16
_MAX_SLACK_TRIES = 4

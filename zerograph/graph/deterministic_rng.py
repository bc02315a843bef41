"""Undo AOTAutograd's RNG functionalization for ops that draw no random numbers.

When a recomputed node's op is tagged ``nondeterministic_seeded``, the
partitioner wraps it so the backward replays the forward's RNG state::

    # forward                                      # backward
    r = run_and_save_rng_state(op, q, k, v, 0.0)   o = run_with_rng_state(state, op, q, k, v, 0.0)
    state, o = r[0], r[1]      # state: saved

The fused attention ops carry that tag because of their ``dropout_p`` argument;
with ``dropout_p=0`` they are deterministic, and the wrapper only costs a saved
RNG state per call (5 KB on CPU) and, with parameters held as DTensors, misplaces
the saved values (it counts symbolic ints but not opaque objects such as the
DeviceMesh). :func:`unwrap_deterministic_rng` turns both sides back into plain
``op(q, k, v, 0.0)`` calls and drops the states, when every wrapped op in the
pair of graphs is deterministic (zerograph's policies never recompute a real
random op; a user's pass that does keeps the wrappers).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch.fx as fx

_RUN_AND_SAVE = "run_and_save_rng_state"
_RUN_WITH = "run_with_rng_state"


def dropout_p(target, args, kwargs) -> Optional[float]:
    """The ``dropout_p`` argument of a call to ``target``; ``None`` if it has none
    or it is symbolic."""
    schema = getattr(target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else []
    if "dropout_p" not in names:
        return None
    index = names.index("dropout_p")
    value = args[index] if index < len(args) else kwargs.get("dropout_p", schema.arguments[index].default_value)
    return float(value) if isinstance(value, (int, float)) else None


def _wrapped(gm: fx.GraphModule, name: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "__name__", getattr(n.target, "_name", "")) == name]


def unwrap_deterministic_rng(fw: fx.GraphModule, bw: fx.GraphModule) -> int:
    """Replace the RNG wrappers around deterministic ops by plain calls (in place);
    returns how many forward/backward pairs were unwrapped (0: graphs unchanged)."""
    saves, replays = _wrapped(fw, _RUN_AND_SAVE), _wrapped(bw, _RUN_WITH)
    if not saves or len(saves) != len(replays):
        return 0
    if any(dropout_p(n.args[0], n.args[1:], n.kwargs) != 0.0 for n in saves) or \
            any(dropout_p(n.args[1], n.args[2:], n.kwargs) != 0.0 for n in replays):
        return 0
    output = next(n for n in reversed(fw.graph.nodes) if n.op == "output")
    states = set()
    for node in saves:
        with fw.graph.inserting_before(node):
            plain = fw.graph.call_function(node.args[0], tuple(node.args[1:]), dict(node.kwargs))
        for user in list(node.users):
            assert user.target is operator.getitem, user
            if user.args[1] == 1:
                plain.meta = dict(user.meta)
                user.replace_all_uses_with(plain)
                fw.graph.erase_node(user)
            else:
                states.add(user)
    outputs = output.args[0]
    output.args = (tuple(o for o in outputs if o not in states),)
    for state in states:
        fw.graph.erase_node(state)
    for node in saves:
        fw.graph.erase_node(node)
    for node in replays:
        placeholder = node.args[0]
        with bw.graph.inserting_before(node):
            plain = bw.graph.call_function(node.args[1], tuple(node.args[2:]), dict(node.kwargs))
        plain.meta = dict(node.meta)
        node.replace_all_uses_with(plain)
        bw.graph.erase_node(node)
        if not placeholder.users:
            bw.graph.erase_node(placeholder)
    fw.recompile()
    bw.recompile()
    return len(saves)

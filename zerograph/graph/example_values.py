"""Recompute a Dynamo graph's recorded example values after a rewrite.

Dynamo records ``meta["example_value"]`` (a fake tensor) on every node. A
pass that changes shapes (tensor parallelism's per-rank weights, sequence
parallelism's local sequence) leaves them stale; :func:`refresh_example_values`
runs the graph once on the placeholders' fake values and records each
node's new value. Later passes (shape propagation, fusion matchers, the
planner) read these.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.fx as fx

from zerograph._torch_private import fake_mode_of


def refresh_example_values(gm: fx.GraphModule,
                           on_error: Optional[Callable[[fx.Node, Exception], Exception]] = None) -> None:
    """Re-run ``gm`` on its placeholders' fake example values, recording each
    node's output. ``on_error(node, exc)`` returns the exception to raise when
    a node fails (a message naming the user's module); otherwise it propagates.
    Nothing happens when the placeholders carry no fake values."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("example_value") for n in placeholders]
    mode = fake_mode_of(values)
    if mode is None:
        return

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            try:
                out = super().run_node(node)
            except Exception as exc:
                if on_error is None:
                    raise
                raise on_error(node, exc) from exc
            if node.op != "placeholder":
                node.meta["example_value"] = out
            return out

    with mode:
        Recorder(gm).run(*values)

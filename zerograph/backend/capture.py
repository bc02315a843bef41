"""Capture a model's Dynamo graphs on an example batch, without zerograph's
passes: what the planner's graph rules read before the model is sharded
(tensor parallelism must know which layers it splits before it stores them).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn


def _call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def capture_graphs(model: nn.Module, batch) -> list[tuple[fx.GraphModule, dict[str, str]]]:
    """The Dynamo graphs of ``model(batch)`` (a dict is passed as keywords, a
    tuple or list as positional arguments), each with ``{placeholder name:
    parameter FQN}`` for the placeholders that are the model's parameters.

    The forward runs once, under ``torch.no_grad()``, with Dynamo's graphs
    run as they are; a code object of its own keeps Dynamo's caches of the
    model's later compilation apart."""
    names: dict[int, str] = {}
    for name, param in model.named_parameters():
        names.setdefault(id(param), name)
    graphs: list[tuple[fx.GraphModule, dict[str, str]]] = []

    def record(gm: fx.GraphModule, example_inputs):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        params = {ph.name: names[id(t)] for ph, t in zip(placeholders, example_inputs)
                  if isinstance(t, torch.Tensor) and id(t) in names}
        graphs.append((gm, params))
        return gm.forward

    def run_model(batch):
        return _call(model, batch)

    run_model.__code__ = run_model.__code__.replace()
    with torch.no_grad():
        torch.compile(run_model, backend=record)(batch)
    return graphs

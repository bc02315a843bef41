"""The ``lower`` step: a partitioned graph becomes an executable.

``zerograph.compiler: "eager"`` runs the GraphModule's generated code
(boxed, so inputs can be freed early); ``"inductor"`` compiles a copy of the
graph whose ``aten._to_copy`` nodes are decomposed
(:mod:`zerograph.graph.decompose_copies`); the graph ``zerograph.inspect``
and the planner show keeps them.
"""

from __future__ import annotations

import copy

import torch

from zerograph._torch_private import inductor_compile, make_boxed_func
from zerograph.graph.decompose_copies import decompose_copies


def lower(gm: torch.fx.GraphModule, example_inputs, compiler: str):
    if compiler != "inductor":
        return make_boxed_func(gm.forward)
    if any(n.op == "call_function" and n.target is torch.ops.aten._to_copy.default for n in gm.graph.nodes):
        lowered = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        lowered.meta.update(gm.meta)
        decompose_copies(lowered)
        gm = lowered
    return inductor_compile(gm, example_inputs)

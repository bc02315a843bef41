"""Compile a function with Dynamo + AOTAutograd and keep its forward/backward graphs."""

from __future__ import annotations

import torch

from zerograph._torch_private import aot_autograd, make_boxed_func


def compile_capturing(fn):
    """``(compiled_fn, graphs)``: ``graphs["forward"]``/``graphs["backward"]`` are
    filled with the AOTAutograd graphs when ``compiled_fn`` first runs (and its
    output's backward). Resets Dynamo first so the graphs are traced anew."""
    graphs: dict = {}

    def compiler(name):
        def compile_graph(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compile_graph

    torch.compiler.reset()
    backend = aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))
    return torch.compile(fn, backend=backend, fullgraph=True), graphs


def capture_graphs(fn, *args):
    """Run ``compile_capturing(fn)`` on ``args``: ``(output, graphs)``."""
    compiled, graphs = compile_capturing(fn)
    return compiled(*args), graphs

"""Dropout that follows the stage module's ``training`` flag.

``torch.export`` bakes the model's mode at trace time into the graph: a
dropout traced in training mode is ``aten.dropout(x, p, True)`` whatever
``stage.training`` says later. :func:`follow_training_mode` rewrites such
nodes (and ``scaled_dot_product_attention`` with ``dropout_p > 0``) of a
stage graph into calls of :func:`stage_dropout` / :func:`stage_sdpa` that
also take the stage's mode module (``get_attr`` of a parameter-free
submodule, :data:`MODE_ATTR`) and read its ``training`` flag when they run.
``model.eval()`` reaches that submodule like any other, so it turns dropout
off for :meth:`PipelineModel.eval_step` (and for ``train_step``, as in eager
PyTorch); each stage has its own flag, nothing is shared between models.
Dynamo guards on the flag: training-mode graphs are the ones a traced-as-is
stage compiles to, and an eval-mode call compiles its own variant once.
Graphs without dropout (``p == 0``) are left alone::

    dropout = aten.dropout(x, 0.1, True)
      ->  zg_mode = self.zg_mode;  dropout = stage_dropout(x, 0.1, zg_mode)
"""

from __future__ import annotations

import torch
from torch import fx, nn

MODE_ATTR = "zg_mode"


class StageMode(nn.Module):
    """No parameters, no forward: its ``training`` flag is the stage's."""


def stage_dropout(x, p, mode: nn.Module):
    return torch.ops.aten.dropout.default(x, p, mode.training)


def stage_sdpa(*args, mode: nn.Module, **kwargs):
    if not mode.training:
        if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, is_causal)
            args = (*args[:4], 0.0, *args[5:])
        else:
            kwargs = {**kwargs, "dropout_p": 0.0}
    return torch.ops.aten.scaled_dot_product_attention.default(*args, **kwargs)


def _sdpa_dropout(node: fx.Node) -> float:
    return node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)


def _is_training_dropout(node: fx.Node) -> bool:
    return (node.target is torch.ops.aten.dropout.default and len(node.args) == 3 and node.args[2] is True
            and isinstance(node.args[1], (int, float)) and node.args[1] > 0)


def follow_training_mode(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s training-mode dropouts in place; returns how many."""
    targets = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if _is_training_dropout(node):
            targets.append(node)
        elif node.target is torch.ops.aten.scaled_dot_product_attention.default:
            p = _sdpa_dropout(node)
            if isinstance(p, (int, float)) and p > 0:
                targets.append(node)
    if not targets:
        return 0
    gm.add_submodule(MODE_ATTR, StageMode())
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        mode = gm.graph.get_attr(MODE_ATTR)
    for node in targets:
        if node.target is torch.ops.aten.dropout.default:
            node.target, node.args = stage_dropout, (*node.args[:2], mode)
        else:
            node.target, node.kwargs = stage_sdpa, {**node.kwargs, "mode": mode}
    gm.recompile()
    return len(targets)

"""The split pass: one traced forward graph -> ``p`` stage graphs.

The model's forward, with the loss, is traced by ``torch.export`` (non-strict,
so Hugging Face models trace) on one micro-batch. Every op node carries its
module path (``nn_module_stack``, read with
:func:`zerograph.graph.tags.module_path_from_meta`). The *blocks* are the
modules whose path ends in an index (``transformer.h.3``, ``model.layers.0``).
Stage boundaries may only fall where a block starts, or right after the
last block; each stage is a contiguous run of the graph's nodes.

Where to cut: at user-given module names (``pipeline.split_points``), or
where the cost model balances the stages. A node's cost is its share of the
model's FLOPs (``2·M·N·K`` for matrix products and linear layers, ``4·B·H·L·S·E``
for attention, the output size otherwise) plus its share of parameter bytes
(each parameter counted at its first use); the cuts minimise the largest
stage cost (dynamic programming over the candidate cuts).

Each stage becomes a ``GraphModule`` ``forward(*batch_inputs, *incoming) ->
tuple`` whose parameters are the original ``nn.Parameter`` objects, under their
original names. Values computed on stage ``< b`` and read on stage ``> b``
cross boundary ``b``: a stage passes on what later stages need (adjacent
sends only). A parameter read by two stages (GPT's embedding and LM head) is
the same object in both stage modules; :class:`PipelineSplit.tied` lists it,
and the runtime sums its gradient over those stages.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
import torch.fx as fx
from torch import nn

from zerograph.graph.tags import module_path_from_meta

log = logging.getLogger(__name__)

WRAPPER_ATTR = "model"  # the traced wrapper holds the user's model under this name


class SplitError(ValueError):
    """The model cannot be split as asked."""


@dataclasses.dataclass(frozen=True)
class BoundaryValue:
    """A value that crosses from one stage to the next."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    module_path: str

    @property
    def has_grad(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex


@dataclasses.dataclass
class StagePlan:
    index: int
    module: fx.GraphModule | None  # None once the runtime keeps only its own stage
    batch_inputs: tuple[int, ...]  # indices into the flat batch tensors this stage reads
    incoming: tuple[BoundaryValue, ...]
    outgoing: tuple[BoundaryValue, ...]  # for the last stage: empty (it returns the loss)
    first_module: str
    cost: float
    num_params: int = 0  # distinct parameter elements the stage reads


@dataclasses.dataclass
class PipelineSplit:
    stages: list[StagePlan]
    tied: dict[str, tuple[int, ...]]  # parameter name -> the stages that read it (>= 2)
    tied_names: dict[str, dict[int, str]]  # parameter name -> {stage: its attribute path there}

    def describe(self) -> str:
        lines = []
        for st in self.stages:
            params = st.num_params
            lines.append(
                f"stage {st.index}: from {st.first_module or '<inputs>'}, cost {st.cost:.3f}, "
                f"{params} parameters, receives {len(st.incoming)} value(s), sends {len(st.outgoing)}"
            )
        for name, stages in self.tied.items():
            lines.append(f"tied parameter {name}: stages {', '.join(map(str, stages))} (gradients summed)")
        return "\n".join(lines)


def user_name(path: str) -> str:
    """A path inside the traced wrapper -> the user's model's name."""
    if path == WRAPPER_ATTR:
        return ""
    return path[len(WRAPPER_ATTR) + 1:] if path.startswith(WRAPPER_ATTR + ".") else path


_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(path: str | None) -> str | None:
    """``transformer.h.3.attn`` -> ``transformer.h.3``; None outside blocks."""
    if not path:
        return None
    match = _BLOCK.match(path)
    return match.group(1) if match else None


def _shape(node: fx.Node):
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _flops(node: fx.Node) -> float:
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor):
        return 0.0
    name = getattr(node.target, "__name__", str(node.target))
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if name.startswith(("linear", "mm", "addmm", "bmm", "matmul", "baddbmm")) and args:
        k_src = args[0] if not name.startswith(("addmm", "baddbmm")) else args[1] if len(args) > 1 else args[0]
        k = _shape(k_src)
        return 2.0 * out.numel() * (k[-1] if k else 1)
    if "scaled_dot_product" in name and len(args) >= 2:
        q, k = _shape(args[0]), _shape(args[1])
        if q and k:
            return 4.0 * (out.numel() / q[-1]) * k[-2] * q[-1]
    return float(out.numel())


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def node_costs(gm: fx.GraphModule, nodes: list[fx.Node]) -> list[float]:
    """FLOP share + parameter-byte share of each node (sums to 2 when both exist)."""
    flops = [_flops(n) for n in nodes]
    pbytes = [0.0] * len(nodes)
    seen: set[int] = set()
    for i, n in enumerate(nodes):
        for a in n.all_input_nodes:
            if a.op != "get_attr":
                continue
            val = _get_attr(gm, a.target)
            if isinstance(val, nn.Parameter) and id(val) not in seen:
                seen.add(id(val))
                pbytes[i] += val.numel() * val.element_size()
    tf, tb = sum(flops) or 1.0, sum(pbytes) or 1.0
    return [f / tf + b / tb for f, b in zip(flops, pbytes)]


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def candidate_cuts(nodes: list[fx.Node]) -> dict[int, str]:
    """Node index -> the module a stage starting there starts with."""
    cuts: dict[int, str] = {}
    prev_block, last_block_end = None, None
    for i, n in enumerate(nodes):
        block = block_of(user_name(module_path_from_meta(n) or ""))
        if block is not None and block != prev_block:
            cuts.setdefault(i, block)
            prev_block = block
        if block is not None:
            last_block_end = i + 1
    if last_block_end is not None and last_block_end < len(nodes):
        cuts.setdefault(last_block_end, user_name(module_path_from_meta(nodes[last_block_end]) or "") or "<after blocks>")
    cuts.pop(0, None)
    return cuts


def balanced_cuts(costs: list[float], candidates: list[int], stages: int) -> list[int]:
    """``stages - 1`` cut positions from ``candidates`` minimising the largest stage cost."""
    bounds = [0] + sorted(candidates) + [len(costs)]
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    k = len(bounds)
    inf = float("inf")
    # best[j][s]: the least max-cost splitting nodes[0:bounds[j]] into s stages
    best = [[inf] * (stages + 1) for _ in range(k)]
    choice = [[-1] * (stages + 1) for _ in range(k)]
    best[0][0] = 0.0
    for j in range(1, k):
        for s in range(1, stages + 1):
            for i in range(j):
                if best[i][s - 1] == inf:
                    continue
                value = max(best[i][s - 1], prefix[bounds[j]] - prefix[bounds[i]])
                if value < best[j][s]:
                    best[j][s], choice[j][s] = value, i
    if best[k - 1][stages] == inf:
        raise SplitError(f"cannot make {stages} stages: the model has only {k - 1} block-aligned pieces")
    cuts, j = [], k - 1
    for s in range(stages, 0, -1):
        i = choice[j][s]
        if s > 1:
            cuts.append(bounds[i])
        j = i
    return sorted(cuts)


def _cuts_at(nodes: list[fx.Node], names: tuple[str, ...], stages: int, candidates: dict[int, str]) -> list[int]:
    if len(names) != stages - 1:
        raise SplitError(
            f"pipeline.split_points has {len(names)} module name(s) for {stages} stages; give exactly "
            f"{stages - 1} (the modules that start stages 1..{stages - 1})"
        )
    cuts = []
    for name in names:
        found = next(
            (i for i, n in enumerate(nodes)
             if (p := user_name(module_path_from_meta(n) or "")) == name or p.startswith(name + ".")),
            None,
        )
        if found is None or found == 0:
            some = ", ".join(list(dict.fromkeys(candidates.values()))[:8])
            raise SplitError(f"pipeline.split_points: no stage can start at module {name!r}; block boundaries are: {some}")
        cuts.append(found)
    if cuts != sorted(set(cuts)):
        raise SplitError(f"pipeline.split_points must name modules in forward order, each once; got {list(names)}")
    return cuts


def split_graph(gm: fx.GraphModule, stages: int, split_points: tuple[str, ...] = ()) -> PipelineSplit:
    """Split an exported, unlifted forward graph (``forward(*flat_batch) -> (loss,)``) into stages."""
    nodes = _compute_nodes(gm)
    candidates = candidate_cuts(nodes)
    costs = node_costs(gm, nodes)
    if split_points:
        cuts = _cuts_at(nodes, split_points, stages, candidates)
    else:
        cuts = balanced_cuts(costs, list(candidates), stages)
    stage_of: dict[fx.Node, int] = {}
    for i, n in enumerate(nodes):
        stage_of[n] = sum(c <= i for c in cuts)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    # boundary b: values made on stage <= b and read on stage > b (or by the output)
    crossing: list[list[fx.Node]] = [[] for _ in range(stages - 1)]
    for n in nodes:
        readers = [stage_of.get(u, stages - 1) for u in n.users]
        last = max(readers, default=stage_of[n])
        for b in range(stage_of[n], last):
            crossing[b].append(n)
    for b, values in enumerate(crossing):
        for v in values:
            if not isinstance(v.meta.get("val"), torch.Tensor):
                raise SplitError(
                    f"stage boundary {b} would carry {v.name} (from {user_name(module_path_from_meta(v) or '')}), "
                    "which is not a tensor; choose other pipeline.split_points"
                )
    bvals = [tuple(_boundary(v) for v in values) for values in crossing]
    plans = []
    cut_bounds = [0] + cuts + [len(nodes)]
    for s in range(stages):
        incoming = crossing[s - 1] if s > 0 else []
        outgoing = crossing[s] if s < stages - 1 else []
        own = [n for n in nodes if stage_of[n] == s]
        module, used = _stage_module(gm, s, own, placeholders, incoming, outgoing, output if s == stages - 1 else None)
        first = candidates.get(cut_bounds[s], "") if s > 0 else ""
        plans.append(StagePlan(
            index=s, module=module, batch_inputs=used,
            incoming=bvals[s - 1] if s > 0 else (), outgoing=bvals[s] if s < stages - 1 else (),
            first_module=first, cost=sum(costs[cut_bounds[s]:cut_bounds[s + 1]]),
            num_params=sum(p.numel() for p in dict.fromkeys(module.parameters())),
        ))
    tied, tied_names = _tied_parameters(plans)
    return PipelineSplit(plans, tied, tied_names)


def _boundary(n: fx.Node) -> BoundaryValue:
    val = n.meta["val"]
    return BoundaryValue(n.name, tuple(int(d) for d in val.shape), val.dtype, user_name(module_path_from_meta(n) or ""))


def _stage_module(gm, s, own, placeholders, incoming, outgoing, output) -> tuple[fx.GraphModule, tuple[int, ...]]:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    reads = {a for n in own for a in n.all_input_nodes}
    if output is not None:
        reads |= set(output.all_input_nodes)
    used = tuple(i for i, ph in enumerate(placeholders) if ph in reads)
    for i in used:
        env[placeholders[i]] = graph.placeholder(placeholders[i].name)
        env[placeholders[i]].meta = dict(placeholders[i].meta)
    for v in incoming:
        env[v] = graph.placeholder(v.name)
        env[v].meta = dict(v.meta)

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise SplitError(f"stage {s}: {a.name} is neither computed here nor received")
            env[a] = graph.get_attr(a.target)
            env[a].meta = dict(a.meta)
        return env[a]

    for n in own:
        env[n] = graph.node_copy(n, lookup)
    if output is not None:
        graph.output(fx.map_arg(output.args[0], lookup))
    else:
        graph.output(tuple(lookup(v) for v in outgoing))
    module = fx.GraphModule(gm, graph, class_name=f"PipelineStage{s}")
    return module, used


def _tied_parameters(plans: list[StagePlan]):
    by_id: dict[int, dict[int, str]] = {}
    first_name: dict[int, str] = {}
    for st in plans:
        for node in st.module.graph.nodes:
            if node.op != "get_attr":
                continue
            val = _get_attr(st.module, node.target)
            if isinstance(val, nn.Parameter):
                by_id.setdefault(id(val), {}).setdefault(st.index, node.target)
                first_name.setdefault(id(val), user_name(node.target))
    tied, names = {}, {}
    for pid, where in by_id.items():
        if len(where) > 1:
            tied[first_name[pid]] = tuple(sorted(where))
            names[first_name[pid]] = dict(where)
    return tied, names

"""Liveness analysis: live bytes per node of the final graphs, by kind.

An analysis (it never mutates a graph). It models the storages the
generated code allocates and when it frees them, with the rules of FX's
code generation:

* a view (an ATen op whose schema says ``is_view``, ``_unsafe_view``, or a
  functional collective's ``wait_tensor``) aliases its input's storage; every other op
  that returns a tensor allocates a new storage;
* a storage is freed right after the last node that uses any of its aliases;
  a value used by the graph's ``output`` lives to the end of the graph; a
  node nobody uses is freed right after it runs; a placeholder nobody uses
  lives to the end (the generated code keeps the argument bound);
* the forward's saved values (the backward's inputs) stay alive from their
  creation in the forward to their last use in the backward.

Each storage gets one kind:

``gathered``
    a gathered (full) parameter: the output of a data-parallel all-gather
    (the wait aliases it; a tensor-parallel one gathers activations), the
    per-parameter copy-outs of a bucket (``comm_prep``
    nodes computed only from gathered values), casts of gathered values, and
    in the backward a saved input whose tag names a parameter (a gathered
    parameter kept from forward to backward).
``activation``
    a forward value saved for the backward that is not a parameter or shard
    (its storage was created by the forward graph).
``gradient``
    a value the backward returns (the reduced gradient shards).
``other``
    everything else the graphs allocate (temporaries, the loss).
``input``
    storages from outside the step (parameter shards, the batch,
    the incoming gradient): not counted.

Each storage also has a location. ``host``: the output of a node tagged
``location="host"`` (:class:`~zerograph.graph.tags.NodeTag`) and its views:
offload_param's gradient shards copied back to host memory after their
reduction, offload_activations' saved host copies (and, in the backward, the
inputs that receive them). ``device``: everything else. The live bytes by
kind (``live``, the peaks, the memory budget) count device storages only;
host storages are counted apart (``NodeLive.host``, ``MemoryPlan.peak_host``).
An offloaded parameter shard is a graph input (in host memory, counted by
the model states as host bytes); its copy to the compute device
(``host_copy``) is a device storage (``other``) from the copy to its last use
(the all-gather, or the computation at world size 1).

The timeline of a compiled region is its forward graph followed by its
backward graph; entry ``i`` holds the bytes live right after node ``i`` ran
(before the values it used for the last time are freed). Example, stage 3,
``TinyMLP`` of docs/passes.md (fp32, world size 2, unbucketed)::

    forward  all_gather_into_tensor_default   gathered=96   (fc1.weight, 6x4)
    forward  all_gather_into_tensor_default_1 gathered=120  (+ fc1.bias)
    ...
    backward all_gather_into_tensor_default   gathered=96   (fc2.weight re-gathered, padded 4x6)

:func:`plan_region` analyses one region's forward and backward together
(:class:`RegionPlan`); :func:`liveness` is the pass (one graph at a time).

Composing a model's regions along a step (graph breaks, the memory limit)
is :mod:`zerograph.planner.step_plan`.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Iterable

import torch
import torch.fx as fx

from zerograph._torch_private import c10d_functional, is_inplace_op, is_view_op, size_hint
from zerograph.graph.tags import COLLECTIVE_ROLES, get_tag
from zerograph.runtime.stats import KINDS as COMM_KINDS
from zerograph.runtime.stats import collective_buffer_bytes

KINDS = ("gathered", "activation", "gradient", "other")
_WAIT = c10d_functional.wait_tensor.default
_CASTS = {
    torch.ops.aten._to_copy.default,
    torch.ops.aten.clone.default,
    torch.ops.prims.convert_element_type.default,
}


def _tensor_val(node: fx.Node):
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes of the storage behind ``t`` (real or fake tensor)."""
    try:
        return size_hint(t.untyped_storage().nbytes())
    except Exception:  # tensors without storage
        try:
            return size_hint(t.numel()) * t.element_size()
        except Exception:
            return 0


# ops that return their input's storage although their schema does not say so
_SHARES_STORAGE = {_WAIT, torch.ops.aten._unsafe_view.default}


def is_alias(node: fx.Node) -> bool:
    """``node`` returns (a view of) its first input's storage: a view, or an
    in-place op (see zerograph/passes/reuse_comm_buffers.py)."""
    target = node.target
    if target in _SHARES_STORAGE:
        return True
    return is_view_op(target) or is_inplace_op(target)


def alias_source(node: fx.Node) -> fx.Node | None:
    """The node whose storage ``node`` shares, or ``None`` when ``node``
    allocates (or is not a call). A view shares its first input's storage; an
    element of a view op's tuple output (``getitem`` of ``split``/``unbind``)
    shares the storage of that op's input. The one aliasing rule of the
    planner and of the offload pass."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem:
        src = node.args[0]
        if isinstance(src, fx.Node) and is_alias(src) and src.all_input_nodes:
            return src.all_input_nodes[0]
        return None
    if is_alias(node) and node.all_input_nodes:
        return node.all_input_nodes[0]
    return None


@dataclasses.dataclass(frozen=True)
class Storage:
    """One allocation of a graph: the node that made it and its aliases."""

    root: str
    kind: str
    nbytes: int
    birth: int  # index in the graph of the node that made it (0 for inputs)
    death: int  # index of its last use (freed right after)
    members: tuple[str, ...]
    location: str = "device"  # "device" or "host" (module docstring)


def storages(
    gm: fx.GraphModule,
    phase: str,
    *,
    saved: Iterable[str] = (),
    input_kinds: dict[str, str] | None = None,
    input_roots: dict[str, str] | None = None,
    input_nbytes: dict[str, int] | None = None,
    input_locations: dict[str, str] | None = None,
) -> tuple[list[Storage], dict[str, str], dict[str, str]]:
    """The storages of one graph and each node's storage kind.

    ``saved``: names of forward outputs the backward receives (they are
    ``activation`` unless gathered). ``input_kinds``: kind per placeholder
    name (backward graphs; by default from tags: a placeholder whose tag names
    a parameter is ``gathered``, tangents and primals are ``input``, the rest
    ``activation``). ``input_roots``: a storage key per placeholder name;
    placeholders with the same key share one storage (two saved views of one
    forward value); ``input_nbytes``: their storage's size (a saved view's
    graph input shows only the view); ``input_locations``: their location
    (``"host"`` for a saved host copy; default ``"device"``). Returns the
    storages, ``{node name: kind}`` and ``{node name: root name}``.
    """
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    end = len(nodes) - 1
    saved = set(saved)
    root: dict[fx.Node, fx.Node] = {}
    gathered_roots: set[fx.Node] = set()
    output = nodes[-1]
    returned = {a for a in output.all_input_nodes} if output.op == "output" else set()
    same_input: dict[str, fx.Node] = {}
    born_with: dict[fx.Node, fx.Node] = {}  # getitem -> multi-output node that allocated it
    unclaimed: list[tuple[fx.Node, int, torch.Tensor]] = []  # outputs of multi-output nodes no getitem reads
    for node in nodes:
        if node.op == "placeholder":
            if _tensor_val(node) is not None:
                key = (input_roots or {}).get(node.name, node.name)
                root[node] = same_input.setdefault(key, node)
                kind = _placeholder_kind(node, phase, input_kinds)
                if kind == "gathered":
                    gathered_roots.add(node)
            continue
        if node.op != "call_function":
            continue
        if node.target is not operator.getitem and _tensor_val(node) is None:
            _tuple_elements(node, unclaimed)
            continue
        source = alias_source(node)
        if source is not None and source in root:
            root[node] = root[source]
            continue
        if node.target is operator.getitem:
            src = node.args[0]
            if _tensor_val(node) is not None:
                root[node] = node
                if isinstance(src, fx.Node):  # allocated by src; its tuple holds it until the last getitem
                    born_with[node] = src
            continue
        inputs = [a for a in node.all_input_nodes if a in root]
        root[node] = node
        tag = get_tag(node)
        role = tag.role if tag is not None else "compute"
        if role == "all_gather" and tag.mesh_dim != "tp":  # tp all-gathers (Megatron-SP) gather activations
            gathered_roots.add(node)
        elif inputs and all(root[a] in gathered_roots for a in inputs) and (
            role == "comm_prep" or node.target in _CASTS
        ):
            gathered_roots.add(node)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node, r in root.items():
        groups.setdefault(r, []).append(node)
    out: list[Storage] = []
    kinds: dict[str, str] = {}
    roots: dict[str, str] = {}
    for r, members in groups.items():
        if r.op == "placeholder":
            kind = _placeholder_kind(r, phase, input_kinds)
            birth = 0
        elif r in gathered_roots:
            kind, birth = "gathered", index[r]
        elif phase == "forward" and any(m.name in saved for m in members):
            kind, birth = "activation", index[r]
        elif phase == "backward" and any(m in returned for m in members):
            kind, birth = "gradient", index[r]
        else:
            kind, birth = "other", index[r]
        last = max((index[u] if u.op != "output" else end for m in members for u in m.users), default=None)
        if r in born_with:
            src = born_with[r]
            birth = min(birth, index[src])
            last = max(last if last is not None else index[r], max(index[u] for u in src.users))
        if last is None:
            last = end if r.op == "placeholder" else index[r]
        for m in members:
            kinds[m.name] = kind
            roots[m.name] = r.name
        nbytes = (input_nbytes or {}).get(r.name) if r.op == "placeholder" else None
        if nbytes is None:
            nbytes = storage_bytes(_tensor_val(r))
        out.append(Storage(r.name, kind, nbytes, birth, max(last, birth),
                           tuple(m.name for m in members), _location(r, input_locations)))
    for src, k, val in unclaimed:
        last = max((index[u] for u in src.users), default=index[src])
        out.append(Storage(f"{src.name}[{k}]", "other", storage_bytes(val), index[src], last, ()))
    return out, kinds, roots


def _tuple_elements(node: fx.Node, unclaimed: list) -> None:
    """Record the tensor outputs of a multi-output node that no getitem reads
    (they live in the node's tuple until its last use)."""
    val = node.meta.get("val")
    if not isinstance(val, (tuple, list)) or is_alias(node):
        return
    read = {u.args[1] for u in node.users if u.target is operator.getitem}
    for k, v in enumerate(val):
        if isinstance(v, torch.Tensor) and k not in read:
            unclaimed.append((node, k, v))


def _location(root: fx.Node, input_locations: dict[str, str] | None) -> str:
    """Where the storage made by ``root`` lives: ``"host"`` or ``"device"``
    (a graph input: as ``input_locations`` says, else as its tag says)."""
    if root.op == "placeholder" and input_locations and root.name in input_locations:
        return input_locations[root.name]
    tag = get_tag(root)
    return tag.location if tag is not None else "device"


def _placeholder_kind(node: fx.Node, phase: str, input_kinds: dict[str, str] | None) -> str:
    if input_kinds is not None:
        return input_kinds.get(node.name, "input")
    if phase != "backward" or node.name.startswith(("tangents", "primals")):
        return "input"
    tag = get_tag(node)
    return "gathered" if tag is not None and tag.param is not None else "activation"


@dataclasses.dataclass(frozen=True)
class NodeLive:
    """Bytes live right after one node ran, by kind: on the compute device
    (``live``) and in host memory (``host``)."""

    phase: str
    index: int
    name: str
    role: str
    live: dict[str, int]
    host: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def total(self) -> int:
        """Device bytes."""
        return sum(self.live.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def timeline(gm: fx.GraphModule, phase: str, stores: list[Storage]) -> list[NodeLive]:
    """Live bytes by kind after every node but placeholders and the output
    (a sweep over storage births and deaths)."""
    nodes = list(gm.graph.nodes)
    delta = {where: [dict.fromkeys(KINDS, 0) for _ in range(len(nodes) + 1)] for where in ("device", "host")}
    for s in stores:
        if s.kind in KINDS:
            delta[s.location][s.birth][s.kind] += s.nbytes
            delta[s.location][s.death + 1][s.kind] -= s.nbytes
    live = dict.fromkeys(KINDS, 0)
    host = dict.fromkeys(KINDS, 0)
    out = []
    for i, node in enumerate(nodes):
        for k in KINDS:
            live[k] += delta["device"][i][k]
            host[k] += delta["host"][i][k]
        if node.op in ("placeholder", "output"):
            continue
        tag = get_tag(node)
        out.append(NodeLive(phase, i, node.name, tag.role if tag is not None else "compute", dict(live), dict(host)))
    return out


def comm_by_kind(gm: fx.GraphModule) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes, elements) of every collective's full buffer in ``gm``, by kind."""
    nbytes = dict.fromkeys(COMM_KINDS, 0)
    elems = dict.fromkeys(COMM_KINDS, 0)
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.role not in COLLECTIVE_ROLES:
            continue
        b, n = comm_by_kind_single(node, tag.role)
        kind = tag.role if tag.mesh_dim == "dp" else f"{tag.mesh_dim}_{tag.role}"  # "tp_all_reduce"
        elems[kind] = elems.get(kind, 0) + n
        nbytes[kind] = nbytes.get(kind, 0) + b
    return nbytes, elems


@dataclasses.dataclass
class RegionPlan:
    """One compiled region: forward then backward timeline, peaks, traffic."""

    index: int
    timeline: list[NodeLive]
    peak: dict[str, int]  # peak of each kind on its own
    peak_total: int
    comm_bytes: dict[str, int]  # one micro-batch (forward + backward)
    comm_elements: dict[str, int]
    storages: dict[str, list[Storage]]
    collectives: list[tuple[str, int, int, str, int]]  # (phase, start index, wait index, kind, bytes)
    # bytes by kind of the forward's storages that the backward receives (the
    # saved values that are not inputs): held from the end of the forward to
    # the start of the backward, while other regions run
    held: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    # in host memory (offload copies): the peak of each kind on its own, and of their sum
    host_peak: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    host_peak_total: int = 0


def _collectives(gm: fx.GraphModule, phase: str) -> list[tuple[str, int, int, str, int]]:
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.role not in COLLECTIVE_ROLES:
            continue
        wait = next((u for u in node.users if u.target is _WAIT), node)
        b, _ = comm_by_kind_single(node, tag.role)
        out.append((phase, index[node], index[wait], tag.role, b))
    return out


def comm_by_kind_single(node: fx.Node, role: str) -> tuple[int, int]:
    src = node.args[0] if isinstance(node.args[0], fx.Node) else None
    in_val = _tensor_val(src) if src is not None else None
    out_val = _tensor_val(node)
    in_n = size_hint(in_val.numel()) if in_val is not None else 0
    out_n = size_hint(out_val.numel()) if out_val is not None else 0
    size = in_val.element_size() if in_val is not None else 0
    n = collective_buffer_bytes(role, in_n, out_n)
    return n * size, n


def saved_inputs(forward: fx.GraphModule, backward: fx.GraphModule | None) -> dict[str, str]:
    """``{backward input name: forward node name}`` for the values the
    forward saves for the backward. AOTAutograd returns them last from the
    forward and passes them first, in the same order, to the backward (whose
    other inputs are the ``tangents_*``); names can differ, because the
    lowering replaced a saved marker node by its collective's output."""
    if backward is None:
        return {}
    inputs = _saved_placeholders(backward)
    tail = _saved_outputs(forward, len(inputs))
    if tail is None:
        return {}
    return {b.name: f.name for b, f in zip(inputs, tail) if isinstance(f, fx.Node)}


def _saved_placeholders(backward: fx.GraphModule) -> list[fx.Node]:
    return [n for n in backward.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]


def saved_count(backward: fx.GraphModule) -> int:
    """How many values the forward saves for ``backward``: its inputs that
    are not ``tangents_*`` (the forward returns them last). The runtime
    records this at partition time (``CompiledRegion.num_saved``), before the
    backward graph is compiled, so that :func:`held_by_forward` can tell what
    a region holds from its forward graph alone."""
    return len(_saved_placeholders(backward))


def _saved_outputs(forward: fx.GraphModule, num_saved: int) -> list | None:
    """The last ``num_saved`` outputs of ``forward`` (the saved values), or
    ``None`` when it returns fewer."""
    out_node = list(forward.graph.nodes)[-1]
    outs = list(out_node.args[0]) if out_node.op == "output" else []
    if num_saved > len(outs):
        return None
    return outs[len(outs) - num_saved:]


def _held(f_stores: list[Storage], saved: set[str]) -> dict[str, int]:
    """Device bytes by kind of the forward storages that hold a saved value."""
    held = dict.fromkeys(KINDS, 0)
    for st in f_stores:
        if st.kind in KINDS and st.location == "device" and saved.intersection(st.members):
            held[st.kind] += st.nbytes
    return held


def held_by_forward(forward: fx.GraphModule, num_saved: int | None) -> dict[str, int]:
    """:attr:`RegionPlan.held` from the forward graph alone: the device bytes
    by kind of the forward's storages behind its last ``num_saved`` outputs,
    the values AOTAutograd saves for the backward (:func:`saved_count`). The
    backward graph is not needed, so this is known as soon as the region's
    forward ran, before its backward is compiled. ``num_saved=None`` (not
    recorded): every output counts as saved, an upper bound."""
    out_node = list(forward.graph.nodes)[-1]
    outs = list(out_node.args[0]) if out_node.op == "output" else []
    tail = outs if num_saved is None else (_saved_outputs(forward, num_saved) or [])
    saved = {f.name for f in tail if isinstance(f, fx.Node)}
    f_stores, _, _ = storages(forward, "forward", saved=saved)
    return _held(f_stores, saved)


def plan_region(forward: fx.GraphModule, backward: fx.GraphModule | None, index: int = 0) -> RegionPlan:
    """Liveness of one region's step: forward, then backward, joined by the saved values."""
    pairs = saved_inputs(forward, backward)
    f_stores, f_kinds, f_roots = storages(forward, "forward", saved=set(pairs.values()))
    stores = {"forward": f_stores}
    tl = timeline(forward, "forward", f_stores)
    comm_b, comm_e = comm_by_kind(forward)
    colls = _collectives(forward, "forward")
    if backward is not None:
        input_kinds = {name: f_kinds.get(fwd, "input") for name, fwd in pairs.items()}
        input_roots = {name: f_roots.get(fwd, fwd) for name, fwd in pairs.items()}
        f_size = {st.root: st.nbytes for st in f_stores}
        input_nbytes = {name: f_size[root] for name, root in input_roots.items() if root in f_size}
        f_where = {st.root: st.location for st in f_stores}
        input_locations = {name: f_where[root] for name, root in input_roots.items() if root in f_where}
        b_stores, _, _ = storages(backward, "backward", input_kinds=input_kinds, input_roots=input_roots,
                                  input_nbytes=input_nbytes, input_locations=input_locations)
        stores["backward"] = b_stores
        tl += timeline(backward, "backward", b_stores)
        b_b, b_e = comm_by_kind(backward)
        comm_b = {k: comm_b.get(k, 0) + b_b.get(k, 0) for k in {**comm_b, **b_b}}  # tp kinds may be in one only
        comm_e = {k: comm_e.get(k, 0) + b_e.get(k, 0) for k in {**comm_e, **b_e}}
        colls += _collectives(backward, "backward")
    peak = {k: max((e.live[k] for e in tl), default=0) for k in KINDS}
    held = _held(f_stores, set(pairs.values()))
    host_peak = {k: max((e.host[k] for e in tl), default=0) for k in KINDS}
    return RegionPlan(index, tl, peak, max((e.total for e in tl), default=0), comm_b, comm_e, stores, colls, held,
                      host_peak, max((e.host_total for e in tl), default=0))

"""The measured side of the planner: an interpreter that runs compiled graphs
node by node and records the live bytes by kind (``zerograph.track_memory``),
to set against the liveness analysis' prediction (docs/planner.md)."""

from __future__ import annotations

import dataclasses
from collections import Counter

from zerograph.graph.tags import COLLECTIVE_ROLES, get_tag
from zerograph.planner.liveness import storages
from zerograph.runtime.offload import HOST
from zerograph.runtime.stats import KINDS, collective_buffer_bytes


def tracker_of(stats) -> "MemoryTracker":
    """The :class:`MemoryTracker` of a model's ``CommStats`` (made on first use)."""
    if stats.memory is None:
        stats.memory = MemoryTracker()
    return stats.memory


class MemoryTracker:
    """Measures, while compiled graphs run, the bytes of live storages by kind.

    Opt-in (``zerograph.track_memory: true``): every forward and backward
    graph then runs through :class:`TrackedGraph`, an ``fx.Interpreter`` that
    frees each value right after its last use, as FX's generated code does.
    After every node it sums the storages (by real ``data_ptr``, so aliases
    count once) of the values alive, by kind: ``gathered`` (what the liveness
    analysis classes as a gathered parameter), ``saved`` (forward values
    received by the backward), ``other``. Inputs from outside the step
    (shards, the batch) are not counted. It also counts the collectives the
    graphs really ran, by kind, from their real tensors.

    Device and host bytes are counted apart, as the plan counts them
    (``NodeLive.live`` / ``NodeLive.host``). A storage is on the host when
    its tensor is in host memory (:data:`zerograph.runtime.offload.HOST`)
    while the graph computes on another device (``device``); on a CPU-only
    run, where the two are the same memory, the graph's own location of the
    value decides (``location="host"`` tags: offload copies, and in a
    backward the forward's host outputs it receives).

    ``allocations``/``last_step_allocations``: ``(phase, node name, shape,
    storage bytes)`` of every storage the graphs made in the running / last
    step (the largest intermediate of a tiled region, docs/long_sequences.md).

    ``current``/``last_step``: samples of the running / last finished step,
    one ``(phase, node name, gathered bytes, total bytes)`` per node, device
    bytes only, each counting only the values of the graph that runs;
    ``current_host``/``last_step_host``: one ``(phase, node name, host bytes)``
    per node, the same samples' host bytes. This mode keeps every
    forward output alive until the step ends (so that the backward's inputs
    are recognised by address): real memory use is higher than without it;
    the recorded numbers follow the generated code's frees.

    Across graphs (a model with graph breaks has several regions): each run
    of a graph is a :class:`GraphRun` (``runs``/``last_runs``, in execution
    order). A backward run is paired with the latest unpaired forward run of
    its region, and its inputs take their kinds from that forward's outputs.
    The device outputs of a forward run that its backward receives (not
    inputs) are held from the end of the forward to the start of that
    backward: :attr:`last_step_held` adds them to the samples of the graphs
    that run in between, :attr:`last_step_composed` is the samples plus that.
    The peaks are those of the composed samples. Host bytes are per graph
    run, not composed (as the plan's ``peak_host``).
    """

    def __init__(self) -> None:
        self.current: list[tuple[str, str, int, int]] = []
        self.last_step: list[tuple[str, str, int, int]] = []
        self.current_host: list[tuple[str, str, int]] = []
        self.last_step_host: list[tuple[str, str, int]] = []
        self.runs: list[GraphRun] = []
        self.last_runs: list[GraphRun] = []
        self.comm_current: Counter = Counter()
        self.comm_last_step: dict[str, int] = {}
        # (phase, node name, shape, storage bytes) of every storage the graphs made
        self.allocations: list[tuple[str, str, tuple, int]] = []
        self.last_step_allocations: list[tuple[str, str, tuple, int]] = []
        # data_ptr -> (kind, tensor): forward outputs that the backward may
        # receive, held until the step ends so their addresses stay theirs
        self.held: dict[int, tuple[str, object]] = {}

    @property
    def last_step_held(self) -> list[tuple[int, int]]:
        """``(gathered bytes, total bytes)`` per sample of the last step that
        other graph runs hold: forward outputs that their own backward
        receives later, between that forward's end and that backward's start."""
        delta = [[0, 0] for _ in range(len(self.last_step) + 1)]
        runs = self.last_runs
        for run in runs:
            if run.paired is None:
                continue
            fwd = runs[run.paired]
            for ptr in run.received:
                kind, nbytes, location = fwd.outputs.get(ptr, ("input", 0, "device"))
                if kind == "input" or location != "device":
                    continue
                gathered = nbytes if kind == "gathered" else 0
                delta[fwd.stop][0] += gathered
                delta[fwd.stop][1] += nbytes
                delta[run.start][0] -= gathered
                delta[run.start][1] -= nbytes
        out, g, t = [], 0, 0
        for i in range(len(self.last_step)):
            g, t = g + delta[i][0], t + delta[i][1]
            out.append((g, t))
        return out

    @property
    def last_step_composed(self) -> list[tuple[str, str, int, int]]:
        """The last step's samples with :attr:`last_step_held` added."""
        return [(phase, name, g + hg, t + ht)
                for (phase, name, g, t), (hg, ht) in zip(self.last_step, self.last_step_held)]

    @property
    def last_step_region_order(self) -> list[tuple[str, int | None]]:
        """``(phase, region index)`` of every graph run of the last step, in order."""
        return [(run.label, run.region) for run in self.last_runs]

    @property
    def peak_gathered_bytes(self) -> int:
        """Most gathered-parameter bytes alive at once in the last step (other regions' held included)."""
        return max((s[2] for s in self.last_step_composed), default=0)

    @property
    def peak_total_bytes(self) -> int:
        """Most device bytes alive at once in the last step (other regions' held included)."""
        return max((s[3] for s in self.last_step_composed), default=0)

    @property
    def peak_host_total_bytes(self) -> int:
        """Most host bytes one graph run held at once in the last step."""
        return max((s[2] for s in self.last_step_host), default=0)

    def end_step(self) -> None:
        self.last_step, self.current = self.current, []
        self.last_step_host, self.current_host = self.current_host, []
        self.last_runs, self.runs = self.runs, []
        self.last_step_allocations, self.allocations = self.allocations, []
        self.comm_last_step = {k: int(self.comm_current.get(k, 0)) for k in KINDS}
        self.comm_current = Counter()
        self.held = {}

    def executable(self, gm, phase: str, region: int | None = None, device=None):
        """A boxed callable that runs ``gm`` (of compiled region ``region``,
        computing on ``device``; ``None``: host memory) through a :class:`TrackedGraph`."""
        tracked = TrackedGraph(gm, phase, self, region, device)

        def run(args):
            return tracked.run_boxed(args)

        run._boxed_call = True
        return run


@dataclasses.dataclass
class GraphRun:
    """One run of a tracked graph: its samples are ``MemoryTracker.current[start:stop]``."""

    label: str  # forward, backward or inference
    region: int | None
    start: int
    stop: int = 0
    # forward: data_ptr -> (kind, storage bytes, "device" or "host") of every output storage
    outputs: dict[int, tuple[str, int, str]] = dataclasses.field(default_factory=dict)
    # backward: the paired forward run (index in the runs) and the data_ptrs
    # of its inputs that are that forward's outputs
    paired: int | None = None
    received: set[int] = dataclasses.field(default_factory=set)


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _key(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class TrackedGraph:
    """Runs one graph node by node, freeing values after their last use,
    and records live bytes into a :class:`MemoryTracker`."""

    def __init__(self, gm, phase: str, tracker: MemoryTracker, region: int | None = None, device=None) -> None:
        import torch
        import torch.fx as fx


        self.gm, self.tracker, self.region = gm, tracker, region
        self.phase = "backward" if phase == "backward" else "forward"
        self.label = phase
        self.interp = fx.Interpreter(gm, garbage_collect_values=False)
        self.nodes = list(gm.graph.nodes)
        stores, self.kinds, _ = storages(gm, self.phase)
        # the graph's location of every value (its storage's), for host memory
        # that is also the compute device's (a CPU-only run)
        self.locations = {m: st.location for st in stores for m in st.members}
        self.host = HOST
        # host memory is apart from the compute device's: a value's real device tells
        self.host_apart = device is not None and torch.device(device).type != HOST.type
        index = {n: i for i, n in enumerate(self.nodes)}
        end = len(self.nodes) - 1
        self.free_after: dict[int, list] = {}
        for node in self.nodes:
            if node.op == "output":
                continue
            uses = [index[u] if u.op != "output" else end for u in node.users]
            last = max(uses) if uses else (end if node.op == "placeholder" else index[node])
            self.free_after.setdefault(last, []).append(node)
        self.collectives = {
            n: get_tag(n).role for n in self.nodes if get_tag(n) is not None and get_tag(n).role in COLLECTIVE_ROLES
        }

    def run_boxed(self, args: list):
        args_list = list(args)
        args.clear()
        env = self.interp.env = {}
        kind_of_ptr: dict[int, str] = {}
        where_of_ptr: dict[int, str] = {}  # "device" or "host"
        refs: Counter = Counter()  # env values per storage
        result = None
        position = 0
        tracker = self.tracker
        run = GraphRun(self.label, self.region, len(tracker.current))
        outputs = None  # backward: the paired forward run's outputs
        if self.phase == "backward":
            run.paired = self._pair()
            if run.paired is not None:
                outputs = tracker.runs[run.paired].outputs
        for i, node in enumerate(self.nodes):
            if node.op == "placeholder":
                value = args_list[position]
                args_list[position] = None
                position += 1
                env[node] = value
                for t in _tensors(value):
                    ptr, _ = _key(t)
                    kind = None
                    where = self.locations.get(node.name, "device")
                    if outputs is not None:
                        kind, _, where = outputs.get(ptr, (None, 0, where))
                        if kind is not None:
                            run.received.add(ptr)
                    elif self.phase == "backward" and ptr in tracker.held:
                        kind = tracker.held[ptr][0]
                    if not refs[ptr]:
                        kind_of_ptr[ptr] = kind if kind is not None else "input"
                        where_of_ptr[ptr] = self._where(t, where)
                    refs[ptr] += 1
            elif node.op == "output":
                result = self.interp.fetch_args_kwargs_from_env(node)[0][0]
            else:
                value = self.interp.run_node(node)
                env[node] = value
                for t in _tensors(value):
                    ptr = _key(t)[0]
                    if not refs[ptr]:  # a new storage (the allocator may reuse a freed address)
                        kind_of_ptr[ptr] = self.kinds.get(node.name, "other")
                        tracker.allocations.append((self.label, node.name, tuple(t.shape), _key(t)[1]))
                        where_of_ptr[ptr] = self._where(t, self.locations.get(node.name, "device"))
                    refs[ptr] += 1
                role = self.collectives.get(node)
                if role is not None:
                    self._count(node, role, value)
                self._sample(node, env, kind_of_ptr, where_of_ptr)
            for dead in self.free_after.get(i, ()):
                for t in _tensors(env.pop(dead, None)):
                    refs[_key(t)[0]] -= 1
        self.interp.env = {}
        if self.phase == "forward" and self.label != "inference":
            for t in _tensors(result):
                ptr, nbytes = _key(t)
                kind = kind_of_ptr.get(ptr, "other")
                kind = "gathered" if kind == "gathered" else ("input" if kind == "input" else "saved")
                tracker.held[ptr] = (kind, t)
                run.outputs[ptr] = (kind, nbytes, where_of_ptr.get(ptr, self._where(t, "device")))
        run.stop = len(tracker.current)
        tracker.runs.append(run)
        return result

    def _pair(self) -> int | None:
        """The index in ``tracker.runs`` of the latest forward run of this
        graph's region that no backward run has been paired with."""
        taken = {r.paired for r in self.tracker.runs if r.paired is not None}
        for k in range(len(self.tracker.runs) - 1, -1, -1):
            r = self.tracker.runs[k]
            if r.label == "forward" and r.region == self.region and k not in taken:
                return k
        return None

    def _count(self, node, role: str, value) -> None:
        src = node.args[0]
        in_t = self.interp.env.get(src)
        in_bytes = in_t.numel() * in_t.element_size() if in_t is not None else 0
        out_bytes = value.numel() * value.element_size()
        self.tracker.comm_current[role] += collective_buffer_bytes(role, in_bytes, out_bytes)

    def _where(self, t, location: str) -> str:
        """Where the storage of ``t`` is: ``"host"`` or ``"device"``. Its
        real device decides, unless host memory is the compute device's too;
        then ``location``, the graph's."""
        if t.device.type != self.host.type:
            return "device"
        return "host" if self.host_apart else location

    def _sample(self, node, env, kind_of_ptr, where_of_ptr) -> None:
        seen: set[int] = set()
        gathered = total = host = 0
        for value in env.values():
            for t in _tensors(value):
                ptr, nbytes = _key(t)
                if ptr in seen:
                    continue
                seen.add(ptr)
                kind = kind_of_ptr.get(ptr, "other")
                if kind == "input":
                    continue
                if where_of_ptr.get(ptr, "device") == "host":
                    host += nbytes
                    continue
                total += nbytes
                if kind == "gathered":
                    gathered += nbytes
        self.tracker.current.append((self.label, node.name, gathered, total))
        self.tracker.current_host.append((self.label, node.name, host))

"""NVMe offload in the plan: which parameter shards each compiled graph reads
from the parameter file, in what order, and the disk and host-buffer bytes
of this rank (``offload_param`` / ``offload_optimizer`` with device
``"nvme"``; docs/nvme_offload.md).

* :func:`host_copies`: a lowered graph's ``host_copy`` nodes that bring a
  host shard to the compute device (not the gradient copies tagged
  ``location="host"``), each with its parameter; :func:`graph_reads`: their
  parameters in node order.
* :func:`read_ahead_points`: where the ``nvme_read_ahead`` pass requests each
  file shard's read: at most ``offload_param.buffer_count`` shards, and
  ``buffer_count * buffer_size`` elements, requested and not yet copied at
  any point of the graph (DeepSpeed's pool of ``buffer_count`` read buffers of
  ``buffer_size`` elements): the first window at the graph's start, then each
  copy frees its place for the next shard's read right after it.
  :func:`announced_reads`: the shards a graph's ``read_ahead`` nodes request.
* :func:`nvme_plan`: :class:`NvmePlan`, this rank's bytes on disk (the
  parameter file, exact; the optimizer's swap files for Adam/AdamW, as the
  memory report counts states), the peak of parameter-file bytes mapped
  at once (the largest sum over one graph's reads: a graph's regions are
  released when it ends), and the parameter file's bytes read from storage
  per training step (``param_read_bytes_per_step``, below).

Reads per step. After each optimizer step the runtime drops the parameter
file from the page cache (``ParamStore.after_step``), and nothing else drops
it during a step. So a step reads each file region that one of its graphs
copies (forward and backward graphs of every region; the optimizer's reads
of the same regions and the backward's re-gathers find the forward's pages
in the cache) once from storage: the page-rounded sum over the union of the
training graphs' reads. This is exact, and tested against the process's
storage reads (``/proc/self/io`` ``read_bytes``), when: the step is not the
first (the first finds the pages written at sharding still cached); the
kernel keeps the pages from the forward to the optimizer step (no memory
pressure); and the filesystem reads through a block device (on tmpfs
nothing is read). Otherwise it is a bound from above for the first and from
below under memory pressure; a region no graph reads but the kernel's
mmap read-around fetches can only add within ``param_file_bytes``.
"""

from __future__ import annotations

import dataclasses
import mmap

from zerograph.graph.tags import get_tag
from zerograph.runtime.aio import align_up
from zerograph.runtime.nvme_optimizer import sub_groups, swapped_groups
from zerograph.runtime.nvme_params import local_numel


def host_copies(gm) -> list[tuple[object, str]]:
    """``(node, parameter)`` of every ``host_copy`` node of ``gm`` that copies a
    host shard to the compute device, in node order. A bucket's copies carry
    the bucket's names, not their own: ``gather_bucket`` emits them in bucket
    order, and the scheduler moves them in that order, so the k-th copy of a
    bucket is its k-th member's."""
    out = []
    seen: dict[tuple[str, ...], int] = {}
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is None or tag.role != "host_copy" or tag.location == "host":
            continue
        if tag.param:
            out.append((node, tag.param))
        elif tag.bucket:
            k = seen.get(tag.bucket, 0)
            seen[tag.bucket] = k + 1
            if k < len(tag.bucket):
                out.append((node, tag.bucket[k]))
    return out


def graph_reads(gm) -> list[str]:
    """Parameters whose host shard ``gm`` copies to the compute device, in node order."""
    return list(dict.fromkeys(name for _, name in host_copies(gm)))


def announced_reads(gm) -> list[str]:
    """The shards ``gm``'s ``read_ahead`` nodes request, in node order."""
    out: dict[str, None] = {}
    for node in gm.graph.nodes:
        tag = get_tag(node)
        if tag is not None and tag.role == "read_ahead":
            out.setdefault(node.args[2])
    return list(out)


def read_ahead_points(copies: list[tuple[str, int]], buffer_count: int, buffer_size: int) -> list[list[str]]:
    """Where to request each shard's read (module docstring). ``copies``:
    ``(parameter, elements)`` of the file shards in the graph's copy order,
    each once. Returns ``len(copies) + 1`` lists of names: ``[0]`` requested
    at the graph's start, ``[j + 1]`` right after the ``j``-th copy. At any
    point at most ``buffer_count`` requested shards are not yet copied, of at
    most ``buffer_count * buffer_size`` elements (one shard always fits: a
    shard above ``buffer_size`` is an error when the model is sharded)."""
    limit = buffer_count * buffer_size
    points: list[list[str]] = [[] for _ in range(len(copies) + 1)]
    pending = held = nxt = 0

    def fill(point: list[str]) -> None:
        nonlocal pending, held, nxt
        while nxt < len(copies) and pending < buffer_count and (pending == 0 or held + copies[nxt][1] <= limit):
            point.append(copies[nxt][0])
            pending, held, nxt = pending + 1, held + copies[nxt][1], nxt + 1

    fill(points[0])
    for j, (_, numel) in enumerate(copies):
        pending, held = pending - 1, held - numel
        fill(points[j + 1])
    return points


@dataclasses.dataclass(frozen=True)
class NvmePlan:
    """This rank's NVMe offload bytes (module docstring)."""

    param_file_bytes: int  # the parameter file (offload_param "nvme")
    optimizer_file_bytes: int  # the optimizer's swap files (offload_optimizer "nvme"), for Adam/AdamW
    params_in_file: int  # shards in the parameter file
    # most parameter-file bytes one graph maps (its reads, page-rounded); per graph: (region, phase) -> bytes
    peak_mapped_bytes: int
    mapped_by_graph: dict[tuple[int, str], int] = dataclasses.field(default_factory=dict)
    # parameter-file bytes read from storage per training step (module docstring)
    param_read_bytes_per_step: int = 0

    @property
    def disk_bytes(self) -> int:
        return self.param_file_bytes + self.optimizer_file_bytes

    @property
    def swap_bytes_per_step(self) -> int:
        """Bytes the optimizer step (``zerograph.make_optimizer``'s
        ``NvmeOptimizer``) reads, and as many it writes, per step when every
        shard has a gradient: each parameter-file region (the shard is its
        own master) and each swap file (states, and masters not in the
        parameter file), once. With ``offload_optimizer.ratio`` < 1 the
        sub-groups kept in memory read nothing."""
        return self.param_file_bytes + self.optimizer_file_bytes

    def lines(self) -> list[str]:
        """The report's lines (``zerograph.explain``)."""
        mib = 2 ** 20
        return [f"  on NVMe (disk)      {self.disk_bytes / mib:10.3f} MiB   (parameter file "
                f"{self.param_file_bytes:,} bytes, {self.params_in_file} shards; optimizer swap files "
                f"{self.optimizer_file_bytes:,} bytes, Adam/AdamW)",
                f"  NVMe mapped peak    {self.peak_mapped_bytes / mib:10.3f} MiB   (parameter-file pages one graph "
                "reads, released when it ends)",
                f"  NVMe reads per step {self.param_read_bytes_per_step / mib:10.3f} MiB   (parameter file "
                f"{self.param_read_bytes_per_step:,} bytes from storage: each region the step's graphs copy, once)",
                f"  NVMe optimizer I/O  {self.swap_bytes_per_step / mib:10.3f} MiB   read and as much written per "
                f"step ({self.swap_bytes_per_step:,} bytes: parameter-file regions and swap files, once each)"]


def _optimizer_file_bytes(ctx, store) -> int:
    """Bytes of the NvmeOptimizer's swap files for Adam/AdamW (two fp32 states
    per element; an fp32 master per element unless the shard is its own
    master: in the parameter file, or an fp32 shard in host memory)."""
    zero = ctx.config.zero_optimization
    cfg = zero.offload_optimizer
    if cfg.device != "nvme":
        return 0
    specs = list(ctx.specs.values())
    cut = sub_groups([local_numel(s) for s in specs], zero.sub_group_size)
    total = 0
    for group in cut[:swapped_groups(len(cut), cfg.ratio)]:
        for i in group:
            spec, numel = specs[i], local_numel(specs[i])
            own_master = spec.master_dtype.is_floating_point and spec.master_dtype.itemsize == 4 and (
                (store is not None and store.holds(spec.name)) or spec.offloaded)
            total += (0 if own_master else align_up(numel * 4)) + 2 * align_up(numel * 4)
    return total


def nvme_plan(ctx) -> NvmePlan | None:
    """This rank's :class:`NvmePlan` (None without NVMe offload)."""
    zero = ctx.config.zero_optimization
    if "nvme" not in (zero.offload_param.device, zero.offload_optimizer.device):
        return None
    store = ctx.nvme_params
    by_graph = {}
    step_reads: set[str] = set()
    if store is not None:
        for region in ctx.regions:
            for phase, gm in region.graphs.items():
                names = [n for n in graph_reads(gm) if store.holds(n)]
                by_graph[(region.index, phase)] = _page_bytes(store, names)
                if phase in ("forward", "backward"):
                    step_reads.update(names)
    return NvmePlan(param_file_bytes=store.nbytes if store is not None else 0,
                    optimizer_file_bytes=_optimizer_file_bytes(ctx, store),
                    params_in_file=len(store.layout) if store is not None else 0,
                    peak_mapped_bytes=max(by_graph.values(), default=0), mapped_by_graph=by_graph,
                    param_read_bytes_per_step=_page_bytes(store, step_reads) if store is not None else 0)


def _page_bytes(store, names) -> int:
    """The page-rounded bytes of these shards' file regions."""
    return sum(align_up(store.layout[n][1], mmap.PAGESIZE) for n in names)

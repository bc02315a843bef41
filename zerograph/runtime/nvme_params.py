"""ZeRO-Infinity's parameter side: ``offload_param.device: "nvme"`` keeps the
offloaded parameter shards of this rank in one file, memory-mapped.

Layout (:func:`param_layout`, decided when the model is sharded): the
offloaded shards (``ParamSpec.offloaded``: every stage-3 shard that is not
persistent) in parameter order; the first ones, up to
``offload_param.max_in_cpu`` elements, stay in host memory as with device
``"cpu"``; the rest each get a 4096-byte aligned region of
``<nvme_path>/zerograph-<model tag>-rank<global rank>/params/params.swp``.

Mechanism (:class:`ParamStore`): the file is mapped (``mmap``, shared) and
each stored shard *is* a view of its region (``torch.frombuffer``), so every
reader of the parameter (the compiled graphs' ``host_copy`` before the
gather, ``torch.distributed.checkpoint``, the optimizer) reads the file,
and every in-place write lands in it. The compiled schedule drives the I/O:

* **read ahead**: the compiled graph's ``read_ahead`` nodes (the
  ``nvme_read_ahead`` pass, :mod:`zerograph.graph.nvme_ops`) announce each
  shard's region to the kernel a planner-chosen distance ahead of its copy
  (``posix_fadvise(WILLNEED)``: an asynchronous read into the page cache),
  then the graph's ``host_copy`` nodes (which the scheduler already moves
  ahead with their gather's prefetch) fault the pages in;
* **release**: after the graph ran, the mapping is unmapped from the
  process (``madvise(MADV_DONTNEED)`` over the whole file: the kernel's
  fault-around maps page-cache neighbours of the pages a graph reads too);
  the pages stay in the page cache, where the kernel may drop them, and
  written ones are written back;
* **write**: after the optimizer step (:meth:`ParamStore.after_step`) the
  written regions are flushed (``msync``) and dropped from the page cache.

The file is opened without ``O_DIRECT``: its pages are shared with the
mapping, so the optimizer's ``pwrite`` of an updated shard
(:class:`~zerograph.runtime.nvme_optimizer.NvmeOptimizer`, master kind
``"param"``) and the mapping see the same bytes.
"""

from __future__ import annotations

import logging
import mmap
import os
import weakref

import torch
from torch.distributed.tensor import DTensor

from zerograph._torch_private import dtensor_with_local
from zerograph.runtime.aio import (
    FileIO, IOConfig, NvmeOffloadError, SwapDir, align_up, global_rank,
)
from zerograph.runtime.specs import ParamSpec

log = logging.getLogger(__name__)

KEY = "zero_optimization.offload_param"
FILE_NAME = "params.swp"


def local_numel(spec: ParamSpec) -> int:
    """Elements of this rank's stored shard."""
    if spec.storage == "replicated" or not spec.full_shape:
        return spec.numel
    return spec.local_rows * spec.row_numel


def shard_nbytes(spec: ParamSpec) -> int:
    return local_numel(spec) * torch.empty((), dtype=spec.master_dtype).element_size()


def param_layout(specs, max_in_cpu: int) -> dict[str, tuple[int, int]]:
    """``{fqn: (file offset, bytes)}`` of the offloaded shards that go to the
    file, for ``specs`` in parameter order (module docstring): the first
    offloaded shards up to ``max_in_cpu`` elements stay in host memory."""
    out: dict[str, tuple[int, int]] = {}
    in_cpu = offset = 0
    for spec in specs:
        if not spec.offloaded:
            continue
        numel = local_numel(spec)
        if in_cpu + numel <= max_in_cpu:
            in_cpu += numel
            continue
        in_cpu = max_in_cpu  # DeepSpeed's cut: in order, once full the rest go to the file
        nbytes = shard_nbytes(spec)
        out[spec.name] = (offset, nbytes)
        offset += align_up(max(nbytes, 1))
    return out


def file_bytes(layout: dict[str, tuple[int, int]]) -> int:
    """Size of the parameter file for ``layout``."""
    return max((off + align_up(max(n, 1)) for off, n in layout.values()), default=0)


def check_buffer_size(specs, layout: dict, buffer_size: int) -> None:
    """DeepSpeed's check: a shard in the file must fit one buffer of ``buffer_size`` elements."""
    for spec in specs:
        if spec.name in layout and local_numel(spec) > buffer_size:
            raise NvmeOffloadError(
                f"zerograph: {KEY}.buffer_size={buffer_size:,} elements is smaller than this rank's shard of "
                f"{spec.name!r} ({local_numel(spec):,} elements); set {KEY}.buffer_size to at least "
                f"{local_numel(spec):,} (DeepSpeed rejects this too)")


def _close(mm, swap_file, swap_dir, io) -> None:
    if io is not None:
        io.close()
    try:
        mm.close()
    except BufferError:  # a shard view is still alive: the mapping outlives the (unlinked) file
        pass
    swap_file.close()
    swap_dir.close()


class ParamStore:
    """This rank's file of offloaded parameter shards and its mapping (module
    docstring). Built by :func:`zerograph.runtime.sharding.shard_parameters`
    as ``ModelState.nvme_params``."""

    def __init__(self, config, layout: dict[str, tuple[int, int]], tag: str):
        cfg = config.zero_optimization.offload_param
        self.layout = layout
        self.nbytes = file_bytes(self.layout)
        self.swap_dir = SwapDir(cfg.nvme_path, key=KEY, tag=tag, rank=global_rank(), kind="params",
                                needed_bytes=self.nbytes)
        self.file = self.swap_dir.file(FILE_NAME, size=max(self.nbytes, mmap.PAGESIZE), reserve=True, direct=False)
        self.mm = mmap.mmap(self.file.fd, self.file.size, flags=mmap.MAP_SHARED)
        self.io = FileIO(IOConfig.from_config(config), name="zerograph-nvme-io")
        self.reads = 0  # regions announced ahead (fadvise WILLNEED) so far
        self._finalizer = weakref.finalize(self, _close, self.mm, self.file, self.swap_dir, self.io)
        log.info("zerograph: parameter offload to NVMe: %d shard(s), %d bytes in %s", len(self.layout), self.nbytes,
                 self.file.path)

    def close(self) -> None:
        """Remove the file and this rank's directory (once; also when the
        store is garbage collected, or at a clean exit)."""
        self._finalizer()

    # -- what is where ------------------------------------------------------------
    def holds(self, name: str) -> bool:
        return name in self.layout

    def region(self, name: str):
        """(swap file, offset, bytes) of ``name``'s shard."""
        offset, nbytes = self.layout[name]
        return self.file, offset, nbytes

    @property
    def path(self):
        return self.file.path

    def place(self, name: str, stored: torch.Tensor) -> torch.Tensor:
        """``stored`` (a DTensor or a plain tensor) with its local shard
        replaced by a view of ``name``'s region, holding the same values."""
        local = stored.to_local() if isinstance(stored, DTensor) else stored
        offset, nbytes = self.layout[name]
        if local.numel() == 0:
            view = torch.empty(local.shape, dtype=local.dtype)
        else:
            view = torch.frombuffer(self.mm, dtype=local.dtype, count=local.numel(), offset=offset).view(local.shape)
            view.copy_(local)
        return dtensor_with_local(stored, view) if isinstance(stored, DTensor) else view

    # -- the schedule's I/O -------------------------------------------------------
    def _ranges(self, names):
        for name in names:
            offset, nbytes = self.layout[name]
            if nbytes:
                yield offset, align_up(nbytes, mmap.PAGESIZE)

    def read_ahead(self, names) -> None:
        """Start asynchronous reads of these shards, in this order."""
        for offset, length in self._ranges(names):
            os.posix_fadvise(self.file.fd, offset, length, os.POSIX_FADV_WILLNEED)
            self.reads += 1

    def release(self, names=None) -> None:
        """Unmap these shards' pages from the process (all: ``None``)."""
        ranges = self._ranges(self.layout if names is None else names)
        for offset, length in ranges:
            self.mm.madvise(mmap.MADV_DONTNEED, offset, min(length, self.mm.size() - offset))

    def after_step(self) -> None:
        """After the optimizer step: write the updated shards to the file and
        drop them from memory (mapping and page cache)."""
        if not self.nbytes:
            return
        self.mm.flush()
        os.fdatasync(self.file.fd)
        self.release()
        os.posix_fadvise(self.file.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def create_store(ctx, specs: list[ParamSpec], model) -> ParamStore | None:
    """The :class:`ParamStore` of ``model`` with ``offload_param.device:
    "nvme"`` (None when no shard goes to the file), closed when ``model`` is
    garbage collected: a compiled graph may keep the model's state alive
    longer, but nothing can read the shards once the model is gone."""
    cfg = ctx.config.zero_optimization.offload_param
    if cfg.device != "nvme":
        return None
    layout = param_layout(specs, cfg.max_in_cpu)
    if not layout:
        log.info("zerograph: offload_param.device 'nvme': every offloaded shard fits %s.max_in_cpu=%d elements; "
                 "none goes to a file (set it lower to use %s)", KEY, cfg.max_in_cpu, cfg.nvme_path)
        return None
    check_buffer_size(specs, layout, cfg.buffer_size)
    store = ParamStore(ctx.config, layout, ctx.tag)
    weakref.finalize(model, store.close)
    return store


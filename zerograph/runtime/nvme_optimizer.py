"""ZeRO-Infinity's optimizer side: :class:`NvmeOptimizer` keeps the fp32
masters and the optimizer states of this rank's shards in files and swaps
them through a few host buffers, one optimizer sub-group at a time.

``zero_optimization.offload_optimizer.device: "nvme"`` (or
``offload_param.device: "nvme"``) makes :func:`zerograph.make_optimizer`
return one. Parameters are cut, in order, into *sub-groups* of at most
``sub_group_size`` local elements (whole shards; a larger shard is a
sub-group of its own). Each :meth:`~NvmeOptimizer.step`, per sub-group:

1. **read** its file image (masters and states) into a host buffer (a
   *slot*) with :class:`zerograph.runtime.aio.FileIO`;
2. **step**: the wrapped ``torch.optim`` optimizer's masters and states are
   bound to views of the slot (``param.data`` and ``optimizer.state`` entries),
   the gradient shards are bound as the masters' ``.grad``, and the
   optimizer steps exactly the parameters that have a gradient (the others'
   ``.grad`` is ``None``, so ``torch.optim`` skips them: the arithmetic per
   element is the CPU offload's, bit for bit);
3. **write** the slot back, and copy the updated masters into the parameters.

``pipeline_read`` reads the next sub-groups into free slots while one steps,
``pipeline_write`` writes a stepped sub-group while the next ones step;
``buffer_count`` slots (1 without pipelining) bound the host memory.

Where each master lives (``_Entry.master``):

* ``"file"``: an fp32 copy in the optimizer's swap file (the parameter shard
  is on the device, or on the host with a dtype other than fp32);
* ``"param"``: the parameter shard itself in the parameter file
  (``offload_param.device: "nvme"``); no second copy;
* ``"resident"``: the host fp32 parameter shard itself (``offload_param``
  with the shard in host memory), stepped in place;
* ``"copy"``: an fp32 host copy (a sub-group past ``ratio``), as with
  device ``"cpu"``.

Between steps a swapped state of the shard's shape is a 0-element
placeholder in ``optimizer.state`` (the scalar ``step`` stays in memory): a
present placeholder means "valid in the file", an absent key "not created
yet" (``torch.optim`` creates it at the next step, which is then copied into
the slot). Checkpoints read and fill the states in place through memory
maps of the files (:meth:`NvmeOptimizer.sharded_state_dict`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import mmap
import weakref
from typing import Any, Callable

import torch

from zerograph._torch_private import tensor_version
from zerograph.runtime.aio import FileIO, IOConfig, SwapDir, SwapFile, align_up, aligned_buffer, global_rank
from zerograph.runtime.offload import HOST, _local, pin_host_memory
from zerograph.runtime.shard_optimizer import ShardOptimizer, _is_host_master, check_elementwise

log = logging.getLogger(__name__)

_KEY = "zero_optimization.offload_optimizer"
_EMPTY = torch.empty(0)  # a swapped-out master's data, and a swapped state's placeholder


@dataclasses.dataclass
class _Region:
    """A tensor's bytes in a sub-group's slot and in a file."""

    slot_offset: int
    nbytes: int
    file: SwapFile | None = None
    file_offset: int = 0


@dataclasses.dataclass
class _Entry:
    index: int  # into device_params / masters
    shape: tuple[int, ...]
    master: str  # "file", "param", "resident", "copy" (module docstring)
    master_region: _Region | None = None
    states: dict[str, _Region] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _SubGroup:
    entries: list[_Entry]
    swapped: bool  # states (and "file" masters) in the optimizer's swap file
    file: SwapFile | None = None
    file_bytes: int = 0  # size of the swap file: the slot's first file_bytes bytes are its image
    slot_bytes: int = 0
    regions: list[_Region] = dataclasses.field(default_factory=list)  # parameter-file masters

    def segments(self, slot: torch.Tensor) -> list:
        """(file, offset, slot view) of every byte range this sub-group moves."""
        out = []
        if self.file is not None and self.file_bytes:
            out.append((self.file, 0, slot[:self.file_bytes]))
        for r in self.regions:
            out.append((r.file, r.file_offset, slot[r.slot_offset:r.slot_offset + align_up(r.nbytes)]))
        return out


def sub_groups(numels: list[int], sub_group_size: int) -> list[list[int]]:
    """Indices of ``numels`` cut in order into groups of at most
    ``sub_group_size`` elements (a larger one alone)."""
    groups: list[list[int]] = []
    size = 0
    for i, n in enumerate(numels):
        if groups and size + n <= sub_group_size:
            groups[-1].append(i)
            size += n
        else:
            groups.append([i])
            size = n
    return groups


def swapped_groups(count: int, ratio: float) -> int:
    """How many of ``count`` sub-groups (the first ones) swap their states (DeepSpeed's ``ratio``)."""
    return count if ratio >= 1.0 else int(ratio * count)


def state_layout(optimizer_cls, optimizer_kwargs: dict) -> dict[str, torch.dtype]:
    """The states ``optimizer_cls`` keeps of a parameter's shape (Adam:
    ``exp_avg``, ``exp_avg_sq``), by stepping it once on a 3-element fp32
    parameter."""
    probe = torch.nn.Parameter(torch.zeros(3))
    probe.grad = torch.zeros(3)
    opt = optimizer_cls([probe], **optimizer_kwargs)
    opt.step()
    return {k: v.dtype for k, v in opt.state[probe].items() if isinstance(v, torch.Tensor) and v.shape == probe.shape}


def _view(slot: torch.Tensor, region: _Region, dtype: torch.dtype, shape) -> torch.Tensor:
    return slot[region.slot_offset:region.slot_offset + region.nbytes].view(dtype).view(shape)


def _close(swap_dir, files, io) -> None:
    for f in files:
        f.close()
    if io is not None:
        io.close()
    if swap_dir is not None:
        swap_dir.close()


class NvmeOptimizer(ShardOptimizer):
    """``optimizer_cls`` over this rank's shards with masters and states in
    files (module docstring). Built by :func:`zerograph.make_optimizer`."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], optimizer_cls: Callable[..., torch.optim.Optimizer],
                 *, ctx, pin_memory: bool = False, host_resident=(), **optimizer_kwargs: Any):
        check_elementwise(optimizer_cls)
        config = ctx.config
        zero = config.zero_optimization
        cfg = zero.offload_optimizer
        names = [n for n, p in named_params.items() if p.requires_grad]
        self.device_params = [named_params[n] for n in names]
        if not self.device_params:
            raise ValueError("NvmeOptimizer got no parameters that require gradients; pass model.parameters()")
        self.on_host = True
        self.pin = pin_host_memory(pin_memory)
        self.pipeline_read, self.pipeline_write = cfg.pipeline_read, cfg.pipeline_write
        self._buffers = cfg.buffer_count
        param_store = self.param_store = getattr(ctx, "nvme_params", None)
        resident_ids = {id(p) for p in host_resident}
        locals_ = [_local(p.detach()) for p in self.device_params]
        cut = sub_groups([t.numel() for t in locals_], zero.sub_group_size)
        on_disk = swapped_groups(len(cut), cfg.ratio) if cfg.device == "nvme" else 0
        layout = state_layout(optimizer_cls, optimizer_kwargs) if on_disk else {}
        self.masters: list[torch.nn.Parameter] = []
        self.groups: list[_SubGroup] = []
        self.resident = []
        for k, indices in enumerate(cut):
            group = _SubGroup([], swapped=k < on_disk)
            for i in indices:
                p, local = self.device_params[i], locals_[i]
                if param_store is not None and param_store.holds(names[i]) and local.dtype == torch.float32:
                    kind = "param"
                elif id(p) in resident_ids and _is_host_master(p):
                    kind = "resident"
                else:
                    kind = "file" if group.swapped else "copy"
                group.entries.append(_Entry(i, tuple(local.shape), kind))
                self.resident.append(kind == "resident")
                if kind == "resident":
                    self.masters.append(torch.nn.Parameter(local))
                elif kind == "copy":
                    host = torch.empty(local.shape, dtype=torch.float32, device=HOST, pin_memory=self.pin)
                    host.copy_(local)
                    self.masters.append(torch.nn.Parameter(host))
                else:
                    self.masters.append(torch.nn.Parameter(_EMPTY))
            self._lay_out(group, layout, names, param_store)
            self.groups.append(group)
        # param version when its "file"/"copy" master last agreed with it (-1: refresh at the next step)
        self._fresh = [0] * len(self.device_params)
        for g in self.groups:
            for e in g.entries:
                self._fresh[e.index] = -1 if e.master == "file" else tensor_version(locals_[e.index])
        self.optimizer = optimizer_cls(self.masters, **optimizer_kwargs)
        self._layout = layout
        self._slots: list[torch.Tensor] = []
        self._swap_dir = None
        files: list[SwapFile] = []
        needed = sum(g.file_bytes for g in self.groups)
        if needed:
            self._swap_dir = SwapDir(cfg.nvme_path, key=_KEY, tag=ctx.tag, rank=global_rank(), kind="optimizer",
                                     needed_bytes=needed)
            for k, g in enumerate(self.groups):
                if g.file_bytes:
                    g.file = self._swap_dir.file(f"subgroup{k:05d}.swp", size=g.file_bytes, reserve=not cfg.fast_init)
                    files.append(g.file)
        own_io = None
        if param_store is not None:
            self.io = param_store.io
        elif any(g.slot_bytes for g in self.groups):
            self.io = own_io = FileIO(IOConfig.from_config(config), name="zerograph-optimizer-io")
        else:
            self.io = None
        weakref.finalize(self, _close, self._swap_dir, files, own_io)
        log.info("zerograph: optimizer offload to NVMe: %d sub-group(s) of <= %d elements, %d with states in %s "
                 "(%d bytes), %s states; %d slot(s) of %d bytes", len(self.groups), zero.sub_group_size, on_disk,
                 self._swap_dir.path if self._swap_dir else "memory", needed, optimizer_cls.__name__,
                 self._slot_count(), max((g.slot_bytes for g in self.groups), default=0))

    # -- layout ----------------------------------------------------------------
    def _lay_out(self, group: _SubGroup, layout: dict, names: list[str], param_store) -> None:
        """Place each entry's swapped tensors in the group's file image (the
        slot's first bytes) and its parameter-file master after it."""
        offset = 0
        for e in group.entries:
            numel = 1
            for d in e.shape:
                numel *= d
            if e.master == "file":
                e.master_region = _Region(offset, numel * 4, file_offset=offset)
                offset += align_up(numel * 4)
            if group.swapped:
                for key, dtype in layout.items():
                    nbytes = numel * torch.empty((), dtype=dtype).element_size()
                    e.states[key] = _Region(offset, nbytes, file_offset=offset)
                    offset += align_up(nbytes)
        group.file_bytes = offset
        for e in group.entries:
            if e.master == "param":
                file, file_offset, nbytes = param_store.region(names[e.index])
                e.master_region = _Region(offset, nbytes, file, file_offset)
                group.regions.append(e.master_region)
                offset += align_up(nbytes)
        group.slot_bytes = offset

    def _slot_count(self) -> int:
        io_groups = sum(1 for g in self.groups if g.slot_bytes)
        if not io_groups:
            return 0
        if not (self.pipeline_read or self.pipeline_write):
            return 1
        return max(1, min(self._buffers, io_groups))

    def _ensure_slots(self) -> None:
        if not self._slots:
            size = max(g.slot_bytes for g in self.groups)
            self._slots = [aligned_buffer(size, pin=self.pin) for _ in range(self._slot_count())]

    # -- the step --------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step does not take a closure; compute the loss before step()")
        groups = [g for g in self.groups if any(self.device_params[e.index].grad is not None for e in g.entries)]
        self._run(groups, zero_grads=False)
        if self.param_store is not None:  # the updated shards to disk, out of memory
            self.param_store.after_step()

    def _run(self, groups: list[_SubGroup], *, zero_grads: bool) -> None:
        """Read, step and write ``groups`` through the slots (module docstring)."""
        io_groups = [g for g in groups if g.slot_bytes]
        if io_groups:
            self._ensure_slots()
        free = list(range(len(self._slots)))[::-1]
        writing: collections.deque = collections.deque()  # (slot index, transfer)
        reads: dict[int, tuple[int, Any]] = {}  # id(group) -> (slot index, transfer)
        ahead = 0  # io_groups[ahead] is the next one to read

        def take_slot(block: bool):
            if free:
                return free.pop()
            if writing and (block or writing[0][1].done()):
                slot, transfer = writing.popleft()
                transfer.wait()
                return slot
            return None

        def read_next(block: bool) -> bool:
            nonlocal ahead
            slot = take_slot(block)
            if slot is None:
                return False
            group = io_groups[ahead]
            reads[id(group)] = (slot, self.io.read(group.segments(self._slots[slot])))
            ahead += 1
            return True

        try:
            for group in groups:
                if not group.slot_bytes:
                    self._step_group(group, None, zero_grads)
                    continue
                if id(group) not in reads:
                    read_next(block=True)
                while self.pipeline_read and ahead < len(io_groups) and read_next(block=False):
                    pass
                slot, transfer = reads.pop(id(group))
                transfer.wait()
                self._step_group(group, self._slots[slot], zero_grads)
                write = self.io.write(group.segments(self._slots[slot]))
                if self.pipeline_write:
                    writing.append((slot, write))
                else:
                    write.wait()
                    free.append(slot)
            for _, write in writing:
                write.wait()
        finally:  # an error: let every transfer end before the slots are reused
            for _, transfer in list(writing) + list(reads.values()):
                try:
                    transfer.wait()
                except Exception:  # noqa: BLE001  (the first error is already propagating)
                    pass

    def _step_group(self, group: _SubGroup, slot: torch.Tensor | None, zero_grads: bool) -> None:
        state = self.optimizer.state
        stepped = []
        for e in group.entries:
            dev, master = self.device_params[e.index], self.masters[e.index]
            if slot is not None and e.master_region is not None:
                master.data = _view(slot, e.master_region, torch.float32, e.shape)
            if e.master in ("file", "copy"):
                local = _local(dev.detach())
                if self._fresh[e.index] != tensor_version(local):
                    master.data.copy_(local)
                    self._fresh[e.index] = tensor_version(local)
            if e.states and master in state and all(k in state[master] for k in e.states):
                for key, region in e.states.items():
                    state[master][key] = _view(slot, region, self._layout[key], e.shape)
            if zero_grads:
                master.grad = torch.zeros(e.shape, dtype=torch.float32, device=HOST)
            elif dev.grad is not None:
                grad = _local(dev.grad)
                master.grad = grad if grad.dtype == torch.float32 and grad.device == HOST else grad.to(HOST, torch.float32)
            if master.grad is not None:
                stepped.append(e)
        try:
            self.optimizer.step()
        finally:
            for e in group.entries:
                master = self.masters[e.index]
                master.grad = None
                if e.states and master in state:
                    values = state[master]
                    for key, region in e.states.items():
                        if key in values:
                            view = _view(slot, region, self._layout[key], e.shape)
                            if values[key].data_ptr() != view.data_ptr():  # created by this step
                                view.copy_(values[key])
                            values[key] = _EMPTY
            for e in stepped:
                if e.master in ("file", "copy"):
                    local = _local(self.device_params[e.index].detach())
                    local.copy_(self.masters[e.index].detach(), non_blocking=local.is_cuda and self.pin)
                    self._fresh[e.index] = tensor_version(local)
            if slot is not None:
                for e in group.entries:
                    if e.master_region is not None:
                        self.masters[e.index].data = _EMPTY

    @torch.no_grad()
    def _refresh_masters(self, force: bool = False) -> None:
        """A ``"file"`` master is refreshed from its parameter at its next
        step when the parameter changed (or always, ``force``); a ``"copy"``
        one now."""
        for g in self.groups:
            for e in g.entries:
                if e.master == "file" and force:
                    self._fresh[e.index] = -1
                elif e.master == "copy":
                    local = _local(self.device_params[e.index].detach())
                    if force or tensor_version(local) != self._fresh[e.index]:
                        self.masters[e.index].detach().copy_(local)
                        self._fresh[e.index] = tensor_version(local)

    @torch.no_grad()
    def _init_state(self) -> None:
        """Create the states as ``torch.distributed.checkpoint`` does for a
        plain optimizer (a zero-gradient step at learning rate 0), through
        the swap."""
        if self.optimizer.state:
            return
        lrs = [group.get("lr") for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            if "lr" in group:
                group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
        try:
            self._run(self.groups, zero_grads=True)
        finally:
            for group, lr in zip(self.optimizer.param_groups, lrs):
                if lr is not None:
                    group["lr"] = lr

    # -- state dicts and checkpoints ---------------------------------------------
    def _file_views(self, *, copy: bool) -> dict[tuple[int, str], torch.Tensor]:
        """(master index, key) -> the swapped state, as a view of a memory map
        of its file (``copy``: cloned into memory). Writes into a view land in
        the file."""
        out = {}
        for g in self.groups:
            if g.file is None:
                continue
            with open(g.file.path, "r+b") as f:
                mm = mmap.mmap(f.fileno(), g.file_bytes)
            for e in g.entries:
                values = self.optimizer.state.get(self.masters[e.index], {})
                for key, region in e.states.items():
                    if values.get(key) is not _EMPTY:
                        continue
                    count = region.nbytes // torch.empty((), dtype=self._layout[key]).element_size()
                    if count == 0:
                        view = torch.empty(e.shape, dtype=self._layout[key])
                    else:
                        view = torch.frombuffer(mm, dtype=self._layout[key], count=count,
                                                offset=region.file_offset).view(e.shape)
                    out[(e.index, key)] = view.clone() if copy else view
        return out

    def _with_files(self, inner: dict, *, copy: bool) -> dict:
        """``inner`` (``self.optimizer.state_dict()``) with each placeholder
        replaced by its state from the file."""
        flat = [p for group in self.optimizer.param_groups for p in group["params"]]
        index_of = {id(m): i for i, m in enumerate(self.masters)}
        views = self._file_views(copy=copy)
        for position, values in inner["state"].items():
            i = index_of[id(flat[position])]
            inner["state"][position] = {k: views.get((i, k), v) if v is _EMPTY else v for k, v in values.items()}
        return inner

    def _inner_state_dict(self) -> dict:
        return self._with_files(self.optimizer.state_dict(), copy=False)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict with every swapped state read into memory."""
        return self._with_files(self.optimizer.state_dict(), copy=True)

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        self._absorb()
        self._refresh_masters(force=True)

    def load_sharded_state_dict(self, model: torch.nn.Module, state_dict: dict) -> None:
        super().load_sharded_state_dict(model, state_dict)
        self._absorb()

    @torch.no_grad()
    def _absorb(self) -> None:
        """Write the states a load put in memory (or in memory maps) into the
        swap files, leaving placeholders."""
        state = self.optimizer.state
        for g in self.groups:
            loaded = [e for e in g.entries if e.states and any(
                state.get(self.masters[e.index], {}).get(k, _EMPTY) is not _EMPTY for k in e.states)]
            if not loaded:
                continue
            self._ensure_slots()
            slot = self._slots[0]
            self.io.read(g.segments(slot)).wait()
            for e in loaded:
                values = state[self.masters[e.index]]
                for key, region in e.states.items():
                    if values.get(key, _EMPTY) is not _EMPTY:
                        _view(slot, region, self._layout[key], e.shape).copy_(values[key].reshape(e.shape))
                        values[key] = _EMPTY
            self.io.write(g.segments(slot)).wait()

    # -- what is where -------------------------------------------------------------
    @property
    def swap_dir(self):
        """This optimizer's directory of swap files (None: nothing swapped)."""
        return None if self._swap_dir is None else self._swap_dir.path

    def file_bytes(self) -> int:
        """Bytes of this rank's optimizer swap files."""
        return sum(g.file_bytes for g in self.groups)

    def buffer_bytes(self) -> int:
        """Bytes of the host slots the swap cycles through."""
        return self._slot_count() * max((g.slot_bytes for g in self.groups), default=0)


"""File I/O for NVMe offload (ZeRO-Infinity): the swap directory of a rank,
aligned buffers, and reads/writes of tensors on a small thread pool.

Choice of I/O path: threads calling ``os.preadv`` / ``os.pwritev`` (the
system calls release the GIL, so reads, writes and the optimizer's compute
overlap), on files opened with ``O_DIRECT`` where the filesystem accepts it
(no page-cache copy, no page-cache pollution; buffers and offsets aligned to
:data:`ALIGN` bytes), else buffered with a log line. No extra dependency:
DeepSpeed's libaio extension needs a compiler and libaio headers, kvikio/GDS
a GPU; ``docs/nvme_offload.md`` has the measured bandwidth of this path next
to plain ``dd``-like reads of the same disk.

DeepSpeed's ``aio`` section, as it applies here (:class:`IOConfig`):

* ``block_size``: bytes per request (one ``preadv``/``pwritev`` call);
* ``queue_depth``: requests of one transfer in flight at once;
* ``intra_op_parallelism`` (``thread_count``): threads issuing requests;
* ``overlap_events``: true, a new request is issued as soon as one finishes
  (``queue_depth`` always in flight); false, requests go in waves of
  ``queue_depth``, each wave waited for before the next;
* ``single_submit``: no effect (each request is its own system call; threads
  have no batched submission like ``io_submit``);
* ``use_gds``: rejected by the config (GPUDirect Storage needs an NVIDIA GPU
  and cuFile; reads here go through host buffers).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ALIGN = 4096  # bytes: O_DIRECT alignment of buffers, file offsets and lengths
LOCK_NAME = "LOCK"


class NvmeOffloadError(RuntimeError):
    """NVMe offload cannot start or continue: a missing, unwritable or full
    ``nvme_path``, a swap directory another run holds, a failed transfer."""


def align_up(nbytes: int, align: int = ALIGN) -> int:
    return -(-nbytes // align) * align


def aligned_buffer(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A ``uint8`` host tensor of ``align_up(nbytes)`` bytes whose first byte
    is :data:`ALIGN`-aligned (pinned when ``pin`` and CUDA exists)."""
    size = align_up(max(nbytes, 1))
    raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=pin and torch.cuda.is_available())
    start = (-raw.data_ptr()) % ALIGN
    return raw[start:start + size]


def direct_io_supported(directory: Path) -> bool:
    """Whether files in ``directory`` accept ``O_DIRECT`` reads and writes of
    aligned buffers (tmpfs and some network filesystems do not)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / ".zerograph_odirect_probe"
    buf = aligned_buffer(ALIGN)
    view = (ctypes.c_char * ALIGN).from_address(buf.data_ptr())
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
        try:
            os.pwritev(fd, [view], 0)
            os.preadv(fd, [view], 0)
        finally:
            os.close(fd)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class IOConfig:
    """The ``aio`` section as :class:`FileIO` uses it (module docstring)."""

    block_size: int = 1 << 20
    queue_depth: int = 8
    threads: int = 1
    overlap_events: bool = True

    @classmethod
    def from_config(cls, config) -> "IOConfig":
        aio = config.aio
        return cls(block_size=aio.block_size, queue_depth=aio.queue_depth, threads=aio.intra_op_parallelism,
                   overlap_events=aio.overlap_events)


@dataclasses.dataclass
class IOStats:
    """What a :class:`FileIO` moved, and for how long.

    ``busy_s``: wall time during which at least one of its transfers was in
    flight; ``waited_s``: time callers spent blocked in :meth:`Transfer.wait`.
    The I/O that overlapped the caller's work is ``busy_s - waited_s``."""

    read_bytes: int = 0
    write_bytes: int = 0
    read_requests: int = 0
    write_requests: int = 0
    busy_s: float = 0.0
    waited_s: float = 0.0

    def snapshot(self) -> "IOStats":
        return dataclasses.replace(self)

    def since(self, before: "IOStats") -> "IOStats":
        return IOStats(*(getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)))


class SwapFile:
    """One file of swapped tensors, opened once (``O_DIRECT`` when ``direct``)."""

    def __init__(self, path: Path, *, direct: bool, size: int = 0, reserve: bool = False):
        self.path = path
        self.direct = direct
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
        self.fd = os.open(path, flags, 0o600)
        self.size = 0
        if size:
            self.resize(size, reserve=reserve)

    def resize(self, size: int, *, reserve: bool = False) -> None:
        """Make the file ``size`` bytes; ``reserve``: allocate its blocks now
        (``posix_fallocate``), so a full disk fails here and not mid-step."""
        try:
            if reserve and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(self.fd, 0, size)
            else:
                os.ftruncate(self.fd, size)
        except OSError as exc:
            raise NvmeOffloadError(f"zerograph: cannot size {self.path} to {size:,} bytes: {exc}") from exc
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Transfer:
    """Reads or writes of several (file, offset, tensor) segments, split into
    requests of at most ``block_size`` bytes; :meth:`wait` blocks until all
    are done and raises the first error."""

    def __init__(self, io: "FileIO", write: bool, segments):
        self.io, self.write = io, write
        self._keep = [t for _, _, t in segments]  # the buffers stay alive until done
        self._pending = collections.deque()
        block = io.config.block_size
        for file, offset, tensor in segments:
            nbytes = tensor.numel() * tensor.element_size()
            if file.direct and (offset % ALIGN or tensor.data_ptr() % ALIGN):
                raise ValueError(f"zerograph: unaligned O_DIRECT transfer at offset {offset} of {file.path}")
            for start in range(0, nbytes, block):
                self._pending.append((file, offset + start, tensor.data_ptr() + start, min(block, nbytes - start)))
        self._lock = threading.Lock()
        self._in_flight = 0
        self._closed = False  # finished once, under the lock
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.nbytes = sum(n for *_, n in self._pending)
        self.requests = len(self._pending)
        io._started(self)
        self._pump()

    def _pump(self) -> None:
        depth = self.io.config.queue_depth
        with self._lock:
            if not self.io.config.overlap_events and self._in_flight:
                return  # waves: the next one starts when this one is done
            batch = []
            while self._pending and self._in_flight < depth and self._error is None:
                batch.append(self._pending.popleft())
                self._in_flight += 1
            finished = not self._in_flight and (not self._pending or self._error is not None) and not self._closed
            self._closed = self._closed or finished
        for request in batch:
            self.io._pool.submit(self._run, *request)
        if finished:
            self._finish()

    def _run(self, file: SwapFile, offset: int, address: int, nbytes: int) -> None:
        try:
            view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
            done = 0
            while done < nbytes:
                call = os.pwritev if self.write else os.preadv
                moved = call(file.fd, [view[done:]], offset + done)
                if moved <= 0:
                    raise NvmeOffloadError(f"zerograph: {file.path} ended at byte {offset + done:,} "
                                           f"while reading {nbytes:,} bytes at {offset:,}")
                done += moved
        except BaseException as exc:  # reported to the waiter
            if not isinstance(exc, NvmeOffloadError):
                what = "writing" if self.write else "reading"
                exc = NvmeOffloadError(f"zerograph: {what} {nbytes:,} bytes at offset {offset:,} of {file.path} "
                                       f"failed: {exc}")
            with self._lock:
                self._error = self._error or exc
        with self._lock:
            self._in_flight -= 1
        self._pump()

    def _finish(self) -> None:
        self.io._finished(self)
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        if not self._done.is_set():
            start = time.perf_counter()
            self._done.wait()
            self.io._waited(time.perf_counter() - start)
        if self._error is not None:
            raise self._error


class FileIO:
    """A thread pool that moves tensors to and from :class:`SwapFile` s."""

    def __init__(self, config: IOConfig, name: str = "zerograph-nvme"):
        self.config = config
        self._pool = ThreadPoolExecutor(max(1, config.threads), thread_name_prefix=name)
        self.stats = IOStats()
        self._lock = threading.Lock()
        self._active = 0
        self._busy_since = 0.0

    def read(self, segments) -> Transfer:
        """Fill each tensor of ``segments`` ((file, offset, tensor), ...) from its file."""
        return Transfer(self, False, segments)

    def write(self, segments) -> Transfer:
        return Transfer(self, True, segments)

    def _started(self, transfer: Transfer) -> None:
        with self._lock:
            if transfer.write:
                self.stats.write_bytes += transfer.nbytes
                self.stats.write_requests += transfer.requests
            else:
                self.stats.read_bytes += transfer.nbytes
                self.stats.read_requests += transfer.requests
            if self._active == 0:
                self._busy_since = time.perf_counter()
            self._active += 1

    def _finished(self, transfer: Transfer) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self.stats.busy_s += time.perf_counter() - self._busy_since

    def _waited(self, seconds: float) -> None:
        with self._lock:
            self.stats.waited_s += seconds

    def close(self) -> None:
        self._pool.shutdown(wait=True)


# --------------------------------------------------------------------------- the swap directory

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SwapDir:
    """``<nvme_path>/zerograph-<model tag>-rank<global rank>/<kind>``: this
    rank's files of one kind ("optimizer", "params"), created fresh, removed
    by :meth:`close` (called at a clean exit).

    The rank directory holds a lock file with the owning process id and host;
    a live owner other than this process is an error, a dead one's leftovers
    are removed. Errors name the path, the bytes needed and the key to
    change; they are raised before training starts (when the model is
    sharded, or the optimizer built)."""

    def __init__(self, nvme_path, *, key: str, tag: str, rank: int, kind: str, needed_bytes: int):
        if not nvme_path:
            raise NvmeOffloadError(f"zerograph: {key}.device is \"nvme\" but {key}.nvme_path is not set; set it to "
                                   f"a directory on a local NVMe drive ({needed_bytes:,} bytes needed on rank {rank})")
        base = Path(nvme_path)
        self.key, self.needed_bytes = key, needed_bytes
        if not base.is_dir():
            what = "does not exist" if not base.exists() else "is not a directory"
            raise NvmeOffloadError(f"zerograph: {key}.nvme_path {base} {what}; create it (rank {rank} needs "
                                   f"{needed_bytes:,} bytes there) or point {key}.nvme_path at an existing directory")
        probe = base / f".zerograph-write-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError as exc:
            raise NvmeOffloadError(f"zerograph: {key}.nvme_path {base} is not writable by this process "
                                   f"({exc.strerror}); rank {rank} needs to write {needed_bytes:,} bytes there. Fix "
                                   "its permissions or choose another directory") from exc
        self.rank_dir = base / f"zerograph-{tag.replace('/', '_')}-rank{rank}"
        self._lock()
        self.path = self.rank_dir / kind
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        free = shutil.disk_usage(self.path).free
        if free < needed_bytes:
            self.close()
            raise NvmeOffloadError(
                f"zerograph: not enough space in {key}.nvme_path {base}: rank {rank} needs {needed_bytes:,} bytes "
                f"for its {kind} files, {free:,} are free. Free space there, point {key}.nvme_path at a larger "
                "drive, or shard over more ranks")
        self.direct = direct_io_supported(self.path)
        if not self.direct:
            log.info("zerograph: %s does not accept O_DIRECT; NVMe offload uses buffered I/O there", self.path)

    def _lock(self) -> None:
        lock = self.rank_dir / LOCK_NAME
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(3):
            try:
                self.rank_dir.mkdir(exist_ok=True)
                fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                try:
                    owner = lock.read_text().split()
                except FileNotFoundError:
                    continue
                pid, host = (int(owner[0]), owner[1]) if len(owner) == 2 and owner[0].isdigit() else (-1, "")
                if pid == os.getpid() and host == socket.gethostname():
                    return  # this process's other kind of files
                if host == socket.gethostname() and not _pid_alive(pid):
                    log.warning("zerograph: removing %s, left by process %d, which has ended", self.rank_dir, pid)
                    shutil.rmtree(self.rank_dir, ignore_errors=True)
                    continue
                raise NvmeOffloadError(
                    f"zerograph: {self.rank_dir} is in use by process {pid} on {host or 'an unknown host'} "
                    f"(lock file {lock}); this run needs {self.needed_bytes:,} bytes there. Stop that run, or give "
                    f"this one another {self.key}.nvme_path") from None
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(me)
                for stale in self.rank_dir.iterdir():  # a fresh directory per run
                    if stale.name != LOCK_NAME:
                        shutil.rmtree(stale, ignore_errors=True)
                return
        raise NvmeOffloadError(f"zerograph: cannot take the lock {lock}")

    def file(self, name: str, *, size: int = 0, reserve: bool = False, direct: bool | None = None) -> SwapFile:
        return SwapFile(self.path / name, direct=self.direct if direct is None else direct, size=size,
                        reserve=reserve)

    def close(self) -> None:
        """Remove this kind's files, and the rank directory once no kind is left."""
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            left = [p.name for p in self.rank_dir.iterdir()]
        except FileNotFoundError:
            return
        if left == [LOCK_NAME]:
            (self.rank_dir / LOCK_NAME).unlink(missing_ok=True)
            try:
                self.rank_dir.rmdir()
            except OSError:
                pass


def global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

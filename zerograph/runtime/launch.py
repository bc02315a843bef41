"""Spawn N local processes with a gloo (CPU) or NCCL process group.

Used by the demo, the tests and the benchmarks. Each rank runs
``fn(*args)`` after the default process group is up; the return values come
back as a list indexed by rank. A rank that raises ends the whole group with
an error naming the rank; a group that runs past ``timeout`` is killed and
reported, never left hanging.
"""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


# How ranks start: a new interpreter each, or forked from a server that imported torch once.
START_METHODS = ("spawn", "forkserver")
# Environment variable naming spawn's default start method (the tests set forkserver).
START_METHOD_ENV = "ZEROGRAPH_START_METHOD"


def default_start_method() -> str:
    """``$ZEROGRAPH_START_METHOD`` if set, else ``"spawn"``."""
    method = os.environ.get(START_METHOD_ENV) or "spawn"
    if method not in START_METHODS:
        raise ValueError(f"{START_METHOD_ENV}={method!r}: must be one of {START_METHODS}")
    return method


class RankFailed(RuntimeError):
    """A spawned rank raised (``traceback`` holds its text) or died (``exitcode``)."""

    def __init__(self, message: str, rank: int | None = None, exitcode: int | None = None, traceback: str = ""):
        super().__init__(message)
        self.rank, self.exitcode, self.traceback = rank, exitcode, traceback


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, timeout_s, fn, args, results, environ=None):
    if environ is not None:  # forkserver: the caller's environment, as a spawned process would inherit it
        os.environ.clear()
        os.environ.update(environ)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    import torch.distributed as dist

    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        out = fn(*args)
        buf = io.BytesIO()
        torch.save(out, buf)  # plain bytes: no shared-memory handles that die with this process
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    backend: str | None = None,
    raise_on_failure: bool = True,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` fresh local processes; return each rank's result.

    ``timeout`` bounds the whole run and is the process group's timeout.
    With ``raise_on_failure=False`` a rank that raises or dies does not end
    the others: its entry in the result is a :class:`RankFailed` (with
    ``rank``, ``exitcode`` and the rank's traceback text), and spawn waits
    for the remaining ranks (fault-injection tests use this).

    ``start_method``: ``"spawn"`` (the default, or ``$ZEROGRAPH_START_METHOD``)
    starts a new interpreter per rank. ``"forkserver"`` forks each rank from a
    server process that imported the modules named by
    ``multiprocessing.set_forkserver_preload`` once (by default the caller's
    ``__main__``) instead of importing torch again in each (seconds of CPU per
    rank); the ranks see the caller's ``os.environ`` as spawned ones do, but
    what only takes effect at process start (glibc's ``MALLOC_*``) does not."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    start_method = start_method or default_start_method()
    if start_method not in START_METHODS:
        raise ValueError(f"start_method must be one of {START_METHODS}, got {start_method!r}")
    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo")
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    environ = dict(os.environ) if start_method == "forkserver" else None
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, timeout, fn, args, results, environ),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(out))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out and p.exitcode not in (0, None)]
                if dead:
                    time.sleep(0.5)  # let a final message arrive
                    if results.empty():
                        failure = RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}",
                                             rank=dead[0], exitcode=procs[dead[0]].exitcode)
                        if raise_on_failure:
                            raise failure from None
                        out[dead[0]] = failure
                continue
            if status == "error":
                failure = RankFailed(f"rank {rank} failed:\n{value}", rank=rank, traceback=value)
                if raise_on_failure:
                    raise failure
                out[rank] = failure
                continue
            out[rank] = torch.load(io.BytesIO(value), weights_only=False)
        return [out[r] for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()

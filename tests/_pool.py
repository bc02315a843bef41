"""Long-lived gloo rank processes that run many test bodies without respawning.

``run(fn, world, *args, timeout=...)`` is ``zerograph.runtime.launch.spawn``
for tests: it calls the importable module-level function ``fn(*args)`` on
every rank of a ``world``-rank gloo group on 127.0.0.1 and returns each
rank's result, indexed by rank; a rank that raises fails the call with
``RankFailed`` holding that rank's traceback. What it saves is the cost of a
fresh interpreter per test (importing torch, zerograph and transformers,
initializing the group): a pool of ranks is started lazily per world size and
kept for the session (PyTorch's own distributed test cases reuse processes in
the same way).

The ranks start as ``launch.spawn``'s do: forked from the forkserver into
which tests/conftest.py preloads torch, zerograph and transformers (``spawn``,
a new interpreter each, where ``ZEROGRAPH_START_METHOD`` says so). A forked
rank that dies of a signal (abort, segfault, bus error: a crash in C) does not
fail the call at once: the pool switches to new interpreters and runs the same
call again, where it must pass; the summary line names the crash. (One forked
pool rank died of glibc's "malloc(): unaligned tcache chunk detected" in 3
full runs, cause unknown; docs/testing.md.)

Every call has a timeout. A call that times out, a rank that dies, and a rank
that raises (the others may be blocked in a collective, the group unusable)
tear the pool down (the processes are killed); the next call starts a fresh
one. So do a pytest timeout or an interrupt while a call runs.

Between bodies each rank (see ``_Isolation``) resets Dynamo, collects
garbage, reseeds the RNGs (a fresh process starts from a random seed too),
restores ``os.environ``, logging, warning filters, Dynamo's and Inductor's
configs, torch's global modes and the default group's timeout, destroys every process group
the body made, and clears zerograph's rank-liveness marks in the store; what
survives all that is frozen out of the garbage collector's walks (``gc.freeze``). The
default process group stays up and is the same for every body. A rank that
finds the default group gone, a zerograph heartbeat thread still running
(a model that outlived its test) or its memory above ``MAX_RSS_BYTES``
reports it, and the pool is restarted before the next call.

Use fresh ``spawn`` instead for a test that kills or stops ranks, needs a
process group timeout or environment set at initialization, or claims
something about new processes (fault injection, resume in new processes).
"""

from __future__ import annotations

import atexit
import datetime
import gc
import io
import logging
import os
import pickle
import queue as queue_mod
import random
import signal
import sys
import threading
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from zerograph.runtime.launch import RankFailed, default_start_method, free_port

log = logging.getLogger("tests.pool")

# The default group's timeout: a hung collective fails on its own well after
# every call's timeout has torn the pool down (the call's timeout decides).
GROUP_TIMEOUT_S = 1800.0
# Most rank processes kept alive at once (an idle rank holds ~0.5-1 GiB): 1 + 2 + 4,
# so the pools of every world size CI uses stay up together.
MAX_LIVE_RANKS = 7
# A rank using more memory than this after a body gets replaced.
MAX_RSS_BYTES = 3 * 2**30
# A rank that died of one of these crashed in C code (abort, segfault, bus error).
_CRASH_EXITCODES = (-signal.SIGABRT, -signal.SIGSEGV, -signal.SIGBUS)
# zerograph's RankMonitor keys in the default store that outlive a model
# (zerograph/runtime/dist.py); heartbeat counters only ever grow, and are compared as deltas.
_LIVENESS_PREFIX = "zerograph/heartbeat/"
_LIVENESS_MARKS = ("failed", "checked")


# --------------------------------------------------------------------------- rank side


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _logging_state():
    loggers = {"": logging.getLogger()}
    loggers.update((name, lg) for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger))
    state = {name: (lg, list(lg.handlers), lg.level, lg.propagate, lg.disabled) for name, lg in loggers.items()}
    return state, logging.root.manager.disable


def _restore_logging(saved) -> None:
    state, disable = saved
    logging.disable(disable)
    for name, lg in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and name not in state:  # made by the body: back to a bare logger
            lg.handlers[:] = []
            lg.setLevel(logging.NOTSET)
            lg.propagate, lg.disabled = True, False
    for lg, handlers, level, propagate, disabled in state.values():
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate, lg.disabled = propagate, disabled


def _configs():
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    return [dynamo_config, inductor_config]


class _Isolation:
    """What one body may change in a rank process, saved before it and put back after it."""

    def __init__(self, env: dict[str, str] | None):
        self.environ = dict(os.environ)
        self.logging = _logging_state()
        self.configs = [(cfg, cfg.get_config_copy()) for cfg in _configs()]
        self.torch_modes = (torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads(),
                            torch.are_deterministic_algorithms_enabled(),
                            torch.is_deterministic_algorithms_warn_only_enabled())
        self.warning_filters = warnings.catch_warnings()  # saves the filters, puts them back on exit
        self.warning_filters.__enter__()
        os.environ.update(env or {})

    def restore(self) -> None:
        os.environ.clear()
        os.environ.update(self.environ)
        _restore_logging(self.logging)
        for cfg, values in self.configs:
            for key, value in values.items():
                if getattr(cfg, key) != value:
                    setattr(cfg, key, value)
        grad, dtype, threads, deterministic, warn_only = self.torch_modes
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        self.warning_filters.__exit__(None, None, None)


def _fresh_rngs() -> None:
    """Random seeds, as a new process would have (tests that need determinism seed themselves)."""
    torch.seed()
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def _between_bodies(world_group) -> str:
    """Clean up after a body that returned on every rank; a reason to replace this rank, or ''."""
    import torch.distributed as dist

    from zerograph._torch_private import default_store, process_groups, set_group_timeout

    torch._dynamo.reset()
    gc.collect()
    if not dist.is_initialized() or dist.group.WORLD is not world_group:
        return "the body destroyed or replaced the default process group"
    dist.barrier()  # every rank is done with the groups the body made
    for group in process_groups():
        if group is not world_group:
            dist.destroy_process_group(group)
    set_group_timeout(world_group, GROUP_TIMEOUT_S)  # zerograph sets collective_timeout_s on it
    if dist.get_rank() == 0:
        store = dist.PrefixStore(_LIVENESS_PREFIX, default_store())
        for mark in _LIVENESS_MARKS:
            for r in range(dist.get_world_size()):
                store.delete_key(f"{mark}/{r}")
    dist.barrier()
    beating = [t for t in threading.enumerate() if t.name.startswith("zerograph-heartbeat")]
    for thread in beating:  # a stopped monitor's thread may still be ending its last beat (RankMonitor.stop)
        thread.join(timeout=2.0)
    beating = [t.name for t in beating if t.is_alive()]
    if beating:
        return f"zerograph heartbeat threads still running after the body: {beating} (a model outlived its test)"
    if _rss_bytes() > MAX_RSS_BYTES:
        return f"rank memory {_rss_bytes() / 2**30:.1f} GiB > {MAX_RSS_BYTES / 2**30:.1f} GiB"
    _freeze_survivors()
    return ""


def _freeze_survivors() -> None:
    """Collect, then move every object still alive (modules, torch's
    registries, what imports made) out of the garbage collector's view
    (``gc.freeze``): later collections walk only what later bodies allocate.
    With torch, zerograph and transformers loaded, a full collection walks
    ~0.5 M objects (0.2-0.3 s of CPU), and the harness collects after every
    model it trains, this module after every body. Cheap after the first
    time (the frozen objects are not walked). What a later body drops of the
    frozen objects is not reclaimed; the memory check above bounds that."""
    gc.collect()
    gc.freeze()


def _rank_main(rank: int, world: int, port: int, commands, results, environ: dict[str, str]) -> None:
    os.environ.clear()  # a forked rank: the test process's environment, as a new interpreter inherits it
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        world_group = dist.group.WORLD
    except BaseException:
        results.put((rank, None, "error", traceback.format_exc(), ""))
        return
    _freeze_survivors()
    results.put((rank, None, "ready", b"", ""))
    while True:
        message = commands.get()
        call, payload = message
        isolation = None
        try:
            fn, args, env = pickle.loads(payload)
            isolation = _Isolation(env)
            _fresh_rngs()
            torch._dynamo.reset()
            out = fn(*args)
            buf = io.BytesIO()
            torch.save(out, buf)  # plain bytes, as spawn sends them
            del out, fn, args
        except BaseException:  # report everything; the pool is torn down after an error
            results.put((rank, call, "error", traceback.format_exc(), ""))
            continue
        finally:
            if isolation is not None:
                isolation.restore()
        try:
            replace = _between_bodies(world_group)
        except BaseException:
            results.put((rank, call, "error", "cleaning up after the body failed:\n" + traceback.format_exc(), ""))
            continue
        results.put((rank, call, "ok", buf.getvalue(), replace))


# --------------------------------------------------------------------------- test side


class RankPool:
    """``world`` long-lived gloo ranks; see the module docstring."""

    def __init__(self, world: int, start_method: str | None = None):
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world}")
        self.world = world
        # as launch.spawn: the tests set forkserver (conftest.py), whose server preloaded torch and zerograph
        self.start_method = start_method or default_start_method()
        self.procs: list = []
        self.calls = 0
        self.starts = 0
        self.stops: list[str] = []  # why the ranks were killed before the end of the session

    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def _start(self, deadline: float) -> None:
        ctx = mp.get_context(self.start_method)
        self.results = ctx.Queue()
        self.commands = [ctx.SimpleQueue() for _ in range(self.world)]
        port = free_port()
        self.procs = [ctx.Process(target=_rank_main, args=(r, self.world, port, self.commands[r], self.results,
                                                                dict(os.environ)),
                                  daemon=True, name=f"pool-{self.world}-rank{r}") for r in range(self.world)]
        for p in self.procs:
            p.start()
        self.starts += 1
        self._collect(None, deadline, "starting the ranks")

    def close(self) -> None:
        """Kill the ranks: they hold nothing to save, and a graceful exit of a
        process with torch loaded takes seconds."""
        procs, self.procs = self.procs, []
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()

    def _collect(self, call: int | None, deadline: float, what: str) -> tuple[dict[int, Any], list[str]]:
        out: dict[int, Any] = {}
        replace: list[str] = []
        while len(out) < self.world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(self.world)) - set(out))
                raise TimeoutError(f"ranks {missing} did not finish within the call's timeout ({what})")
            try:
                rank, got_call, status, value, reason = self.results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in out]
                if dead:
                    time.sleep(0.5)  # let a final message arrive
                    if self.results.empty():
                        code = self.procs[dead[0]].exitcode
                        raise RankFailed(f"rank {dead[0]} died with exit code {code}", rank=dead[0], exitcode=code)
                continue
            if got_call != call:
                continue  # cannot happen: a pool is torn down after every failed call
            if status == "error":
                raise RankFailed(f"rank {rank} failed:\n{value}", rank=rank, traceback=value)
            out[rank] = value
            if reason:
                replace.append(f"rank {rank}: {reason}")
        return out, replace

    def run(self, fn: Callable[..., Any], args: tuple, timeout: float, env: dict[str, str] | None = None) -> list:
        try:
            return self._run(fn, args, timeout, env)
        except RankFailed as exc:
            if self.start_method == "spawn" or exc.exitcode not in _CRASH_EXITCODES:
                raise
            # A forked rank crashed in C (once: glibc's "malloc(): unaligned tcache chunk detected",
            # docs/testing.md). The same call runs again in new interpreters, where it must pass, and
            # this pool starts new interpreters from now on; the summary line names the crash.
            what = f"{getattr(fn, '__qualname__', fn)}: rank {exc.rank} (forked) died of signal {-exc.exitcode}"
            log.warning("%s; running the call again in new interpreters", what)
            self.stops.append(f"{what}; the call ran again in new interpreters")
            self.start_method = "spawn"
            return self._run(fn, args, timeout, env)

    def _run(self, fn: Callable[..., Any], args: tuple, timeout: float, env: dict[str, str] | None) -> list:
        deadline = time.monotonic() + timeout
        payload = pickle.dumps((fn, args, env))  # a function that cannot be pickled fails here, in the test
        ok = False
        try:
            if not self.alive():
                self.close()
                self._start(deadline)
            self.calls += 1
            for q in self.commands:
                q.put((self.calls, payload))
            out, replace = self._collect(self.calls, deadline, f"{getattr(fn, '__qualname__', fn)}, {timeout:.0f} s")
            ok = True
        except BaseException as exc:
            self.stops.append(f"{type(exc).__name__} in {getattr(fn, '__qualname__', fn)}")
            raise
        finally:
            if not ok:  # timeout, dead or failed rank, pytest-timeout, Ctrl-C: the group may be unusable
                self.close()
        if replace:
            log.info("restarting the world-%d pool: %s", self.world, "; ".join(replace))
            self.stops.append("; ".join(replace))
            self.close()
        return [torch.load(io.BytesIO(out[r]), weights_only=False) for r in range(self.world)]


_POOLS: dict[int, RankPool] = {}


def run(fn: Callable[..., Any], world: int, *args: Any, timeout: float, env: dict[str, str] | None = None) -> list:
    """``fn(*args)`` on every rank of the pool of ``world`` ranks; each rank's result, by rank.

    Like ``spawn(fn, world, *args, timeout=timeout)``, in processes that stay up
    between calls. ``env``: environment variables set on the ranks for this call only."""
    pool = _POOLS.pop(world, None) or RankPool(world)
    for other in list(_POOLS.values()):  # least recently used first
        if sum(p.world for p in _POOLS.values() if p.alive()) + world <= MAX_LIVE_RANKS:
            break
        other.close()
    _POOLS[world] = pool  # now the most recently used
    return pool.run(fn, args, timeout, env)


def close_all() -> None:
    """Stop every pool (the end of the session)."""
    for pool in _POOLS.values():
        pool.close()


def summary() -> str:
    """One line per world size: calls, starts and why ranks were killed early."""
    lines = []
    for world, pool in sorted(_POOLS.items()):
        stops = f"; killed: {' | '.join(pool.stops)}" if pool.stops else ""
        lines.append(f"rank pool, world {world}: {pool.calls} calls, {pool.starts} start(s){stops}")
    return "\n".join(lines)


atexit.register(close_all)

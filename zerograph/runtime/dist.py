"""Process groups and device meshes.

zerograph uses an already initialized default process group; otherwise it
initializes one from the torchrun environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); with neither it runs as a single process
(world size 1, no process group, no collectives). The backend is NCCL when
CUDA is available and gloo otherwise.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import logging
import os
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataParallelGroup:
    """The data-parallel ranks a model is sharded over."""

    rank: int
    world_size: int
    device: torch.device
    mesh: object | None  # torch.distributed.device_mesh.DeviceMesh, None for world size 1
    group_name: str  # "" for world size 1

    @property
    def group(self):
        return None if self.mesh is None else self.mesh.get_group()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the default group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device(requested: str | None = None, model_device: torch.device | None = None) -> torch.device:
    """Where this rank's shards live.

    ``requested`` (config ``zerograph.device``) wins. Otherwise the process
    group decides: NCCL uses the current CUDA device, gloo the CPU (gloo
    cannot reduce-scatter CUDA tensors). Without a group, or with another
    backend (the fake test backend), the model stays where it is.
    """
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if dist.is_initialized():
        backend = str(dist.get_backend()).lower()
        if backend == "nccl" and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if backend == "gloo":
            return torch.device("cpu")
    return model_device if model_device is not None else torch.device("cpu")


def ensure_process_group(timeout_s: float) -> None:
    """Initialize the default process group from torchrun's environment if needed."""
    if dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    log.info("initializing process group (%s) from the environment", backend)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


@dataclasses.dataclass(frozen=True)
class SequenceParallelGroup:
    """This rank's sequence-parallel group: ``world_size`` ranks that each
    hold ``1/world_size`` of every sequence."""

    rank: int  # this rank's sp index
    world_size: int  # sp
    mesh: object  # the DeviceMesh with an "sp" dimension: ("dp", "sp"), or ("pp", "dp", "sp") with stages
    group_name: str

    @property
    def group(self):
        return self.mesh["sp"].get_group()


@dataclasses.dataclass(frozen=True)
class PipelineGroups:
    """This rank's place on the (pipeline x data-parallel x sequence-parallel x
    tensor-parallel) mesh, as pipeline stages read it
    (:func:`zerograph.runtime.mesh.build_mesh` makes it).

    Global rank ``r = ((stage * dp + dp_index) * sp + sp_index) * tp + tp_index``
    (the plan's ``("pp", "dp", "sp", "tp")`` order,
    :class:`zerograph.runtime.plan.DeviceMeshPlan`): each stage's ``dp``
    ranks of one (sp, tp) index form its data-parallel group, its ``tp``
    ranks of one (dp, sp) index its tensor-parallel group, its ``sp`` ranks of
    one (dp, tp) index its sequence-parallel group, and the ranks with the
    same (dp, sp, tp) indices form one pipeline (stages exchange activations,
    sequence shards with sp, with the same indices). ZeRO shards over the
    stage's dp ranks of one tp index, with sp over its dp x sp ranks (``zero``).
    """

    stage: int
    stages: int
    dp: DataParallelGroup
    tp: "TensorParallelGroup | None" = None  # None: no tensor parallelism (tp = 1)
    sp: SequenceParallelGroup | None = None  # None: no sequence parallelism (sp = 1)
    zero: DataParallelGroup | None = None  # with sp: the stage's dp x sp ranks of one tp index, which ZeRO shards over

    @property
    def mesh(self):
        """The mesh as the plan names it (:class:`zerograph.runtime.plan.DeviceMeshPlan`)."""
        from zerograph.runtime.plan import MESH_DIMS, DeviceMeshPlan

        tp, tp_index = (self.tp.world_size, self.tp.rank) if self.tp is not None else (1, 0)
        sp, sp_index = (self.sp.world_size, self.sp.rank) if self.sp is not None else (1, 0)
        sizes = {"pp": self.stages, "dp": self.dp.world_size, "sp": sp, "tp": tp}
        coords = {"pp": self.stage, "dp": self.dp.rank, "sp": sp_index, "tp": tp_index}
        return DeviceMeshPlan(sizes=tuple((d, sizes.get(d, 1)) for d in MESH_DIMS),
                              coords=tuple((d, coords.get(d, 0)) for d in MESH_DIMS))

    def rank_of(self, stage: int, **coords: int) -> int:
        """The global rank of ``stage`` in this rank's pipeline (this rank's
        dp, sp and tp indices unless ``coords`` give others)."""
        return self.mesh.global_rank(pp=stage, **coords)

    @property
    def group(self):
        """Every rank of this rank's stage (dp x sp x tp): the stage model's group."""
        if self.tp is not None:
            return self.tp.model_group
        return self.zero.group if self.zero is not None else self.dp.group


def apply_collective_timeout(group, timeout_s: float) -> None:
    """Make collectives on ``group`` fail after ``timeout_s`` seconds
    (config ``zerograph.collective_timeout_s``) instead of the process
    group's own default (30 min for gloo, 10 min for NCCL), also when the
    user initialized the group."""
    from zerograph._torch_private import set_group_timeout

    if str(dist.get_backend(group)) not in ("gloo", "nccl"):  # e.g. the fake test backend: no timeouts
        return
    try:
        set_group_timeout(group, timeout_s)
    except (RuntimeError, ValueError, AttributeError) as exc:  # a backend without settable timeouts
        log.warning("zerograph: could not set the collective timeout to %.0f s on %s: %s", timeout_s, group, exc)
        return
    log.debug("zerograph: collective timeout %.1f s on group %s", timeout_s, getattr(group, "group_name", group))


class StoreUnreachable(RuntimeError):
    """The process group's key-value store did not answer (in time)."""


def store_host_description() -> str:
    """Which process serves the default process group's store, in words."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    where = f" at {addr}:{port}" if addr and port else ""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return f"the store{where} (served by torchrun's agent on the first node)"
    return f"the store{where} (served by the process of global rank 0)"


def call_with_deadline(fn, deadline_s: float, what: str):
    """``fn()``, or :class:`StoreUnreachable` when it has not returned
    within ``deadline_s`` seconds or raised.

    Store calls block without a bound while the store's host is stopped
    (SIGSTOP, a frozen node): a TCPStore's own timeout covers waits for
    keys, not a request whose answer never comes. ``fn`` runs on a daemon
    thread; on a timeout that thread is left blocked (it ends with the
    process), and the caller goes on."""
    box: dict[str, object] = {}

    def target():
        try:
            box["value"] = fn()
        except Exception as exc:  # noqa: BLE001 -- handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="zerograph-store-call", daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        raise StoreUnreachable(f"{store_host_description()} did not answer {what} within {deadline_s:.1f} s")
    if "error" in box:
        raise StoreUnreachable(f"{store_host_description()} did not answer {what}: {box['error']}") from box["error"]
    return box.get("value")


def heartbeat_interval_s(timeout_s: float) -> float:
    """Seconds between heartbeats for ``zerograph.collective_timeout_s``:
    ``timeout_s / 20``, between 0.05 s and 1 s."""
    return min(1.0, max(0.05, timeout_s / 20))


def detection_margin_s(timeout_s: float) -> float:
    """How long after ``zerograph.collective_timeout_s`` every surviving rank
    has raised, at most, when a rank died, froze or is stuck elsewhere:
    the heartbeat watch (4 intervals: ``timeout_s / 5``, at most 4 s), plus
    one store deadline (``max(1 s, 2 intervals)``) for the case that the
    store's host is the rank that froze, plus the wait of rank 0 (which
    serves the store) for the ranks still checking (at most 2 intervals).
    docs/troubleshooting.md#a-rank-died."""
    interval = heartbeat_interval_s(timeout_s)
    return 6 * interval + store_deadline_s(interval)


def store_deadline_s(interval_s: float) -> float:
    """The longest a failure check waits for one answer of the store."""
    return max(1.0, 2 * interval_s)


def _beat(store, key: str, interval_s: float, stop: threading.Event) -> None:
    while True:
        try:
            store.add(f"beat/{key}", 1)
        except Exception as exc:  # the store is gone (its host died) or the group was destroyed
            log.debug("zerograph: heartbeat %s stopped: %s", key, exc)
            return
        if stop.wait(interval_s):
            return


class RankMonitor:
    """Liveness of a process group's ranks, through its key-value store.

    A daemon thread adds 1 to ``zerograph/heartbeat/beat/<global rank>`` in the
    default group's store every ``interval_s`` seconds while this object
    lives. The thread keeps beating while the main thread is blocked in a
    collective (gloo and NCCL release the GIL while they wait), so after a
    collective fails, :meth:`unresponsive` tells a dead or frozen process
    (counter stopped) from a slow one (counter moving). Each zerograph model
    owns one; :meth:`stop` (also run when the model is garbage-collected)
    ends the thread. Every store call of the check has a deadline
    (:func:`store_deadline_s`): a stopped store host cannot hang it.
    """

    PREFIX = "zerograph/heartbeat/"

    def __init__(self, ranks: list[int], interval_s: float = 1.0, store=None):
        from zerograph._torch_private import default_store

        self.ranks = list(ranks)
        self.rank = dist.get_rank()
        self.interval_s = interval_s
        self.deadline_s = store_deadline_s(interval_s)
        self._store = dist.PrefixStore(self.PREFIX, store if store is not None else default_store())
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_beat, args=(self._store, str(self.rank), interval_s, self._stop),
            name=f"zerograph-heartbeat-{self.rank}", daemon=True,
        )
        self._thread.start()
        # a daemon thread inside a store call while the interpreter finalizes can abort the process
        # ("terminate called without an active exception"): end it before that
        atexit.register(self._stop_and_join)

    def _stop_and_join(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.deadline_s)

    @classmethod
    def for_group(cls, group, timeout_s: float) -> "RankMonitor":
        """A monitor of ``group``'s ranks whose check fits well inside ``timeout_s``."""
        return cls(dist.get_process_group_ranks(group), heartbeat_interval_s(timeout_s))

    def stop(self) -> None:
        self._stop.set()
        atexit.unregister(self._stop_and_join)

    def _read(self, kind: str) -> dict[int, int]:
        return call_with_deadline(lambda: {r: int(self._store.add(f"{kind}/{r}", 0)) for r in self.ranks},
                                  self.deadline_s, f"a read of the {kind} counters")

    def _mark(self, kind: str) -> None:
        call_with_deadline(lambda: self._store.add(f"{kind}/{self.rank}", 1), self.deadline_s,
                           f"a write of this rank's {kind} counter")

    def unresponsive(self, wait_s: float | None = None, linger_s: float | None = None) -> dict[int, str]:
        """After a failed collective: the ranks (global) that are gone, each
        with how (``"stopped"``: its heartbeat stopped; ``"never started"``:
        it never had one, i.e. never reached zerograph.compile/shard).

        This rank records that it saw the failure, then watches the
        heartbeats for ``wait_s`` seconds (default: 4 intervals). A rank is
        gone when its heartbeat did not move and it did not record a failure
        of its own (a survivor that already reported and exited is not
        counted). The rank that serves the store then waits up to
        ``linger_s`` (default: 2 intervals past the others' watch) for the
        ranks that recorded a failure to finish this check, so its exit does
        not look like a death to them; a rank stuck elsewhere is not waited
        for. Raises :class:`StoreUnreachable` when the store does not answer
        within its deadline (its host died or froze)."""
        wait_s = 4 * self.interval_s if wait_s is None else wait_s
        linger_s = wait_s + 2 * self.interval_s if linger_s is None else linger_s
        self._mark("failed")
        before = self._read("beat")
        time.sleep(wait_s)
        after, reported = self._read("beat"), self._read("failed")
        gone = {r: ("never started" if after[r] == 0 else "stopped") for r in self.ranks
                if r != self.rank and after[r] == before[r] and not reported[r]}
        self._mark("checked")
        if linger_s > 0 and self.rank == 0 and "torchrun's agent" not in store_host_description():
            deadline = time.monotonic() + linger_s
            while time.monotonic() < deadline:
                checked, reported = self._read("checked"), self._read("failed")
                if all(checked[r] >= reported[r] for r in self.ranks if r not in gone):
                    break
                time.sleep(min(self.interval_s, 0.1))
        return gone


# -- tensor parallelism ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's tensor-parallel group (:func:`zerograph.runtime.mesh.build_mesh`).

    tp is the mesh's innermost dimension: the ranks of one tp group are
    adjacent, so they share a node's fast links. They read the same batch
    rows; ZeRO shards over the ranks with the same tp index."""

    rank: int  # this rank's tp index
    world_size: int  # tp
    # the DeviceMesh ("dp", "tp"), ("pp", "dp", "tp") with pipeline stages, its "dp" being
    # the ranks ZeRO shards over (with sequence parallelism: dp x sp)
    mesh: object
    group_name: str
    stage_group: object = None  # with pipeline stages: the (dp x sp x tp) ranks of this rank's stage

    @property
    def group(self):
        return self.mesh["tp"].get_group()

    @property
    def dp_tp_mesh(self):
        """The 2-D ``("dp", "tp")`` DeviceMesh of this rank's stage: "dp" is
        ZeRO's ranks of each tp index, "tp" this group."""
        return self.mesh["dp", "tp"]

    @property
    def model_group(self):
        """Every rank of the model (dp x sp x tp): the default group, or with
        pipeline stages the ranks of this rank's stage."""
        return self.stage_group if self.stage_group is not None else dist.group.WORLD

"""Process groups and device meshes.

zerograph uses an already initialized default process group; otherwise it
initializes one from the torchrun environment (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``); with neither it runs as a single process
(world size 1, no process group, no collectives). The backend is NCCL when
CUDA is available and gloo otherwise.
"""

from __future__ import annotations

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


def data_parallel_group(
    timeout_s: float = 300.0, device: str | None = None, model_device: torch.device | None = None
) -> DataParallelGroup:
    ensure_process_group(timeout_s)
    device = default_device(device, model_device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return DataParallelGroup(rank=0, world_size=1, device=device, mesh=None, group_name="")
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    apply_collective_timeout(mesh.get_group(), timeout_s)
    return DataParallelGroup(
        rank=dist.get_rank(),
        world_size=world,
        device=device,
        mesh=mesh,
        group_name=mesh.get_group().group_name,
    )


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
    tensor-parallel) mesh.

    Global rank ``r = ((stage * dp + dp_index) * sp + sp_index) * tp + tp_index``
    (the plan's ``("pp", "dp", "sp", "tp")`` order,
    :class:`zerograph.runtime.plan.DeviceMeshPlan`; sp or tp is 1): each
    stage's ``dp`` ranks of one (sp, tp) index form its data-parallel group,
    its ``tp`` ranks of one dp index its tensor-parallel group, its ``sp``
    ranks of one dp index its sequence-parallel group, and the ranks with the
    same (dp, sp, tp) indices form one pipeline (stages exchange activations,
    sequence shards with sp, with the same indices). ZeRO shards over the
    stage's dp ranks, with sp over its dp x sp ranks (``zero``).
    """

    stage: int
    stages: int
    dp: DataParallelGroup
    tp: "TensorParallelGroup | None" = None  # None: no tensor parallelism (tp = 1)
    sp: SequenceParallelGroup | None = None  # None: no sequence parallelism (sp = 1)
    zero: DataParallelGroup | None = None  # with sp: the stage's dp x sp ranks, which ZeRO shards over

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
        dp and tp indices unless ``coords`` give others)."""
        return self.mesh.global_rank(pp=stage, **coords)

    @property
    def group(self):
        """Every rank of this rank's stage (dp x sp x tp): the stage model's group."""
        if self.zero is not None:
            return self.zero.group
        return self.tp.model_group if self.tp is not None else self.dp.group


def pipeline_groups(stages: int, timeout_s: float = 300.0, device: str | None = None,
                    tp: int = 1, sp: int = 1) -> PipelineGroups:
    ensure_process_group(timeout_s)
    dev = default_device(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if sp > 1:
        return _pipeline_sp_groups(stages, sp, timeout_s, dev, world)
    if tp > 1 and (world % (stages * tp) or world < stages * tp):
        from zerograph.config import ConfigError

        raise ConfigError(
            f"pipeline.stages={stages} x tensor_parallel.autotp_size={tp} needs a world size that is a multiple of "
            f"{stages * tp}; this run has {world} rank(s): launch stages x data-parallel x tensor-parallel ranks")
    if world % stages or world < stages:
        raise ValueError(
            f"pipeline.stages={stages} needs a world size that is a multiple of it; this run has "
            f"{world} rank(s): launch stages x data-parallel ranks"
        )
    dp = world // (stages * tp)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world > 1:  # stages exchange activations, tied gradients and the loss on the default group
        apply_collective_timeout(dist.group.WORLD, timeout_s)
    stage, rest = divmod(rank, dp * tp)
    dp_rank, tp_rank = divmod(rest, tp)
    tp_group = None
    if dp == 1 and tp == 1:
        group = DataParallelGroup(rank=0, world_size=1, device=dev, mesh=None, group_name="")
    else:
        from torch.distributed.device_mesh import init_device_mesh

        if tp == 1:
            mesh = init_device_mesh(dev.type, (stages, dp), mesh_dim_names=("pp", "dp"))
        else:
            mesh = init_device_mesh(dev.type, (stages, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
            apply_collective_timeout(mesh["tp"].get_group(), timeout_s)
            stage_group = None
            for s in range(stages):  # every rank creates every stage's (dp x tp) group, in order
                ranks = list(range(s * dp * tp, (s + 1) * dp * tp))
                made = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
                if s == stage:
                    stage_group = made
            tp_group = TensorParallelGroup(rank=tp_rank, world_size=tp, mesh=mesh,
                                           group_name=mesh["tp"].get_group().group_name, stage_group=stage_group)
        if dp == 1:
            group = DataParallelGroup(rank=0, world_size=1, device=dev, mesh=None, group_name="")
        else:
            sub = mesh["dp"]
            apply_collective_timeout(sub.get_group(), timeout_s)
            group = DataParallelGroup(rank=dp_rank, world_size=dp, device=dev, mesh=sub,
                                      group_name=sub.get_group().group_name)
    log.info("pipeline mesh: %d stage(s) x %d data-parallel x %d tensor-parallel rank(s); this rank is stage %d",
             stages, dp, tp, stage)
    return PipelineGroups(stage=stage, stages=stages, dp=group, tp=tp_group)


def _pipeline_sp_groups(stages: int, sp: int, timeout_s: float, dev: torch.device, world: int) -> PipelineGroups:
    """The (pp, dp, sp) mesh: sp ranks adjacent, ZeRO over each stage's dp x sp ranks."""
    from zerograph.config import ConfigError

    if world % (stages * sp):
        raise ConfigError(
            f"pipeline.stages={stages} x sequence_parallel_size={sp} needs a world size that is a multiple of "
            f"{stages * sp}; this run has {world} rank(s): launch stages x data-parallel x sequence-parallel ranks")
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // (stages * sp)
    rank = dist.get_rank()
    stage, rest = divmod(rank, dp * sp)
    dp_rank, sp_rank = divmod(rest, sp)
    apply_collective_timeout(dist.group.WORLD, timeout_s)
    mesh = init_device_mesh(dev.type, (stages, dp, sp), mesh_dim_names=("pp", "dp", "sp"))
    zero_mesh = init_device_mesh(dev.type, (stages, dp * sp), mesh_dim_names=("pp", "dp"))  # a stage's dp x sp
    for sub in (mesh["dp"], mesh["sp"], zero_mesh["dp"]):
        apply_collective_timeout(sub.get_group(), timeout_s)
    group = DataParallelGroup(rank=dp_rank, world_size=dp, device=dev, mesh=mesh["dp"] if dp > 1 else None,
                              group_name=mesh["dp"].get_group().group_name if dp > 1 else "")
    zero = DataParallelGroup(rank=rest, world_size=dp * sp, device=dev, mesh=zero_mesh["dp"],
                             group_name=zero_mesh["dp"].get_group().group_name)
    seq = SequenceParallelGroup(rank=sp_rank, world_size=sp, mesh=mesh, group_name=mesh["sp"].get_group().group_name)
    log.info("pipeline mesh: %d stage(s) x %d data-parallel x %d sequence-parallel rank(s); this rank is stage %d",
             stages, dp, sp, stage)
    return PipelineGroups(stage=stage, stages=stages, dp=group, sp=seq, zero=zero)


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

    @classmethod
    def for_group(cls, group, timeout_s: float) -> "RankMonitor":
        """A monitor of ``group``'s ranks whose check fits well inside ``timeout_s``."""
        return cls(dist.get_process_group_ranks(group), heartbeat_interval_s(timeout_s))

    def stop(self) -> None:
        self._stop.set()

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


# -- tensor parallelism: the 2-D (dp, tp) mesh ---------------------------------

@dataclasses.dataclass(frozen=True)
class TensorParallelGroup:
    """This rank's tensor-parallel group on the 2-D ``(dp, tp)`` mesh (with
    pipeline stages the 3-D ``(pp, dp, tp)`` one, :class:`PipelineGroups`).

    Global rank ``r`` is data-parallel index ``r // tp`` and tensor-parallel
    index ``r % tp`` (tp innermost: the ranks of one tp group are adjacent,
    so they share a node's fast links). The ranks of one tp group read the
    same batch rows; ZeRO shards over the ranks with the same tp index."""

    rank: int  # this rank's tp index
    world_size: int  # tp
    mesh: object  # the DeviceMesh ("dp", "tp"), or ("pp", "dp", "tp") with pipeline stages
    group_name: str
    stage_group: object = None  # with pipeline stages: the (dp x tp) ranks of this rank's stage

    @property
    def group(self):
        return self.mesh["tp"].get_group()

    @property
    def model_group(self):
        """Every rank of the model (dp x tp): the default group, or with
        pipeline stages the ranks of this rank's stage."""
        return self.stage_group if self.stage_group is not None else dist.group.WORLD


def dp_by_inner_mesh(dim: str, size: int, key: str, timeout_s: float, dev: torch.device):
    """A 2-D ``("dp", dim)`` device mesh over every rank, ``dim`` innermost
    (its ranks adjacent), with ``collective_timeout_s`` on both dimensions'
    groups and the default group. ``key``: the config key that set ``size``,
    for the error when ``size`` does not divide the world. Returns the mesh,
    the data-parallel size and this rank's (dp, ``dim``) indices."""
    from zerograph.config import ConfigError

    world = dist.get_world_size() if dist.is_initialized() else 1
    name = key.rsplit(".", 1)[-1]
    if world % size:
        article = "an" if name[0] in "aeiou" else "a"
        raise ConfigError(
            f"{key}={size} does not divide the world size {world}: launch a multiple of {size} ranks "
            f"(world = data-parallel ranks x {name}), or use {article} {name} that divides {world}")
    from torch.distributed.device_mesh import init_device_mesh

    dp = world // size
    mesh = init_device_mesh(dev.type, (dp, size), mesh_dim_names=("dp", dim))
    for sub in ("dp", dim):
        apply_collective_timeout(mesh[sub].get_group(), timeout_s)
    apply_collective_timeout(dist.group.WORLD, timeout_s)
    dp_index, inner_index = divmod(dist.get_rank(), size)
    return mesh, dp, dp_index, inner_index


def data_and_tensor_parallel_groups(
    tp: int, timeout_s: float = 300.0, device: str | None = None, model_device: torch.device | None = None
) -> tuple[DataParallelGroup, TensorParallelGroup]:
    """The data-parallel group ZeRO shards over and the tensor-parallel group,
    from a 2-D ``(dp, tp)`` device mesh over every rank (world = dp x tp)."""
    ensure_process_group(timeout_s)
    dev = default_device(device, model_device)
    mesh, dp, dp_rank, tp_rank = dp_by_inner_mesh("tp", tp, "tensor_parallel.autotp_size", timeout_s, dev)
    if dp == 1:
        dp_group = DataParallelGroup(rank=0, world_size=1, device=dev, mesh=None, group_name="")
    else:
        sub = mesh["dp"]
        dp_group = DataParallelGroup(rank=dp_rank, world_size=dp, device=dev, mesh=sub,
                                     group_name=sub.get_group().group_name)
    tp_group = TensorParallelGroup(rank=tp_rank, world_size=tp, mesh=mesh,
                                   group_name=mesh["tp"].get_group().group_name)
    log.info("tensor-parallel mesh: %d data-parallel x %d tensor-parallel rank(s); this rank is dp %d, tp %d",
             dp, tp, dp_rank, tp_rank)
    return dp_group, tp_group

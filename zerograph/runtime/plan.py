"""The typed parallel plan: the config decoded once, for one model on one rank.

Every module that needs to know what a ZeRO stage means, which mesh
dimensions exist, how a parameter is placed, or whether gradient
synchronisation waits for the accumulation boundary reads a
:class:`ParallelPlan` instead of decoding the config itself::

    plan = ParallelPlan.build(config, mesh_sizes={"pp": 1, "dp": 2}, coords={"dp": 1})
    plan.mesh.size("dp")           # 2
    plan.zero.grad_reduce          # "reduce_scatter" at stages 2 and 3
    plan.zero.regathers_in_backward  # True at stage 3
    plan.placement(numel=4096, dim=2)  # ParamPlacement(storage="sharded", on={"dp": "shard(0)"}, ...)

Mesh dimensions, innermost last: ``("pp", "dp", "sp", "tp")``. Global rank =
``((pp_i * dp + dp_i) * sp + sp_i) * tp + tp_i``. Tensor- and
sequence-parallel ranks of one data-parallel index read the same batch rows.
A new kind of parallelism adds a dimension here (its size, this rank's index,
how parameters are placed on it), not a special case in the modules that use
the plan.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

from zerograph.config import ConfigError

MESH_DIMS = ("pp", "dp", "sp", "tp")

Storage = Literal["replicated", "sharded"]
GradReduce = Literal["all_reduce", "all_reduce_slice", "reduce_scatter"]

# how each ZeRO stage reduces the gradient of a sharded parameter
_GRAD_REDUCE_BY_STAGE: dict[int, GradReduce] = {
    0: "all_reduce", 1: "all_reduce_slice", 2: "reduce_scatter", 3: "reduce_scatter",
}


@dataclasses.dataclass(frozen=True)
class DeviceMeshPlan:
    """Sizes of the named mesh dimensions and this rank's index on each."""

    sizes: tuple[tuple[str, int], ...]
    coords: tuple[tuple[str, int], ...]

    def size(self, dim: str) -> int:
        return dict(self.sizes).get(dim, 1)

    def index(self, dim: str) -> int:
        return dict(self.coords).get(dim, 0)

    @property
    def world_size(self) -> int:
        out = 1
        for _, n in self.sizes:
            out *= n
        return out

    def global_rank(self, **coords: int) -> int:
        """The global rank at ``coords`` (this rank's index on dimensions not given)."""
        rank = 0
        for dim in MESH_DIMS:
            rank = rank * self.size(dim) + coords.get(dim, self.index(dim))
        return rank

    def describe(self) -> str:
        return " x ".join(f"{d}={self.size(d)}" for d in MESH_DIMS if self.size(d) > 1) or "one rank"


@dataclasses.dataclass(frozen=True)
class ZeroPPPlan:
    """ZeRO++ (arXiv 2306.10209) on the data-parallel ranks.

    ``node_size`` consecutive data-parallel ranks form a node (on one machine,
    a simulated one; ``zero_hpz_partition_size``): collectives inside a node
    are *intra-group* traffic, the others *cross-group*."""

    node_size: int = 1  # ranks per node; 1: every rank is its own node
    hpz: bool = False  # secondary shards over the node serve the backward's re-gather
    qwz: bool = False  # the forward's parameter all-gathers send int8 blocks + fp32 scales
    qgz: bool = False  # gradients are reduce-scattered by int8 all-to-alls (two hops with nodes)
    block: int = 256  # elements per quantization block (zerograph.zeropp_block_size)
    weight_bits: int = 8  # qwZ's code: 8 (int8) or 4 (int4, two per byte); zerograph.zeropp_weight_bits
    grad_bits: int = 8  # qgZ's code (zerograph.zeropp_gradient_bits)
    error_feedback: bool = False  # qgZ keeps each message's quantization residual (zerograph.zeropp_error_feedback)

    def node_of(self, dp_index: int) -> int:
        return dp_index // self.node_size


@dataclasses.dataclass(frozen=True)
class ZeroPlan:
    """What the configured ZeRO stage means for states, gradients and gathers."""

    stage: int
    # parameters stored as shards between steps (zerograph keeps them sharded
    # at stages 1-3 and gathers once per forward; stage 0 keeps them whole)
    shards_parameters: bool
    # stage 3: the backward gathers again what it reads (the forward keeps only shards)
    regathers_in_backward: bool
    # the reduction of a sharded parameter's gradient
    grad_reduce: GradReduce
    # stage 3: parameters of at most this many elements stay whole (never gathered)
    persistence_threshold: int
    # offload_param / offload_optimizer device is "cpu" or "nvme" (files behind the host)
    offload_param: bool
    offload_optimizer: bool
    zeropp: ZeroPPPlan = ZeroPPPlan()

    @property
    def shards_optimizer_states(self) -> bool:
        return self.stage >= 1

    @property
    def shards_gradients(self) -> bool:
        return self.stage >= 2


@dataclasses.dataclass(frozen=True)
class ParamPlacement:
    """How one parameter is stored and reduced: ``on`` maps each mesh
    dimension the parameter is split along to its placement."""

    storage: Storage
    grad_reduce: GradReduce
    on: tuple[tuple[str, str], ...]  # (("dp", "shard(0)"),) or () for a whole parameter
    offloaded: bool


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    """The config decoded once: the mesh, the ZeRO plan and the step's accumulation."""

    mesh: DeviceMeshPlan
    zero: ZeroPlan
    accumulation: int  # micro-batches per optimizer step

    @classmethod
    def build(cls, config, mesh_sizes: Mapping[str, int], coords: Mapping[str, int] | None = None) -> "ParallelPlan":
        """``config``: a :class:`zerograph.config.Config`; ``mesh_sizes`` by
        dimension name (missing ones are 1); ``coords``: this rank's index per dimension."""
        unknown = set(mesh_sizes) - set(MESH_DIMS)
        if unknown:
            raise ValueError(f"unknown mesh dimension(s) {sorted(unknown)}; the mesh's dimensions are {MESH_DIMS}")
        coords = dict(coords or {})
        for dim in MESH_DIMS:
            size = mesh_sizes.get(dim, 1)
            if size < 1 or not 0 <= coords.get(dim, 0) < size:
                raise ValueError(f"mesh dimension {dim!r}: index {coords.get(dim, 0)} of size {size}")
        z = config.zero_optimization
        zero = ZeroPlan(
            stage=z.stage,
            shards_parameters=z.stage >= 1,
            regathers_in_backward=z.stage == 3,
            grad_reduce=_GRAD_REDUCE_BY_STAGE[z.stage],
            persistence_threshold=z.stage3_param_persistence_threshold if z.stage == 3 else 0,
            offload_param=z.stage == 3 and z.offload_param.device != "none",
            offload_optimizer=z.offload_optimizer.device != "none",
            zeropp=_zeropp_plan(config, mesh_sizes.get("dp", 1) * mesh_sizes.get("sp", 1)),
        )
        mesh = DeviceMeshPlan(sizes=tuple((d, mesh_sizes.get(d, 1)) for d in MESH_DIMS),
                              coords=tuple((d, coords.get(d, 0)) for d in MESH_DIMS))
        return cls(mesh=mesh, zero=zero, accumulation=config.gradient_accumulation_steps)

    @property
    def dp_size(self) -> int:
        """Ranks ZeRO shards over (and averages gradients over): the
        data-parallel ranks times the sequence-parallel ranks of each, as
        DeepSpeed does (the ranks of one sp group hold the same parameters)."""
        return self.mesh.size("dp") * self.mesh.size("sp")

    @property
    def sp_size(self) -> int:
        """Ranks each sequence is split over (Ulysses; docs/long_sequences.md)."""
        return self.mesh.size("sp")

    @property
    def tp_size(self) -> int:
        """Ranks each tensor-parallel layer is split over."""
        return self.mesh.size("tp")

    def batch_rows(self, global_rows: int) -> slice:
        """The rows of a global batch of ``global_rows`` that this rank reads:
        its data-parallel index's share (the ranks of one tensor- or
        sequence-parallel group read the same rows)."""
        dp, index = self.mesh.size("dp"), self.mesh.index("dp")
        if global_rows % dp:
            raise ValueError(f"a global batch of {global_rows} rows does not split over {dp} data-parallel ranks; "
                             f"use a multiple of {dp}")
        per = global_rows // dp
        return slice(index * per, (index + 1) * per)

    def sequence_slice(self, seq_len: int) -> slice:
        """The positions of a sequence of ``seq_len`` tokens that this rank
        computes: its sequence-parallel index's contiguous share."""
        sp, index = self.sp_size, self.mesh.index("sp")
        if seq_len % sp:
            raise ValueError(f"a sequence of {seq_len} tokens does not split over sequence_parallel_size={sp} ranks; "
                             f"pad the sequences to a multiple of {sp} (labels -100 on the padding)")
        per = seq_len // sp
        return slice(index * per, (index + 1) * per)

    @property
    def defers_grad_sync(self) -> bool:
        """Stages 0 and 1 keep full local gradients, so with accumulation they
        reduce once per optimizer step instead of once per micro-batch."""
        return self.zero.stage <= 1 and self.accumulation > 1 and self.dp_size > 1

    @property
    def grad_scale(self) -> float:
        """What a reduced gradient is multiplied by: the mean over data-parallel
        ranks and micro-batches."""
        return 1.0 / (self.dp_size * self.accumulation)

    def placement(self, numel: int, dim: int) -> ParamPlacement:
        """How a parameter of ``numel`` elements and ``dim`` dimensions is placed."""
        persistent = self.zero.persistence_threshold > 0 and numel <= self.zero.persistence_threshold
        sharded = self.dp_size > 1 and self.zero.shards_parameters and dim >= 1 and not persistent
        return ParamPlacement(
            storage="sharded" if sharded else "replicated",
            grad_reduce=self.zero.grad_reduce if sharded else "all_reduce",
            on=(("dp", "shard(0)"),) if sharded else (),
            offloaded=self.zero.offload_param and dim >= 1 and not persistent,
        )

    def describe(self) -> str:
        return (f"mesh {self.mesh.describe()}; ZeRO stage {self.zero.stage} "
                f"({self.zero.grad_reduce} gradients{', re-gather in backward' if self.zero.regathers_in_backward else ''})")


def _zeropp_plan(config, dp: int) -> ZeroPPPlan:
    """The ZeRO++ settings of ``config`` on ``dp`` data-parallel ranks."""
    z, own = config.zero_optimization, config.zerograph
    hpz_k, node_k = max(1, z.zero_hpz_partition_size), own.ranks_per_node
    if hpz_k > 1 and node_k > 1 and hpz_k != node_k:
        raise ConfigError(
            f"zero_optimization.zero_hpz_partition_size={hpz_k} and zerograph.ranks_per_node={node_k} disagree: "
            "both set the ranks of a node; remove zerograph.ranks_per_node")
    k, key = (hpz_k, "zero_optimization.zero_hpz_partition_size") if hpz_k > 1 else (node_k, "zerograph.ranks_per_node")
    if dp > 1 and k > 1 and dp % k:
        raise ConfigError(
            f"{key}={k} must divide the data-parallel world size {dp} "
            f"(nodes of {k} consecutive ranks); use a divisor of {dp}, or 1 to turn it off")
    if dp <= 1:
        k = 1
    return ZeroPPPlan(node_size=k, hpz=1 < k < dp and z.stage == 3 and hpz_k > 1,
                      qwz=dp > 1 and z.zero_quantized_weights, qgz=dp > 1 and z.zero_quantized_gradients,
                      block=own.zeropp_block_size, weight_bits=own.zeropp_weight_bits,
                      grad_bits=own.zeropp_gradient_bits, error_feedback=own.zeropp_error_feedback)

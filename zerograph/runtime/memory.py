"""Per-rank memory budget: model states, the planner's step peak, and what to
change when they do not fit.

With ``zerograph.memory_limit_bytes`` set, the backend plans every compiled
region (forward and backward together) as soon as its backward graph is
compiled (an inference-only region: its inference graph), adds this rank's
model states, and raises :class:`MemoryBudgetError` before the backward runs
when the total is over the limit. With graph breaks the region is composed
with the step (:func:`zerograph.planner.step_plan.plan_in_step`): the regions
whose forward ran before it in this model call hold their saved values
while it runs, so their held bytes are added to its own peak, read from
their forward graphs (their backward graphs are compiled later). When the
execution order is unknown (not recorded by the runtime; a pipeline stage,
whose context sees neither the rank's other stages nor its micro-batches in
flight) the region is checked on its own, a lower bound, and the message
says so. A ``torch.OutOfMemoryError`` raised while a graph is compiled or
run becomes the same error. Either way the message names the largest
consumer and the config keys that shrink it, with their current values::

    zerograph.MemoryBudgetError: rank 0, region 1: predicted 1.20 GiB > zerograph.memory_limit_bytes 1.00 GiB
      model states (params 0.10 GiB, grads 0.10 GiB, optimizer states 0.20 GiB)   0.40 GiB
      saved by earlier regions (0) for their backward                            0.50 GiB  <- largest
      gathered parameters (peak)                                                 0.10 GiB
      ...
      step peak, all kinds together (own 0.30 GiB + earlier regions')            0.80 GiB
      execution order: forward 0 -> 1, then backward 1 -> 0; ...
    To fit, change: activation_checkpointing.policy (now 'none') to "per_layer" or "memory_budget"; ...

Analysis (what is live, what earlier regions hold) is the planner's
(:mod:`zerograph.planner.liveness`); this module adds the model states,
compares with the limit and words the advice.
"""

from __future__ import annotations

import dataclasses

import torch

from zerograph.config import Config

GIB = float(1 << 30)


class MemoryBudgetError(RuntimeError):
    """The step does not fit this rank's memory (predicted or observed).

    ``budget``: the :class:`Budget` behind the message (``None`` when the
    step was not planned yet)."""

    def __init__(self, message: str, budget: "Budget | None" = None):
        super().__init__(message)
        self.budget = budget


def _shard_bytes(ctx) -> tuple[int, int, int, int]:
    """(bytes of this rank's parameter shards on the device, on the host
    (``offload_param``), Ψ, bytes per master element)."""
    device = host = psi = 0
    master = 4
    for spec in ctx.specs.values():
        size = torch.empty((), dtype=spec.master_dtype).element_size()
        master = size
        psi += spec.numel
        local = spec.numel if spec.storage == "replicated" or not spec.full_shape else spec.local_rows * spec.row_numel
        if spec.offloaded:
            host += local * size
        else:
            device += local * size
    return device, host, psi, master


def _host_step(ctx) -> bool:
    """Whether the optimizer steps on the host (its states live there)."""
    z = ctx.config.zero_optimization
    return z.offload_optimizer.device != "none" or z.offload_param.device != "none"


def model_state_bytes(ctx) -> tuple[dict[str, int], int, int]:
    """This rank's model states in device memory between steps as
    ``({"params", "grads", "optimizer_states"}, Ψ, bytes per master element)``,
    for Adam/AdamW (two moments per element, in the master dtype). Offloaded
    parameter shards and their gradients (``offload_param``) and the states
    of an optimizer that steps on the host (``offload_optimizer`` or
    ``offload_param``, built with ``zerograph.make_optimizer``) are not
    counted: see :func:`host_state_bytes`."""
    device, host, psi, master = _shard_bytes(ctx)
    states = 0 if _host_step(ctx) else 2 * (device + host)
    return {"params": device, "grads": device, "optimizer_states": states}, psi, master


def host_state_bytes(ctx) -> dict[str, int]:
    """This rank's model states in host memory (ZeRO-Offload): offloaded
    parameter shards (not those in the NVMe parameter file) and their
    gradients, and with a host optimizer step its states and the fp32 master
    copies of the shards that stay on the device. What NVMe offload keeps in
    files instead is not counted (``zerograph.planner.nvme.NvmePlan``): the
    shards in the parameter file, and with ``offload_optimizer.device:
    "nvme"`` the states and masters of the sub-groups swapped to disk."""
    device, host, _, master = _shard_bytes(ctx)
    store = getattr(ctx, "nvme_params", None)  # offload_param "nvme": these shards are in a file, not in memory
    in_file = sum(nbytes for _, nbytes in store.layout.values()) if store is not None else 0
    if not _host_step(ctx):
        return {"params": host - in_file, "grads": host, "optimizer_states": 0, "masters": 0}
    states, masters = 2 * (device + host), device // master * 4
    cfg = ctx.config.zero_optimization.offload_optimizer
    if cfg.device == "nvme":  # the swapped sub-groups' share, by elements (sub-groups in parameter order)
        from zerograph.runtime.nvme_optimizer import sub_groups, swapped_groups

        numels = [s.numel if s.storage == "replicated" or not s.full_shape else s.local_rows * s.row_numel
                  for s in ctx.specs.values()]
        cut = sub_groups(numels, ctx.config.zero_optimization.sub_group_size)
        swapped = sum(numels[i] for g in cut[:swapped_groups(len(cut), cfg.ratio)] for i in g)
        kept = 1.0 - swapped / max(1, sum(numels))
        states, masters = int(states * kept), int(masters * kept)
    return {"params": host - in_file, "grads": host, "optimizer_states": states, "masters": masters}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What occupies a rank's memory while one compiled region runs, in bytes."""

    model_states: dict[str, int]
    step_peak: dict[str, int]  # the region's own, by liveness kind: gathered, activation, gradient, other (each on its own)
    step_peak_total: int  # the region's own peak of all kinds together
    # what the regions whose forward ran before it in the step hold for their
    # backward meanwhile (graph breaks), by kind; ``earlier``: their indices
    # in execution order, ``None`` when the order is unknown
    earlier_held: dict[str, int] = dataclasses.field(default_factory=dict)
    earlier: tuple[int, ...] | None = ()
    note: str = ""  # how the region was composed with the others, in words

    @property
    def earlier_held_total(self) -> int:
        return sum(self.earlier_held.values())

    @property
    def composed_peak_total(self) -> int:
        """The step's peak while the region runs: its own + what earlier regions hold."""
        return self.step_peak_total + self.earlier_held_total

    @property
    def total(self) -> int:
        return sum(self.model_states.values()) + self.composed_peak_total


def region_budget(ctx, plan) -> Budget:
    """This rank's model states and ``plan``'s peaks: a
    :class:`~zerograph.planner.step_plan.RegionInStep` (the region composed
    with the regions run before it, :func:`~zerograph.planner.step_plan.plan_in_step`)
    or a :class:`~zerograph.planner.liveness.RegionPlan` (on its own)."""
    states, _, _ = model_state_bytes(ctx)
    if not hasattr(plan, "earlier_held"):  # a RegionPlan: the region alone
        return Budget(states, dict(plan.peak), plan.peak_total)
    own = plan.region
    return Budget(states, dict(own.peak), own.peak_total, dict(plan.earlier_held), plan.earlier, plan.note())


def fixes(config: Config, consumer: str) -> list[str]:
    """The config changes that shrink ``consumer`` (a liveness kind or
    ``"model_states"``), with the current values."""
    z = config.zero_optimization
    ac = config.activation_checkpointing
    micro = config.train_micro_batch_size_per_gpu
    now = f" (now {micro})" if micro is not None else ""
    micro_fix = f"train_micro_batch_size_per_gpu{now} lower, with gradient_accumulation_steps higher"
    if consumer == "gathered":
        out = [f"zero_optimization.stage3_max_live_parameters (now {z.stage3_max_live_parameters}) lower",
               f"zero_optimization.allgather_bucket_size (now {z.allgather_bucket_size}) lower",
               f"zero_optimization.stage3_prefetch_bucket_size (now {z.stage3_prefetch_bucket_size}) lower"]
        if z.stage3_max_reuse_distance:
            out.append(f"zero_optimization.stage3_max_reuse_distance (now {z.stage3_max_reuse_distance}) to 0")
        if z.stage < 3:
            out.insert(0, f"zero_optimization.stage (now {z.stage}) to 3, so parameters are gathered one block at a time")
        return out
    if consumer == "activation":
        out = []
        if ac.policy in ("none", "selective"):
            out.append(f"activation_checkpointing.policy (now {ac.policy!r}) to \"per_layer\" or \"memory_budget\"")
        else:
            out.append("activation_checkpointing.memory_budget lower (policy \"memory_budget\")")
        if not ac.offload_activations:
            out.append("activation_checkpointing.offload_activations to true")
        return out + [micro_fix]
    if consumer == "model_states":
        out = []
        if z.stage < 3:
            out.append(f"zero_optimization.stage (now {z.stage}) higher")
        if z.offload_optimizer.device == "none" and z.offload_param.device == "none":
            out.append("zero_optimization.offload_optimizer.device to \"cpu\" (with zerograph.make_optimizer)")
        if z.stage == 3 and z.offload_param.device == "none":
            out.append("zero_optimization.offload_param.device to \"cpu\" (parameter shards on the host)")
        return out + ["more data-parallel ranks (model states shrink as 1/world size)"]
    if consumer == "earlier_regions":  # what earlier regions save for their backward (graph breaks)
        out = fixes(config, "activation")
        if z.stage == 3 and z.stage3_max_reuse_distance:
            out.insert(-1, f"zero_optimization.stage3_max_reuse_distance (now {z.stage3_max_reuse_distance}) to 0, "
                           "so no gathered parameter is kept for the backward")
        return out
    if consumer == "gradient":
        return [f"zero_optimization.reduce_bucket_size (now {z.reduce_bucket_size}) lower", micro_fix]
    return [micro_fix]


def _gib(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1."""
    for unit, size in (("GiB", GIB), ("MiB", float(1 << 20)), ("KiB", 1024.0)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def explain_budget(config: Config, budget: Budget, *, where: str, headline: str) -> str:
    """A multi-line report of ``budget`` with the fixes for its largest consumer."""
    states = budget.model_states
    parts = {"model_states": sum(states.values())}
    labels = {
        "model_states": "model states (params {params}, grads {grads}, optimizer states {optimizer_states})".format(
            **{k: _gib(v) for k, v in states.items()}),
        "gathered": "gathered parameters (peak)",
        "activation": "saved activations (peak)",
        "gradient": "gradients (peak)",
        "other": "temporaries (peak)",
    }
    if budget.earlier:  # graph breaks: earlier regions' saved values, held while this region runs
        parts["earlier_regions"] = budget.earlier_held_total
        labels["earlier_regions"] = (f"saved by earlier regions ({', '.join(map(str, budget.earlier))}) "
                                     "for their backward")
    parts.update(budget.step_peak)
    largest = max(parts, key=parts.get)
    lines = [f"{where}: {headline}"]
    for key, value in parts.items():
        mark = "  <- largest" if key == largest else ""
        lines.append(f"  {labels[key]:<76} {_gib(value)}{mark}")
    total_label = "step peak, all kinds together"
    if budget.earlier:
        total_label += f" (own {_gib(budget.step_peak_total)} + earlier regions')"
    lines.append(f"  {total_label:<76} {_gib(budget.composed_peak_total)}")
    if budget.note:
        lines.append(f"  {budget.note}")
    lines.append("To fit, change: " + "; or ".join(fixes(config, largest)) + ".")
    lines.append("zerograph.explain(model, config, *batch) prints the plan without training (docs/planner.md).")
    return "\n".join(lines)


def check_region(ctx, plan, limit: int, rank: int) -> Budget:
    """Raise :class:`MemoryBudgetError` when this rank's model states plus
    ``plan``'s peak exceed ``limit`` bytes; return the budget otherwise.
    ``plan``: a :class:`~zerograph.planner.step_plan.RegionInStep` (the region
    with what the regions run before it hold, :func:`region_budget`) or a
    :class:`~zerograph.planner.liveness.RegionPlan`."""
    budget = region_budget(ctx, plan)
    if budget.total > limit:
        raise MemoryBudgetError(explain_budget(
            ctx.config, budget, where=f"rank {rank}, region {plan.index}",
            headline=f"predicted {_gib(budget.total)} > zerograph.memory_limit_bytes {_gib(limit)}"), budget)
    return budget


def out_of_memory(ctx, exc: BaseException, *, phase: str, plan=None, rank: int = 0) -> MemoryBudgetError:
    """``exc`` (a ``torch.OutOfMemoryError``) as a :class:`MemoryBudgetError`
    that says which budget to change (from ``plan`` when there is one)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"rank {rank}, {phase} graph"
    if plan is None:
        states, _, _ = model_state_bytes(ctx)
        lines = [f"{where}: out of memory ({first})",
                 f"  model states {_gib(sum(states.values()))} per rank; the step's peak is not planned yet.",
                 "To fit, change: " + "; or ".join(fixes(ctx.config, "model_states") + fixes(ctx.config, "activation")) + ".",
                 "zerograph.explain(model, config, *batch) shows where the memory goes (docs/planner.md)."]
        return MemoryBudgetError("\n".join(lines))
    budget = region_budget(ctx, plan)
    return MemoryBudgetError(explain_budget(ctx.config, budget, where=where, headline=f"out of memory ({first})"),
                             budget)

"""``activation_checkpointing`` (joint graph): the mechanism.

Writes the decisions of :func:`zerograph.planner.recompute_policy.choose` into
``node.meta["recompute"]``; AOTAutograd's default partitioner then saves the
``MUST_SAVE`` nodes for the backward and copies the ``*_RECOMPUTE`` ones into
the backward graph. With ``per_layer`` on a GPT block, the forward saves only
each block's output (and dropout's random values); the backward graph
recomputes the block's pointwise ops and matmuls from it::

    # backward, recomputed from the saved block input
    mm = aten.mm(view, t)        # recomputed
    gelu = aten.gelu(view_1)     # recomputed

``memory_budget`` uses :func:`~zerograph.planner.recompute_policy.choose_for_budget`
(the same tags, chosen to fit a byte budget). With ``offload_activations`` the pass
then runs :func:`zerograph.passes.offload_activations.offload_activations` on what is still
saved (``aten._to_copy`` to the host after the forward use, back before the
backward use). :func:`predict_saved` is an opt-in analysis pass recording the
exact saved bytes.
"""

from __future__ import annotations

from torch.utils.checkpoint import CheckpointPolicy

from zerograph.planner.recompute_policy import choose, choose_for_budget, params_read_by_backward, predict_saved_bytes
from zerograph.passes.manager import PassContext, PassResult
from zerograph.passes.offload_activations import offload_activations


def activation_checkpointing(gm, ctx: PassContext, predicate=None) -> PassResult:
    result = _checkpointing(gm, ctx, predicate)
    if not ctx.config.activation_checkpointing.offload_activations:
        return result
    offload = offload_activations(gm, ctx)  # after the tags: only what is still saved moves
    return PassResult(changed=result.changed or offload.changed, details={**result.details, **offload.details})


def _checkpointing(gm, ctx: PassContext, predicate=None) -> PassResult:
    cfg = ctx.config.activation_checkpointing
    if cfg.policy == "none" and predicate is None:
        return PassResult(details={"policy": "none"})
    details = {}
    if cfg.policy == "memory_budget" and predicate is None:
        decision, details = choose_for_budget(gm, cfg.memory_budget, no_regather=_not_regathered(gm, ctx))
    else:
        decision = choose(gm, cfg.policy, block_pattern=cfg.block_pattern, predicate=predicate,
                          no_regather=_not_regathered(gm, ctx))
    for node, policy in decision.items():
        node.meta["recompute"] = policy
    recompute = sum(p != CheckpointPolicy.MUST_SAVE for p in decision.values())
    return PassResult(changed=bool(decision),
                      details={"policy": cfg.policy, "save": len(decision) - recompute, "recompute": recompute,
                               **details})


def _not_regathered(gm, ctx: PassContext) -> frozenset[str]:
    """Stage 3: sharded parameters whose backward has no all-gather of its own."""
    if ctx.state is None or not ctx.plan.zero.regathers_in_backward:
        return frozenset()
    sharded = {name for name, spec in ctx.state.specs.items() if spec.storage == "sharded"}
    return frozenset(sharded - params_read_by_backward(gm))


def predict_saved(gm, ctx: PassContext) -> PassResult:
    """Analysis pass for the end of the joint phase: the exact bytes the forward will
    save for the backward (:func:`~zerograph.planner.recompute_policy.predict_saved_bytes`),
    in ``details["saved_bytes"]``, and in ``details["activation_bytes"]`` the part that
    parameters and inputs do not already hold (the unit of ``memory_budget``). Not in the default pipeline (it partitions a copy of
    the graph); add it with ``passes.append(GraphPass("predict_saved", predict_saved,
    phases=("joint",), analysis=True))``."""
    return PassResult(details={"saved_bytes": predict_saved_bytes(gm),
                               "activation_bytes": predict_saved_bytes(gm, activations_only=True)})

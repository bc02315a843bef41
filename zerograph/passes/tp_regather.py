"""``tp_regather`` (joint graph): Megatron-SP's backward re-gather, the mechanism.

Writes :func:`zerograph.planner.tp_regather.regather_decisions` into
``node.meta["recompute"]``: each column group's ``tp_seq_gather`` and the
views of it that the weight gradient reads become ``MUST_RECOMPUTE``, so
AOTAutograd's partitioner saves the sequence shard (``[b, s/tp, h]``)
instead of the gathered input (``[b, s, h]``), and the backward graph gets
its own gather, which ``lower_tp_markers`` lowers like the forward's. For
``fc2(relu(fc1(ln(h))))`` with Megatron-SP at tp=2 (``[2, 8, 4]``; the golden
test ``tests/test_tp_sp_regather.py``), the backward graph::

    clone_default_2: f32[2, 4, 4] = aten.clone(getitem)                  # the saved shard
    all_gather_into_tensor_default_1: f32[4, 4, 4] = _c10d_functional.all_gather_into_tensor(clone_default_2, 2, '0')
    ...
    mm_2: f32[16, 4] = aten.mm(view_5, t_6)                               # fc1's input gradient meanwhile
    wait_tensor_default_1: f32[4, 4, 4] = _c10d_functional.wait_tensor(all_gather_into_tensor_default_1)
    ...                                                                   # the blocks in place: [2, 8, 4]
    view_6: f32[16, 4] = aten.view(view_default_3, [16, 4])
    mm_3: f32[4, 4] = aten.mm(t_7, view_6)                                # fc1's weight gradient

where the forward used to return ``view_1`` (``f32[16, 4]``) and now returns
``getitem`` (``f32[2, 4, 4]``, layer_norm's output shard).

Runs with ``zerograph.tp_sequence_parallel`` and
``zerograph.tp_sequence_parallel_regather`` (default true), after
``zero_policy`` and before ``activation_checkpointing`` (whose policies leave
tagged nodes alone, so a recomputed block reads the same single gather).
"""

from __future__ import annotations

from zerograph.passes.manager import PassContext, PassResult
from zerograph.planner.tp_regather import TP_SEQ_GATHER, regather_decisions


def tp_regather(gm, ctx: PassContext) -> PassResult:
    """Details: ``regathered`` (column groups whose input the backward gathers
    again) and ``must_recompute`` (nodes tagged: the gathers and their views)."""
    decision = regather_decisions(gm)
    for node, policy in decision.items():
        node.meta["recompute"] = policy
    gathers = sum(1 for node in decision if node.target is TP_SEQ_GATHER)
    return PassResult(changed=bool(decision), details={"regathered": gathers, "must_recompute": len(decision)})

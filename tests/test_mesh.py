"""The one device mesh (zerograph.runtime.mesh.build_mesh): every group it
hands out holds the ranks the docs' rule says, for several (pp, dp, sp, tp)
shapes, and sizes that do not divide the world are errors naming the sizes
and the fix.

Each rank of each shape is built in this process on the fake process group
(``rank=r``), so the groups checked are the ones torch.distributed made. The
expected ranks come from the rule in docs/concepts.md, written out here:
global rank = ((pp_i * dp + dp_i) * sp + sp_i) * tp + tp_i.
"""

from __future__ import annotations

import itertools

import pytest
import torch.distributed as dist

from zerograph.config import ConfigError
from zerograph.runtime.mesh import build_mesh, mesh_sizes


def _rank(pp, dp, sp, tp, p, d, s, t):
    return ((p * dp + d) * sp + s) * tp + t


def _ranks(group):
    return dist.get_process_group_ranks(group)


SHAPES = [  # (pp, dp, sp, tp)
    (1, 1, 1, 1),
    (1, 4, 1, 1),
    (1, 1, 1, 2),
    (2, 1, 2, 2),
    (1, 2, 2, 2),
    (2, 2, 2, 1),
    (2, 2, 1, 2),
    (1, 2, 1, 2),
    (1, 2, 2, 1),
    (3, 2, 1, 1),
    (2, 1, 1, 1),
    (2, 2, 2, 2),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "pp{}_dp{}_sp{}_tp{}".format(*s))
def test_every_group_of_every_rank_follows_the_mesh_rule(shape):
    from zerograph._torch_private import fake_store

    pp, dp, sp, tp = shape
    world = pp * dp * sp * tp
    for rank in range(world):
        dist.init_process_group("fake", store=fake_store(), rank=rank, world_size=world)
        try:
            groups = build_mesh(pp, sp, tp, device="cpu")
            p, rest = divmod(rank, dp * sp * tp)
            d, rest = divmod(rest, sp * tp)
            s, t = divmod(rest, tp)
            at = lambda **c: _rank(pp, dp, sp, tp, c.get("p", p), c.get("d", d), c.get("s", s), c.get("t", t))  # noqa: E731
            assert dict(groups.layout.sizes) == {"pp": pp, "dp": dp, "sp": sp, "tp": tp}
            assert dict(groups.layout.coords) == {"pp": p, "dp": d, "sp": s, "tp": t}
            assert groups.layout.global_rank() == rank
            # data-parallel: the dp ranks of one (pp, sp, tp) index
            assert (groups.dp.world_size, groups.dp.rank) == (dp, d)
            if dp > 1:
                assert _ranks(groups.dp.group) == [at(d=i) for i in range(dp)]
            # ZeRO: the dp x sp ranks of one (pp, tp) index, in global-rank order
            zero = [at(d=i, s=j) for i in range(dp) for j in range(sp)]
            assert (groups.zero.world_size, groups.zero.rank) == (dp * sp, zero.index(rank))
            if dp * sp > 1:
                assert _ranks(groups.zero.group) == zero
            else:
                assert groups.zero.mesh is None
            # sequence- and tensor-parallel groups: one (pp, dp, tp) / (pp, dp, sp) index
            if sp > 1:
                assert (groups.sp.world_size, groups.sp.rank) == (sp, s)
                assert _ranks(groups.sp.group) == [at(s=j) for j in range(sp)]
            else:
                assert groups.sp is None
            stage = [at(d=i, s=j, t=k) for i in range(dp) for j in range(sp) for k in range(tp)]
            if tp > 1:
                assert (groups.tp.world_size, groups.tp.rank) == (tp, t)
                assert _ranks(groups.tp.group) == [at(t=k) for k in range(tp)]
                # the stage's 2-D (dp, tp) mesh: "dp" is ZeRO's ranks of each tp index
                assert groups.dp_tp_mesh.mesh_dim_names == ("dp", "tp")
                assert groups.dp_tp_mesh.mesh.tolist() == [[at(d=i, s=j, t=k) for k in range(tp)]
                                                           for i in range(dp) for j in range(sp)]
                assert _ranks(groups.tp.model_group) == (stage if pp > 1 else list(range(world)))
            else:
                assert groups.tp is None and groups.dp_tp_mesh is None
            # pipeline: stage group and neighbours with this rank's (dp, sp, tp) indices
            pipe = groups.pipeline()
            assert (pipe.stage, pipe.stages) == (p, pp)
            assert [pipe.rank_of(k) for k in range(pp)] == [at(p=k) for k in range(pp)]
            if pp > 1 and len(stage) > 1:
                assert _ranks(pipe.group) == stage
        finally:
            dist.destroy_process_group()


def test_sizes_that_do_not_divide_the_world_name_the_sizes_and_the_fix():
    assert mesh_sizes(8, pp=2, sp=2, tp=2) == {"pp": 2, "dp": 1, "sp": 2, "tp": 2}
    assert mesh_sizes(16, pp=2, sp=2, tp=2) == {"pp": 2, "dp": 2, "sp": 2, "tp": 2}
    with pytest.raises(ConfigError) as info:
        mesh_sizes(12, pp=2, sp=2, tp=2)
    assert str(info.value) == (
        "pipeline.stages=2 x sequence_parallel_size=2 x tensor_parallel.autotp_size=2 needs a world size that is a "
        "multiple of 8; this run has 12 rank(s): launch a multiple of 8 ranks (world = data-parallel ranks x "
        "pipeline stages x sequence-parallel ranks x tensor-parallel ranks; e.g. 8), or change pipeline.stages or "
        "sequence_parallel_size or tensor_parallel.autotp_size so that their product divides 12")
    with pytest.raises(ConfigError) as info:
        mesh_sizes(2, tp=3)
    assert str(info.value) == (
        "tensor_parallel.autotp_size=3 does not divide the world size 2: launch a multiple of 3 ranks (world = "
        "data-parallel ranks x tensor-parallel ranks; e.g. 3), or change tensor_parallel.autotp_size so that 3 "
        "divides 2")
    with pytest.raises(ConfigError, match=r"pipeline.stages=2 needs a world size that is a multiple of it; this run "
                                          r"has 1 rank\(s\): launch a multiple of 2 ranks"):
        mesh_sizes(1, pp=2)
    with pytest.raises(ConfigError, match=r"sequence_parallel_size=0: the number of sequence-parallel ranks must"):
        mesh_sizes(4, sp=0)
    for pp, sp, tp in itertools.product((1, 2, 3), repeat=3):  # every divisor shape of 12 is accepted
        if 12 % (pp * sp * tp) == 0:
            assert mesh_sizes(12, pp=pp, sp=sp, tp=tp)["dp"] == 12 // (pp * sp * tp)

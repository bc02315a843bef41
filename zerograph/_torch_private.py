"""The one module of zerograph that touches private PyTorch APIs.

Every name that PyTorch does not promise to keep stable is imported here and
re-exported under a zerograph name, so a PyTorch upgrade breaks exactly one
file. Supported: torch 2.11 through the newest release. Version differences are
handled here and nowhere else.
"""

from __future__ import annotations

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import default_partition
from torch._guards import detect_fake_mode
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "aot_autograd",
    "make_boxed_func",
    "default_partition",
    "detect_fake_mode",
    "FakeTensorProp",
    "resolve_process_group",
    "c10d_functional",
    "queue_backward_callback",
    "fake_store",
    "dynamo_exception_types",
    "inductor_decompositions",
    "TORCH_VERSION",
    "TorchDispatchMode",
    "set_group_timeout",
    "default_store",
    "process_groups",
    "size_hint",
    "dtensor_with_local",
    "strided_shard",
    "is_strided_shard",
    "tensor_version",
    "is_view_op",
    "is_inplace_op",
    "fake_mode_of",
]

TORCH_VERSION: tuple[int, int] = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])  # type: ignore[assignment]

# Functional collectives live in an underscore op namespace.
c10d_functional = torch.ops._c10d_functional


def is_view_op(target) -> bool:
    """``target`` is an ATen/custom op whose schema says it returns a view of an input."""
    return isinstance(target, torch._ops.OpOverload) and target.is_view


def is_inplace_op(target) -> bool:
    """``target`` is an op that overwrites its first input and returns it (``mul_``, ``all_reduce_``)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    returns = target._schema.returns
    return bool(returns) and returns[0].alias_info is not None and returns[0].alias_info.is_write


def resolve_process_group(group_name: str):
    """The ProcessGroup registered under ``group_name``."""
    return _resolve_process_group(group_name)


def queue_backward_callback(fn) -> None:
    """Run ``fn`` once the current autograd backward pass has finished
    (after every gradient has been accumulated into ``.grad``)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def dynamo_exception_types() -> tuple[type[BaseException], ...]:
    """The exception classes Dynamo raises when it cannot trace or compile."""
    from torch._dynamo import exc

    return (exc.TorchDynamoException,)


def fake_store():
    """A store for the single-process fake process group (pass-level tests)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    return FakeStore()


def inductor_decompositions() -> dict:
    """The decompositions Inductor expects AOTAutograd to have applied."""
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def inductor_compile(gm, example_inputs):
    """Compile a partitioned ATen graph with Inductor (returns a boxed callable).

    ``gm`` must hold only ops Inductor lowers (the backend's lowering step,
    :mod:`zerograph.backend.lowering`, decomposes zerograph's copies first)."""
    from torch._inductor.compile_fx import compile_fx_inner

    return compile_fx_inner(gm, example_inputs)


def set_group_timeout(group, seconds: float) -> None:
    """Set the default timeout of ``group``'s gloo/NCCL backends (collectives
    issued on it afterwards fail after ``seconds`` instead of hanging)."""
    import datetime

    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=seconds), group)


def default_store():
    """The key-value store the default process group was initialized with."""
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def process_groups() -> list:
    """Every process group this process holds, the default group included
    (the test suite's rank pool destroys the others between tests)."""
    from torch.distributed.distributed_c10d import _world

    return list(_world.pg_map)


def size_hint(x) -> int:
    """``x`` (an int or a SymInt of a graph traced with dynamic shapes) as an
    int, WITHOUT adding a guard: a symbolic size gives its example value.
    ``int(symint)`` would specialize the graph to that size, and Dynamo would
    recompile for every new shape. For analyses only (sizes, bytes, costs)."""
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    if node is None:
        return int(x)
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    return int(node.shape_env.size_hint(node.expr))


def dtensor_with_local(like, local: torch.Tensor, requires_grad: bool | None = None):
    """A DTensor with ``like``'s mesh, placements and global shape whose local
    shard is ``local`` (same shape as ``like``'s; the dtype is ``local``'s),
    kept on ``local``'s device. ``DTensor.from_local`` would move it to the
    mesh's device type; offloaded parameter shards and host optimizer states
    must stay in host memory."""
    import dataclasses

    from torch.distributed.tensor import DTensor

    spec = like._spec
    if local.dtype != like.dtype:
        spec = dataclasses.replace(spec, tensor_meta=spec.tensor_meta._replace(dtype=local.dtype))
    return DTensor(local, spec, requires_grad=like.requires_grad if requires_grad is None else requires_grad)


def strided_shard(dim: int, split_factor: int):
    """DTensor's ``_StridedShard(dim, split_factor=...)`` placement: ``dim``
    cut into ``split_factor`` equal pieces, each sharded over the mesh
    dimension, a rank holding its block of every piece (FSDP2 + TP uses it
    for the dp placement of a tensor tp already shards on the same dim)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return _StridedShard(dim, split_factor=split_factor)


def is_strided_shard(placement) -> bool:
    """``placement`` is a ``_StridedShard`` (whose ``is_shard()`` is False)."""
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(placement, _StridedShard)


def tensor_version(t: torch.Tensor) -> int:
    """``t``'s version counter (shared by its views and ``detach()``es),
    bumped by every in-place write to it."""
    return t._version


def fake_mode_of(values) -> object | None:
    """The fake mode the first fake tensor among ``values`` belongs to (a
    Dynamo graph's recorded values), or None."""
    from torch._subclasses.fake_tensor import FakeTensor

    return next((v.fake_mode for v in values if isinstance(v, FakeTensor)), None)


def nn_binding(name: str):
    """The C++ binding (``torch._C._nn.<name>``) that Dynamo graphs record as
    a ``call_function`` target for some ``F.<name>`` calls (``linear``,
    ``gelu``, ``scaled_dot_product_attention``); passes match both."""
    return getattr(torch._C._nn, name)

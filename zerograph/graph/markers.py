"""zerograph's marker ops: ``unshard`` and ``reduce_grad``.

Reading a sharded parameter from its module returns
``zerograph::unshard(local_shard, tag, name)``. Its autograd backward is
``zerograph::reduce_grad(grad, tag, name)``.

* Eager implementations really communicate (through the same op sequences the
  passes emit, see :mod:`zerograph.graph.collectives`), so code that Dynamo leaves
  outside compiled regions sees full parameters and produces correct shards
  of gradients. A collective failing there raises the same
  :class:`~zerograph.runtime.errors.RankFailureError` as in a compiled graph.
* Fake implementations give the full (resp. shard) shape, so tracing sees
  full-size parameters.
* Under Dynamo + AOTAutograd each marker stays a single node; the ZeRO passes
  decide per stage whether to save or recompute the gathered parameter and
  then lower the markers into functional collectives.
"""

from __future__ import annotations

import torch

from zerograph.graph import collectives
from zerograph.runtime import registry
from zerograph.runtime.errors import naming_failed_ranks
from zerograph.runtime.specs import ParamSpec
from zerograph.runtime.stats import KINDS, collective_buffer_bytes


def spec_of(tag: str, name: str) -> ParamSpec:
    return registry.lookup(tag).specs[name]


def _counting_emit(tag: str):
    stats = registry.lookup(tag).stats

    def emit(role: str, value, **_tag):
        if role in KINDS:
            # The output of a collective start is its result buffer.
            out_bytes = value.numel() * value.element_size()
            in_bytes = out_bytes
            if role == "reduce_scatter":
                in_bytes = out_bytes * registry.lookup(tag).world_size
            stats.add(role, collective_buffer_bytes(role, in_bytes, out_bytes))
        return value

    return emit


@torch.library.custom_op("zerograph::unshard", mutates_args=())
def unshard(shard: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    """The full parameter ``name`` gathered from every rank's shard."""
    spec = spec_of(tag, name)
    with naming_failed_ranks(registry.lookup(tag), "forward"):
        full = collectives.gather_param(shard, spec, _counting_emit(tag))
    return full.clone() if full is shard else full.contiguous()


@unshard.register_fake
def _unshard_fake(shard: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    spec = spec_of(tag, name)
    return shard.new_empty(spec.full_shape, dtype=spec.compute_dtype, device=spec.gathered_device(shard.device))


@torch.library.custom_op("zerograph::reduce_grad", mutates_args=())
def reduce_grad(grad: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    """This rank's shard of the data-parallel mean of ``grad``.

    Under the no-sync tag (a micro-batch before the accumulation boundary, at
    stages 0/1) the gradient is stashed instead, and the next reduction of
    ``name`` adds the stash first."""
    ctx = registry.lookup(tag)
    if tag == ctx.nosync_tag:
        return stash_grad(grad, tag, name)
    if name in ctx.grad_stash:
        grad = unstash_grad(grad, tag, name)
    spec = ctx.specs[name]
    with naming_failed_ranks(ctx, "backward"):
        out = collectives.reduce_param_grad(grad, spec, _counting_emit(tag))
    return out.clone() if out is grad else out.contiguous()


@reduce_grad.register_fake
def _reduce_grad_fake(grad: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    spec = spec_of(tag, name)
    return grad.new_empty(spec.local_shape, dtype=spec.master_dtype, device=spec.grad_shard_device(grad.device))


@torch.library.custom_op("zerograph::stash_grad", mutates_args=())
def stash_grad(grad: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    """Add ``grad`` to the model's stash for ``name`` (in the master dtype)
    and return zeros shaped like this rank's gradient shard.

    Side effect on zerograph's per-model state, invisible to the compiler: its
    output is the parameter's gradient, so it is never dead code."""
    ctx = registry.lookup(tag)
    spec = ctx.specs[name]
    g = grad.detach().to(spec.master_dtype)
    held = ctx.grad_stash.get(name)
    ctx.grad_stash[name] = g.clone() if held is None else held.add_(g)
    return grad.new_zeros(spec.local_shape, dtype=spec.master_dtype)


@stash_grad.register_fake
def _stash_grad_fake(grad: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    spec = spec_of(tag, name)
    return grad.new_empty(spec.local_shape, dtype=spec.master_dtype)


@torch.library.custom_op("zerograph::unstash_grad", mutates_args=())
def unstash_grad(grad: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    """``grad`` plus what was stashed for ``name`` (the stash is emptied)."""
    held = registry.lookup(tag).grad_stash.pop(name, None)
    if held is None:
        return grad.clone()
    return (held + grad).to(grad.dtype)


@unstash_grad.register_fake
def _unstash_grad_fake(grad: torch.Tensor, tag: str, name: str) -> torch.Tensor:
    return torch.empty_like(grad)


def _unshard_setup(ctx, inputs, output):
    _shard, ctx.tag, ctx.name = inputs


def _unshard_backward(ctx, grad):
    return torch.ops.zerograph.reduce_grad(grad, ctx.tag, ctx.name), None, None


unshard.register_autograd(_unshard_backward, setup_context=_unshard_setup)

UNSHARD = torch.ops.zerograph.unshard.default
REDUCE_GRAD = torch.ops.zerograph.reduce_grad.default
STASH_GRAD = torch.ops.zerograph.stash_grad.default
UNSTASH_GRAD = torch.ops.zerograph.unstash_grad.default

"""Which dimension of each value is split over the tp ranks, op by op, and
the shape arguments that must become per-rank sizes (the ``tensor_parallel``
pass's propagation rules, in the spirit of DTensor's sharding propagation).

A value's state is ``None`` (whole on every tp rank), a :class:`Split` (one
dimension cut into ``tp`` blocks, per fused part), or a :class:`SplitTuple`
(the outputs of a ``split``/``chunk``). Shapes are Dynamo's full shapes; a
rule returns the output's state and rewrites the node's size arguments in
place (``view(b, t, 12, 64)`` of a split hidden dim becomes
``view(b, t, 6, 64)`` at tp=2). An op this module has no rule for may not
touch a split value: the pass stops with an error naming the op and module.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from zerograph._torch_private import nn_binding
from zerograph.graph.tp_ops import full_shape, module_of, requires_grad, torch_level
from zerograph.runtime.tp_layout import TensorParallelError


@dataclasses.dataclass(frozen=True)
class Split:
    dim: int
    parts: tuple[int, ...]  # full sizes of the fused parts along ``dim``
    # tp ranks holding each block (grouped-query key/value heads fewer than tp): a dim of full size n
    # is n * replicas / tp on each rank
    replicas: int = 1
    # replicated key/value heads whose next dim was expanded to this rank's share of the query heads
    # (Hugging Face's repeat_kv: expand(b, kv, n_rep, s, d) -> n_rep / replicas per rank); the reshape
    # that merges the two is split over tp like the query heads
    repeated: bool = False
    # a sequence shard (Megatron sequence parallelism, :mod:`zerograph.passes.tp_sequence`):
    # ``dim`` is the sequence, not the heads or features
    seq: bool = False

    def at(self, dim: int, parts: tuple[int, ...] | None = None) -> "Split":
        """The same kind of split along ``dim`` (of ``parts``, default: the same); a
        view of repeated key/value heads is no longer the repeat itself."""
        return dataclasses.replace(self, dim=dim, parts=self.parts if parts is None else parts, repeated=False)


@dataclasses.dataclass(frozen=True)
class SplitTuple:
    items: tuple


_EW_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.tanh, torch.sigmoid, torch.rsqrt, torch.sqrt,
    torch.exp, torch.pow, torch.relu, torch.where, torch.clone, torch.erf, torch.abs,
    nn_binding("gelu"), F.gelu, F.silu, F.relu, F.dropout, F.sigmoid, torch.nn.functional.tanh,
}
_EW_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "tanh", "sigmoid", "relu", "exp", "rsqrt", "sqrt", "abs",
               "masked_fill", "clone", "contiguous", "detach", "__add__", "__mul__"}
_CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type_as"}  # only ``self`` matters
_REDUCTIONS = {"mean", "sum", "amax", "amin"}


def _error(node: fx.Node, what: str) -> TensorParallelError:
    return TensorParallelError(f"tensor parallelism: {module_of(node)}: {what} (graph node {node.name})")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


class Propagator:
    """Propagates tp states through a Dynamo graph, rewriting shape arguments."""

    def __init__(self, tp: int):
        self.tp = tp
        self.states: dict[fx.Node, object] = {}
        self.rewritten = 0
        # (op, whole input): a whole value that carries a gradient, broadcast over a tp-split
        # one (Qwen3's per-head q_norm weight): each rank's gradient of it is partial
        self.partial_grads: list[tuple[fx.Node, fx.Node]] = []

    def get(self, value) -> object:
        return self.states.get(value) if isinstance(value, fx.Node) else None

    def visit(self, node: fx.Node) -> None:
        inputs = node.all_input_nodes
        if node.op == "output":  # the pass gathers split values that leave the graph
            return
        if not any(self.get(a) is not None for a in inputs):
            return  # whole in, whole out
        self.states[node] = self._rule(node)

    # -- dispatch --------------------------------------------------------------
    def _rule(self, node: fx.Node):
        fn, name = torch_level(node)  # an ATen overload (a pipeline stage's graph) as its torch-level op
        x = node.args[0] if node.args else None
        if fn is operator.getitem and isinstance(self.get(x), SplitTuple):
            return self.get(x).items[node.args[1]]
        if name in _CAST_METHODS:
            if any(self.get(a) is not None for a in node.all_input_nodes if a is not x):
                raise _error(node, f"{name}() with a tp-split argument")
            return self.get(x)
        if fn in _EW_FUNCTIONS or name in _EW_METHODS:
            return self._elementwise(node)
        if name in ("view", "reshape") or fn is torch.reshape:
            return self._view(node, sizes_at=1)
        if name == "flatten" or fn is torch.flatten:
            return self._view(node, sizes_at=None)
        if name == "unflatten":
            return self._view(node, sizes_at="unflatten")
        if name == "expand":
            return self._expand(node)
        if name == "transpose" or fn is torch.transpose:
            return self._transpose(node)
        if name == "permute" or fn is torch.permute:
            return self._permute(node)
        if name == "unsqueeze" or fn is torch.unsqueeze:
            return self._unsqueeze(node)
        if fn is operator.getitem:
            return self._getitem(node)
        if name in ("slice", "select"):
            return self._slice(node, name)
        if name in ("split", "chunk") or fn in (torch.split, torch.chunk):
            return self._split(node, "chunk" if name == "chunk" or fn is torch.chunk else "split")
        if fn is torch.cat:
            return self._cat(node)
        if fn is torch.stack:
            return self._stack(node)
        if fn in (nn_binding("scaled_dot_product_attention"), F.scaled_dot_product_attention):
            return self._attention(node)
        if fn in (operator.matmul, torch.matmul, torch.bmm) or name in ("matmul", "bmm"):
            return self._matmul(node)
        if name in ("softmax", "log_softmax") or fn in (F.softmax, F.log_softmax, torch.softmax):
            return self._over_dim(node, node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None))
        if name in _REDUCTIONS or fn in (torch.mean, torch.sum):
            return self._reduction(node)
        if fn is F.layer_norm:
            return self._layer_norm(node)
        op = name or getattr(fn, "__name__", str(fn))
        raise _error(node, f"{op} on a tensor split over the tp ranks: zerograph has no tensor-parallel rule for "
                     "it yet; keep this layer whole with a layer spec {\"partition_type\": \"skip\"}")

    # -- rules -----------------------------------------------------------------
    def _split_of(self, node: fx.Node) -> Split:
        state = self.get(node.args[0])
        if not isinstance(state, Split):
            raise _error(node, "an op whose first input is not a plain tp-split tensor")
        return state

    def _elementwise(self, node: fx.Node):
        out = full_shape(node)
        tensors = [a for a in node.all_input_nodes if full_shape(a) is not None]
        result = None
        for t in tensors:
            state = self.get(t)
            if isinstance(state, Split):
                cand = state.at(state.dim + len(out) - len(full_shape(t)))
                if result not in (None, cand):
                    raise _error(node, f"combines tensors split over tp along different dims ({result} and {cand})")
                result = cand
            elif state is not None:
                raise _error(node, "an element-wise op on a tp-split parameter")
        for t in tensors:
            shape = full_shape(t)
            pos = result.dim - (len(out) - len(shape))
            if self.get(t) is None and 0 <= pos and shape[pos] != 1:
                raise _error(node, f"combines a tensor split over tp along dim {result.dim} with a whole tensor of "
                             f"shape {shape}")
        if result is not None:
            self._note_partial_grads(node, result, tensors)
        return result

    def _note_partial_grads(self, node: fx.Node, result: Split, wholes) -> None:
        """Whole inputs of ``node`` (whose output is split over tp) that carry a
        gradient: each rank's backward gives them the part of its own slice,
        so the caller sums their gradients over tp (``tp_copy``). Sequence
        shards are Megatron-SP's (its pass sums those)."""
        if result.seq:
            return
        for t in wholes:
            if self.get(t) is None and requires_grad(t):
                self.partial_grads.append((node, t))

    def _heads(self, node, size: int, shape_in, shape_out) -> TensorParallelError:
        return _error(node, f"{size} heads (the reshape {tuple(shape_in)} -> {tuple(shape_out)}) cannot be split "
                      f"over tensor_parallel.autotp_size={self.tp}; valid autotp_size values divide {size}: "
                      f"{_divisors(size)}")

    def _map_view(self, node, split: Split, shape_in, shape_out) -> Split:
        d = split.dim
        pre, size, post = math.prod(shape_in[:d]), shape_in[d], math.prod(shape_in[d + 1:])
        acc, o = 1, 0
        while o < len(shape_out) and acc < pre:
            acc *= shape_out[o]
            o += 1
        if acc != pre:
            raise _error(node, f"a reshape {tuple(shape_in)} -> {tuple(shape_out)} merges the tp-split dim {d} with "
                         "the dims before it")
        while o < len(shape_out) - 1 and shape_out[o] == 1 and split.replicas == 1:
            o += 1
        a = shape_out[o]
        blocks = self.tp // split.replicas
        if split.repeated:  # repeat_kv's reshape: (b, kv, n_rep, s, d) -> (b, kv * n_rep, s, d)
            if a != size * shape_in[d + 1]:
                raise _error(node, f"a reshape {tuple(shape_in)} -> {tuple(shape_out)} of replicated key/value heads "
                             "that does not merge them with their repeats")
            return Split(o, (a,))
        if len(split.parts) == 1:
            if a % blocks:
                raise self._heads(node, a, shape_in, shape_out)
            return split.at(o, (a,))
        if a == size * post:
            return split.at(o, tuple(p * post for p in split.parts))
        if a == len(split.parts) and len(set(split.parts)) == 1 and o + 1 < len(shape_out):
            b = shape_out[o + 1]
            if b % blocks:
                raise self._heads(node, b, shape_in, shape_out)
            return split.at(o + 1, (b,))
        raise _error(node, f"a reshape {tuple(shape_in)} -> {tuple(shape_out)} cuts across the fused parts "
                     f"{list(split.parts)} of a tp-split dim")

    def _local(self, node, value, split: Split):
        if value == -1:
            return value
        if not isinstance(value, int):
            raise _error(node, f"a symbolic size {value} along the tp-split dim")
        self.rewritten += 1
        return value // (self.tp // split.replicas)

    def _view(self, node: fx.Node, sizes_at):
        split = self._split_of(node)
        shape_in, shape_out = full_shape(node.args[0]), full_shape(node)
        out = self._map_view(node, split, shape_in, shape_out)
        args = list(node.args)
        if sizes_at == 1:  # view(x, *sizes) or view(x, sizes)
            key = "shape" if "shape" in node.kwargs else None
            packed = key is not None or (len(args) == 2 and isinstance(args[1], (list, tuple, torch.Size)))
            sizes = list(node.kwargs[key] if key else (args[1] if packed else args[1:]))
            sizes[out.dim] = self._local(node, sizes[out.dim], out)
            if key:
                node.kwargs = {**node.kwargs, key: tuple(sizes)}
            else:
                node.args = (args[0], tuple(sizes)) if packed else (args[0], *sizes)
        elif sizes_at == "unflatten":
            dim = args[1] % len(shape_in)
            sizes = list(args[2])
            if dim <= out.dim < dim + len(sizes):
                sizes[out.dim - dim] = self._local(node, sizes[out.dim - dim], out)
                node.args = (args[0], args[1], tuple(sizes), *args[3:])
        return out

    def _expand(self, node: fx.Node):
        split = self._split_of(node)
        args = list(node.args)
        packed = len(args) == 2 and isinstance(args[1], (list, tuple, torch.Size))
        sizes = list(args[1] if packed else args[1:])
        dim = split.dim + len(sizes) - len(full_shape(node.args[0]))
        sizes[dim] = self._local(node, sizes[dim], split)
        repeated = False
        if split.replicas > 1 and dim + 1 < len(sizes) and full_shape(node.args[0])[dim + 1 - len(sizes)] == 1:
            # repeat_kv of replicated key/value heads: this rank repeats its head for its query heads only
            if not isinstance(sizes[dim + 1], int) or sizes[dim + 1] % split.replicas:
                raise _error(node, f"repeats key/value heads {sizes[dim + 1]} times, which the "
                             f"{split.replicas} tp ranks holding each head cannot share")
            sizes[dim + 1] //= split.replicas
            self.rewritten, repeated = self.rewritten + 1, True
        node.args = (args[0], tuple(sizes)) if packed else (args[0], *sizes)
        return dataclasses.replace(split.at(dim), repeated=repeated)

    def _transpose(self, node: fx.Node):
        split = self._split_of(node)
        n = len(full_shape(node))
        a, b = (d % n for d in node.args[1:3])
        dim = b if split.dim == a else a if split.dim == b else split.dim
        return split.at(dim)

    def _permute(self, node: fx.Node):
        split = self._split_of(node)
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        n = len(dims)
        return split.at([d % n for d in dims].index(split.dim))

    def _unsqueeze(self, node: fx.Node):
        split = self._split_of(node)
        at = node.args[1] % len(full_shape(node))
        return split.at(split.dim + (1 if at <= split.dim else 0))

    def _getitem(self, node: fx.Node):
        split = self._split_of(node)
        shape = full_shape(node.args[0])
        items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        in_d = out_d = 0
        result = None
        for pos, item in enumerate(items):
            if item is Ellipsis:
                for _ in range(len(shape) - consumed):
                    if in_d == split.dim:
                        result = out_d
                    in_d, out_d = in_d + 1, out_d + 1
            elif item is None:
                out_d += 1
            elif isinstance(item, int) or not isinstance(item, slice):
                if in_d == split.dim:
                    raise _error(node, f"indexing the tp-split dim {split.dim} with {item!r}")
                in_d += 1
            else:
                full = item.step in (None, 1) and item.start in (None, 0) and (item.stop is None or (
                    isinstance(item.stop, int) and item.stop >= shape[in_d]))
                if in_d == split.dim:
                    if not full:
                        local, split = self._slice_parts(node, split, item.start, item.stop, item.step)
                        node.args = (node.args[0], items[:pos] + (local,) + items[pos + 1:]
                                     if isinstance(node.args[1], tuple) else local, *node.args[2:])
                    result = out_d
                in_d, out_d = in_d + 1, out_d + 1
        if result is None:
            result = out_d + split.dim - in_d
        return split.at(result)

    def _slice_parts(self, node: fx.Node, split: Split, start, stop, step) -> tuple[slice, Split]:
        """A slice of the tp-split dim that selects whole fused parts (Phi-3's
        ``qkv[..., :q]``, ``qkv[..., q:q + kv]``) becomes the slice of this
        rank's blocks of those parts; the result is split like them."""
        bounds = [0]
        for p in split.parts:
            bounds.append(bounds[-1] + p)
        start = 0 if start is None else start
        stop = bounds[-1] if stop is None else min(stop, bounds[-1])
        if not (isinstance(start, int) and isinstance(stop, int)) or step not in (None, 1) \
                or start not in bounds or stop not in bounds or start >= stop or split.replicas != 1:
            raise _error(node, f"slicing the tp-split dim {split.dim} of parts {list(split.parts)} with "
                         f"[{start}:{stop}:{step}] (only whole fused parts can be sliced)")
        i, j = bounds.index(start), bounds.index(stop)
        local = [p // self.tp for p in split.parts]
        self.rewritten += 1
        return slice(sum(local[:i]), sum(local[:j])), split.at(split.dim, split.parts[i:j])

    def _slice(self, node: fx.Node, how: str):
        """ATen's ``slice(x, dim, start, end, step)`` / ``select(x, dim, index)``."""
        split = self._split_of(node)
        n = len(full_shape(node.args[0]))
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % n
        if how == "select":
            if dim == split.dim:
                raise _error(node, f"indexing the tp-split dim {split.dim}")
            return split.at(split.dim - (dim < split.dim))
        if dim == split.dim:
            start, end, step = (list(node.args[2:]) + [None, None, 1])[:3]
            if start not in (None, 0) or step != 1 or (end is not None and end < full_shape(node.args[0])[dim]):
                # whole fused parts, as in _getitem (a pipeline stage's ATen graph of Phi-3's qkv slices)
                local, split = self._slice_parts(node, split, start, end, step)
                node.args = (node.args[0], node.args[1], local.start, local.stop, *node.args[4:])
        return split

    def _split(self, node: fx.Node, how: str):
        split = self._split_of(node)
        shape = full_shape(node.args[0])
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) % len(shape)
        arg = node.args[1]
        if how == "chunk":
            count = arg
        else:
            count = len(arg) if isinstance(arg, (list, tuple)) else -(-shape[dim] // arg)
        if dim != split.dim:
            return SplitTuple((split,) * count)
        if how == "chunk":
            sizes = [shape[dim] // arg] * arg
        else:
            sizes = list(arg) if isinstance(arg, (list, tuple)) else [arg] * count
        if tuple(sizes) != split.parts:
            raise _error(node, f"splits a tp-split dim of parts {list(split.parts)} into {sizes}; declare the fused "
                         "parts (layer spec \"shape\") so the weight is cut per part")
        if how == "split":
            local = [s // (self.tp // split.replicas) for s in sizes]
            new = local if isinstance(arg, (list, tuple)) else local[0]
            node.args = (node.args[0], new, *node.args[2:])
            self.rewritten += 1
        return SplitTuple(tuple(split.at(dim, (s,)) for s in sizes))

    def _cat(self, node: fx.Node):
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        live = [t for t in tensors if full_shape(t) not in ((0,), None)]  # torch.cat skips 1-D empty tensors
        states = {self.get(t) for t in live}
        if len(states) != 1 or not isinstance(next(iter(states)), Split):
            raise _error(node, "concatenates tp-split tensors with whole ones")
        split = next(iter(states))
        if dim % len(full_shape(node)) == split.dim:
            raise _error(node, "concatenates along the tp-split dim")
        return split

    def _stack(self, node: fx.Node):
        """``torch.stack`` of tensors split alike (GPT-J's rotary
        ``stack((-x2, x1), dim=-1)``): the new dim moves the split dim up when
        it is inserted at or before it."""
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        states = {self.get(t) for t in tensors}
        if len(states) != 1 or not isinstance(next(iter(states)), Split):
            raise _error(node, "stacks tp-split tensors with whole ones")
        split = next(iter(states))
        dim %= len(full_shape(node))
        return split.at(split.dim + 1) if dim <= split.dim else split

    def _attention(self, node: fx.Node):
        q, k, v = node.args[:3]
        states = [self.get(t) for t in (q, k, v)]
        if not all(isinstance(s, Split) for s in states) or len({s.dim for s in states}) != 1:
            raise _error(node, "attention with query, key and value not all split by heads over tp")
        split = states[0]
        if split.dim != len(full_shape(q)) - 3:
            raise _error(node, f"attention inputs split along dim {split.dim}, not the heads dim")
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        if isinstance(mask, fx.Node) and self.get(mask) is None:
            shape = full_shape(mask)
            pos = split.dim - (len(full_shape(q)) - len(shape))
            if 0 <= pos and shape[pos] != 1:
                raise _error(node, f"an attention mask with {shape[pos]} heads cannot be split over tp yet")
        return split.at(split.dim, (full_shape(node)[split.dim],))

    def _matmul(self, node: fx.Node):
        a, b = node.args[:2]
        sa, sb = self.get(a), self.get(b)
        na, nb, n = len(full_shape(a)), len(full_shape(b)), len(full_shape(node))
        if (isinstance(sa, Split) and sa.dim == na - 1) or (isinstance(sb, Split) and sb.dim == nb - 2):
            raise _error(node, "a matrix product over the tp-split dim (its result would be a partial sum)")
        if isinstance(sa, Split) and sa.dim == na - 2:
            return sa.at(n - 2)
        if isinstance(sb, Split) and sb.dim == nb - 1:
            return sb.at(n - 1)
        return self._elementwise_batch(node, [(a, sa, na), (b, sb, nb)], n)

    def _elementwise_batch(self, node, operands, n):
        result = None
        for _, state, nd in operands:
            if isinstance(state, Split):
                cand = state.at(state.dim + n - nd)
                if result not in (None, cand):
                    raise _error(node, "a matrix product of tensors split along different batch dims")
                result = cand
        for t, state, nd in operands:
            pos = result.dim - (n - nd)
            if state is None and 0 <= pos < nd - 2 and full_shape(t)[pos] != 1:
                raise _error(node, "a matrix product of a tp-split tensor with a whole one")
        return result

    def _over_dim(self, node: fx.Node, dim):
        split = self._split_of(node)
        if dim is None or dim % len(full_shape(node.args[0])) == split.dim:
            raise _error(node, "a softmax over the tp-split dim")
        return split

    def _reduction(self, node: fx.Node):
        split = self._split_of(node)
        n = len(full_shape(node.args[0]))
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None:
            raise _error(node, "a reduction over every dim, the tp-split one included")
        dims = [d % n for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if split.dim in dims:
            raise _error(node, "a reduction over the tp-split dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        return split.at(split.dim - (0 if keep else sum(d < split.dim for d in dims)))

    def _layer_norm(self, node: fx.Node):
        split = self._split_of(node)
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
        if split.dim >= len(full_shape(node)) - len(normalized):
            raise _error(node, "a layer norm over the tp-split dim")
        affine = [a for a in (*node.args[2:4], node.kwargs.get("weight"), node.kwargs.get("bias"))
                  if isinstance(a, fx.Node)]
        self._note_partial_grads(node, split, affine)
        return split

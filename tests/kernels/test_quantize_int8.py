"""Blockwise int8 quantization (ZeRO++ qwZ/qgZ): the error bound per block,
the Triton launchers (interpreter on CPU) against the reference, and the
torch.library registration."""

from __future__ import annotations

import pytest
import torch

from zerograph.kernels import quantize_int8 as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (shape, block): blocks that divide the row, that do not (a short last
# block), a block longer than the row, one element, a block that is not a
# power of two, several rows (each row's blocks start at its first element)
CASES = [((512,), 128), ((1000,), 256), ((7,), 256), ((1,), 4), ((3, 37), 5), ((4, 130), 64), ((2, 3, 50), 48),
         ((2, 300), 100)]
# the stated bound (module docstring): exact arithmetic gives scale / 2; fp32
# rounds the division and the product once each
SLACK = 0.5 + 2.0 ** -16


def _data(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1]) if shape[-1] > 1 else \
        torch.randn(shape, generator=g)
    flat = x.reshape(-1)
    if flat.numel() >= 8:
        flat[:4] = 0.0  # a block that may be all zero
        flat[5] = 1e30  # a block dominated by one huge value
    return x.to(dtype)


def _expanded(scales, block, n):
    return scales.repeat_interleave(block, dim=-1)[..., :n]


@pytest.mark.parametrize("shape,block", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_per_element_is_at_most_half_a_scale(shape, block, seed):
    """|x - deq(q(x))| <= scale / 2 per element, up to fp32 rounding (SLACK),
    where scale = absmax(block) / 127; and q stays within [-127, 127]."""
    x = _data(shape, seed)
    q, scales = K.quantize_int8(x, block)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert scales.shape == (*shape[:-1], K.num_blocks(shape[-1], block)) and scales.dtype == torch.float32
    deq = K.dequantize_int8(q, scales, block, torch.float32)
    s = _expanded(scales, block, shape[-1]).double()
    err = (x.double() - deq.double()).abs()
    assert bool((err <= s * SLACK).all()), float((err / s.clamp_min(1e-300)).max())
    assert int(q.abs().max()) <= 127
    # the scale is the block's absmax / 127: its largest element round-trips to +-127
    blocks = torch.nn.functional.pad(x.reshape(-1, shape[-1]), (0, -shape[-1] % block)).reshape(
        -1, K.num_blocks(shape[-1], block), block)
    torch.testing.assert_close(scales.reshape(blocks.shape[:2]), blocks.abs().amax(-1) / 127, rtol=0, atol=0)


def test_zero_blocks_are_exact_and_low_precision_inputs_quantize():
    x = torch.zeros(2, 10)
    q, s = K.quantize_int8(x, 4)
    assert not q.any() and not s.any()
    assert torch.equal(K.dequantize_int8(q, s, 4), x)
    xb = _data((3, 70), dtype=torch.bfloat16)
    q, s = K.quantize_int8(xb, 32)
    deq = K.dequantize_int8(q, s, 32, torch.float32)
    assert bool(((xb.double() - deq.double()).abs() <= _expanded(s, 32, 70).double() * SLACK).all())
    assert K.dequantize_int8(q, s, 32, torch.bfloat16).dtype == torch.bfloat16


def _launch(launcher, *args):
    out = launcher(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


@pytest.mark.parametrize("shape,block", CASES)
def test_triton_matches_reference_exactly(shape, block):
    x = _data(shape)
    q_ref, s_ref = K.quantize_int8_reference(x, block)
    q, s = _launch(K.quantize_int8_triton, x, block)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    assert torch.equal(_launch(K.dequantize_int8_triton, q, s, block, torch.float32),
                       K.dequantize_int8_reference(q, s, block, torch.float32))
    # bf16: one ulp (Triton's interpreter truncates fp32 -> bf16; the reference rounds)
    torch.testing.assert_close(_launch(K.dequantize_int8_triton, q, s, block, torch.bfloat16),
                               K.dequantize_int8_reference(q, s, block, torch.bfloat16), rtol=2 ** -7, atol=0)


def test_triton_reads_strided_rows():
    """The gathered buffer's values are a column slice of [ranks, values + scales]."""
    packed = torch.randint(-127, 128, (4, 40), dtype=torch.int8)
    q = packed[:, :30]
    s = torch.rand(4, 3)
    out = _launch(K.dequantize_int8_triton, q, s, 10, torch.float32)
    assert torch.equal(out, K.dequantize_int8_reference(q, s, 10, torch.float32))
    xs = torch.randn(4, 40)[:, 5:35]
    assert all(torch.equal(a, b) for a, b in zip(_launch(K.quantize_int8_triton, xs, 8),
                                                 K.quantize_int8_reference(xs, 8)))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="block must be >= 1"):
        K.quantize_int8(torch.randn(4), 0)
    with pytest.raises(TypeError, match="floating point"):
        K.quantize_int8(torch.arange(4), 2)
    with pytest.raises(TypeError, match="int8 values and fp32 scales"):
        K.dequantize_int8(torch.zeros(4), torch.zeros(1), 4)


def test_opcheck():
    x = _data((3, 37))
    torch.library.opcheck(torch.ops.zerograph.quantize_int8, (x, 8))
    q, s = K.quantize_int8(x, 8)
    torch.library.opcheck(torch.ops.zerograph.dequantize_int8, (q, s, 8, torch.bfloat16))


# (row length, block, segments): segments that a block divides and that it does
# not, a zero-length segment (a parameter with no elements on this rank), a
# segment shorter than a block, one segment (the plain layout)
SEGMENT_CASES = [(40, 8, [16, 24]), (37, 5, [3, 0, 30, 4]), (130, 64, [1, 129]), (50, 256, [7, 43]),
                 (20, 4, [20])]


def _per_segment(x, block, segments, quantize):
    """Each segment of every row quantized as its own row: what segments mean."""
    parts = [quantize(p.contiguous(), block) for p in torch.split(x, segments, dim=-1) if p.shape[-1]]
    return torch.cat([p[0] for p in parts], -1), torch.cat([p[1] for p in parts], -1)


@pytest.mark.parametrize("n,block,segments", SEGMENT_CASES)
def test_segments_restart_the_blocks(n, block, segments):
    """Blocks restart at each segment: the result equals quantizing each segment
    on its own, there are sum(ceil(n_i / block)) scales per row, every element
    is within half of its own block's scale, and Triton agrees exactly."""
    x = _data((3, n))
    x[:, :segments[0]] *= 1e-6  # a tiny first segment: its own scale, not its neighbour's
    q, s = K.quantize_int8(x, block, segments)
    nb = sum(-(-m // block) for m in segments)
    assert K.num_blocks(n, block, segments) == nb and s.shape == (3, nb)
    assert K.packed_bytes(n, block, segments) == n + 4 * nb
    q_ref, s_ref = _per_segment(x, block, segments, K.quantize_int8_reference)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    deq = K.dequantize_int8(q, s, block, torch.float32, segments)
    per_col = torch.cat([_expanded(p, block, m) for p, m in
                         zip(torch.split(s, [-(-m // block) for m in segments], -1), segments)], -1)
    assert bool(((x.double() - deq.double()).abs() <= per_col.double() * SLACK).all())
    qt, st = _launch(K.quantize_int8_triton, x, block, segments)
    assert torch.equal(qt, q) and torch.equal(st, s)
    assert torch.equal(_launch(K.dequantize_int8_triton, q, s, block, torch.float32, segments), deq)


def test_bad_segments_are_named():
    with pytest.raises(ValueError, match=r"segments \[3, 4\] must be non-negative lengths summing to the row length 8"):
        K.quantize_int8(torch.randn(2, 8), 4, [3, 4])
    with pytest.raises(ValueError, match="summing to the row length 8"):
        K.dequantize_int8(torch.zeros(8, dtype=torch.int8), torch.zeros(2), 4, torch.float32, [9, -1])


def test_opcheck_with_segments():
    x = _data((3, 37))
    torch.library.opcheck(torch.ops.zerograph.quantize_int8, (x, 8, [5, 32]))
    q, s = K.quantize_int8(x, 8, [5, 32])
    torch.library.opcheck(torch.ops.zerograph.dequantize_int8, (q, s, 8, torch.float32, [5, 32]))

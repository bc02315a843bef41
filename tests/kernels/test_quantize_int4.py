"""Blockwise int4 quantization, two values per byte (ZeRO++ qgZ/qwZ with
zerograph.zeropp_bits 4): the exact byte layout, the error bound per block,
the Triton launchers (interpreter on CPU) against the reference, and the
torch.library registration."""

from __future__ import annotations

import pytest
import torch

from zerograph.kernels import quantize_int4 as K

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (shape, block): blocks that divide the row and that do not, odd rows (a last
# byte with an empty high nibble), odd blocks (a byte whose two nibbles have
# different scales), a block longer than the row, one element, several rows,
# a row longer than one program's bytes (two programs)
CASES = [((512,), 128), ((1000,), 256), ((7,), 256), ((1,), 4), ((3, 37), 5), ((4, 131), 64), ((2, 3, 51), 48),
         ((2, 300), 100), ((5, 9), 3), ((1, 1100), 7)]
# the stated bound (module docstring): scale / 2 exactly, fp32 adds < 2^-19 scale
SLACK = 0.5 + 2.0 ** -19


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


def test_golden_bytes():
    """Row [1, -7, 3.5, 0.2 | 14] in blocks of 4: scales 7/7 = 1 and 14/7 = 2;
    codes 1, -7, 4 (3.5 rounds half up), 0 | 7; bytes low nibble first:
    0x1 | 0x9 << 4 = 0x91 (-111 as int8), 0x4 | 0x0 << 4 = 4, and 0x7 with an
    empty high nibble (odd row). 5 elements: 3 value bytes + 2 * 4 scale bytes."""
    x = torch.tensor([[1.0, -7.0, 3.5, 0.2, 14.0]])
    q, s = K.quantize_int4(x, 4)
    assert q.dtype == torch.int8 and q.tolist() == [[-111, 4, 7]]
    assert s.tolist() == [[1.0, 2.0]]
    assert K.dequantize_int4(q, s, 4, 5).tolist() == [[1.0, -7.0, 4.0, 0.0, 14.0]]
    assert K.packed_bytes(5, 4) == q.numel() + 4 * s.numel() == 11
    assert [K.packed_bytes(n, 256) for n in (1, 2, 255, 256, 257)] == [5, 5, 132, 132, 137]


@pytest.mark.parametrize("shape,block", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_error_per_element_is_at_most_half_a_scale(shape, block, seed):
    """|x - deq(q(x))| <= scale / 2 per element, up to fp32 rounding (SLACK),
    where scale = absmax(block) / 7; every code is in [-7, 7] (nibble 8 = -8
    never appears) and the padding nibble of an odd row is 0."""
    x = _data(shape, seed)
    n = shape[-1]
    q, scales = K.quantize_int4(x, block)
    assert q.shape == (*shape[:-1], (n + 1) // 2)
    assert scales.shape == (*shape[:-1], -(-n // block)) and scales.dtype == torch.float32
    deq = K.dequantize_int4(q, scales, block, n, torch.float32)
    assert deq.shape == x.shape
    s = _expanded(scales, block, n).double()
    err = (x.double() - deq.double()).abs()
    assert bool((err <= s * SLACK).all()), float((err / s.clamp_min(1e-300)).max())
    nibbles = torch.stack([q.int() & 0xF, (q.int() & 0xFF) >> 4], -1)
    assert not bool((nibbles == 8).any())
    if n % 2:
        assert not bool(nibbles[..., -1, 1].any())
    blocks = torch.nn.functional.pad(x.reshape(-1, n), (0, -n % block)).reshape(-1, -(-n // block), block)
    torch.testing.assert_close(scales.reshape(blocks.shape[:2]), blocks.abs().amax(-1) / 7, rtol=0, atol=0)


def test_bound_is_reached():
    """The bound is not loose: uniform data reaches at least 0.45 scale somewhere."""
    x = torch.rand(4, 1000, generator=torch.Generator().manual_seed(3)) * 2 - 1
    q, s = K.quantize_int4(x, 64)
    err = (x - K.dequantize_int4(q, s, 64, 1000)).abs() / _expanded(s, 64, 1000)
    assert 0.45 < float(err.max()) <= SLACK


def test_zero_blocks_are_exact_and_low_precision_inputs_quantize():
    x = torch.zeros(2, 11)
    q, s = K.quantize_int4(x, 4)
    assert not q.any() and not s.any()
    assert torch.equal(K.dequantize_int4(q, s, 4, 11), x)
    xb = _data((3, 71), dtype=torch.bfloat16)
    q, s = K.quantize_int4(xb, 32)
    deq = K.dequantize_int4(q, s, 32, 71, torch.float32)
    assert bool(((xb.double() - deq.double()).abs() <= _expanded(s, 32, 71).double() * SLACK).all())
    assert K.dequantize_int4(q, s, 32, 71, torch.bfloat16).dtype == torch.bfloat16


def _launch(launcher, *args):
    out = launcher(*[a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args])
    return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()


@pytest.mark.parametrize("shape,block", CASES)
def test_triton_matches_reference_exactly(shape, block):
    x = _data(shape)
    n = shape[-1]
    q_ref, s_ref = K.quantize_int4_reference(x, block)
    q, s = _launch(K.quantize_int4_triton, x, block)
    assert torch.equal(s, s_ref)
    assert torch.equal(q, q_ref)
    assert torch.equal(_launch(K.dequantize_int4_triton, q, s, block, n, torch.float32),
                       K.dequantize_int4_reference(q, s, block, n, torch.float32))
    # bf16: one ulp (Triton's interpreter truncates fp32 -> bf16; the reference rounds)
    torch.testing.assert_close(_launch(K.dequantize_int4_triton, q, s, block, n, torch.bfloat16),
                               K.dequantize_int4_reference(q, s, block, n, torch.bfloat16), rtol=2 ** -7, atol=0)


def test_triton_reads_strided_rows():
    """The gathered buffer's packed values are a column slice of [ranks, values + scales]."""
    packed = torch.randint(-128, 128, (4, 40), dtype=torch.int8)
    q = packed[:, :15]
    s = torch.rand(4, 3)
    out = _launch(K.dequantize_int4_triton, q, s, 10, 29, torch.float32)
    assert torch.equal(out, K.dequantize_int4_reference(q, s, 10, 29, torch.float32))
    xs = torch.randn(4, 40)[:, 5:34]
    assert all(torch.equal(a, b) for a, b in zip(_launch(K.quantize_int4_triton, xs, 8),
                                                 K.quantize_int4_reference(xs, 8)))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="block must be >= 1"):
        K.quantize_int4(torch.randn(4), 0)
    with pytest.raises(TypeError, match="floating point"):
        K.quantize_int4(torch.arange(4), 2)
    with pytest.raises(TypeError, match="int8 packed values and fp32 scales"):
        K.dequantize_int4(torch.zeros(4), torch.zeros(1), 4, 8)
    with pytest.raises(ValueError, match="7 elements per row are 4 packed bytes, got a last dimension of 3"):
        K.dequantize_int4(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 1), 8, 7)


def test_opcheck():
    x = _data((3, 37))
    torch.library.opcheck(torch.ops.zerograph.quantize_int4, (x, 8))
    q, s = K.quantize_int4(x, 8)
    torch.library.opcheck(torch.ops.zerograph.dequantize_int4, (q, s, 8, 37, torch.bfloat16))


# odd segments (a byte whose nibbles lie in two segments), a zero-length
# segment, a segment shorter than a block, one segment
SEGMENT_CASES = [(40, 8, [16, 24]), (37, 5, [3, 0, 31, 3]), (131, 64, [1, 130]), (51, 256, [7, 44]),
                 (1100, 7, [5, 1095])]


@pytest.mark.parametrize("n,block,segments", SEGMENT_CASES)
def test_segments_restart_the_blocks(n, block, segments):
    """Blocks restart at each segment: the scales equal each segment's own, the
    codes dequantize to within half of their own block's scale, the byte count
    is ceil(n / 2) + 4 * sum(ceil(n_i / block)), and Triton agrees exactly."""
    x = _data((2, n))
    x[:, :segments[0]] *= 1e-6
    q, s = K.quantize_int4(x, block, segments)
    nb = sum(-(-m // block) for m in segments)
    assert s.shape == (2, nb) and K.packed_bytes(n, block, segments) == (n + 1) // 2 + 4 * nb == q.shape[-1] + 4 * nb
    parts = [K.quantize_int4_reference(p.contiguous(), block) for p in torch.split(x, segments, -1) if p.shape[-1]]
    assert torch.equal(s, torch.cat([p[1] for p in parts], -1))
    deq = K.dequantize_int4(q, s, block, n, torch.float32, segments)
    per_col = torch.cat([_expanded(p, block, m) for p, m in
                         zip(torch.split(s, [-(-m // block) for m in segments], -1), segments)], -1)
    assert bool(((x.double() - deq.double()).abs() <= per_col.double() * SLACK).all())
    qt, st = _launch(K.quantize_int4_triton, x, block, segments)
    assert torch.equal(qt, q) and torch.equal(st, s)
    assert torch.equal(_launch(K.dequantize_int4_triton, q, s, block, n, torch.float32, segments), deq)


def test_opcheck_with_segments():
    x = _data((3, 37))
    torch.library.opcheck(torch.ops.zerograph.quantize_int4, (x, 8, [5, 32]))
    q, s = K.quantize_int4(x, 8, [5, 32])
    torch.library.opcheck(torch.ops.zerograph.dequantize_int4, (q, s, 8, 37, torch.float32, [5, 32]))

"""The fusion passes: golden rewrites on small Dynamo graphs, match counts on
real model graphs, non-equivalent subgraphs left alone, and training with
fusion on equal to eager PyTorch (CPU runs the kernels' references)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import zerograph
from tests import _harness, _models
from tests._harness import TIMEOUT
from zerograph.config import Config
from zerograph.models import GPT, GPTConfig
from zerograph.passes import PassContext
from zerograph.passes.fusion import fuse

FAMILIES = ("attention", "norms", "mlp_activation", "cross_entropy")
ON = Config.load({"zerograph": {"fusion": True}})


def _dynamo_graph(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    torch._dynamo.reset()
    assert len(graphs) == 1
    return graphs[0]


def _fuse_all(gm, config=ON):
    counts = {}
    for family in FAMILIES:
        result = fuse(gm, PassContext(phase="dynamo", state=None, config=config), family=family)
        counts.update(result.counts)
    return counts


def _code(gm) -> str:
    lines = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            lines.append(f"{n.op} {n.name}" if n.op == "placeholder" else f"return {n.args[0]}")
            continue
        target = n.target if isinstance(n.target, str) else f"{n.target.__module__}.{n.target.__name__}"
        args = ", ".join([repr(a) if not isinstance(a, torch.fx.Node) else a.name for a in n.args]
                         + [f"{k}={v!r}" if not isinstance(v, torch.fx.Node) else f"{k}={v.name}" for k, v in n.kwargs.items()])
        lines.append(f"{n.name} = {target}({args})")
    return "\n".join(lines).replace("torch._C._nn.", "F.").replace("torch.nn.functional.", "F.")


class LlamaRMSNorm(nn.Module):  # Hugging Face's, verbatim semantics
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(dtype)


class Block(nn.Module):
    def __init__(self, d=12):
        super().__init__()
        self.norm = LlamaRMSNorm(d)
        self.gate, self.up = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d)
        self.ln = nn.LayerNorm(2 * d)

    def forward(self, x, y):
        h = self.norm(x)
        h = F.silu(self.gate(h)) * self.up(h)
        logits = F.gelu(self.ln(h), approximate="tanh").flatten(0, 1)
        return F.cross_entropy(logits, y.flatten())


def test_golden_rewrite_of_a_small_block():
    block = Block()
    x, y = torch.randn(2, 3, 12), torch.randint(0, 24, (2, 3))
    gm = _dynamo_graph(block, x, y)
    expected = block(x, y)
    assert _fuse_all(gm) == {"rms_norm": 1, "swiglu": 1, "layer_norm": 1, "gelu": 1, "cross_entropy": 1}
    assert_expected_inline(_code(gm), """\
placeholder l_x_
placeholder l_self_modules_norm_parameters_weight_
placeholder l_self_modules_gate_parameters_weight_
placeholder l_self_modules_gate_parameters_bias_
placeholder l_self_modules_up_parameters_weight_
placeholder l_self_modules_up_parameters_bias_
placeholder l_self_modules_ln_parameters_weight_
placeholder l_self_modules_ln_parameters_bias_
placeholder l_y_
rms_norm = zerograph.kernels.rms_norm.rms_norm(l_x_, l_self_modules_norm_parameters_weight_, 1e-06)
linear = F.linear(rms_norm, l_self_modules_gate_parameters_weight_, l_self_modules_gate_parameters_bias_)
linear_1 = F.linear(rms_norm, l_self_modules_up_parameters_weight_, l_self_modules_up_parameters_bias_)
swiglu = zerograph.kernels.swiglu.swiglu(linear, linear_1)
layer_norm_1 = zerograph.kernels.layer_norm.layer_norm(swiglu, l_self_modules_ln_parameters_weight_, l_self_modules_ln_parameters_bias_, 1e-05)
gelu_1 = zerograph.kernels.gelu.gelu(layer_norm_1, 'tanh')
logits = flatten(gelu_1, 0, 1)
flatten_1 = flatten(l_y_)
cross_entropy_1 = zerograph.kernels.cross_entropy.cross_entropy(logits, flatten_1, -100, 'mean')
return (cross_entropy_1,)""")
    params = [p for _, p in block.named_parameters()]
    got = gm(x, *params, y)[0]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_fused_nodes_keep_the_module_path():
    gm = _dynamo_graph(Block(), torch.randn(2, 3, 12), torch.randint(0, 24, (2, 3)))
    _fuse_all(gm)
    fused = {n.target.__name__: n for n in gm.graph.nodes
             if n.op == "call_function" and n.target.__module__.startswith("zerograph.kernels")}
    from zerograph.graph.tags import module_path_from_meta

    assert module_path_from_meta(fused["rms_norm"]) == "norm"
    assert module_path_from_meta(fused["layer_norm"]) == "ln"


def test_fusion_is_off_by_default():
    gm = _dynamo_graph(Block(), torch.randn(2, 3, 12), torch.randint(0, 24, (2, 3)))
    before = _code(gm)
    assert _fuse_all(gm, Config()) == {}
    assert _code(gm) == before


# --------------------------------------------------------------------------- negative cases


def _rms_variant(x, w, *, eps=1e-6, leak=False, extra=False):
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    r = torch.rsqrt(var + eps)
    n = h * r
    if extra:
        n = n * 1.5  # an extra op in the middle
    out = w * n.to(x.dtype)
    return (out, var) if leak else out


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda x, w: _rms_variant(x, w, leak=True), id="intermediate-used-elsewhere"),
        pytest.param(lambda x, w: _rms_variant(x, w, extra=True), id="extra-op-in-the-middle"),
        pytest.param(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)), id="wrong-dim"),
        pytest.param(lambda x, w: w * (x * torch.rsqrt(x.pow(3).mean(-1, keepdim=True) + 1e-6)), id="not-a-square"),
        pytest.param(lambda x, w: F.scaled_dot_product_attention(
            x.view(1, 2, 3, 4), x.view(1, 2, 3, 4), x.view(1, 2, 3, 4),
            attn_mask=torch.ones(3, 3, dtype=torch.bool).triu()), id="sdpa-with-a-different-mask"),
        pytest.param(lambda x, w: F.cross_entropy(x.view(6, 4), torch.zeros(6, dtype=torch.long), label_smoothing=0.1),
                     id="ce-label-smoothing"),
        pytest.param(lambda x, w: F.silu(x) * w, id="swiglu-broadcast"),
        pytest.param(lambda x, w: F.layer_norm(x.view(2, 3, 4), (3, 4)), id="layer-norm-two-dims"),
    ],
)
def test_non_equivalent_subgraphs_stay(fn):
    x, w = torch.randn(2, 3, 4), torch.randn(4)
    gm = _dynamo_graph(fn, x, w)
    before = _code(gm)
    assert _fuse_all(gm) == {}
    assert _code(gm) == before


def test_sdpa_scale_gqa_and_causality_are_carried():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3, enable_gqa=True)

    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    gm = _dynamo_graph(fn, q, k, v)
    assert _fuse_all(gm) == {"sdpa": 1}
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.kwargs == {"causal": True, "scale": 0.3, "dropout_p": 0.0}
    torch.testing.assert_close(gm(q, k, v)[0], fn(q, k, v), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- attention written out


def _hf_mask(B, Sq, Sk, *, op="le", q_offset=0, kv_offset=0, padding=None, additive=True, fill=None):
    """A mask built the way transformers' ``masking_utils`` builds it (5.x):
    position indices from ``arange``, ``kv_idx <= q_idx``, ``& padding[b, kv_idx]``,
    expanded, and for eager attention ``torch.where(mask, 0, finfo.min)``."""
    q_idx = (torch.arange(Sq) + q_offset)[None, None, :, None]
    kv_idx = (torch.arange(Sk) + kv_offset)[None, None, None, :]
    mask = q_idx.new_ones((), dtype=torch.bool)
    mask = mask & ((kv_idx <= q_idx) if op == "le" else (kv_idx < q_idx))
    if padding is not None:
        mask = mask & padding[torch.arange(B)[:, None, None, None], kv_idx]
    mask = mask.expand(B, -1, Sq, Sk)
    if not additive:
        return mask
    return torch.where(mask, torch.zeros(()), torch.finfo(torch.float32).min if fill is None else fill)


class _Module(nn.Module):  # what transformers' attention functions read from `module`
    def __init__(self, groups=1):
        super().__init__()
        self.num_key_value_groups = groups


_MODULE, _GQA_MODULE = _Module(), _Module(groups=2)


def _gpt2_eager(q, k, v, *, scaling=0.25, **mask_kw):
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    mask = _hf_mask(q.shape[0], q.shape[2], k.shape[2], **mask_kw)
    return eager_attention_forward(_MODULE, q, k, v, mask, scaling=scaling, dropout=0.0)[0]


def _call(gm, fn, *inputs):
    """Run a Dynamo graph on ``fn``'s arguments (its placeholders come in first-use order)."""
    import inspect

    names = list(inspect.signature(fn.forward if isinstance(fn, nn.Module) else fn).parameters)
    by_name = {f"l_{n}_": t for n, t in zip(names, inputs)}
    return gm(*[by_name[p.name] for p in gm.graph.find_nodes(op="placeholder")])


def _grads_match(gm, fn, *inputs, rtol=1e-5, atol=1e-6):
    """Forward and input gradients of the rewritten graph equal the original
    function's (fp32: the reference kernels sum in another order, so round-off)."""
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    got, want = _call(gm, fn, *a)[0], fn(*b)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    g = torch.randn_like(want)
    got.backward(g)
    want.backward(g)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=rtol, atol=atol)


def _qkv(B=2, Hq=2, Hkv=2, S=5, D=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g),
            torch.randn(B, Hkv, S, D, generator=g))


def test_gpt2_eager_attention_golden():
    q, k, v = _qkv()
    gm = _dynamo_graph(_gpt2_eager, q, k, v)
    assert _fuse_all(gm) == {"eager_attention": 1}
    assert_expected_inline(_code(gm), """\
placeholder l_q_
placeholder l_k_
placeholder l_v_
attention = zerograph.kernels.attention.attention(l_q_, l_k_, l_v_, causal=True, scale=0.25, dropout_p=0.0)
attn_output_1 = transpose(attention, 1, 2)
return (attn_output_1,)""")
    _grads_match(gm, _gpt2_eager, q, k, v)


def test_llama_eager_attention_with_repeat_kv_is_native_gqa():
    from transformers.models.llama.modeling_llama import eager_attention_forward

    def fn(q, k, v):
        mask = _hf_mask(q.shape[0], q.shape[2], k.shape[2])
        return eager_attention_forward(_GQA_MODULE, q, k, v, mask, scaling=0.3, dropout=0.0)[0]

    q, k, v = _qkv(Hq=4, Hkv=2)
    gm = _dynamo_graph(fn, q, k, v)
    assert _fuse_all(gm) == {"eager_attention": 1}
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "attention"]
    assert [n.op for n in node.args] == ["placeholder"] * 3  # k and v un-repeated: 2 heads
    assert node.kwargs == {"causal": True, "scale": 0.3, "dropout_p": 0.0}
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("expand", "reshape")]
    _grads_match(gm, fn, q, k, v)


def test_scale_without_mask_and_division():
    def fn(q, k, v):  # nanoGPT-style, no mask, scale as a division
        att = F.softmax((q @ k.transpose(-2, -1)) / 8.0, dim=-1)
        return att @ v

    q, k, v = _qkv()
    gm = _dynamo_graph(fn, q, k, v)
    assert _fuse_all(gm) == {"eager_attention": 1}
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert node.kwargs == {"causal": False, "scale": 0.125, "dropout_p": 0.0}
    _grads_match(gm, fn, q, k, v)


def _scores_variant(q, k, v, *, tanh=False, post_scale=False, dim=-1):
    mask = _hf_mask(q.shape[0], q.shape[2], k.shape[2])
    s = torch.matmul(q, k.transpose(-1, -2)) * 0.25 + mask
    if tanh:
        s = 30.0 * torch.tanh(s / 30.0)  # an extra op (soft-capping) in the middle
    p = F.softmax(s, dim=dim)
    if post_scale:
        p = p * 0.5
    return torch.matmul(p, v)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda q, k, v: _gpt2_eager(q, k, v, op="lt"), id="mask-strictly-below-diagonal"),
        pytest.param(lambda q, k, v: _gpt2_eager(q, k, v, q_offset=1), id="mask-shifted-by-one"),
        pytest.param(lambda q, k, v: _gpt2_eager(q, k, v, fill=-1e4), id="mask-fill-not-finfo-min"),
        pytest.param(lambda q, k, v: _gpt2_eager(q, k, v, padding=torch.ones(2, 5, dtype=torch.bool)),
                     id="additive-padding-mask"),
        pytest.param(lambda q, k, v: torch.matmul(F.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.25
                     + torch.ones(5, 5).tril().log(), dim=-1), v), id="mask-from-a-tensor"),
        pytest.param(lambda q, k, v: _scores_variant(q, k, v, tanh=True), id="extra-op-in-the-middle"),
        pytest.param(lambda q, k, v: _scores_variant(q, k, v, post_scale=True), id="scale-after-softmax"),
        pytest.param(lambda q, k, v: _scores_variant(q, k, v, dim=-2), id="softmax-over-queries"),
        pytest.param(lambda q, k, v: torch.matmul(F.softmax(torch.matmul(q, k.transpose(-1, -2)) * k[:1, :1, :1, :1],
                     dim=-1), v), id="scale-from-a-tensor"),
        pytest.param(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=_hf_mask(2, 5, 5, q_offset=1, additive=False)), id="sdpa-mask-shifted-by-one"),
        pytest.param(lambda q, k, v: F.scaled_dot_product_attention(*(t.repeat(1, 1, 1, 33) for t in (q, k, v))),
                     id="sdpa-head-dim-over-the-kernel-maximum"),
        pytest.param(lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=_hf_mask(2, 5, 5, op="lt", additive=False)), id="sdpa-mask-strict"),
    ],
)
def test_non_equivalent_attention_stays(fn):
    q, k, v = _qkv()
    gm = _dynamo_graph(fn, q, k, v)
    before = _code(gm)
    assert _fuse_all(gm) == {}
    assert _code(gm) == before


def test_a_constant_mask_is_evaluated():
    """A mask computed from constants only (here ``tril`` of ones; in transformers
    the packed-sequence mask of ``use_cache=False``) is evaluated at compile time
    and matched when it equals the causal mask."""

    def causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool).tril()[None, None])

    def anti_causal(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool).triu()[None, None])

    q, k, v = _qkv()
    gm = _dynamo_graph(causal, q, k, v)
    assert _fuse_all(gm) == {"sdpa_masked": 1}
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]  # the mask's ops are gone
    assert node.kwargs == {"causal": True, "scale": 0.5, "dropout_p": 0.0}
    _grads_match(gm, causal, q, k, v)
    gm = _dynamo_graph(anti_causal, q, k, v)
    before = _code(gm)
    assert _fuse_all(gm) == {}
    assert _code(gm) == before


@pytest.mark.parametrize("additive", [False, True])
def test_sdpa_with_a_causal_and_key_padding_mask(additive):
    padding = torch.ones(2, 5, dtype=torch.bool)
    padding[0, :3] = False  # left padding: query rows 0-2 of sample 0 see no key

    def fn(q, k, v, padding):
        mask = _hf_mask(2, 5, 5, padding=padding if not additive else None, additive=additive)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.4)

    q, k, v = _qkv()
    gm = _dynamo_graph(fn, q, k, v, padding)
    assert _fuse_all(gm) == {"sdpa_masked": 1}
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    want = {"causal": True, "scale": 0.4, "dropout_p": 0.0}
    if not additive:
        want["key_padding_mask"] = next(n for n in gm.graph.nodes if n.name == "l_padding_")
    assert node.kwargs == want
    _grads_match(gm, lambda q, k, v: fn(q, k, v, padding), q, k, v) if additive else None
    if not additive:  # SDPA (torch >= 2.5) and the kernel both give 0 on rows that see no key
        a = [t.clone().requires_grad_() for t in (q, k, v)]
        b = [t.clone().requires_grad_() for t in (q, k, v)]
        got, want_out = _call(gm, fn, *a, padding)[0], fn(*b, padding)
        torch.testing.assert_close(got, want_out, rtol=1e-5, atol=1e-6)
        assert got[0, :, :3].abs().max() == 0
        got.sum().backward()
        want_out.sum().backward()
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- rotary, GELU formula, linear + CE


def _rope(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _cos_sin(B=2, S=5, D=4):
    freqs = torch.arange(S, dtype=torch.float32)[:, None] * torch.tensor([1.0, 0.1])[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None].expand(B, S, D)
    return emb.cos(), emb.sin()


def test_hf_rotary_becomes_one_op():
    q, k, _ = _qkv(Hq=4, Hkv=2)
    cos, sin = _cos_sin()

    def fn(q, k, cos, sin):
        qe, ke = _rope(q, k, cos, sin)
        return qe * 2.0, ke * 3.0

    gm = _dynamo_graph(fn, q, k, cos, sin)
    assert _fuse_all(gm) == {"rotary": 1}
    assert_expected_inline(_code(gm), """\
placeholder l_cos_
placeholder l_sin_
placeholder l_q_
placeholder l_k_
apply_rotary = zerograph.kernels.rotary.apply_rotary(l_q_, l_k_, l_cos_, l_sin_, 1)
getitem_4 = _operator.getitem(apply_rotary, 0)
getitem_5 = _operator.getitem(apply_rotary, 1)
mul_4 = _operator.mul(getitem_4, 2.0)
mul_5 = _operator.mul(getitem_5, 3.0)
return (mul_4, mul_5)""")
    a = [t.clone().requires_grad_() for t in (q, k)]
    b = [t.clone().requires_grad_() for t in (q, k)]
    got, want = _call(gm, fn, *a, cos, sin), fn(*b, cos, sin)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    sum(x.sum() for x in got).backward()
    sum(y.sum() for y in want).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-6)


def _rot(x, swap=False):
    x1, x2 = x[..., :2], x[..., 2:]
    return torch.cat((x1, -x2) if swap else (-x2, x1), dim=-1)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda q, k, c, s: q * c.unsqueeze(1) + _rot(q) * s.unsqueeze(1), id="query-only"),
        pytest.param(lambda q, k, c, s: (q * c.unsqueeze(1) + _rot(q, swap=True) * s.unsqueeze(1),
                                         k * c.unsqueeze(1) + _rot(k, swap=True) * s.unsqueeze(1)),
                     id="wrong-rotate-half"),
        pytest.param(lambda q, k, c, s: (q * c.unsqueeze(1) + _rot(q) * s.unsqueeze(1),
                                         k * c.unsqueeze(1) + _rot(k) * (2 * s).unsqueeze(1)),
                     id="different-sin-for-k"),
    ],
)
def test_non_equivalent_rotary_stays(fn):
    q, k, _ = _qkv()
    cos, sin = _cos_sin()
    gm = _dynamo_graph(fn, q, k, cos, sin)
    before = _code(gm)
    assert _fuse_all(gm) == {}
    assert _code(gm) == before


def test_gpt2_new_gelu_formula():
    from transformers.activations import NewGELUActivation

    x = torch.randn(3, 7)
    gm = _dynamo_graph(NewGELUActivation(), x)
    assert _fuse_all(gm) == {"gelu_new": 1}
    assert_expected_inline(_code(gm), """\
placeholder l_input_
gelu = zerograph.kernels.gelu.gelu(l_input_, 'tanh')
return (gelu,)""")
    _grads_match(gm, NewGELUActivation(), x)


@pytest.mark.parametrize("coef, power", [(0.044, 3.0), (0.044715, 2.0)], ids=["other-coefficient", "square"])
def test_non_equivalent_gelu_formula_stays(coef, power):
    def fn(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + coef * torch.pow(x, power))))

    gm = _dynamo_graph(fn, torch.randn(3, 7))
    before = _code(gm)
    assert _fuse_all(gm) == {}
    assert _code(gm) == before


class NanoHead(nn.Module):
    """nanoGPT's loss: ``F.cross_entropy(lm_head(x).view(-1, V).float(), y)``."""

    def __init__(self, return_logits=False):
        super().__init__()
        self.lm_head = nn.Linear(12, 19, bias=False)
        self.return_logits = return_logits

    def forward(self, x, y):
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1), ignore_index=-1)
        return (loss, logits) if self.return_logits else loss


def test_linear_cross_entropy_when_the_logits_feed_only_the_loss():
    head = NanoHead()
    x, y = torch.randn(2, 5, 12), torch.randint(0, 19, (2, 5))
    y[0, 0] = -1
    gm = _dynamo_graph(head, x, y)
    assert _fuse_all(gm) == {"linear_cross_entropy": 1}
    assert_expected_inline(_code(gm), """\
placeholder l_self_modules_lm_head_parameters_weight_
placeholder l_x_
placeholder l_y_
view_1 = view(l_y_, -1)
reshape = torch.reshape(l_x_, (-1, 12))
linear_cross_entropy_fp32 = zerograph.passes.fusion.patterns.linear_cross_entropy_fp32(reshape, l_self_modules_lm_head_parameters_weight_, view_1, None, -1, 'mean')
return (linear_cross_entropy_fp32,)""")
    w = head.lm_head.weight
    xa, wa = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    by_name = {"l_x_": xa, "l_self_modules_lm_head_parameters_weight_": wa, "l_y_": y}
    got = gm(*[by_name[p.name] for p in gm.graph.find_nodes(op="placeholder")])[0]
    want = head(x.requires_grad_(), y)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(xa.grad, x.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wa.grad, w.grad, rtol=1e-5, atol=1e-7)


def test_returned_logits_keep_the_plain_cross_entropy():
    gm = _dynamo_graph(NanoHead(return_logits=True), torch.randn(2, 5, 12), torch.randint(0, 19, (2, 5)))
    assert _fuse_all(gm) == {"cross_entropy": 1}


# --------------------------------------------------------------------------- real models


def _counts(model_name, attn=None):
    torch._dynamo.reset()
    model = _models.MODELS[model_name]()
    if attn:
        model.set_attn_implementation(attn)
    model = zerograph.compile(model, {"zero_optimization": {"stage": 3}, "zerograph": {"fusion": True}})
    idx, targets = _models.global_batch(0, 2)
    _models.loss_of(model_name, model, idx, targets).backward()
    info = zerograph.inspect(model)
    counts = {}
    for record in info.passes:
        for k, v in record.counts.items():
            counts[k] = counts.get(k, 0) + v
    torch._dynamo.reset()
    return counts, info


# HF models and zerograph.models.GPT return their logits, so the loss stays a
# plain cross_entropy there (linear_cross_entropy would have to recompute them).
EXPECTED = {
    ("gpt", None): {"layer_norm": 5, "sdpa": 2, "gelu": 2, "cross_entropy": 1},
    ("hf_gpt2", "sdpa"): {"layer_norm": 5, "sdpa": 2, "gelu_new": 2, "cross_entropy": 1},
    ("hf_gpt2", "eager"): {"layer_norm": 5, "eager_attention": 2, "gelu_new": 2, "cross_entropy": 1},
    ("llama", "sdpa"): {"rms_norm": 5, "rotary": 2, "sdpa": 2, "swiglu": 2, "cross_entropy": 1},
    ("llama", "eager"): {"rms_norm": 5, "rotary": 2, "eager_attention": 2, "swiglu": 2, "cross_entropy": 1},
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model_name, attn", list(EXPECTED))
def test_match_counts_on_real_models(model_name, attn):
    counts, info = _counts(model_name, attn)
    assert counts == EXPECTED[model_name, attn]
    assert "fused patterns: " in info.summary()


@pytest.mark.parametrize("model_name, attn", [("hf_gpt2", "eager"), ("llama", "eager"), ("hf_gpt2", "sdpa")])
def test_no_mask_or_repeat_kv_ops_are_left(model_name, attn):
    """The whole attention subgraph goes: scores, softmax, the mask built from
    arange (shared by the layers, erased with the last one), repeat_kv."""
    model = _models.MODELS[model_name]()
    model.set_attn_implementation(attn)
    idx, _ = _models.global_batch(0, 2)
    gm = _dynamo_graph(lambda i: model(input_ids=i).logits, idx)
    _fuse_all(gm)
    left = {n.target if isinstance(n.target, str) else n.target.__name__ for n in gm.graph.nodes}
    assert not left & {"softmax", "where", "le", "matmul", "tanh", "neg", "pow", "rsqrt", "silu"}, left
    repeat_kv = [n for n in gm.graph.nodes if n.target == "reshape" and n.args[0].target == "expand"]
    assert not repeat_kv


@pytest.mark.parametrize("model_name, attn, pattern", [("hf_gpt2", "eager", "eager_attention"),
                                                        ("hf_gpt2", "sdpa", "sdpa_masked"),
                                                        ("llama", "eager", "eager_attention")])
def test_hf_without_cache_packed_sequence_mask(model_name, attn, pattern):
    """``use_cache=False`` makes transformers build a packed-sequence mask from the
    position ids; built from ``arange`` only, it evaluates to the causal mask."""
    model = _models.MODELS[model_name]()
    model.set_attn_implementation(attn)
    idx, _ = _models.global_batch(0, 2)
    counts = {}

    def backend(gm, example_inputs):
        counts.update(_fuse_all(gm))
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(lambda i: model(input_ids=i, use_cache=False).logits, backend=backend, fullgraph=True)(idx)
    torch._dynamo.reset()
    assert counts[pattern] == 2
    torch.testing.assert_close(got, model(input_ids=idx, use_cache=False).logits, rtol=1e-5, atol=1e-6)


def test_hf_sdpa_with_a_padding_mask():
    model = _models.MODELS["llama"]()
    idx, _ = _models.global_batch(0, 2)
    mask = torch.ones_like(idx)
    mask[0, :3] = 0
    gm = _dynamo_graph(lambda i, m: model(input_ids=i, attention_mask=m).logits, idx, mask)
    assert _fuse_all(gm) == {"rms_norm": 5, "rotary": 2, "sdpa_masked": 2, "swiglu": 2}
    kwargs = [n.kwargs for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "attention"]
    assert len(kwargs) == 2
    for kw in kwargs:  # the (B, S) bool mask made from the attention_mask input
        kpm = kw["key_padding_mask"].meta["example_value"]
        assert kw["causal"] and kpm.dtype == torch.bool and tuple(kpm.shape) == (2, 16)


# --------------------------------------------------------------------------- training equivalence

# (model, attention implementation, left padding): nanoGPT-style GPT returning
# only its loss (linear_cross_entropy on the tied lm_head), HF GPT-2 and Llama
# with written-out attention (causal mask, repeat_kv, NewGELU, rotary), Llama
# with SDPA given a causal + key-padding mask.
VARIANTS = [("gpt_loss_only", None, False), ("hf_gpt2", "eager", False), ("llama", "eager", False),
            ("llama", "sdpa", True)]
FUSED = {
    ("gpt_loss_only", None, False): {"layer_norm": 5, "sdpa": 2, "gelu": 2, "linear_cross_entropy": 1},
    ("hf_gpt2", "eager", False): EXPECTED["hf_gpt2", "eager"],
    ("llama", "eager", False): EXPECTED["llama", "eager"],
    ("llama", "sdpa", True): {"rms_norm": 5, "rotary": 2, "sdpa_masked": 2, "swiglu": 2, "cross_entropy": 1},
}


class LossOnlyGPT(GPT):
    """nanoGPT's training forward: the loss only, so the tied ``lm_head`` and the
    loss become one ``linear_cross_entropy`` (no ``(N, V)`` logits)."""

    def forward(self, idx, targets):
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _model(name, attn):
    if name == "gpt_loss_only":
        torch.manual_seed(1234)
        return LossOnlyGPT(GPTConfig(vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=2, n_head=2, n_embd=30))
    model = _models.MODELS[name]()
    if attn:
        model.set_attn_implementation(attn)
    return model


def _loss(name, model, idx, targets, pad):
    if name == "gpt_loss_only":
        return model(idx, targets)
    mask = torch.ones_like(idx)
    if pad:
        mask[0::2, :3] = 0  # every rank's 4 rows hold 2 padded ones: equal token counts per rank
    labels = idx.masked_fill(mask == 0, -100)
    return model(input_ids=idx, attention_mask=mask if pad else None, labels=labels).loss


def _variants(world):
    """HF GPT-2 and Llama eager at both world sizes; the rest at ZeRO-3 world 2 only (time)."""
    return VARIANTS if world > 1 else [v for v in VARIANTS if v[1] == "eager"]


def _reference(world):
    out = []
    for name, attn, pad in _variants(world):
        model = _model(name, attn)
        opt = _harness._optimizer(model.parameters())
        losses = []
        for step in range(_harness.STEPS):
            idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
            loss = _loss(name, model, idx, targets, pad)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        out.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
    return out


def _variant_loss(name, pad, model, idx, targets):
    return _loss(name, model, idx, targets, pad)


def _pass_counts(model, opt):
    counts = {}
    for record in zerograph.inspect(model).passes:
        for k, v in record.counts.items():
            counts[k] = counts.get(k, 0) + v
    return {"counts": counts}


def _fused(world):
    config = {"zero_optimization": {"stage": 3}, "zerograph": {"fusion": True}}
    return [_harness.train(functools.partial(_model, name, attn), config, _harness.STEPS, world,
                           loss=functools.partial(_variant_loss, name, pad), report=_pass_counts)[0]
            for name, attn, pad in _variants(world)]


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.slow), 2])  # world 2 trains every variant
def test_training_with_fusion_matches_eager(world):
    # CPU runs the kernels' pure-torch references; their closed-form fp32
    # backwards (RMSNorm, SwiGLU, attention, rotary) differ from autograd's
    # op-by-op ones by round-off (single-step gradients agree to ~5e-7
    # relative). AdamW divides each gradient by its running RMS, so on the few
    # Llama embedding entries whose gradient is tiny that round-off becomes a
    # parameter difference of a few 1e-6 after 5 steps at lr 1e-2 (measured:
    # up to 2.7e-6, eager attention at world size 1); hence atol 1e-5 for Llama.
    # GPT (also with linear_cross_entropy on the tied lm_head) and HF GPT-2
    # measured at most 5.7e-7 here, but 1.5e-6 (GPT, c_proj.bias, world 2) on
    # CI's machine, whose CPU takes other vector paths: the same amplified
    # round-off, so atol 1e-5 for every variant (losses agree to ~1e-7).
    results = _fused(world)
    variants = _variants(world)
    assert len(results) == len(variants)
    for (name, attn, pad), result, (ref_losses, ref_params) in zip(variants, results, _reference(world)):
        assert result["counts"] == FUSED[name, attn, pad], (name, attn, pad)
        _harness.assert_same_training(result, ref_losses, ref_params, atol=1e-5)

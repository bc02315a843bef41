"""Vocab-parallel embedding and cross-entropy (``zerograph.tp_vocab_parallel``):
tp=2 trains like single-process eager (fp32, rtol 1e-5) on zerograph's GPT
(embedding tied to the LM head) and on Hugging Face GPT-2 (tied too), and
the returned logits are this rank's vocabulary slice: no rank holds a
full-vocabulary row."""

from __future__ import annotations

import pytest
import torch

from tests import _harness, _models, _pool
from tests.test_tensor_parallel import TP, _check, _config, tp_run
from zerograph.models import GPT, GPTConfig

VOCAB = 98  # tp divides it; the token ids (< 97) are those of the other tests


def make_gpt_v98():
    torch.manual_seed(1234)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=_models.SEQ, n_layer=2, n_head=2, n_embd=30))


def make_hf_gpt2_v98():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=_models.SEQ, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return GPT2LMHeadModel(cfg)


def make_llama_v98():
    """Llama with an untied LM head (and grouped-query attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=_models.SEQ,
                      use_cache=False)
    return LlamaForCausalLM(cfg)


# the ranks import this module to run vocab_run, and so know these names
_models.MODELS.setdefault("gpt_v98", make_gpt_v98)
_models.MODELS.setdefault("hf_gpt2_v98", make_hf_gpt2_v98)
_models.MODELS.setdefault("llama_v98", make_llama_v98)


def vocab_run(model_name, configs, steps):
    import zerograph

    logits_shapes = []
    original = zerograph.compile

    def compile_and_look(model, config, **kwargs):
        model = original(model, config, **kwargs)
        idx, _ = _models.global_batch(0, _harness.PER_RANK_BATCH)
        with torch.no_grad():
            out = model(idx, idx) if model_name.startswith("gpt") else model(input_ids=idx, labels=idx)
        logits_shapes.append(tuple(out.logits.shape))
        return model

    zerograph.compile = compile_and_look
    try:
        results = tp_run(model_name, configs, steps)
    finally:
        zerograph.compile = original
    for result, shape in zip(results, logits_shapes):
        result["logits_shape"] = shape
    return results


def _vocab_config(stage: int) -> dict:
    config = _config(stage)
    config["zerograph"] = {**config.get("zerograph", {}), "tp_vocab_parallel": True}
    return config


_EMBEDDINGS = {"gpt_v98": ("wte.weight", 30), "hf_gpt2_v98": ("transformer.wte.weight", 32),
               "llama_v98": ("model.embed_tokens.weight", 32)}


@pytest.mark.timeout(_harness.TIMEOUT + 30)
@pytest.mark.parametrize("model_name", [
    "gpt_v98",
    # nightly: CI trains Hugging Face GPT-2 at tp=2 (test_tensor_parallel) and the vocab-parallel
    # Hugging Face loss with Llama's untied head (Megatron-SP test below)
    pytest.param("hf_gpt2_v98", marks=pytest.mark.slow),
    pytest.param("llama_v98", marks=pytest.mark.slow),
])
def test_vocab_parallel_tp2_matches_eager(model_name):
    """zerograph's GPT and Hugging Face GPT-2 (heads tied to the embedding),
    Llama (untied head): the loss (Hugging Face's ForCausalLMLoss: labels
    shifted, -100 ignored, mean over the rest) is computed vocab-parallel in
    the graph of the logits, so no rank ever holds a full-vocabulary row:
    the model returns this rank's slice and nothing is gathered."""
    results = _pool.run(vocab_run, 2, model_name, [_vocab_config(3)], _harness.STEPS, timeout=_harness.TIMEOUT)
    emb, width = _EMBEDDINGS[model_name]
    for rank_results in results:
        assert rank_results[0]["local_shapes"][emb] == (VOCAB // TP, width)
        assert rank_results[0]["logits_shape"][-1] == VOCAB // TP
        assert "tp_all_gather" not in rank_results[0]["comm"]
    if model_name == "llama_v98":  # untied: the head is a parameter of its own, split too
        assert results[0][0]["local_shapes"]["lm_head.weight"] == (VOCAB // TP, width)
    _check(results, model_name, 2, ["vocab parallel, ZeRO-3"])


def test_the_plan_splits_the_embedding_and_the_head_over_the_vocabulary():
    from zerograph.planner.tp_plan import decide_splits, tp_layouts

    def specs(qkv, proj):
        return {"layer_specs": [{"patterns": [qkv], "partition_type": "column", "shape": [3, -1]},
                                {"patterns": [proj], "partition_type": "row"}]}

    for model, emb, head, config in (
            (make_gpt_v98(), "wte", "lm_head", specs(r".*attn\.qkv\.weight$", r".*attn\.proj\.weight$")),
            (make_hf_gpt2_v98(), "transformer.wte", "lm_head",
             specs(r".*attn\.c_attn\.weight$", r".*attn\.c_proj\.weight$"))):
        splits = decide_splits(model, config, None, vocab_parallel=True)
        assert splits[emb].kind == splits[head].kind == "vocab", splits
        layouts = tp_layouts(model, splits, 2, 1)
        name = f"{emb}.weight"  # the head is tied to the embedding: one parameter, split once
        assert layouts[name].local_shape[0] == VOCAB // 2 and layouts[name].dim == 0
        assert f"{head}.weight" not in layouts


def test_a_vocabulary_tp_does_not_divide_is_a_config_error(fake_world):
    import zerograph

    idx, targets = _models.global_batch(0, 2)
    with pytest.raises(zerograph.ConfigError, match=r"autotp_size=2 does not divide its 97 features.*vocab_parallel"):
        zerograph.compile(_models.make_gpt(), {"tensor_parallel": {"autotp_size": 2},
                                               "zerograph": {"tp_vocab_parallel": True}},
                          example_batch=(idx, targets))


class TinyLM(torch.nn.Module):
    """An embedding tied to its LM head, and the loss: all a vocab-parallel rewrite touches."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx, targets):
        return torch.nn.functional.cross_entropy(self.head(self.emb(idx)), targets)


def test_vocab_parallel_pass_golden(fake_world):
    import zerograph
    from expecttest import assert_expected_inline
    from zerograph.graph.format import format_graph

    torch.manual_seed(0)
    idx, targets = torch.randint(0, 8, (6,)), torch.randint(0, 8, (6,))
    config = {"tensor_parallel": {"autotp_size": 2},
              "zerograph": {"verify_graphs": True, "device": "cpu", "tp_vocab_parallel": True}}
    model = zerograph.compile(TinyLM(), config, example_batch=(idx, targets))
    model(idx, targets).backward()
    assert [_harness.tp_local_shape(p) for p in model.parameters()] == [(4, 4)]  # rows 0-3 or 4-7 of the vocabulary
    assert_expected_inline(format_graph(zerograph.inspect(model).regions[0]["graphs"]["dynamo"], canonical=True),
                           """\
l_call_impl_self_modules_emb_parameters_weight_: f32[8, 4]
l_args_0_: i64[6]
l_args_1_: i64[6]
local: f32[4, 4] = to_local(l_call_impl_self_modules_emb_parameters_weight_)
unshard_whole: f32[4, 4] = unshard(local, 'zg0', 'emb.weight')
sub: i64[6] = sub(l_args_0_, 0)
lt: bool[6] = lt(sub, 0)
ge: bool[6] = ge(sub, 4)
or_: bool[6] = or_(lt, ge)
masked_fill: i64[6] = masked_fill(sub, or_, 0)
embedding: f32[6, 4] = embedding(masked_fill, unshard_whole, None)
unsqueeze: bool[6, 1] = unsqueeze(or_, -1)
masked_fill_1: f32[6, 4] = masked_fill(embedding, unsqueeze, 0.0)
tp_all_reduce_default: f32[6, 4] = zerograph.tp_all_reduce(masked_fill_1, 'zg0')
tp_copy_default: f32[6, 4] = zerograph.tp_copy(tp_all_reduce_default, 'zg0')
linear: f32[6, 4] = linear(tp_copy_default, unshard_whole, None)
detach: f32[6, 4] = detach(linear)
amax: f32[6, 1] = amax(detach, -1, True)
tp_all_reduce_max_default: f32[6, 1] = zerograph.tp_all_reduce_max(amax, 'zg0')
sub_1: f32[6, 4] = sub(linear, tp_all_reduce_max_default)
exp: f32[6, 4] = exp(sub_1)
sum: f32[6] = sum(exp, -1)
tp_all_reduce_default_1: f32[6] = zerograph.tp_all_reduce(sum, 'zg0')
sub_2: i64[6] = sub(l_args_1_, 0)
lt_1: bool[6] = lt(sub_2, 0)
ge_1: bool[6] = ge(sub_2, 4)
or__1: bool[6] = or_(lt_1, ge_1)
masked_fill_2: i64[6] = masked_fill(sub_2, or__1, 0)
unsqueeze_1: i64[6, 1] = unsqueeze(masked_fill_2, 1)
gather: f32[6, 1] = gather(sub_1, 1, unsqueeze_1)
squeeze: f32[6] = squeeze(gather, 1)
masked_fill_3: f32[6] = masked_fill(squeeze, or__1, 0.0)
tp_all_reduce_default_2: f32[6] = zerograph.tp_all_reduce(masked_fill_3, 'zg0')
log: f32[6] = log(tp_all_reduce_default_1)
sub_3: f32[6] = sub(log, tp_all_reduce_default_2)
eq: bool[6] = eq(l_args_1_, -100)
masked_fill_4: f32[6] = masked_fill(sub_3, eq, 0.0)
invert: bool[6] = invert(eq)
sum_1: i64[] = sum(invert)
sum_2: f32[] = sum(masked_fill_4)
div: f32[] = div(sum_2, sum_1)
return [div]""")


@pytest.mark.timeout(_harness.TIMEOUT + 30)
def test_vocab_parallel_llama_with_megatron_sp_reduce_scatters_the_embedding():
    """Llama with the vocab-parallel embedding and loss and Megatron-SP at
    tp=2 (world 2, ZeRO 0): its embedding feeds the first norm directly, so
    the embedding's sum over tp is a reduce-scatter along the sequence
    (Megatron-SP's embedding; backward: all-gather), not an all-reduce and a
    cut. Training equals eager; the step's tp bytes equal the formula."""
    config = _vocab_config(0)
    config["zerograph"]["tp_sequence_parallel"] = True
    results = _pool.run(vocab_run, 2, "llama_v98", [config], _harness.STEPS, timeout=_harness.TIMEOUT)
    _check(results, "llama_v98", 2, ["vocab parallel + Megatron-SP, ZeRO-0"])
    rows, width = _harness.PER_RANK_BATCH * _models.SEQ, 32
    u, vec = rows * width * 4, width * 4  # one [b, s, h] fp32 activation; one RMSNorm weight
    for rank_results in results:
        comm = {k: v for k, v in rank_results[0]["comm"].items() if k.startswith("tp_") and v}
        # 2 blocks x 4 of each; the embedding's reduce-scatter (backward: all-gather); the vocab-split head's
        # gather of the stream (backward: reduce-scatter); the backward's re-gather of each column group's
        # input (2 per block and the head's: zerograph.tp_sequence_parallel_regather); 5 RMSNorm weights'
        # gradient sums; the loss's 3
        assert comm == {"tp_reduce_scatter": 10 * u, "tp_all_gather": 15 * u,
                        "tp_all_reduce": 5 * vec + 3 * rows * 4}, comm

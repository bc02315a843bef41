"""Grouped-query attention with fewer key/value heads than tensor-parallel
ranks: each tp rank holds the key/value head(s) its query heads read (the k
and v projections are replicated over ``tp / num_key_value_heads`` ranks),
and their gradients are summed over those ranks
(docs/tensor_parallel.md#grouped-query-attention-fewer-keyvalue-heads-than-tp).

Equivalence: 5 AdamW steps on real gloo ranks against single-process eager
PyTorch, losses and every full parameter: fp32 rtol 1e-5, with atol
``ADAM_ATOL`` (tests/test_tensor_parallel.py) for the parameters.
"""

from __future__ import annotations

import pytest
import torch

import zerograph
from tests import _harness, _models, _pool
from tests._harness import TIMEOUT
from tests.test_tensor_parallel import _check_adam_atol, _config, fake_world4, tp_run  # noqa: F401  (fixture)
from zerograph.runtime.tp_layout import TpLayout


def test_replicated_layout_cuts_blocks_and_reassembles():
    """16 rows over tp=4 with 2 replicas: ranks 0 and 1 hold rows 0-7, ranks
    2 and 3 rows 8-15; assembling takes one replica of each block."""
    whole = torch.arange(64.0).reshape(16, 4)
    layouts = [TpLayout("column", "attn.k_proj", 0, (16,), (16, 4), 4, i, replicas=2) for i in range(4)]
    parts = [lay.local_part(whole) for lay in layouts]
    assert [tuple(p[:, 0].tolist()) for p in parts] == [tuple(range(0, 32, 4))] * 2 + [tuple(range(32, 64, 4))] * 2
    assert layouts[3].local_shape == (8, 4) and layouts[3].block == 1 and layouts[3].blocks == 2
    assert torch.equal(layouts[0].assemble(parts), whole)
    with pytest.raises(ValueError, match="3 replicas of each block do not divide tensor_parallel.autotp_size=4"):
        TpLayout("column", "attn.k_proj", 0, (16,), (16, 4), 4, 0, replicas=3)


@pytest.mark.timeout(TIMEOUT + 30)
def test_one_kv_head_replicated_over_tp2_matches_eager():
    """Llama, 4 query heads and 1 key/value head (head_dim 8), tp=2 (world
    2) at ZeRO 0 and 3: each rank holds 2 query heads and the whole k and v
    projections ([8, 32]), whose gradients are all-reduced over tp."""
    results = _pool.run(tp_run, 2, "llama_kv1", [_config(0), _config(3)], timeout=TIMEOUT)
    _check_adam_atol(results, "llama_kv1", 1)
    for rank_results in results:
        shapes = rank_results[0]["local_shapes"]
        assert shapes["model.layers.0.self_attn.q_proj.weight"] == (16, 32)
        assert shapes["model.layers.0.self_attn.k_proj.weight"] == (8, 32)
        assert shapes["model.layers.0.self_attn.v_proj.weight"] == (8, 32)
        assert shapes["model.layers.0.self_attn.o_proj.weight"] == (32, 16)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_two_kv_heads_replicated_over_tp4_matches_eager():
    """Llama, 4 query heads and 2 key/value heads at tp=4 (world 4): ranks 0
    and 1 hold key/value head 0, ranks 2 and 3 head 1 (each 4 rows of [16,
    32]); the gradient sum runs over pairs of ranks (zero-padded all-reduce)."""
    results = _pool.run(tp_run, 4, "llama", [_config(0, tp=4)], timeout=TIMEOUT)
    _check_adam_atol(results, "llama", 1)
    assert results[3][0]["local_shapes"]["model.layers.0.self_attn.k_proj.weight"] == (8, 32)


def test_kv_heads_tp_cannot_replicate_is_a_config_error(fake_world4):
    """3 key/value heads for 12 query heads at tp=4: 4 is not a multiple of 3."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=_models.VOCAB, hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=12, num_key_value_heads=3))
    with pytest.raises(zerograph.ConfigError, match=r"model\.layers\.0\.self_attn\.k_proj: 3 key/value heads \(and 12 "
                                                    r"query heads\) cannot be split over tensor_parallel\.autotp_size=4"
                                                    r".*valid autotp_size values: 1, 3, 6, 12"):
        zerograph.compile(model, {"tensor_parallel": {"autotp_size": 4}})


def test_replicated_kv_read_and_repeat_kv_golden(fake_world4):
    """Llama (4 query heads, 2 key/value heads, head_dim 8) at tp=4, no KV
    cache (fake process group, tp rank 0): the k projection's read is
    ``narrow(tp_copy(pad(W)))`` (rank 0 holds rows 0-7 of 16, the gradient
    summed with rank 1's), and repeat_kv repeats this rank's one key/value
    head for its one query head."""
    from expecttest import assert_expected_inline

    from zerograph.graph.format import format_graph

    idx, _ = _models.global_batch(0, 2)
    llama = _models.make_llama()
    llama.config.use_cache = False
    model = zerograph.compile(llama, {"tensor_parallel": {"autotp_size": 4}, "zerograph": {"device": "cpu"}})
    model(input_ids=idx, labels=idx).loss.backward()
    lines = format_graph(zerograph.inspect(model).regions[0]["graphs"]["dynamo"], canonical=True).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("pad:"))
    end = next(i for i, line in enumerate(lines) if line.startswith("attn_output:"))
    keep = ("pad", "tp_copy", "narrow", "linear_1", "hidden_states_3", "key", "attn_output")
    assert_expected_inline("\n".join(line for line in lines[start:end + 1] if line.startswith(keep)), """\
pad: f32[16, 32] = pad(unshard_whole_1, [0, 0, 0, 8])
tp_copy_default_1: f32[16, 32] = zerograph.tp_copy(pad, 'zg0')
narrow: f32[8, 32] = narrow(tp_copy_default_1, 0, 0, 8)
linear_1: f32[2, 16, 8] = linear(tp_copy_default, narrow, None)
key_states: f32[2, 1, 16, 8] = transpose(view_1, 1, 2)
pad_1: f32[16, 32] = pad(unshard_whole_2, [0, 0, 0, 8])
tp_copy_default_2: f32[16, 32] = zerograph.tp_copy(pad_1, 'zg0')
narrow_1: f32[8, 32] = narrow(tp_copy_default_2, 0, 0, 8)
hidden_states_3: f32[2, 1, 1, 16, 8] = expand(getitem_6, 2, 1, 1, 16, 8)
key: f32[2, 1, 16, 8] = reshape(hidden_states_3, 2, 1, 16, 8)
attn_output: f32[2, 1, 16, 8] = scaled_dot_product_attention(q_embed, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=0.3535533905932738, is_causal=False)""")

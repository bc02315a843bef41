"""Ulysses sequence parallelism (``sequence_parallel_size``) trains exactly like
single-process eager PyTorch on the full sequences, moves the Ulysses formula's
bytes, and refuses what it cannot split with errors that name the fix.

Equivalence tests run on real gloo ranks of the test pool (sp=2 on world 2;
sp=2 x dp=2 on world 4, slow), train 5 AdamW steps on the same global
batches as a single-process eager run (every rank of an sp group gets the same
full rows; zerograph cuts the sequences), and compare every step's mean loss
and every full parameter (fp32: rtol 1e-5). Pass-level tests use the fake
process group.
"""

from __future__ import annotations

import gc
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from expecttest import assert_expected_inline
from torch import nn

import zerograph
from tests import _harness, _models, _pool
from zerograph.graph.format import format_graph
from zerograph.runtime.sequence import SequenceParallelError

SP = 2
IGNORED = 5  # every IGNORED-th label is -100 in the masked runs


def _config(stage: int, sp: int = SP, **extra) -> dict:
    return {"zero_optimization": {"stage": stage}, "sequence_parallel_size": sp,
            "zerograph": {"verify_graphs": True}, **extra}


def _batch(model_name: str, step: int, rows: int, masked: bool):
    """(model inputs, kwargs) of a step's global batch: GPT gets (idx, targets),
    Hugging Face models ``input_ids`` and ``labels`` (shifted inside the model)."""
    idx, targets = _models.global_batch(step, rows)
    hf = model_name in ("llama", "qwen2", "hf_gpt2_eager")
    labels = idx.clone() if hf else targets
    if masked == "padded":  # an attention_mask with padding, its positions' labels -100
        mask = _padding(rows)
        labels = labels.masked_fill(mask == 0, -100)
        return (), {"input_ids": idx, "labels": labels, "attention_mask": mask}
    if masked:
        labels = labels.clone()
        labels[:, step % IGNORED::IGNORED] = -100
        labels[0, -3:] = -100  # right padding of the first row
    if hf:
        return (), {"input_ids": idx, "labels": labels}
    return (idx, labels), {}


def _padding(rows: int):
    """Padding of every row but the last: left (3), right across the cut (the
    last 6), left over all of rank 0's half and one more (9)."""
    mask = torch.ones(rows, _models.SEQ, dtype=torch.long)
    for row, (left, right) in zip(range(rows - 1), [(3, 0), (0, 6), (9, 0)] * rows):
        mask[row, :left] = 0
        mask[row, _models.SEQ - right:] = 0
    return mask


def make_hf_gpt2_eager():
    """Hugging Face GPT-2 with its eager (written-out) attention and learned positions."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    return GPT2LMHeadModel(GPT2Config(vocab_size=_models.VOCAB, n_positions=_models.SEQ, n_embd=32, n_layer=2,
                                      n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="eager"))


def make_qwen2():
    """Hugging Face Qwen2: grouped-query attention (4 heads, 2 key/value heads), biased q/k/v, rotary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1234)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=_models.VOCAB, hidden_size=32, intermediate_size=56,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=_models.SEQ))


def _build(model_name: str) -> nn.Module:
    if model_name == "qwen2":
        return make_qwen2()
    if model_name == "tiny_gqa":
        return TinyGQA()
    if model_name == "hf_gpt2_eager":
        return make_hf_gpt2_eager()
    return _models.MODELS[model_name]()


def _reference(model_name: str, dp: int, masked: bool, steps: int = _harness.STEPS,
               dtype: torch.dtype = torch.float32, lr: float = _harness.LR):
    """Single-process eager on the full sequences; for bf16/fp16 the fp32
    parameters are cast to ``dtype`` inside the forward, as zerograph's
    gathers do (tests/_harness.py)."""
    model = _build(model_name)
    opt = _harness._optimizer(model.parameters(), lr)
    losses = []
    for step in range(steps):
        args, kwargs = _batch(model_name, step, _harness.PER_RANK_BATCH * dp, masked)
        call = model if dtype == torch.float32 else _harness._Cast(
            model, {k: v.to(dtype) for k, v in model.named_parameters()})
        loss = call(*args, **kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def sp_run(model_name: str, configs: list[dict], masked: bool = False, steps: int = _harness.STEPS):
    """On each rank: train one fresh model per config on the full rows of
    its data-parallel index (``zerograph.batch_rows``)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for config in configs:
        torch._dynamo.reset()
        config = dict(config)
        presliced = config.pop("_presliced", False)  # the loader cuts: zerograph.sequence_shard
        lr = config.pop("_lr", _harness.LR)
        sp = config["sequence_parallel_size"]
        dp = world // sp
        global_rows = _harness.PER_RANK_BATCH * dp
        model = zerograph.compile(_build(model_name), config)
        mine = zerograph.batch_rows(model, global_rows)
        if presliced:
            zerograph.feed_sequence_slices(model)
        assert mine == slice((rank // sp) * _harness.PER_RANK_BATCH, (rank // sp + 1) * _harness.PER_RANK_BATCH)
        opt = _harness._optimizer(model.parameters(), lr)
        losses = []
        for step in range(steps):
            args, kwargs = _batch(model_name, step, global_rows, masked)
            args = tuple(a[mine] for a in args)
            kwargs = {k: v[mine] for k, v in kwargs.items()}
            if presliced:
                args, kwargs = zerograph.sequence_shard(model, *args, **kwargs)
                assert all(a.shape[1] == _models.SEQ // sp for a in args)
            loss = model(*args, **kwargs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
        info = zerograph.inspect(model)
        results.append({
            "losses": losses,
            "params": {k: v.detach().float().clone() for k, v in zerograph.full_state_dict(model).items()},
            "comm": dict(info.comm_bytes_last_step),
            "comm_by_phase": _harness._comm_by_phase(info),
            "sequence_slice": zerograph.sequence_slice(model, _models.SEQ),
            "planned_comm": dict(info.memory.comm_bytes_per_step),
            "tiling": [r.details for r in info.passes if r.name == "sequence_tiling"],
            "padding_masks": [r.details["padding_masks"] for r in info.passes if r.name == "sequence_parallel"],
        })
        del model, opt
        gc.collect()
    return results


def _check(results, model_name: str, dp: int, masked: bool):
    ref_losses, ref_params = _reference(model_name, dp, masked)
    for result in results[0]:
        _harness.assert_same_training(result, ref_losses, ref_params)
    _harness.assert_ranks_agree(results)  # every rank ends with the same full parameters


def _ulysses_bytes(rows: int, hidden: int, kv_width: int, sp: int) -> int:
    """Bytes one rank sends per layer in the forward: q, k, v and the output,
    each [rows, seq/sp, width] (k and v: the key/value heads' width), fp32."""
    tokens = rows * _models.SEQ // sp
    return 4 * tokens * (2 * hidden + 2 * kv_width)


@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_sp2_gpt_matches_eager_at_stages_0_and_3_and_moves_the_ulysses_bytes():
    """sp=2 on world 2: each rank holds half of every sequence; -100 labels
    (spread unevenly over the halves) are left out of the global mean. Per
    step and layer: 4 all-to-alls forward (q, k, v, output) and their 4
    inverses backward, each of this rank's N/sp tokens x h elements (fp32):
    the 4·N·h/sp of the Ulysses paper each way; plus the loss's scalar sums."""
    results = _pool.run(sp_run, 2, "gpt", [_config(0), _config(3)], True, timeout=_harness.TIMEOUT)
    _check(results, "gpt", 1, True)
    assert [r[0]["sequence_slice"] for r in results] == [slice(0, 8), slice(8, 16)]
    layers, rows, width = 2, _harness.PER_RANK_BATCH, 30
    per_layer = _ulysses_bytes(rows, width, width, SP)
    assert per_layer == 4 * (rows * _models.SEQ) * width // SP * 4  # 4·N·h/sp elements of 4 bytes
    for result in (results[0][0], results[1][0]):
        comm = result["comm_by_phase"]
        assert comm["forward"]["sp_all_to_all"] == layers * per_layer
        assert comm["backward"]["sp_all_to_all"] == layers * per_layer
        assert comm["forward"]["sp_all_reduce"] == 2 * 4  # the loss sum and the token count, fp32 scalars
        assert comm["backward"]["sp_all_reduce"] == 4  # the loss sum's gradient
        # the planner sees the same traffic
        assert result["planned_comm"]["sp_all_to_all"] == 2 * layers * per_layer
        assert result["planned_comm"]["sp_all_reduce"] == 3 * 4


@pytest.mark.slow
@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_sp2_per_layer_recompute_matches_eager_and_repeats_no_all_to_all():
    """Per-layer recompute under sp=2 recomputes each layer's compute but not
    its all-to-alls (planner/recompute_policy.py saves every tp/sp
    collective): the backward moves the Ulysses bytes once, as without
    recompute."""
    results = _pool.run(sp_run, 2, "gpt", [_config(3, activation_checkpointing={"policy": "per_layer"})], True,
                        timeout=_harness.TIMEOUT)
    _check(results, "gpt", 1, True)
    per_layer = _ulysses_bytes(_harness.PER_RANK_BATCH, 30, 30, SP)
    comm = results[0][0]["comm_by_phase"]
    assert comm["forward"]["sp_all_to_all"] == comm["backward"]["sp_all_to_all"] == 2 * per_layer, comm


@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_sp2_bf16_matches_eager_bf16_within_its_rounding():
    """bf16 compute with fp32 master shards under sp=2 (ZeRO-3, -100 labels)
    against eager computing in bf16 on the full sequences. Each rank's bf16
    partial results (attention on its head shard, the loss on its half of the
    sequence) round differently from the whole-sequence run; the bound is
    the one tests/test_properties.py derives for bf16 (lr 1e-3, rtol 2e-2,
    atol 2e-3: about 5 bf16 ulps, and Adam steps of up to lr)."""
    results = _pool.run(sp_run, 2, "gpt", [_config(3, bf16={"enabled": True}, _lr=1e-3)], True,
                        timeout=_harness.TIMEOUT)
    ref_losses, ref_params = _reference("gpt", 1, True, dtype=torch.bfloat16, lr=1e-3)
    for result in results[0]:
        _harness.assert_same_training(result, ref_losses, ref_params, rtol=2e-2, atol=2e-3)
    fp32_losses, _ = _reference("gpt", 1, True, lr=1e-3)
    # the run computed in bf16: its losses are not the fp32 run's
    assert max(abs(a - b) for a, b in zip(results[0][0]["losses"], fp32_losses)) > 1e-5


@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_sp2_llama_gqa_matches_eager_at_stage_3():
    """Hugging Face Llama (4 heads, 2 key/value heads, rotary): labels shifted
    on the whole row before the cut, global position ids, -100 labels."""
    results = _pool.run(sp_run, 2, "llama", [_config(3)], True, timeout=_harness.TIMEOUT)
    _check(results, "llama", 1, True)
    head_dim = 32 // 4
    assert results[0][0]["comm_by_phase"]["forward"]["sp_all_to_all"] == 2 * _ulysses_bytes(
        _harness.PER_RANK_BATCH, 32, 2 * head_dim, SP)


@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_sp2_hf_gpt2_eager_attention_matches_eager():
    """GPT-2's eager attention subgraph (matmul, causal mask, softmax, matmul)
    is recognised by the fusion matcher and wrapped; learned positions read
    the global position ids."""
    results = _pool.run(sp_run, 2, "hf_gpt2_eager", [_config(1)], True, timeout=_harness.TIMEOUT)
    _check(results, "hf_gpt2_eager", 1, True)
    assert results[0][0]["comm_by_phase"]["forward"]["sp_all_to_all"] == 2 * _ulysses_bytes(
        _harness.PER_RANK_BATCH, 32, 32, SP)


@pytest.mark.slow
@pytest.mark.timeout(2 * _harness.TIMEOUT)
@pytest.mark.parametrize("model_name,stages", [("llama", (0,)), ("qwen2", (0, 3))])
def test_sp2_hf_gqa_models_match_eager(model_name, stages):
    results = _pool.run(sp_run, 2, model_name, [_config(s) for s in stages], True, timeout=_harness.TIMEOUT)
    _check(results, model_name, 1, True)


@pytest.mark.slow
@pytest.mark.timeout(4 * _harness.TIMEOUT)
@pytest.mark.parametrize("model_name", ["gpt", "llama"])
def test_sp2_dp2_matches_eager(model_name):
    """sp=2 x dp=2 on world 4: ZeRO shards over all four ranks; each sp pair
    reads the rows of its data-parallel index."""
    results = _pool.run(sp_run, 4, model_name, [_config(1), _config(3)], False, timeout=2 * _harness.TIMEOUT)
    _check(results, model_name, 2, False)


@pytest.mark.timeout(2 * _harness.TIMEOUT)
@pytest.mark.parametrize("model_name,stage", [("gpt", 0), ("llama", 3)])
def test_sp2_with_sequence_tiling_matches_eager(model_name, stage):
    """sp=2 with ALST's tiled MLP and logits+loss (zerograph.sequence_tiling):
    each rank's 8 positions in tiles of 3 (3, 3, 2), the loss already the
    sequence-parallel sum when it is tiled; -100 labels and right padding."""
    config = _config(stage, zerograph={"verify_graphs": True, "sequence_tiling": 3})
    results = _pool.run(sp_run, 2, model_name, [config], True, timeout=_harness.TIMEOUT)
    _check(results, model_name, 1, True)
    layers = 2
    assert results[0][0]["tiling"] == [{"mlp": layers, "loss": 1, "mlp_tile_tokens": _harness.PER_RANK_BATCH * 3,
                                        "loss_tile_tokens": _harness.PER_RANK_BATCH * 3}]


@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_sp2_llama_with_a_padded_attention_mask_matches_eager():
    """Hugging Face Llama (SDPA attention) with an attention_mask with left and
    right padding (one row's first half, rank 0's whole slice, all padding) and
    -100 labels on the padded positions: the mask stays whole, and each
    attention gets the causal + padding mask of the whole sequence after the
    all-to-all, as eager builds it. ZeRO 3."""
    results = _pool.run(sp_run, 2, "llama", [_config(3)], "padded", timeout=_harness.TIMEOUT)
    _check(results, "llama", 1, "padded")
    assert all(r["padding_masks"] == [2] for r in results[0])  # both layers' attention


# ---- pass level (fake process group) -------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, heads: int = 4, kv_heads: int = 4, d: int = 4):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, d
        self.q = nn.Linear(heads * d, heads * d)
        self.kv = nn.Linear(heads * d, 2 * kv_heads * d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k, v = (z.view(b, t, self.kv_heads, self.d).transpose(1, 2) for z in self.kv(x).chunk(2, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return y.transpose(1, 2).reshape(b, t, -1).sum()


def _compiled(model: nn.Module, x: torch.Tensor):
    config = {"sequence_parallel_size": SP, "zerograph": {"verify_graphs": True, "device": "cpu"}}
    model = zerograph.compile(model, config)
    model(x).backward()
    return zerograph.inspect(model)


def test_sequence_parallel_pass_golden_attention(fake_world):
    torch.manual_seed(0)
    info = _compiled(_Attention(), torch.randn(2, 8, 16))  # rank 0 computes positions 0-3
    graph = format_graph(info.regions[0]["graphs"]["dynamo"], canonical=True)
    assert_expected_inline(graph, """\
l_args_0_: f32[2, 4, 16]
l_call_impl_self_modules_q_parameters_weight_: f32[16, 16]
l_call_impl_self_modules_q_parameters_bias_: f32[16]
l_call_impl_self_modules_kv_parameters_weight_: f32[32, 16]
l_call_impl_self_modules_kv_parameters_bias_: f32[32]
unshard: f32[16, 16] = unshard(l_call_impl_self_modules_q_parameters_weight_, 'zg0', 'q.weight')
unshard_1: f32[16] = unshard(l_call_impl_self_modules_q_parameters_bias_, 'zg0', 'q.bias')
linear: f32[2, 4, 16] = linear(l_args_0_, unshard, unshard_1)
view: f32[2, 4, 4, 4] = view(linear, 2, 4, 4, 4)
q: f32[2, 4, 4, 4] = transpose(view, 1, 2)
unshard_2: f32[32, 16] = unshard(l_call_impl_self_modules_kv_parameters_weight_, 'zg0', 'kv.weight')
unshard_3: f32[32] = unshard(l_call_impl_self_modules_kv_parameters_bias_, 'zg0', 'kv.bias')
linear_1: f32[2, 4, 32] = linear(l_args_0_, unshard_2, unshard_3)
chunk:  = chunk(linear_1, 2, -1)
z: f32[2, 4, 16] = getitem(chunk, 0)
z_1: f32[2, 4, 16] = getitem(chunk, 1)
view_1: f32[2, 4, 4, 4] = view(z, 2, 4, 4, 4)
k: f32[2, 4, 4, 4] = transpose(view_1, 1, 2)
view_2: f32[2, 4, 4, 4] = view(z_1, 2, 4, 4, 4)
v: f32[2, 4, 4, 4] = transpose(view_2, 1, 2)
sp_seq_to_heads_default: f32[2, 2, 8, 4] = zerograph.sp_seq_to_heads(q, 'zg0')
sp_seq_to_heads_default_1: f32[2, 2, 8, 4] = zerograph.sp_seq_to_heads(k, 'zg0')
sp_seq_to_heads_default_2: f32[2, 2, 8, 4] = zerograph.sp_seq_to_heads(v, 'zg0')
y: f32[2, 2, 8, 4] = scaled_dot_product_attention(sp_seq_to_heads_default, sp_seq_to_heads_default_1, sp_seq_to_heads_default_2, is_causal=True, enable_gqa=False)
sp_heads_to_seq_default: f32[2, 4, 4, 4] = zerograph.sp_heads_to_seq(y, 'zg0')
transpose: f32[2, 4, 4, 4] = transpose(sp_heads_to_seq_default, 1, 2)
reshape: f32[2, 4, 16] = reshape(transpose, 2, 4, -1)
sum: f32[] = sum(reshape)
return [sum]""")
    forward = format_graph(info.forward[0], canonical=True)
    assert_expected_inline("\n".join(line for line in forward.splitlines() if "sp " in line), """\
reshape_default: f32[2, 2, 2, 4, 4] = aten.reshape(transpose, [2, 2, 2, 4, 4])  # sp comm_prep
permute_default: f32[2, 2, 2, 4, 4] = aten.permute(reshape_default, [1, 0, 2, 3, 4])  # sp comm_prep
clone_default: f32[2, 2, 2, 4, 4] = aten.clone(permute_default, memory_format=torch.contiguous_format)  # sp comm_prep
all_to_all_single_default: f32[2, 2, 2, 4, 4] = _c10d_functional.all_to_all_single(clone_default, [1, 1], [1, 1], '0')  # sp all_to_all
wait_tensor_default: f32[2, 2, 2, 4, 4] = _c10d_functional.wait_tensor(all_to_all_single_default)  # sp wait
permute_default_1: f32[2, 2, 2, 4, 4] = aten.permute(wait_tensor_default, [1, 2, 0, 3, 4])  # sp comm_prep
clone_default_1: f32[2, 2, 2, 4, 4] = aten.clone(permute_default_1, memory_format=torch.contiguous_format)  # sp comm_prep
view_default: f32[2, 2, 8, 4] = aten.view(clone_default_1, [2, 2, 8, 4])  # sp comm_prep
reshape_default_1: f32[2, 2, 2, 4, 4] = aten.reshape(transpose_1, [2, 2, 2, 4, 4])  # sp comm_prep
permute_default_2: f32[2, 2, 2, 4, 4] = aten.permute(reshape_default_1, [1, 0, 2, 3, 4])  # sp comm_prep
clone_default_2: f32[2, 2, 2, 4, 4] = aten.clone(permute_default_2, memory_format=torch.contiguous_format)  # sp comm_prep
all_to_all_single_default_1: f32[2, 2, 2, 4, 4] = _c10d_functional.all_to_all_single(clone_default_2, [1, 1], [1, 1], '0')  # sp all_to_all
wait_tensor_default_1: f32[2, 2, 2, 4, 4] = _c10d_functional.wait_tensor(all_to_all_single_default_1)  # sp wait
permute_default_3: f32[2, 2, 2, 4, 4] = aten.permute(wait_tensor_default_1, [1, 2, 0, 3, 4])  # sp comm_prep
clone_default_3: f32[2, 2, 2, 4, 4] = aten.clone(permute_default_3, memory_format=torch.contiguous_format)  # sp comm_prep
view_default_1: f32[2, 2, 8, 4] = aten.view(clone_default_3, [2, 2, 8, 4])  # sp comm_prep
reshape_default_2: f32[2, 2, 2, 4, 4] = aten.reshape(transpose_2, [2, 2, 2, 4, 4])  # sp comm_prep
permute_default_4: f32[2, 2, 2, 4, 4] = aten.permute(reshape_default_2, [1, 0, 2, 3, 4])  # sp comm_prep
clone_default_4: f32[2, 2, 2, 4, 4] = aten.clone(permute_default_4, memory_format=torch.contiguous_format)  # sp comm_prep
all_to_all_single_default_2: f32[2, 2, 2, 4, 4] = _c10d_functional.all_to_all_single(clone_default_4, [1, 1], [1, 1], '0')  # sp all_to_all
wait_tensor_default_2: f32[2, 2, 2, 4, 4] = _c10d_functional.wait_tensor(all_to_all_single_default_2)  # sp wait
permute_default_5: f32[2, 2, 2, 4, 4] = aten.permute(wait_tensor_default_2, [1, 2, 0, 3, 4])  # sp comm_prep
clone_default_5: f32[2, 2, 2, 4, 4] = aten.clone(permute_default_5, memory_format=torch.contiguous_format)  # sp comm_prep
view_default_2: f32[2, 2, 8, 4] = aten.view(clone_default_5, [2, 2, 8, 4])  # sp comm_prep
reshape_default_3: f32[2, 2, 2, 4, 4] = aten.reshape(getitem_2, [2, 2, 2, 4, 4])  # sp comm_prep
permute_default_6: f32[2, 2, 2, 4, 4] = aten.permute(reshape_default_3, [2, 0, 1, 3, 4])  # sp comm_prep
clone_default_6: f32[2, 2, 2, 4, 4] = aten.clone(permute_default_6, memory_format=torch.contiguous_format)  # sp comm_prep
all_to_all_single_default_3: f32[2, 2, 2, 4, 4] = _c10d_functional.all_to_all_single(clone_default_6, [1, 1], [1, 1], '0')  # sp all_to_all
wait_tensor_default_3: f32[2, 2, 2, 4, 4] = _c10d_functional.wait_tensor(all_to_all_single_default_3)  # sp wait
permute_default_7: f32[2, 2, 2, 4, 4] = aten.permute(wait_tensor_default_3, [1, 0, 2, 3, 4])  # sp comm_prep
clone_default_7: f32[2, 2, 2, 4, 4] = aten.clone(permute_default_7, memory_format=torch.contiguous_format)  # sp comm_prep
view_default_3: f32[2, 4, 4, 4] = aten.view(clone_default_7, [2, 4, 4, 4])  # sp comm_prep""")


class TinyGQA(nn.Module):
    """Embedding, one grouped-query attention block (4 query heads, 1
    key/value head: fewer than sp, so the pass repeats it) and an LM head."""

    def __init__(self, kv_heads: int = 1):
        super().__init__()
        torch.manual_seed(1234)
        self.wte = nn.Embedding(_models.VOCAB, 16)
        self.wpe = nn.Embedding(_models.SEQ, 16)
        self.attn = _Attention(heads=4, kv_heads=kv_heads, d=4)
        self.head = nn.Linear(16, _models.VOCAB)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        b, t, _ = x.shape
        a = self.attn
        q = a.q(x).view(b, t, a.heads, a.d).transpose(1, 2)
        k, v = (z.view(b, t, a.kv_heads, a.d).transpose(1, 2) for z in a.kv(x).chunk(2, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + y.transpose(1, 2).reshape(b, t, -1)
        loss = F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())
        return _Out(loss)


class _Out(NamedTuple):
    loss: torch.Tensor


@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_sp2_repeats_fewer_kv_heads_than_sp_and_uses_global_positions():
    """1 key/value head on sp=2: each rank gets a copy (repeated before the
    all-to-all); the learned positional embedding reads global positions;
    with and without zerograph.fusion (fused attention and cross-entropy),
    and with the loader cutting the sequences (zerograph.sequence_shard)."""
    # zerograph's kernels inside, and a loader that feeds only this rank's slices
    fused = _config(2, zerograph={"verify_graphs": True, "fusion": True}, _presliced=True)
    results = _pool.run(sp_run, 2, "tiny_gqa", [_config(2), fused], True, timeout=_harness.TIMEOUT)
    _check(results, "tiny_gqa", 1, True)
    per_layer = _ulysses_bytes(_harness.PER_RANK_BATCH, 16, SP * 4, SP)  # k, v: the 1 head repeated to 2, of 4
    for result in results[0]:
        assert result["comm_by_phase"]["forward"]["sp_all_to_all"] == per_layer


def _errors(model, x, sp=SP, **extra):
    config = {"sequence_parallel_size": sp, "zerograph": {"device": "cpu"}, **extra}
    model = zerograph.compile(model, config)
    return model(x)


def test_heads_that_sp_does_not_divide_are_rejected(fake_world):
    with pytest.raises(SequenceParallelError) as info:
        _errors(_Attention(heads=3, kv_heads=3), torch.randn(2, 8, 12))
    assert_expected_inline(str(info.value), """sequence parallelism: <top level>: 3 query heads and 3 key/value heads cannot be split over sequence_parallel_size=2 (sp must divide the query heads, and divide or be a multiple of the key/value heads); valid sequence_parallel_size values: 1, 3""")


def test_kv_heads_neither_dividing_nor_divided_by_sp_are_rejected(fake_world):
    with pytest.raises(SequenceParallelError, match=r"6 query heads and 3 key/value heads .* valid sequence_parallel_size "
                                        r"values: 1, 3, 6"):
        _errors(_Attention(heads=6, kv_heads=3, d=2), torch.randn(2, 8, 12), sp=2)


def test_sequence_length_and_world_size_that_sp_does_not_divide_are_rejected(fake_world):
    with pytest.raises(ValueError, match=r"a sequence of 7 tokens does not split over sequence_parallel_size=2 "
                                         r"ranks; pad the sequences to a multiple of 2"):
        _errors(_Attention(), torch.randn(2, 7, 16))
    with pytest.raises(zerograph.ConfigError, match=r"sequence_parallel_size=4 does not divide the world size 2"):
        _errors(_Attention(), torch.randn(2, 8, 16), sp=4)
    with pytest.raises(zerograph.ConfigError, match=r"sequence_parallel_size=2 x tensor_parallel.autotp_size=2 needs "
                                                    r"a world size that is a multiple of 4; this run has 2"):
        _errors(_Attention(), torch.randn(2, 8, 16), tensor_parallel={"autotp_size": 2})


def test_sequence_shard_shifts_hugging_face_labels_and_adds_global_positions(fake_world):
    model = zerograph.shard(_models.make_llama(), {"sequence_parallel_size": SP, "zerograph": {"device": "cpu"}})
    ids = torch.arange(16).view(2, 8)
    args, kwargs = zerograph.sequence_shard(model, input_ids=ids, labels=ids, attention_mask=torch.ones(2, 8))
    assert args == () and sorted(kwargs) == ["attention_mask", "input_ids", "labels", "position_ids", "shift_labels"]
    assert kwargs["attention_mask"] is None  # all ones: dropped
    assert kwargs["input_ids"].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]  # rank 0: positions 0-3
    assert kwargs["shift_labels"].tolist() == [[1, 2, 3, 4], [9, 10, 11, 12]]  # the next token, across the cut
    assert torch.equal(kwargs["labels"], kwargs["shift_labels"])  # Hugging Face reads shift_labels
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 3]] * 2
    assert zerograph.sequence_slice(model, 8) == slice(0, 4)


def test_an_uncompiled_model_is_refused(fake_world):
    model = zerograph.shard(_Attention(), {"sequence_parallel_size": SP, "zerograph": {"device": "cpu"}})
    with pytest.raises(ValueError, match=r"sequence_parallel_size=2: _Attention runs uncompiled \(zerograph.shard\), "
                                         r"so attention would see only this rank's part"):
        model(torch.randn(2, 8, 16))


class _Masked(_Attention):
    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k, v = (z.view(b, t, self.kv_heads, self.d).transpose(1, 2) for z in self.kv(x).chunk(2, -1))
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum()


def test_attention_with_a_mask_and_padding_masks_it_cannot_rebuild_are_rejected(fake_world):
    with pytest.raises(SequenceParallelError, match=r"sequence parallelism: <top level>: attention with an explicit attn_mask "
                                        r"is not supported yet"):
        _errors(_Masked(), torch.randn(2, 8, 16))
    # a padding mask is rebuilt over the whole sequence for SDPA only: GPT-2's eager attention is refused
    model = zerograph.compile(make_hf_gpt2_eager(), {"sequence_parallel_size": SP, "zerograph": {"device": "cpu"}})
    ids = torch.randint(0, _models.VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match=r"an attention_mask with padding needs SDPA attention, where zerograph "
                                         r"rebuilds the mask over the whole sequence; GPT2LMHeadModel uses "
                                         r"attn_implementation='eager': load it with attn_implementation=\"sdpa\""):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    with pytest.raises(ValueError, match=r"an attention_mask of shape \(2, 1, 8, 8\); zerograph takes a \[batch, "
                                         r"seq\] 0/1 padding mask \(\(2, 8\) here\)"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 8, 8), use_cache=False)


def sp_checkpoint_run(path: str) -> dict:
    """Train 2 steps at sp=2 (dp=1) and save; then one more step two ways: the
    same model, and a fresh sp=1 (dp=2) model loaded from the checkpoint."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = _harness.PER_RANK_BATCH

    def step(model, opt, n, mine):
        args, _ = _batch("gpt", n, rows, False)
        loss = model(*(a[mine] for a in args)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return mean.item() / world

    torch._dynamo.reset()
    a = zerograph.compile(_build("gpt"), _config(3))
    opt_a = _harness._optimizer(a.parameters())
    for n in range(2):
        step(a, opt_a, n, slice(None))
    zerograph.save_checkpoint(path, a, opt_a)
    loss_a = step(a, opt_a, 2, slice(None))
    params_a = zerograph.full_state_dict(a)
    torch._dynamo.reset()
    b = zerograph.compile(_build("gpt"), {"zero_optimization": {"stage": 3}})
    opt_b = _harness._optimizer(b.parameters())
    zerograph.load_checkpoint(path, b, opt_b)
    loss_b = step(b, opt_b, 2, zerograph.batch_rows(b, rows))
    return {"losses": (loss_a, loss_b), "a": params_a, "b": zerograph.full_state_dict(b)}


@pytest.mark.slow
@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_checkpoint_saved_at_sp2_resumes_at_sp1(tmp_path):
    """sp is not part of a checkpoint's layout: ZeRO shards over dp x sp ranks
    either way. The resumed sp=1 step equals the sp=2 run's next step."""
    results = _pool.run(sp_checkpoint_run, 2, str(tmp_path / "ckpt"), timeout=_harness.TIMEOUT)
    result = results[0]
    torch.testing.assert_close(result["losses"][1], result["losses"][0], rtol=1e-5, atol=1e-6)
    for key, value in result["a"].items():
        torch.testing.assert_close(result["b"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.slow
@pytest.mark.timeout(2 * _harness.TIMEOUT)
def test_sp2_with_activation_checkpointing_matches_eager():
    """sp=2 with per-layer activation checkpointing at ZeRO 3: the same steps as eager."""
    config = _config(3, activation_checkpointing={"policy": "per_layer"})
    results = _pool.run(sp_run, 2, "gpt", [config], True, timeout=_harness.TIMEOUT)
    _check(results, "gpt", 1, True)

"""Pipeline parallelism: schedules, the dry-run simulator, the split pass,
and training equivalence with single-process eager PyTorch.

The distributed tests spawn real gloo ranks: p=2 stages (world 2) on the
nanoGPT model, Hugging Face GPT-2 and Llama, and p=2 x dp=2 with ZeRO-3
(world 4) on the nanoGPT model, each also with interleaved 1F1B (p=2, v=2:
four model stages, on 4-block models); losses of 5 AdamW steps and every
parameter afterwards must match the eager reference (fp32, rtol 1e-5).
``eval_step`` must return the eager loss and leave training bit-identical.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from expecttest import assert_expected_inline

import zerograph
from tests import _harness, _models, _pool
from tests._harness import TIMEOUT
from zerograph.config import Config, ConfigError
from zerograph.pipeline import (
    Action,
    PipelineModeError,
    Schedule,
    ScheduleError,
    SplitError,
    format_grid,
    forward_only,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
    simulate,
    split_graph,
)
from zerograph.pipeline.build import _untie_copies_on_one_rank, trace
from zerograph.pipeline.step import split_batch

GLOBAL_ROWS = 8  # rows per step, as _harness.reference_run(model, world=2) uses


# ---------------------------------------------------------------------------
# Schedules and the simulator


def test_1f1b_grid_p2_m4():
    assert_expected_inline(format_grid(simulate(one_f_one_b(2, 4))), """\
step  stage0  stage1
   0      F0       .
   1      F1      F0
   2       .      B0
   3      B0      F1
   4      F2      B1
   5      B1      F2
   6      F3      B2
   7      B2      F3
   8       .      B3
   9      B3       .""")


def test_1f1b_grid_p4_m8():
    assert_expected_inline(format_grid(simulate(one_f_one_b(4, 8))), """\
step  stage0  stage1  stage2  stage3
   0      F0       .       .       .
   1      F1      F0       .       .
   2      F2      F1      F0       .
   3      F3      F2      F1      F0
   4       .       .       .      B0
   5       .       .      B0      F1
   6       .      B0      F2      B1
   7      B0      F3      B1      F2
   8      F4      B1      F3      B2
   9      B1      F4      B2      F3
  10      F5      B2      F4      B3
  11      B2      F5      B3      F4
  12      F6      B3      F5      B4
  13      B3      F6      B4      F5
  14      F7      B4      F6      B5
  15      B4      F7      B5      F6
  16       .      B5      F7      B6
  17      B5       .      B6      F7
  18       .      B6       .      B7
  19      B6       .      B7       .
  20       .      B7       .       .
  21      B7       .       .       .""")


def test_gpipe_grid_p2_m4():
    assert_expected_inline(format_grid(simulate(gpipe(2, 4))), """\
step  stage0  stage1
   0      F0       .
   1      F1      F0
   2      F2      F1
   3      F3      F2
   4       .      F3
   5       .      B0
   6      B0      B1
   7      B1      B2
   8      B2      B3
   9      B3       .""")


def test_gpipe_grid_p4_m5():
    assert_expected_inline(format_grid(simulate(gpipe(4, 5))), """\
step  stage0  stage1  stage2  stage3
   0      F0       .       .       .
   1      F1      F0       .       .
   2      F2      F1      F0       .
   3      F3      F2      F1      F0
   4      F4      F3      F2      F1
   5       .      F4      F3      F2
   6       .       .      F4      F3
   7       .       .       .      F4
   8       .       .       .      B0
   9       .       .      B0      B1
  10       .      B0      B1      B2
  11      B0      B1      B2      B3
  12      B1      B2      B3      B4
  13      B2      B3      B4       .
  14      B3      B4       .       .
  15      B4       .       .       .""")


def test_action_lists_include_transfers():
    assert_expected_inline(str(one_f_one_b(2, 2)), """\
1f1b: 2 stages, 2 micro-batches
  stage 0: F0 SEND_ACT(0) F1 SEND_ACT(1) RECV_GRAD(0) B0 RECV_GRAD(1) B1
  stage 1: RECV_ACT(0) F0 B0 SEND_GRAD(0) RECV_ACT(1) F1 B1 SEND_GRAD(1)""")


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("m", [1, 4, 5, 8])
@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_bubble_and_in_flight_follow_the_formulas(name, p, m):
    timeline = simulate(one_f_one_b(p, m) if name == "1f1b" else gpipe(p, m))
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert len(timeline.grid) == 2 * (m + p - 1)
    if name == "1f1b":
        assert timeline.peak_in_flight == tuple(min(p - s, m) for s in range(p))
    else:
        assert timeline.peak_in_flight == (m,) * p


def test_interleaved_grid_p2_v2_m4():
    """Rank 0 holds stages 0 and 2, rank 1 stages 1 and 3; ``2F0`` is micro-batch 0's forward on stage 2."""
    assert_expected_inline(format_grid(simulate(interleaved_one_f_one_b(2, 4, 2))), """\
step   rank0   rank1
   0     0F0       .
   1     0F1     1F0
   2     2F0     1F1
   3     2F1     3F0
   4     0F2     3B0
   5     2B0     3F1
   6     0F3     3B1
   7     2B1     1F2
   8     2F2     1B0
   9     0B0     1F3
  10     2F3     1B1
  11     0B1     3F2
  12       .     3B2
  13     2B2     3F3
  14       .     3B3
  15     2B3     1B2
  16     0B2     1B3
  17     0B3       .""")


def test_interleaved_action_lists_include_transfers_and_the_wrap():
    # stage 1 (rank 1) sends to stage 2 on rank 0: the wrap from the last rank to the first
    assert_expected_inline(str(interleaved_one_f_one_b(2, 2, 2)), """\
interleaved_1f1b: 2 ranks x 2 virtual stages = 4 stages, 2 micro-batches
  rank 0: 0F0 0SEND_ACT(0) 0F1 0SEND_ACT(1) 2RECV_ACT(0) 2F0 2SEND_ACT(0) 2RECV_ACT(1) 2F1 2SEND_ACT(1) 2RECV_GRAD(0) 2B0 2SEND_GRAD(0) 2RECV_GRAD(1) 2B1 2SEND_GRAD(1) 0RECV_GRAD(0) 0B0 0RECV_GRAD(1) 0B1
  rank 1: 1RECV_ACT(0) 1F0 1SEND_ACT(0) 1RECV_ACT(1) 1F1 1SEND_ACT(1) 3RECV_ACT(0) 3F0 3B0 3SEND_GRAD(0) 3RECV_ACT(1) 3F1 3B1 3SEND_GRAD(1) 1RECV_GRAD(0) 1B0 1SEND_GRAD(0) 1RECV_GRAD(1) 1B1 1SEND_GRAD(1)""")


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_interleaved_bubble_and_in_flight_follow_the_formulas(p, v, groups):
    m = groups * p
    timeline = simulate(interleaved_one_f_one_b(p, m, v))
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))
    assert len(timeline.grid) == 2 * (v * m + p - 1)
    # in flight counts (stage, micro-batch) pairs: each holds 1/v of a micro-batch's activations
    assert timeline.peak_in_flight == tuple(min((p - r - 1) * 2 + (v - 1) * p + 1, m * v) for r in range(p))
    # every rank runs exactly its own stages r, r + p, ...
    for r, acts in enumerate(timeline.schedule.actions):
        assert {a.stage for a in acts} == set(range(r, p * v, p))


def test_interleaved_schedule_errors():
    with pytest.raises(ValueError, match="needs micro_batches to be a multiple of the pipeline stages: 3 micro-batches, 2 stages; set pipeline.micro_batches to 4"):
        interleaved_one_f_one_b(2, 3, 2)
    with pytest.raises(ValueError, match="needs virtual_stages >= 2"):
        interleaved_one_f_one_b(2, 4, 1)
    with pytest.raises(ValueError, match="needs at least 2 pipeline stages"):
        interleaved_one_f_one_b(1, 4, 2)


def test_simulator_rejects_interleaved_receives_out_of_send_order():
    """Between two ranks, activations and gradients of different stages share one
    ordered channel: rank 1 may not take stage 2's gradient before rank 0's earlier activation."""
    good = interleaved_one_f_one_b(2, 4, 2).actions[1]
    text = [str(a) for a in good]
    i, j = text.index("1RECV_ACT(2)"), text.index("1RECV_GRAD(0)")
    text.insert(i, text.pop(j))
    with pytest.raises(ScheduleError, match=r"rank 1: 1RECV_GRAD\(0\) would receive rank 0's 0SEND_ACT\(2\)"):
        simulate(_edit(interleaved_one_f_one_b(2, 4, 2), 1, text))
    wrong_rank = _edit(interleaved_one_f_one_b(2, 2, 2), 0, ["1F0"])
    with pytest.raises(ScheduleError, match="rank 0: 1F0 runs on stage 1, which rank 0 does not hold"):
        simulate(wrong_rank)


def _edit(schedule: Schedule, stage: int, actions: list[str]) -> Schedule:
    def parse(text):
        prefix = re.match(r"\d*", text).group()
        stage_of, text = (int(prefix) if prefix else None), text[len(prefix):]
        if "(" in text:
            kind, micro = text.rstrip(")").split("(")
            return Action(kind, int(micro), stage_of)
        return Action(text[0], int(text[1:]), stage_of)

    acts = list(schedule.actions)
    acts[stage] = tuple(parse(a) for a in actions)
    return dataclasses.replace(schedule, actions=tuple(acts))


def test_simulator_rejects_a_deadlock():
    # stage 0 waits for micro-batch 0's gradient before sending its activations
    broken = _edit(one_f_one_b(2, 2), 0, ["F0", "RECV_GRAD(0)", "SEND_ACT(0)", "F1", "SEND_ACT(1)", "B0", "RECV_GRAD(1)", "B1"])
    with pytest.raises(ScheduleError, match=r"deadlocks at step 1: stage 0 waits at RECV_GRAD\(0\).*stage 1 waits at RECV_ACT\(0\)"):
        simulate(broken)


def test_simulator_rejects_out_of_order_receives():
    broken = _edit(one_f_one_b(2, 2), 1, ["RECV_ACT(1)", "F1", "B1", "SEND_GRAD(1)", "RECV_ACT(0)", "F0", "B0", "SEND_GRAD(0)"])
    with pytest.raises(ScheduleError, match=r"stage 1: RECV_ACT\(1\) would receive stage 0's SEND_ACT\(0\)"):
        simulate(broken)


def test_simulator_rejects_backward_before_forward_and_missing_micro_batches():
    with pytest.raises(ScheduleError, match="B0 runs before F0"):
        simulate(_edit(one_f_one_b(1, 1), 0, ["B0", "F0"]))
    with pytest.raises(ScheduleError, match=r"F must run each micro-batch 0..1 exactly once; got \[0\]"):
        simulate(_edit(one_f_one_b(1, 2), 0, ["F0", "B0", "B1"]))


# ---------------------------------------------------------------------------
# Batches and config


def test_micro_batches_must_divide_the_batch():
    idx, targets = _models.global_batch(0, 6)
    with pytest.raises(ValueError, match=r"batch\[0\] has 6 rows, which 4 micro-batches cannot split evenly"):
        split_batch((idx, targets), 4)
    with pytest.raises(ValueError, match=r"batch\['labels'\] has 6 rows"):
        split_batch({"input_ids": idx[:4], "labels": targets}, 4)
    with pytest.raises(ValueError, match=r"batch\['labels'\] has 6 rows but batch\['input_ids'\] has 4"):
        split_batch({"input_ids": idx[:4], "labels": targets}, 2)
    parts = split_batch({"input_ids": idx, "labels": targets, "flag": True}, 3)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 2] and parts[1]["flag"] is True


def test_pipeline_config_and_misuse_errors():
    cfg = Config.load({"pipeline": {"stages": 2}, "gradient_accumulation_steps": 4})
    assert cfg.micro_batches == 4 and cfg.pipeline.schedule == "1f1b"
    assert Config.load({"pipeline": {"stages": 2, "micro_batches": 8}}).micro_batches == 8
    with pytest.raises(ConfigError, match='pipeline.schedule: got .zb.; allowed: "1f1b", "gpipe", "interleaved_1f1b"'):
        Config.load({"pipeline": {"schedule": "zb"}})
    cfg = Config.load({"pipeline": {"stages": 2, "schedule": "interleaved_1f1b", "micro_batches": 4}})
    assert cfg.pipeline.chunks == 2 and Config.load({"pipeline": {"stages": 2}}).pipeline.chunks == 1
    assert Config.load({"pipeline": {"stages": 2, "schedule": "interleaved_1f1b", "virtual_stages": 3}}).pipeline.chunks == 3
    with pytest.raises(ConfigError, match=r'micro_batches to be a multiple of pipeline.stages=2; got 3: set micro_batches to 4'):
        Config.load({"pipeline": {"stages": 2, "schedule": "interleaved_1f1b", "micro_batches": 3}})
    with pytest.raises(ConfigError, match='pipeline.virtual_stages=2 needs pipeline.schedule="interleaved_1f1b"'):
        Config.load({"pipeline": {"stages": 2, "virtual_stages": 2}})
    with pytest.raises(ConfigError, match="pipeline.virtual_stages=1 with schedule \"interleaved_1f1b\": interleaving needs at least 2"):
        Config.load({"pipeline": {"stages": 2, "schedule": "interleaved_1f1b", "virtual_stages": 1}})
    with pytest.raises(ConfigError, match=r'"interleaved_1f1b" needs pipeline.stages >= 2'):
        Config.load({"pipeline": {"schedule": "interleaved_1f1b"}})
    with pytest.raises(ConfigError, match="zerograph.shard cannot split a model"):
        zerograph.shard(_models.make_gpt(), {"pipeline": {"stages": 2}})
    with pytest.raises(ConfigError, match="needs one batch: zerograph.compile\\(model, config, example_batch=batch\\)"):
        zerograph.compile(_models.make_gpt(), {"pipeline": {"stages": 2}})
    with pytest.raises(ConfigError, match="micro_batches to be a multiple of the pipeline stages: 3 micro-batches, 2 stages"):
        zerograph.compile(_models.make_gpt(), {"pipeline": {"stages": 2, "schedule": "interleaved_1f1b"},
                                               "gradient_accumulation_steps": 3}, example_batch=_models.global_batch(0, 6))
    with pytest.raises(ValueError, match="needs a world size that is a multiple of it; this run has 1 rank"):
        zerograph.compile(_models.make_gpt(), {"pipeline": {"stages": 2}}, example_batch=_models.global_batch(0, 2))


# ---------------------------------------------------------------------------
# The split pass


def _traced(name: str, rows: int = 2):
    idx, targets = _models.global_batch(0, rows)
    batch = (idx, targets) if name.startswith("gpt") else {"input_ids": idx, "labels": idx}
    return trace(_models.MODELS[name](), batch, None), batch


def _param_names(module) -> list[str]:
    return sorted({n.target.removeprefix("model.") for n in module.graph.nodes if n.op == "get_attr"})


def test_split_gpt_at_block_boundaries_with_tied_embedding():
    gm, _ = _traced("gpt")
    split = split_graph(gm, 2)
    s0, s1 = split.stages
    assert s1.first_module == "h.1"
    assert _param_names(s0.module) == ["h.0." + n for n in _BLOCK_PARAMS] + ["lm_head.weight", "wpe.weight"]
    assert _param_names(s1.module) == ["h.1." + n for n in _BLOCK_PARAMS] + ["lm_head.weight", "ln_f.bias", "ln_f.weight"]
    # export names the tied embedding once; both stages read the same Parameter
    assert split.tied == {"lm_head.weight": (0, 1)}
    assert [v.shape for v in s0.outgoing] == [(2, _models.SEQ, 30)] and s1.incoming == s0.outgoing
    assert s0.batch_inputs == (0,) and s1.batch_inputs == (1,)  # idx on stage 0, targets on stage 1


_BLOCK_PARAMS = sorted(
    f"{m}.{p}" for m, p in [("attn.proj", "bias"), ("attn.proj", "weight"), ("attn.qkv", "bias"), ("attn.qkv", "weight"),
                            ("ln_1", "bias"), ("ln_1", "weight"), ("ln_2", "bias"), ("ln_2", "weight"),
                            ("mlp.fc", "bias"), ("mlp.fc", "weight"), ("mlp.proj", "bias"), ("mlp.proj", "weight")]
)


def test_split_stages_compose_to_the_whole_model():
    """Running the stages one after another gives the traced model's loss and gradients."""
    for name in ("gpt", "hf_gpt2", "llama"):
        gm, batch = _traced(name)
        flat = list(batch) if isinstance(batch, tuple) else list(batch.values())
        for stages in (2, 3):
            split = split_graph(gm, stages)
            values: list[torch.Tensor] = []
            for st in split.stages:
                out = st.module(*[flat[i] for i in st.batch_inputs], *values)
                values = list(out)
            loss = values[0]
            expected = gm(*flat)[0]
            torch.testing.assert_close(loss, expected, rtol=0, atol=0, msg=f"{name} p={stages}")


def test_split_points_and_cost_model():
    gm, _ = _traced("llama")
    split = split_graph(gm, 2, ("model.layers.1",))
    assert split.stages[1].first_module == "model.layers.1"
    assert any(v.shape[-1] == 8 for v in split.stages[0].outgoing)  # rotary cos/sin relayed from stage 0
    with pytest.raises(SplitError, match=r"no stage can start at module 'model.layerz.1'; block boundaries are: model.layers.0, model.layers.1"):
        split_graph(gm, 2, ("model.layerz.1",))
    with pytest.raises(SplitError, match="has 1 module name"):
        split_graph(gm, 3, ("model.layers.1",))
    # the cost model balances: the largest stage is as small as block-aligned cuts allow
    gm4 = trace(_deep_gpt(), _models.global_batch(0, 2), None)
    costs = [st.cost for st in split_graph(gm4, 4).stages]
    assert max(costs) < 0.4 * sum(costs), costs


def test_split_for_interleaving_puts_the_tied_embedding_on_different_ranks():
    gm = trace(make_gpt4(), _models.global_batch(0, 2), None)
    split = split_graph(gm, 4)  # p=2 x v=2
    assert [st.first_module for st in split.stages] == ["", "h.1", "h.2", "h.3"]
    assert split.tied == {"lm_head.weight": (0, 3)}  # ranks 0 and 1


def test_weight_shared_by_two_stages_of_one_rank_gets_a_copy_per_stage():
    gm = trace(make_gpt4_shared(), _models.global_batch(0, 2), None)
    split = split_graph(gm, 4)  # p=2 x v=2: rank 0 runs stages 0 and 2
    # export names the shared weight once, by its last attribute path
    assert split.tied == {"h.2.mlp.fc.weight": (0, 2), "lm_head.weight": (0, 3)}

    def param(k, name):
        *path, leaf = split.tied_names[name][k].split(".")
        return split.stages[k].module.get_submodule(".".join(path))._parameters[leaf]

    assert param(0, "h.2.mlp.fc.weight") is param(2, "h.2.mlp.fc.weight")
    _untie_copies_on_one_rank(split, mine=(1, 3))  # rank 1: the embedding tie spans ranks, no copy
    assert param(0, "lm_head.weight") is param(3, "lm_head.weight")
    assert param(0, "h.2.mlp.fc.weight") is param(2, "h.2.mlp.fc.weight")
    _untie_copies_on_one_rank(split, mine=(0, 2))
    first, copy = param(0, "h.2.mlp.fc.weight"), param(2, "h.2.mlp.fc.weight")
    assert copy is not first and isinstance(copy, torch.nn.Parameter) and copy.requires_grad
    assert torch.equal(copy, first)
    assert param(0, "lm_head.weight") is param(3, "lm_head.weight")


def _deep_gpt():
    torch.manual_seed(0)
    return zerograph.models.GPT(zerograph.models.GPTConfig(vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=8, n_head=2, n_embd=32))


# ---------------------------------------------------------------------------
# Training equivalence (spawned gloo ranks)


def make_gpt4():
    """The harness's GPT with 4 blocks: p=2 x v=2 model stages get whole blocks each."""
    torch.manual_seed(1234)
    return zerograph.models.GPT(zerograph.models.GPTConfig(
        vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=4, n_head=2, n_embd=30))


def make_gpt4_shared():
    """gpt4 with block 2's MLP input weight shared with block 0's (ALBERT-style):
    with p=2 x v=2 both blocks' stages (0 and 2) run on rank 0."""
    model = make_gpt4()
    model.h[2].mlp.fc.weight = model.h[0].mlp.fc.weight
    return model


def make_llama4():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=_models.VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=_models.SEQ,
    ))


def make_hf_gpt2_4():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=_models.VOCAB, n_positions=_models.SEQ, n_embd=32, n_layer=4, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ))


_MODELS = {**_models.MODELS, "gpt4": make_gpt4, "gpt4_shared": make_gpt4_shared, "llama4": make_llama4, "hf_gpt2_4": make_hf_gpt2_4}


def _reference(name: str, clip: float = 0.0):
    """Single-process eager training on the whole global batch, as
    ``_harness.reference_run(name, 2)`` does, for this file's models too."""
    if name in _models.MODELS:
        return _harness.reference_run(name, 2, clip=clip)
    model = _MODELS[name]()
    opt = _harness._optimizer(model.parameters())
    losses = []
    for step in range(_harness.STEPS):
        idx, targets = _models.global_batch(step, GLOBAL_ROWS)
        loss = _models.loss_of(name, model, idx, targets)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _batch(name: str, step: int, rows: int):
    idx, targets = _models.global_batch(step, rows)
    return (idx, targets) if name.startswith("gpt") else {"input_ids": idx, "labels": idx}


def _rows_of(batch, rank: int, parts: int):
    if isinstance(batch, tuple):
        return tuple(t.chunk(parts)[rank] for t in batch)
    return {k: v.chunk(parts)[rank] for k, v in batch.items()}


def _train(runs: list[tuple[str, dict]], steps: int = _harness.STEPS):
    """On each rank: for each (model, config), train ``steps`` steps with train_step."""
    out = []
    for name, config in runs:
        torch._dynamo.reset()
        cfg = Config.load(config)
        model = _MODELS[name]()
        if cfg.pipeline.stages > 1:
            model = zerograph.compile(model, cfg, example_batch=_batch(name, 0, GLOBAL_ROWS // (torch.distributed.get_world_size() // cfg.pipeline.stages)))
            dp = model.groups.dp
        else:
            model = zerograph.compile(model, cfg)
            dp = model._zg_runtime.ctx.dp
        opt = _harness._optimizer(model.parameters())
        losses = []
        for step in range(steps):
            losses.append(model.train_step(_rows_of(_batch(name, step, GLOBAL_ROWS), dp.rank, dp.world_size)))
            opt.step()
            opt.zero_grad()
        misuse = ""
        if cfg.pipeline.stages > 1:
            try:
                model(*_batch(name, 0, 2)) if name.startswith("gpt") else model(**_batch(name, 0, 2))
            except PipelineModeError as exc:
                misuse = str(exc)
        params = {k: v.float().clone() for k, v in zerograph.full_state_dict(model).items()}
        inspection = zerograph.inspect(model)
        stages = sorted({r["stage"] for r in inspection.regions if r["stage"] is not None})
        out.append({"losses": losses, "params": params, "misuse": misuse, "stages": stages,
                    "comm": sum(inspection.comm_bytes_last_step.values())})
    return out


def _check(results, runs, clip: dict[int, float] | None = None):
    refs = {}
    for i, (name, _) in enumerate(runs):
        c = (clip or {}).get(i, 0.0)
        if (name, c) not in refs:
            refs[(name, c)] = _reference(name, c)
        ref_losses, ref_params = refs[(name, c)]
        for rank, rank_results in enumerate(results):
            try:
                _harness.assert_same_training(rank_results[i], ref_losses, ref_params)
            except AssertionError as exc:
                raise AssertionError(f"{name} {runs[i][1]}, rank {rank}: {exc}") from None


@pytest.mark.timeout(TIMEOUT + 30)
def test_two_stages_match_eager():
    """p=2 (world 2), 1F1B and GPipe, ZeRO-0/3 inside each (single-rank) stage,
    clipping over both stages, train_step without a pipeline, and interleaved
    1F1B (p=2, v=2) on 4-block GPT and Hugging Face GPT-2."""
    pp = {"stages": 2, "micro_batches": 4}
    il = {**pp, "schedule": "interleaved_1f1b"}  # virtual_stages: 2 by default
    runs = [
        ("gpt", {"pipeline": pp}),
        ("gpt", {"pipeline": {**pp, "schedule": "gpipe"}, "zero_optimization": {"stage": 3}}),
        ("gpt", {"pipeline": pp, "gradient_clipping": 0.05}),
        ("hf_gpt2", {"pipeline": pp, "zero_optimization": {"stage": 3}}),
        ("llama", {"pipeline": {**pp, "split_points": ["model.layers.1"]}}),
        ("gpt", {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 2}),  # no pipeline
        # interleaved 1F1B: 4 model stages, rank 0 holds stages 0 and 2, rank 1 stages 1 and 3;
        # the tied embedding is on stages 0 and 3, clipping spans both chunks of both ranks
        ("gpt4", {"pipeline": il, "gradient_clipping": 0.05}),
        ("hf_gpt2_4", {"pipeline": il, "zero_optimization": {"stage": 3}}),
        # a weight shared by blocks 0 and 2: stages 0 and 2 of rank 0 each hold a copy
        ("gpt4_shared", {"pipeline": il, "zero_optimization": {"stage": 3}, "gradient_clipping": 0.05}),
    ]
    results = _pool.run(_train, 2, runs, timeout=TIMEOUT)
    _check(results, runs, clip={2: 0.05, 6: 0.05, 8: 0.05})
    for rank, rank_results in enumerate(results):  # model(...) in pipeline mode says to use train_step
        assert "call loss = model.train_step(batch) instead" in rank_results[0]["misuse"]
        assert "call loss = model.eval_step(batch)" in rank_results[0]["misuse"]  # evaluation
        assert rank_results[0]["stages"] == [rank]
        # interleaved: inspect shows both of this rank's stages (rank r holds stages r and r + 2)
        assert rank_results[6]["stages"] == rank_results[7]["stages"] == [rank, rank + 2]
        assert rank_results[5]["stages"] == []  # no pipeline
    # ZeRO-3 inside each single-rank stage moves no bytes; the no-pipeline ZeRO-3 run does
    assert results[0][7]["comm"] == 0 and results[0][5]["comm"] > 0


@pytest.mark.slow  # CI: test_two_stages_match_eager, test_training_features' Inductor test
@pytest.mark.timeout(TIMEOUT + 30)
def test_two_stages_with_the_inductor_executor_match_eager():
    """The stage graphs compiled by Inductor (the faster executor on CPU, see
    docs/benchmarks.md): 1F1B and interleaved 1F1B, p=2 (world 2). Inductor
    fuses and reorders float arithmetic, so agreement is to a few fp32 ulps."""
    inductor = {"compiler": "inductor"}
    runs = [
        ("gpt", {"pipeline": {"stages": 2, "micro_batches": 4}, "zerograph": inductor}),
        ("gpt4", {"pipeline": {"stages": 2, "micro_batches": 4, "schedule": "interleaved_1f1b"},
                  "zerograph": inductor}),
    ]
    results = _pool.run(_train, 2, runs, timeout=TIMEOUT)
    for i, (name, _) in enumerate(runs):
        ref_losses, ref_params = _reference(name)
        for rank_results in results:
            _harness.assert_same_training(rank_results[i], ref_losses, ref_params, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(TIMEOUT + 30)
def test_two_stages_times_two_data_parallel_zero3_match_eager():
    """p=2 x dp=2 (world 4), ZeRO-3 inside each stage's data-parallel group;
    also interleaved 1F1B (v=2): each rank shards two model stages over its group."""
    runs = [
        ("gpt", {"pipeline": {"stages": 2, "micro_batches": 2}, "zero_optimization": {"stage": 3}}),
        ("gpt4", {"pipeline": {"stages": 2, "micro_batches": 2, "schedule": "interleaved_1f1b"},
                  "zero_optimization": {"stage": 3}}),
    ]
    _check(_pool.run(_train, 4, runs, timeout=TIMEOUT), runs)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_two_stages_times_two_data_parallel_all_models_and_stages():
    runs = [
        (name, {"pipeline": {"stages": 2, "micro_batches": 2}, "zero_optimization": {"stage": s}})
        for name in ("hf_gpt2", "llama") for s in (0, 3)
    ] + [("gpt", {"pipeline": {"stages": 2, "micro_batches": 2}, "zero_optimization": {"stage": s}}) for s in (0, 1, 2)] + [
        (name, {"pipeline": {"stages": 2, "micro_batches": 2, "schedule": "interleaved_1f1b"},
                "zero_optimization": {"stage": s}})
        for name in ("hf_gpt2_4", "llama") for s in (0, 2)
    ]
    _check(_pool.run(_train, 4, runs, timeout=TIMEOUT), runs)


def _resume_with_dropout(path: str):
    """Interleaved p=2 x v=2 with dropout: train step 0, save, train step 1;
    load the checkpoint and train step 1 again. The load must restore every
    rank's RNG (for the same dropout masks) and every stage's step counter."""
    import logging

    torch._dynamo.reset()
    torch.manual_seed(1234)
    model = zerograph.models.GPT(zerograph.models.GPTConfig(
        vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=4, n_head=2, n_embd=30, dropout=0.2))
    config = {"pipeline": {"stages": 2, "micro_batches": 2, "schedule": "interleaved_1f1b"}}
    model = zerograph.compile(model, config, example_batch=_batch("gpt", 0, GLOBAL_ROWS))
    opt = _harness._optimizer(model.parameters())
    model.train_step(_batch("gpt", 0, GLOBAL_ROWS))
    opt.step()
    opt.zero_grad()
    zerograph.save_checkpoint(path, model, opt)
    first = model.train_step(_batch("gpt", 1, GLOBAL_ROWS))
    opt.step()
    opt.zero_grad()
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("zerograph.checkpoint").addHandler(handler)
    zerograph.load_checkpoint(path, model, opt)
    steps = [rt.ctx.step for _, rt in model.stage_runtimes()]
    again = model.train_step(_batch("gpt", 1, GLOBAL_ROWS))
    return first, again, steps, warnings


@pytest.mark.timeout(TIMEOUT + 30)
def test_checkpoint_resume_restores_rng_and_every_stage_counter(tmp_path):
    results = _pool.run(_resume_with_dropout, 2, str(tmp_path / "ckpt"), timeout=TIMEOUT)
    for rank, (first, again, steps, warnings) in enumerate(results):
        assert not [w for w in warnings if "RNG states not restored" in w], (rank, warnings)
        assert steps == [1, 1], (rank, steps)  # both model stages of this rank
        assert again == first, (rank, first, again)  # the same dropout masks: bit-identical


# ---------------------------------------------------------------------------
# Evaluation: eval_step


def test_forward_only_schedules_simulate_without_deadlock():
    """eval_step's schedule: each rank's forwards in the training order, with the
    activation transfers; the simulator checks it as it checks training schedules."""
    assert_expected_inline(str(forward_only(interleaved_one_f_one_b(2, 4, 2))), """\
interleaved_1f1b forward: 2 ranks x 2 virtual stages = 4 stages, 4 micro-batches
  rank 0: 0F0 0SEND_ACT(0) 0F1 0SEND_ACT(1) 2RECV_ACT(0) 2F0 2SEND_ACT(0) 2RECV_ACT(1) 2F1 2SEND_ACT(1) 0F2 0SEND_ACT(2) 0F3 0SEND_ACT(3) 2RECV_ACT(2) 2F2 2SEND_ACT(2) 2RECV_ACT(3) 2F3 2SEND_ACT(3)
  rank 1: 1RECV_ACT(0) 1F0 1SEND_ACT(0) 1RECV_ACT(1) 1F1 1SEND_ACT(1) 3RECV_ACT(0) 3F0 3RECV_ACT(1) 3F1 1RECV_ACT(2) 1F2 1SEND_ACT(2) 1RECV_ACT(3) 1F3 1SEND_ACT(3) 3RECV_ACT(2) 3F2 3RECV_ACT(3) 3F3""")
    for p in (2, 3, 4):
        for m in (1, 4, 5):
            for schedule in (one_f_one_b(p, m), gpipe(p, m)):
                timeline = simulate(forward_only(schedule))
                assert len(timeline.grid) == m + p - 1 and timeline.peak_in_flight == (0,) * p
        for v in (2, 3, 4):
            for m in (p, 2 * p, 3 * p):
                timeline = simulate(forward_only(interleaved_one_f_one_b(p, m, v)))
                assert all(a is None or a.kind == "F" for row in timeline.grid for a in row)
    with pytest.raises(ScheduleError, match=r"F must run each micro-batch 0..1 exactly once; got \[0\]"):
        simulate(_edit(forward_only(one_f_one_b(1, 2)), 0, ["F0"]))


def make_gpt4_dropout():
    """gpt4 with dropout (and attention dropout): traced in training mode."""
    torch.manual_seed(1234)
    return zerograph.models.GPT(zerograph.models.GPTConfig(
        vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=4, n_head=2, n_embd=30, dropout=0.2))


_EVAL_MODELS = {"gpt": _models.make_gpt, "gpt4": make_gpt4, "gpt4_dropout": make_gpt4_dropout,
                "gpt_dropout": lambda: _models.make_gpt(dropout=0.2)}
EVAL_BATCH = 100  # the eval batch: global_batch(EVAL_BATCH, rows), unlike every training batch


def _eval_and_train(runs, steps: int = 4, eval_after: int = 2):
    """On each rank, for each (model, config): train ``steps`` steps twice from
    the same start, once with eval_step calls after step ``eval_after`` (in
    training mode, then after model.eval(), then model.train() again) and once
    without; return the losses, final parameters and counters of both, the
    eval losses and the full state dict at the eval point."""
    out = []
    for name, config in runs:
        cfg = Config.load(config)
        got = {}
        for with_eval in (True, False):
            torch._dynamo.reset()
            torch.manual_seed(0)  # the same dropout masks in both runs, unless eval_step draws from the RNG
            model = _EVAL_MODELS[name]()
            pipeline = cfg.pipeline.stages > 1
            dp_world = torch.distributed.get_world_size() // max(cfg.pipeline.stages, 1)
            example = _batch("gpt", 0, GLOBAL_ROWS // dp_world)
            model = zerograph.compile(model, cfg, example_batch=example) if pipeline else zerograph.compile(model, cfg)
            dp = model.groups.dp if pipeline else model._zg_runtime.ctx.dp
            runtimes = [rt for _, rt in model.stage_runtimes()] if pipeline else [model._zg_runtime]
            opt = _harness._optimizer(model.parameters())
            losses, evals, state, counters = [], {}, None, None
            for step in range(steps):
                if with_eval and step == eval_after:
                    before = ([(rt.ctx.step, rt.ctx.micro_step, dict(rt.ctx.stats.current)) for rt in runtimes],
                              dict(getattr(model, "last_stats", {})), torch.get_rng_state())
                    eval_rows = _rows_of(_batch("gpt", EVAL_BATCH, GLOBAL_ROWS), dp.rank, dp.world_size)
                    evals["train_mode"] = model.eval_step(eval_rows)
                    model.eval()
                    evals["eval_mode"] = model.eval_step(eval_rows)
                    evals["eval_mode_again"] = model.eval_step(eval_rows)
                    model.train()
                    after = ([(rt.ctx.step, rt.ctx.micro_step, dict(rt.ctx.stats.current)) for rt in runtimes],
                             dict(getattr(model, "last_stats", {})), torch.get_rng_state())
                    counters = (before[:2] == after[:2], torch.equal(before[2], after[2]))
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    evals["grads"] = len(grads)
                    state = {k: v.float().clone() for k, v in zerograph.full_state_dict(model).items()}
                losses.append(model.train_step(_rows_of(_batch("gpt", step, GLOBAL_ROWS), dp.rank, dp.world_size)))
                opt.step()
                opt.zero_grad()
            params = {k: v.float().clone() for k, v in zerograph.full_state_dict(model).items()}
            got[with_eval] = {"losses": losses, "params": params, "evals": evals, "state": state, "counters": counters}
        out.append(got)
    return out


def _eager_eval_loss(name: str, state: dict) -> float:
    model = _EVAL_MODELS[name]()
    model.load_state_dict(state)
    model.eval()
    idx, targets = _models.global_batch(EVAL_BATCH, GLOBAL_ROWS)
    with torch.no_grad():
        return model(idx, targets).loss.item()


@pytest.mark.timeout(TIMEOUT + 30)
def test_eval_step_matches_eager_and_leaves_training_bit_identical():
    """eval_step (1F1B p=2, interleaved p=2 x v=2 with dropout, and without a
    pipeline: ZeRO-3 over 2 ranks with accumulation) returns the eager model's
    loss on the same batch after two training steps, in eval mode; calling it
    in the middle of training changes nothing: the following losses and
    parameters are bitwise those of a run without it (dropout masks included)."""
    pp = {"stages": 2, "micro_batches": 4}
    runs = [
        ("gpt", {"pipeline": pp}),
        ("gpt4_dropout", {"pipeline": {**pp, "schedule": "interleaved_1f1b"}, "zero_optimization": {"stage": 3}}),
        ("gpt_dropout", {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 2}),  # no pipeline
    ]
    results = _pool.run(_eval_and_train, 2, runs, timeout=TIMEOUT)
    for i, (name, config) in enumerate(runs):
        ref = _eager_eval_loss(name, results[0][i][True]["state"])
        for rank, rank_results in enumerate(results):
            with_eval, without = rank_results[i][True], rank_results[i][False]
            where = f"{name} {config}, rank {rank}"
            evals = with_eval["evals"]
            # eval mode: dropout off, so the eager model's loss, the same on every call and rank
            assert evals["eval_mode"] == pytest.approx(ref, rel=1e-5), (where, evals, ref)
            assert evals["eval_mode_again"] == evals["eval_mode"], where
            if "dropout" in name:  # training mode: dropout on (masks from a forked RNG)
                assert evals["train_mode"] != evals["eval_mode"], (where, evals)
            else:
                assert evals["train_mode"] == evals["eval_mode"], (where, evals)
            assert evals["grads"] == 0, where  # no gradients accumulated
            assert with_eval["counters"] == (True, True), (where, with_eval["counters"])  # counters, stats, RNG
            assert with_eval["losses"] == without["losses"], (where, with_eval["losses"], without["losses"])
            for key, value in without["params"].items():
                assert torch.equal(with_eval["params"][key], value), (where, key)

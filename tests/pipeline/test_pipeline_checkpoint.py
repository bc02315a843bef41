"""Portable checkpoints of pipeline models (real gloo ranks): a checkpoint
holds the original model's parameter names, so one saved by a pipeline
loads into another pipeline layout or a model without a pipeline, and the
other way round, optimizer state included, and training goes on as if
uninterrupted: losses and parameters equal single-process eager training of
all steps on the same global batches (fp32, rtol 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

import zerograph
from tests import _harness, _models, _pool
from tests._harness import TIMEOUT
from zerograph.config import Config

# one xdist worker runs this module: its module-scoped fixtures train and save once (tests/_xdist.py)
pytestmark = [pytest.mark.timeout(TIMEOUT + 30), pytest.mark.xdist_group("pipeline_checkpoint")]

SAVE_AT, END = 3, 5
GLOBAL_ROWS = 2 * _harness.PER_RANK_BATCH  # rows per step, as _harness.reference_run(model, world=2) uses
PIPELINE = {"pipeline": {"stages": 2, "micro_batches": 4}}  # 1F1B, p=2 on world 2
ZERO3 = {"train_micro_batch_size_per_gpu": _harness.PER_RANK_BATCH, "zero_optimization": {"stage": 3}}


def make_gpt4_shared():
    """The test GPT with 4 blocks, block 2's MLP input weight shared with
    block 0's: with p=2 x v=2 both blocks' stages (0 and 2) run on rank 0,
    each with its own copy; the embedding is tied to the LM head (stages 0 and 3)."""
    torch.manual_seed(1234)
    model = zerograph.models.GPT(zerograph.models.GPTConfig(
        vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=4, n_head=2, n_embd=30))
    model.h[2].mlp.fc.weight = model.h[0].mlp.fc.weight
    return model


_MODELS = {"gpt": _models.make_gpt, "gpt4_shared": make_gpt4_shared}


def _build(config, optimizer: str, name: str = "gpt"):
    torch._dynamo.reset()
    cfg = Config.load(config)
    model = _MODELS[name]()
    if cfg.pipeline.stages > 1:
        dp = torch.distributed.get_world_size() // cfg.pipeline.stages
        idx, targets = _models.global_batch(0, GLOBAL_ROWS // dp)
        model = zerograph.compile(model, cfg, example_batch=(idx, targets))
    else:
        model = zerograph.compile(model, cfg)
    if optimizer == "make_optimizer":  # a ShardOptimizer: steps the local shards
        opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=_harness.LR, eps=_harness.EPS, foreach=False)
    else:
        opt = _harness._optimizer(model.parameters())
    return model, opt


def _train(model, opt, steps) -> list[float]:
    if not hasattr(model, "train_step") or not hasattr(model, "groups"):
        return _harness.train_global_batches(model, opt, steps)
    dp = model.groups.dp
    losses = []
    for step in steps:
        idx, targets = _models.global_batch(step, GLOBAL_ROWS)
        losses.append(model.train_step((idx.chunk(dp.world_size)[dp.rank], targets.chunk(dp.world_size)[dp.rank])))
        opt.step()
        opt.zero_grad()
    return losses


def _runtimes(model):
    """Every stage's runtime of a pipeline rank, or the model's one."""
    return [rt for _, rt in model.stage_runtimes()] if hasattr(model, "stage_runtimes") else [model._zg_runtime]


def _save(config, optimizer: str, path: str) -> list[float]:
    model, opt = _build(config, optimizer)
    losses = _train(model, opt, range(SAVE_AT))
    zerograph.save_checkpoint(path, model, opt, step=SAVE_AT)
    return losses


def _resume(config, optimizer: str, path: str):
    model, opt = _build(config, optimizer)
    extra = zerograph.load_checkpoint(path, model, opt)
    steps = [rt.ctx.step for rt in _runtimes(model)]
    losses = _train(model, opt, range(SAVE_AT, END))
    params = {k: v.detach().float().clone() for k, v in zerograph.full_state_dict(model).items()}
    return extra, steps, losses, params


def _hand_over(name: str, runs):
    """Train ``name`` through ``runs``: (config, optimizer, steps) each, every
    run after the first loading the checkpoint the previous one saved."""
    import os
    import tempfile

    path = tempfile.mkdtemp() if torch.distributed.get_rank() == 0 else None
    box = [path]
    torch.distributed.broadcast_object_list(box)
    path = os.path.join(box[0], "ckpt")
    losses, steps_seen = [], []
    for i, (config, optimizer, steps) in enumerate(runs):
        model, opt = _build(config, optimizer, name)
        if i:
            zerograph.load_checkpoint(path, model, opt)
            steps_seen.append([rt.ctx.step for rt in _runtimes(model)])
        losses += _train(model, opt, steps)
        if i < len(runs) - 1:
            zerograph.save_checkpoint(path, model, opt)
    params = {k: v.detach().float().clone() for k, v in zerograph.full_state_dict(model).items()}
    return losses, params, steps_seen


def _save_then_resume(save_config, save_optimizer, resume_config, resume_optimizer, path):
    first = _save(save_config, save_optimizer, path)
    return first, _resume(resume_config, resume_optimizer, path)


@pytest.fixture(scope="module")
def reference():
    """Single-process eager training of all 5 steps on the same global batches."""
    losses, params = _harness.reference_run("gpt", 2, steps=END)
    return losses, params


@pytest.fixture(scope="module")
def pipeline_checkpoint(tmp_path_factory):
    """3 steps of p=2 1F1B (world 2) with a plain AdamW, saved."""
    path = str(tmp_path_factory.mktemp("pp") / "ckpt")
    losses = _pool.run(_save, 2, PIPELINE, "plain", path, timeout=TIMEOUT)[0]
    return path, losses


def _assert_continues(results, first_losses, reference):
    ref_losses, ref_params = reference
    torch.testing.assert_close(torch.tensor(first_losses), torch.tensor(ref_losses[:SAVE_AT]), rtol=1e-5, atol=1e-6)
    for rank, (extra, steps, losses, params) in enumerate(results):
        assert extra == {"step": SAVE_AT}, (rank, extra)
        assert set(steps) == {SAVE_AT}, (rank, steps)  # every stage's step counter
        _harness.assert_same_training({"losses": losses, "params": params}, ref_losses[SAVE_AT:], ref_params)


def _saved_keys(path) -> set[str]:
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def test_pipeline_checkpoint_holds_the_original_names_once(pipeline_checkpoint, tmp_path):
    """The same keys as a checkpoint of the model without a pipeline; the tied
    embedding / LM head once, written by the first stage's rank; each block by
    the rank of its stage."""
    path, _ = pipeline_checkpoint
    plain = tmp_path / "plain"
    model = zerograph.shard(_models.make_gpt(), {})
    opt = _harness._optimizer(model.parameters())
    _harness.train_global_batches(model, opt, range(1))
    zerograph.save_checkpoint(plain, model, opt)
    keys = _saved_keys(path)
    assert {k for k in keys if not k.startswith("rng/")} == {k for k in _saved_keys(plain) if not k.startswith("rng/")}
    assert "model.wte.weight" in keys and "model.lm_head.weight" not in keys
    assert not [k for k in keys if "chunks" in k]
    files: dict[str, set[str]] = {}
    for index, info in dcp.FileSystemReader(str(path)).read_metadata().storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path.split("_")[2])  # __<rank>_<n>.distcp
    assert files["model.wte.weight"] == {"0"} and files["optim.state.wte.weight.exp_avg"] == {"0"}
    assert files["model.h.0.attn.qkv.weight"] == {"0"} and files["model.h.1.attn.qkv.weight"] == {"1"}


def test_pipeline_checkpoint_loads_into_zero3_without_pipeline(pipeline_checkpoint, reference):
    path, first = pipeline_checkpoint
    results = _pool.run(_resume, 2, ZERO3, "plain", path, timeout=TIMEOUT)
    _assert_continues(results, first, reference)


def test_pipeline_checkpoint_loads_into_another_pipeline(pipeline_checkpoint, reference):
    """Saved: 1F1B, ZeRO-0 stages, plain AdamW. Loaded: GPipe, ZeRO-3 stages,
    make_optimizer's ShardOptimizer."""
    path, first = pipeline_checkpoint
    config = {"pipeline": {**PIPELINE["pipeline"], "schedule": "gpipe"}, "zero_optimization": {"stage": 3}}
    results = _pool.run(_resume, 2, config, "make_optimizer", path, timeout=TIMEOUT)
    _assert_continues(results, first, reference)


def test_zero3_checkpoint_loads_into_a_pipeline(tmp_path, reference):
    """Saved without a pipeline (ZeRO-3, world 2, ShardOptimizer); loaded into p=2."""
    results = _pool.run(_save_then_resume, 2, ZERO3, "make_optimizer", PIPELINE, "plain", str(tmp_path / "ckpt"),
                        timeout=TIMEOUT)
    _assert_continues([r[1] for r in results], results[0][0], reference)


def test_mismatched_checkpoint_names_the_keys_and_the_fix(tmp_path):
    model = zerograph.shard(_models.make_gpt(), {})
    opt = _harness._optimizer([p for name, p in model.named_parameters() if not name.startswith("h.1.")])
    _harness.train_global_batches(model, opt, range(1))
    zerograph.save_checkpoint(tmp_path / "ckpt", model, opt)

    torch.manual_seed(0)
    deeper = zerograph.shard(zerograph.models.GPT(zerograph.models.GPTConfig(
        vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=3, n_head=2, n_embd=30)), {})
    with pytest.raises(ValueError, match=r"has no h\.2\.ln_1\.weight, .*which this model has\. A checkpoint holds "
                                         r"the original model's parameter names .* build the model with the "
                                         r"configuration it was saved from"):
        zerograph.load_checkpoint(tmp_path / "ckpt", deeper)
    wider = zerograph.shard(zerograph.models.GPT(zerograph.models.GPTConfig(
        vocab_size=_models.VOCAB, block_size=_models.SEQ, n_layer=2, n_head=2, n_embd=32)), {})
    with pytest.raises(ValueError, match=r"shapes differ: model\.wte\.weight \(97, 30\) in the checkpoint, "
                                         r"\(97, 32\) here"):
        zerograph.load_checkpoint(tmp_path / "ckpt", wider)
    model = zerograph.shard(_models.make_gpt(), {})
    with pytest.raises(ValueError, match=r"has no optimizer state for h\.1\.ln_1\.weight, .*call "
                                         r"load_checkpoint\(path, model\) without the optimizer"):
        zerograph.load_checkpoint(tmp_path / "ckpt", model, _harness._optimizer(model.parameters()))
    zerograph.load_checkpoint(tmp_path / "ckpt", model)  # the weights alone load


def _eager_reference(name: str, steps: int = END):
    model = _MODELS[name]()
    opt = _harness._optimizer(model.parameters())
    losses = []
    for step in range(steps):
        idx, targets = _models.global_batch(step, GLOBAL_ROWS)
        loss = model(idx, targets).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def test_interleaved_with_shared_weights_hands_over_to_zero3_and_back():
    """Interleaved 1F1B (p=2 x v=2, ZeRO-3) with a weight shared by stages 0
    and 2 (one copy each on rank 0) and the embedding tied across ranks:
    steps 0-2, save; ZeRO-3 without a pipeline loads it, step 3, save;
    interleaved again (ShardOptimizer) loads that into every copy, step 4."""
    interleaved = {"pipeline": {"stages": 2, "micro_batches": 4, "schedule": "interleaved_1f1b"},
                   "zero_optimization": {"stage": 3}}
    runs = [(interleaved, "plain", range(3)), (ZERO3, "plain", range(3, 4)),
            (interleaved, "make_optimizer", range(4, 5))]
    results = _pool.run(_hand_over, 2, "gpt4_shared", runs, timeout=TIMEOUT)
    ref_losses, ref_params = _eager_reference("gpt4_shared")
    for rank, (losses, params, steps_seen) in enumerate(results):
        assert steps_seen == [[3], [4, 4]], (rank, steps_seen)
        _harness.assert_same_training({"losses": losses, "params": params}, ref_losses, ref_params)


@pytest.mark.slow
@pytest.mark.timeout(3 * TIMEOUT + 30)
def test_pipeline_times_data_parallel_zero3_checkpoint_loads_on_two_ranks(tmp_path, reference):
    """Saved by p=2 x dp=2 with ZeRO-3 inside each stage (world 4: every
    stage's tensors sharded over its data-parallel pair); loaded into ZeRO-3
    without a pipeline on world 2 and into p=2 on world 2 (nightly: world 4
    on this 2-core machine is slow)."""
    from zerograph.runtime.launch import spawn

    path = str(tmp_path / "ckpt")
    config = {"pipeline": {"stages": 2, "micro_batches": 2}, "zero_optimization": {"stage": 3}}
    # Fresh processes, not the world-4 pool: each stage's step-check group is a local-synchronization
    # subgroup, whose name torch hashes from its ranks and the number of live groups. In a pool rank
    # that an earlier pipeline body left (its groups destroyed), the same name comes back and its
    # rendezvous reads that earlier group's stale store keys (connection refused).
    first = spawn(_save, 4, config, "make_optimizer", path, timeout=TIMEOUT)
    assert len({tuple(losses) for losses in first}) == 1  # every rank reports the step's mean loss
    _assert_continues(_pool.run(_resume, 2, ZERO3, "plain", path, timeout=TIMEOUT), first[0], reference)
    _assert_continues(_pool.run(_resume, 2, PIPELINE, "make_optimizer", path, timeout=TIMEOUT), first[0], reference)

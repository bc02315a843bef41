"""zerograph.save_checkpoint / load_checkpoint: exact resume in new
processes, resharding on load, atomic writes (real gloo ranks)."""

from __future__ import annotations

import os

import pytest
import torch

import zerograph
from tests import _harness, _models, _pool
from zerograph.runtime.launch import spawn

# one xdist worker runs this module: its module-scoped fixture trains and saves once (tests/_xdist.py)
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group("checkpoint")]


def _run(config, path, phase):
    """phase "straight": 10 steps; "first": 5 steps then save; "second": load then 5 steps."""
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), config)
    opt = _harness._optimizer(model.parameters())
    if phase == "straight":
        losses = _harness.train_global_batches(model, opt, range(10))
    elif phase == "first":
        losses = _harness.train_global_batches(model, opt, range(5))
        zerograph.save_checkpoint(path, model, opt, step=5, note="hello")
    else:
        extra = zerograph.load_checkpoint(path, model, opt)
        assert extra == {"step": 5, "note": "hello"}, extra
        assert model._zg_runtime.ctx.step == 5
        losses = _harness.train_global_batches(model, opt, range(5, 10))
    params = {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()}
    return losses, params


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


@pytest.mark.parametrize("stage", [3, pytest.param(1, marks=pytest.mark.slow)])
def test_resume_is_exact(tmp_path, stage):
    config = {"train_micro_batch_size_per_gpu": _harness.PER_RANK_BATCH, "zero_optimization": {"stage": stage}}
    path = str(tmp_path / "ckpt")
    # the uninterrupted run and the saving run on the rank pool; the resume in new processes
    straight = _pool.run(_run, 2, config, path, "straight", timeout=240)[0]
    first = _pool.run(_run, 2, config, path, "first", timeout=240)[0]
    assert os.path.isfile(os.path.join(path, zerograph.checkpoint.COMMIT_MARKER))
    second = spawn(_run, 2, config, path, "second", timeout=240)[0]
    assert first[0] + second[0] == straight[0]  # bit-exact losses
    for key, ref in straight[1].items():
        assert torch.equal(second[1][key], ref), key

    # Resharding: the world-2 checkpoint loads into a single process.
    model = zerograph.shard(_models.make_gpt(), {"zero_optimization": {"stage": 0}})
    assert zerograph.load_checkpoint(path, model)["step"] == 5
    for key, value in zerograph.full_state_dict(model).items():
        assert torch.equal(value, first[1][key]), key

    # A save that fails midway leaves the previous checkpoint whole.
    with pytest.raises(RuntimeError, match="disk full"):
        zerograph.save_checkpoint(path, model, bad=_Unpicklable())
    assert not [p for p in os.listdir(tmp_path) if "tmp-" in p]
    model = zerograph.shard(_models.make_gpt(), {})
    zerograph.load_checkpoint(path, model)
    for key, value in zerograph.full_state_dict(model).items():
        assert torch.equal(value, first[1][key]), key


def test_uncommitted_directory_is_an_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    model = zerograph.shard(_models.make_gpt(), {})
    with pytest.raises(RuntimeError, match="ZEROGRAPH_COMMITTED"):
        zerograph.load_checkpoint(tmp_path / "ckpt", model)


# -- resharding: save at one world size / stage, continue at another ----------

RESHARD_SAVE_AT, RESHARD_END = 5, 8


def _reshard_run(config, path, phase):
    """phase "save": steps 0-4 then save; "resume": load, then steps 5-7.
    The global batch is the same at every world size (``_train``)."""
    torch._dynamo.reset()
    model = zerograph.compile(_models.make_gpt(), config)
    opt = _harness._optimizer(model.parameters())
    if phase == "save":
        _harness.train_global_batches(model, opt, range(RESHARD_SAVE_AT))
        zerograph.save_checkpoint(path, model, opt, step=RESHARD_SAVE_AT)
        return None
    assert zerograph.load_checkpoint(path, model, opt) == {"step": RESHARD_SAVE_AT}
    losses = _harness.train_global_batches(model, opt, range(RESHARD_SAVE_AT, RESHARD_END))
    return losses, {k: v.detach().clone() for k, v in zerograph.full_state_dict(model).items()}


@pytest.fixture(scope="module")
def zero3_world2_checkpoint(tmp_path_factory):
    """Steps 0-4 trained with ZeRO-3 on 2 ranks, model and optimizer saved;
    and the single-process eager reference of steps 0-7 on the same batches."""
    path = str(tmp_path_factory.mktemp("reshard") / "ckpt")
    config = {"train_micro_batch_size_per_gpu": _harness.PER_RANK_BATCH, "zero_optimization": {"stage": 3}}
    _pool.run(_reshard_run, 2, config, path, "save", timeout=240)
    ref_losses, ref_params = _harness.reference_run("gpt", 2, steps=RESHARD_END)
    return path, ref_losses[RESHARD_SAVE_AT:], ref_params


def _assert_continues_like_reference(result, ref_losses, ref_params):
    # fp32 round-off only: the resumed run reduces in another order than the
    # eager reference (tolerance as in test_equivalence).
    losses, params = result
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    assert params.keys() == ref_params.keys()
    for key, ref in ref_params.items():
        torch.testing.assert_close(params[key], ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_reshard_zero3_world2_to_zero1_world2(zero3_world2_checkpoint):
    path, ref_losses, ref_params = zero3_world2_checkpoint
    config = {"train_micro_batch_size_per_gpu": _harness.PER_RANK_BATCH, "zero_optimization": {"stage": 1}}
    result = _pool.run(_reshard_run, 2, config, path, "resume", timeout=240)[0]
    _assert_continues_like_reference(result, ref_losses, ref_params)


def test_reshard_zero3_world2_to_one_process_stage0(zero3_world2_checkpoint):
    path, ref_losses, ref_params = zero3_world2_checkpoint
    config = {"train_micro_batch_size_per_gpu": 2 * _harness.PER_RANK_BATCH, "zero_optimization": {"stage": 0}}
    _assert_continues_like_reference(_reshard_run(config, path, "resume"), ref_losses, ref_params)


@pytest.mark.slow  # 4 ranks on this 2-core machine: ~40 s
def test_reshard_zero3_world2_to_zero3_world4(zero3_world2_checkpoint):
    path, ref_losses, ref_params = zero3_world2_checkpoint
    config = {"train_micro_batch_size_per_gpu": _harness.PER_RANK_BATCH // 2, "zero_optimization": {"stage": 3}}
    result = spawn(_reshard_run, 4, config, path, "resume", timeout=240)[0]
    _assert_continues_like_reference(result, ref_losses, ref_params)


def test_resume_with_other_accumulation_steps_keeps_the_step_boundaries(tmp_path):
    """Saved with gradient_accumulation_steps 2 after one optimizer step,
    resumed with 4 on the same global batch (as when halving the world size):
    the first boundary after the load is the 4th micro-batch, so clipping
    sees whole steps and training equals eager PyTorch."""

    def train(model, opt, steps, accumulation):
        for step in steps:
            idx, targets = _models.global_batch(step, 8)
            for micro_idx, micro_t in zip(idx.chunk(accumulation), targets.chunk(accumulation)):
                model(micro_idx, micro_t).loss.backward()
            opt.step()
            opt.zero_grad()

    path = tmp_path / "ckpt"
    model = zerograph.shard(_models.make_gpt(), {"gradient_accumulation_steps": 2, "gradient_clipping": 0.3})
    opt = _harness._optimizer(model.parameters())
    train(model, opt, [0], 2)
    zerograph.save_checkpoint(path, model, opt)
    model = zerograph.shard(_models.make_gpt(), {"gradient_accumulation_steps": 4, "gradient_clipping": 0.3})
    opt = _harness._optimizer(model.parameters())
    zerograph.load_checkpoint(path, model, opt)
    train(model, opt, [1, 2], 4)
    assert model._zg_runtime.ctx.step == 3

    ref_losses, ref_params = _harness.reference_run("gpt", 2, clip=0.3, steps=3)
    for key, ref in ref_params.items():
        torch.testing.assert_close(zerograph.full_state_dict(model)[key], ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("builder", ["plain", "make_optimizer"])
def test_checkpoint_of_an_optimizer_that_has_not_stepped_resumes_exactly(tmp_path, builder):
    """A checkpoint saved before the optimizer's first step (at the start, or
    while fp16 overflows skip the first steps) neither changes the run that
    saves it nor gives the resumed run AdamW states it did not have: torch's
    state-dict helpers (and ShardOptimizer's, which mirror them) fill an
    empty optimizer with a zero-gradient step."""

    def run(save=None, load=None):
        model = zerograph.shard(_models.make_gpt(), {})
        if builder == "plain":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        else:
            opt = zerograph.make_optimizer(model, torch.optim.AdamW, lr=1e-2)
        if save:
            zerograph.save_checkpoint(save, model, opt)
        if load:
            zerograph.load_checkpoint(load, model, opt)
        losses = _harness.train_global_batches(model, opt, range(2))
        return losses, zerograph.full_state_dict(model), [s["step"] for s in opt.state.values()]

    straight = run()
    for result in (run(save=tmp_path / "ckpt"), run(load=tmp_path / "ckpt")):
        assert result[0] == straight[0]
        assert result[2] == straight[2]
        for key, value in straight[1].items():
            assert torch.equal(result[1][key], value), key

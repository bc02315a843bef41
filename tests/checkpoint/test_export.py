"""Hugging Face export and full-state-dict import: train with ZeRO-3 on 2
gloo ranks, zerograph.export_pretrained, then from_pretrained in this
process gives the sharded model's logits; zerograph.load_full_state_dict
puts full tensors back into a sharded model."""

from __future__ import annotations

import pytest
import torch

import zerograph
from tests import _harness, _models, _pool
from tests._harness import TIMEOUT

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(TIMEOUT + 30)

STEPS = 3
PROBE = _models.global_batch(99, 3)[0]  # the inputs whose logits are compared


def _config(stage):
    return {"train_micro_batch_size_per_gpu": _harness.PER_RANK_BATCH, "zero_optimization": {"stage": stage}}


def _logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits.detach().clone()


def _train_and_export(name: str, path: str):
    import safetensors.torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    torch._dynamo.reset()
    model = zerograph.compile(_models.MODELS[name](), _config(3))
    opt = _harness._optimizer(model.parameters())
    for step in range(STEPS):
        idx, targets = _models.global_batch(step, _harness.PER_RANK_BATCH * world)
        _models.loss_of(name, model, idx.chunk(world)[rank], targets.chunk(world)[rank]).backward()
        opt.step()
        opt.zero_grad()
    zerograph.export_pretrained(model, path)
    trained = _logits(model)
    full = {k: v.clone() for k, v in zerograph.full_state_dict(model).items()}

    # Back in: a differently initialized sharded model takes the exported weights.
    torch.manual_seed(rank + 7)
    fresh = _models.MODELS[name]()
    torch.nn.init.normal_(next(fresh.parameters()))  # make sure it starts different
    fresh = zerograph.compile(fresh, _config(3))
    zerograph.load_full_state_dict(fresh, safetensors.torch.load_file(f"{path}/model.safetensors"))
    reloaded = {k: v.clone() for k, v in zerograph.full_state_dict(fresh).items()}
    return {"logits": trained, "full": full, "reloaded": reloaded, "reloaded_logits": _logits(fresh)}


@pytest.mark.parametrize("name, cls", [("hf_gpt2", "GPT2LMHeadModel"),
                                       pytest.param("llama", "LlamaForCausalLM", marks=pytest.mark.slow)])
def test_export_round_trips_through_from_pretrained(tmp_path, name, cls):
    import transformers

    path = str(tmp_path / "hf")
    results = _pool.run(_train_and_export, 2, name, path, timeout=TIMEOUT)
    ref = _models.MODELS[name]()
    hf = getattr(transformers, cls).from_pretrained(path)
    assert type(hf).__name__ == cls and hf.config.vocab_size == _models.VOCAB
    # Training moved the weights, and from_pretrained has exactly the trained ones.
    loaded = hf.state_dict()
    for key, value in results[0]["full"].items():
        assert torch.equal(loaded[key], value), key
    assert not torch.equal(loaded[next(iter(results[0]["full"]))], ref.state_dict()[next(iter(results[0]["full"]))])
    hf.eval()
    with torch.no_grad():
        logits = hf(input_ids=PROBE).logits
    for r in results:
        torch.testing.assert_close(logits, r["logits"], rtol=1e-5, atol=1e-6)
        # load_full_state_dict gave every rank its shard of exactly those weights.
        for key, value in r["full"].items():
            assert torch.equal(r["reloaded"][key], value), key
        torch.testing.assert_close(r["reloaded_logits"], r["logits"], rtol=1e-5, atol=1e-6)


def test_load_full_state_dict_errors_name_the_key():
    model = zerograph.shard(_models.make_gpt(), {})
    full = zerograph.full_state_dict(model)
    bad = dict(full)
    bad["nonsense.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="nonsense.weight"):
        zerograph.load_full_state_dict(model, bad)
    key = next(k for k in full if ".ln_" in k)  # not tied to another key
    missing = {k: v for k, v in full.items() if k != key}
    with pytest.raises(KeyError, match="missing keys: " + key.replace(".", r"\.")):
        zerograph.load_full_state_dict(model, missing)
    wrong = dict(full)
    wrong[key] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=f"{key} has shape"):
        zerograph.load_full_state_dict(model, wrong)
    zerograph.load_full_state_dict(model, missing, strict=False)  # keeps the missing one


def test_export_of_a_non_hf_model_needs_a_config(tmp_path):
    model = zerograph.shard(_models.make_gpt(), {})
    with pytest.raises(TypeError, match="not a Hugging Face model"):
        zerograph.export_pretrained(model, tmp_path / "x")


def test_save_pretrained_of_a_sharded_model_names_export_pretrained(tmp_path, fake_world):
    """Hugging Face's own save_pretrained would write this rank's shards (and
    fails deep inside with a DTensor error): it says to use export_pretrained.
    With a full state dict it saves as usual."""
    model = zerograph.shard(_models.make_hf_gpt2(), _config(3))
    with pytest.raises(TypeError, match=r"zerograph\.export_pretrained\(model, path\) on every rank"):
        model.save_pretrained(tmp_path / "shards")
    assert not (tmp_path / "shards" / "model.safetensors").exists()
    full = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "full", state_dict=full)
    assert (tmp_path / "full" / "model.safetensors").exists()

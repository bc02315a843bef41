"""zerograph.integrations.hf.ZeroGraphTrainer: on 2 gloo ranks it trains like
the plain transformers Trainer on one process with the same global batch
(gradient accumulation with a short last window per epoch, clipping, weight
decay groups, the linear schedule), resumes from its checkpoint exactly, and
saves a model from_pretrained loads; its "auto" values come from the
TrainingArguments."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests import _models
from zerograph.config import Config, ConfigError
from zerograph.runtime.launch import spawn

TIMEOUT = 480
PER_RANK = 2
GAS = 4
SAMPLES = 40  # 10 global batches of 4 per epoch: accumulation windows of 4, 4 and 2


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = SAMPLES):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, _models.VOCAB, (n, _models.SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: str, per_device: int, save: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device, gradient_accumulation_steps=GAS, num_train_epochs=2,
        learning_rate=1e-2, weight_decay=0.01, max_grad_norm=0.5, adam_epsilon=1e-4, warmup_steps=2,
        lr_scheduler_type="linear", optim="adamw_torch", logging_steps=1, save_strategy="steps" if save else "no",
        save_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)


def make_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    return GPT2LMHeadModel(GPT2Config(vocab_size=_models.VOCAB, n_positions=_models.SEQ, n_embd=16, n_layer=1,
                                      n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def plain_trainer(out: str):
    from transformers import Trainer

    trainer = Trainer(model=make_model(), args=_args(out, PER_RANK * 2, save=False),
                      train_dataset=TokenData())
    trainer.train()
    return {"losses": _losses(trainer), "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}}


ZG_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
             "train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}


def zerograph_trainer(root: str):
    import zerograph
    from zerograph.integrations.hf import ZeroGraphTrainer

    torch._dynamo.reset()
    trainer = ZeroGraphTrainer(model=make_model(), args=_args(f"{root}/a", PER_RANK, save=True),
                               train_dataset=TokenData(), zerograph_config=ZG_CONFIG)
    cfg = trainer.zerograph_config
    assert (cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps, cfg.train_batch_size,
            cfg.gradient_clipping) == (PER_RANK, GAS, PER_RANK * GAS * 2, 0.5)
    trainer.train()
    trainer.save_model(f"{root}/final")
    straight = {"losses": _losses(trainer), "steps": trainer.zerograph_engine.global_steps,
                "params": {k: v.clone() for k, v in zerograph.full_state_dict(trainer.model).items()}}
    del trainer
    torch._dynamo.reset()
    resumed = ZeroGraphTrainer(model=make_model(), args=_args(f"{root}/b", PER_RANK, save=False),
                               train_dataset=TokenData(), zerograph_config=ZG_CONFIG)
    resumed.train(resume_from_checkpoint=f"{root}/a/checkpoint-2")
    return {"straight": straight, "resumed_losses": _losses(resumed),
            "resumed_params": {k: v.clone() for k, v in zerograph.full_state_dict(resumed.model).items()}}


@pytest.mark.timeout(2 * TIMEOUT + 60)
def test_zerograph_trainer_matches_the_plain_trainer_and_resumes_exactly(tmp_path):
    from transformers import GPT2LMHeadModel

    ref = spawn(plain_trainer, 1, str(tmp_path / "plain"), timeout=TIMEOUT)[0]
    results = spawn(zerograph_trainer, 2, str(tmp_path), timeout=TIMEOUT)
    assert len(ref["losses"]) == 6 and ref["losses"][-1] < ref["losses"][0]
    for r in results:
        straight = r["straight"]
        assert straight["steps"] == 6
        torch.testing.assert_close(torch.tensor(straight["losses"]), torch.tensor(ref["losses"]), rtol=1e-5, atol=1e-6)
        assert straight["params"].keys() <= ref["params"].keys()
        for key, value in straight["params"].items():
            torch.testing.assert_close(value, ref["params"][key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        # resumed from checkpoint-2 (its log history holds steps 1 and 2): steps 3..6 bit for bit
        assert r["resumed_losses"] == straight["losses"]
        for key, value in straight["params"].items():
            assert torch.equal(r["resumed_params"][key], value), key
    saved = GPT2LMHeadModel.from_pretrained(tmp_path / "final").state_dict()
    for key, value in results[0]["straight"]["params"].items():
        assert torch.equal(saved[key], value), key
    assert (tmp_path / "a" / "checkpoint-2" / "latest").read_text() == "global_step2"


def test_auto_values_come_from_the_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from zerograph.integrations.hf import resolve_for_trainer

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                             learning_rate=2e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7,
                             weight_decay=0.1, max_grad_norm=0.7, warmup_steps=0.1, report_to=[], use_cpu=True)
    cfg = Config.load({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                   "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                          "warmup_num_steps": "auto", "total_num_steps": "auto"}}})
    at_init = resolve_for_trainer(cfg, args)
    assert (at_init.train_micro_batch_size_per_gpu, at_init.gradient_accumulation_steps, at_init.train_batch_size,
            at_init.gradient_clipping, at_init.bf16.enabled) == (3, 2, 6, 0.7, False)
    params = at_init.optimizer.params
    assert (params.lr, params.betas, params.eps, params.weight_decay) == (2e-4, (0.8, 0.95), 1e-7, 0.1)
    assert at_init.scheduler.params.warmup_max_lr == 2e-4
    assert set(at_init.auto_keys) == {"scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps"}
    at_train = resolve_for_trainer(at_init, args, num_training_steps=50)
    assert (at_train.scheduler.params.total_num_steps, at_train.scheduler.params.warmup_num_steps) == (50, 5)
    assert at_train.auto_keys == ()
    # a key the config sets (not "auto") must agree with the Trainer's; a key it leaves out keeps its default
    with pytest.raises(ConfigError, match="gradient_clipping is 1.0 in the config"):
        resolve_for_trainer(Config.load({"gradient_clipping": 1.0}), args)
    assert resolve_for_trainer(Config.load({}), args).gradient_clipping == 0.0


def test_importing_zerograph_does_not_import_transformers():
    code = "import sys, zerograph, zerograph.integrations; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"

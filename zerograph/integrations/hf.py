"""The Hugging Face Trainer on zerograph: :class:`ZeroGraphTrainer`.

    from zerograph.integrations.hf import ZeroGraphTrainer
    trainer = ZeroGraphTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                               zerograph_config="ds_config.json")
    trainer.train()
    trainer.save_model("out")      # on every rank; from_pretrained("out") loads it

A ``transformers.Trainer`` whose model is compiled and sharded by
``zerograph.compile``, trained through the engine of
:func:`zerograph.initialize` (as Hugging Face's DeepSpeed integration trains
through DeepSpeed's engine), with zerograph's optimizer and scheduler: the
config's ``optimizer``/``scheduler`` sections, else the Trainer's own
(``TrainingArguments.optim``, ``lr_scheduler_type``, weight decay groups)
built over the shards. The config's ``"auto"`` values are filled from the
``TrainingArguments`` as Hugging Face fills DeepSpeed's (:func:`trainer_values`).
Checkpoints are zerograph's (``checkpoint-N/global_stepN``, resumable at any
world size), and models are saved with ``save_pretrained``-compatible files
(``zerograph.export_pretrained``). Needs ``transformers`` and ``accelerate``
(``pip install zerograph[hf]``); it does not use Accelerate's DeepSpeed plugin.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

import torch
from transformers import Trainer, TrainingArguments

from zerograph.api import compile as _compile
from zerograph.checkpoint import export_pretrained
from zerograph.config import Config, ConfigError
from zerograph.integrations.engine import LATEST, ZeroGraphEngine, torch_optimizer
from zerograph.runtime.ds_optim import build_optimizer, build_scheduler
from zerograph.runtime.optimizer import make_optimizer

log = logging.getLogger(__name__)

__all__ = ["ZeroGraphTrainer", "trainer_values", "DEFAULT_CONFIG"]

# the config without zerograph_config: ZeRO off (stage 0), everything else from the TrainingArguments
DEFAULT_CONFIG = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                  "train_batch_size": "auto", "gradient_clipping": "auto",
                  "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}


def trainer_values(args: TrainingArguments, num_training_steps: Optional[int] = None) -> dict[str, Any]:
    """The config values the Trainer's arguments give, by dotted key (Hugging
    Face's DeepSpeed integration's mapping); with ``num_training_steps``, the
    scheduler's step counts too."""
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "gradient_clipping": args.max_grad_norm,
        "fp16.enabled": bool(args.fp16),
        "bf16.enabled": bool(args.bf16),
        "optimizer.params.lr": args.learning_rate,
        "optimizer.params.betas": [args.adam_beta1, args.adam_beta2],
        "optimizer.params.eps": args.adam_epsilon,
        "optimizer.params.weight_decay": args.weight_decay,
        "scheduler.params.warmup_min_lr": 0.0,
        "scheduler.params.warmup_max_lr": args.learning_rate,
    }
    if num_training_steps is not None:
        values["scheduler.params.total_num_steps"] = num_training_steps
        values["scheduler.params.warmup_num_steps"] = args.get_warmup_steps(num_training_steps)
    return values


def _given(cfg: Config, key: str) -> bool:
    """Whether the config sets ``key`` (to a value or to ``"auto"``); keys it
    leaves out keep zerograph's defaults, as DeepSpeed's do under the Trainer."""
    if key in cfg.auto_keys:
        return True
    node: Any = cfg
    for part in key.split("."):
        if node is None or part not in getattr(node, "model_fields_set", ()):
            return False
        node = getattr(node, part)
    return True


def resolve_for_trainer(cfg: Config, args: TrainingArguments, num_training_steps: Optional[int] = None) -> Config:
    """``cfg`` with its ``"auto"`` keys filled from ``args``; a key the config
    sets to another value than the Trainer's is an error (all reported together)."""
    values = {k: v for k, v in trainer_values(args, num_training_steps).items() if _given(cfg, k)}
    if num_training_steps is None:
        values = {k: v for k, v in values.items() if k in cfg.auto_keys or not k.startswith("scheduler.")}
    return cfg.resolve_auto(values)


class _EngineSteps:
    """What the Trainer holds as its optimizer: zerograph's, stepped by the
    engine at each accumulation boundary, so the Trainer's own ``step()`` is
    a no-op (as with DeepSpeed). Checkpoints go through the engine."""

    def __init__(self, optimizer: Any):
        self.optimizer = optimizer

    def step(self, closure=None) -> None:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return getattr(self.optimizer, "defaults", {})

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class _EngineSchedule:
    """What the Trainer holds as its LR scheduler: the engine steps the real
    one (skipped with a skipped optimizer step); ``step()`` is a no-op."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def step(self, *args, **kwargs) -> None:
        return None

    def get_last_lr(self):
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


class ZeroGraphTrainer(Trainer):
    """A ``transformers.Trainer`` training with zerograph (module docstring).

    ``zerograph_config``: a DeepSpeed/zerograph config (path, dict or Config;
    default :data:`DEFAULT_CONFIG`). Launch with ``torchrun`` (gloo on CPU,
    NCCL on GPUs). ``trainer.zerograph_engine`` is the engine,
    ``trainer.model`` the compiled model."""

    def __init__(self, model=None, args: Optional[TrainingArguments] = None, *trainer_args,
                 zerograph_config: Any = None, **trainer_kwargs):
        optimizers = trainer_kwargs.get("optimizers", (None, None))
        if optimizers is not None and any(o is not None for o in optimizers):
            raise ValueError("ZeroGraphTrainer builds the optimizer over the model's shards: instead of optimizers=, "
                             "give the config an 'optimizer'/'scheduler' section, or pass "
                             "optimizer_cls_and_kwargs=(cls, kwargs)")
        if trainer_kwargs.get("model_init") is not None:
            raise ValueError("ZeroGraphTrainer does not support model_init yet; pass model=")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        if self.args.load_best_model_at_end:
            raise ValueError("ZeroGraphTrainer does not support load_best_model_at_end yet")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or getattr(self.args, "deepspeed", None):
            raise ValueError("ZeroGraphTrainer shards the model itself: remove TrainingArguments' deepspeed/fsdp")
        # batches stay where the data loader made them; _prepare_inputs moves them (and the optimizer
        # states stay where zerograph keeps them, on the host with offload)
        self.accelerator.device_placement = False
        source = DEFAULT_CONFIG if zerograph_config is None else zerograph_config
        self.zerograph_config = resolve_for_trainer(Config.load(source), self.args)
        if self.zerograph_config.pipeline.stages > 1:
            raise ConfigError("ZeroGraphTrainer does not support pipeline.stages > 1; train pipelines with "
                              "zerograph.initialize and engine.train_batch")
        self.model = _compile(self.model, self.zerograph_config)
        self.model_wrapped = self.model
        self.zerograph_engine = ZeroGraphEngine(self.model, self.zerograph_config)
        self._zg_last_lr: Optional[float] = None

    # -- optimizer and scheduler ------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        cfg, model = self.zerograph_config, self.model
        if cfg.optimizer is not None:
            optimizer = build_optimizer(model, cfg)
        else:
            if self.optimizer_cls_and_kwargs is not None:
                cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
            kwargs = dict(kwargs)
            if {"params", "model", "optimizer_dict"} & set(kwargs):
                raise ValueError(f"ZeroGraphTrainer: optim={self.args.optim!r} builds its own parameter groups, which "
                                 "zerograph does not support yet; use a torch optimizer (e.g. adamw_torch)")
            decay = set(self.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            optimizer = make_optimizer(model, cls, params=groups, **kwargs)
        self.zerograph_engine.optimizer = optimizer
        self.optimizer = _EngineSteps(optimizer)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        from transformers.optimization import get_scheduler

        engine = self.zerograph_engine
        self.zerograph_config = resolve_for_trainer(self.zerograph_config, self.args, num_training_steps)
        engine.config = self.zerograph_config
        if self.zerograph_config.scheduler is not None:
            scheduler = build_scheduler(engine.optimizer, self.zerograph_config)
        else:
            scheduler = get_scheduler(self.args.lr_scheduler_type, optimizer=torch_optimizer(engine.optimizer),
                                      num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                                      num_training_steps=num_training_steps,
                                      scheduler_specific_kwargs=self.args.lr_scheduler_kwargs)
        engine.lr_scheduler = scheduler
        self.lr_scheduler = _EngineSchedule(scheduler)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        return self.zerograph_engine

    def _get_learning_rate(self) -> float:
        if self._zg_last_lr is not None:
            return self._zg_last_lr  # the rate the last optimizer step used
        return self.zerograph_engine.get_lr()[0]

    # -- precision: zerograph's (the config's fp16/bf16), not autocast ----------------------
    def autocast_smart_context_manager(self, cache_enabled: Optional[bool] = True):
        return contextlib.nullcontext()

    def compute_loss_context_manager(self):
        return contextlib.ExitStack()

    # -- training ------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        engine = self.zerograph_engine
        gas = engine.gradient_accumulation_steps()
        window = getattr(self, "current_gradient_accumulation_steps", gas)
        if engine.micro_steps % gas == 0 and window < gas:
            engine._skip_micro_batches(gas - window)  # a short last window of the epoch ends its step early
        engine.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(engine, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        if not scaled:
            loss = loss / window
        # as Hugging Face's DeepSpeed integration: the loss is already divided for the accumulation
        engine.backward(loss, scale_wrt_gas=False)
        if engine.is_gradient_accumulation_boundary():
            self._zg_last_lr = engine.get_lr()[0]
        engine.step()
        return loss.detach()

    def _clip_grad_norm(self, model):
        return self.zerograph_engine.get_global_grad_norm()  # zerograph clipped at the end of the backward

    def _get_grad_norm(self, model, grad_norm=None):
        return grad_norm

    # -- checkpoints and saving --------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)
        self.zerograph_engine.save_checkpoint(output_dir)

    def _save_scaler(self, output_dir: str) -> None:
        return None  # fp16 loss scaling is zerograph's, saved with its checkpoint

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, LATEST)):
            raise ValueError(f"{resume_from_checkpoint} is not a ZeroGraphTrainer checkpoint (it has no '{LATEST}' "
                             "file naming zerograph's checkpoint); resume from a checkpoint-N directory it wrote")
        # the model is loaded with the optimizer and scheduler, once they exist (_load_optimizer_and_scheduler)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        if checkpoint is None:
            return
        path, _ = self.zerograph_engine.load_checkpoint(checkpoint)
        if path is None:
            raise ValueError(f"{checkpoint} has no zerograph checkpoint ('{LATEST}' file missing)")

    def _load_scaler(self, checkpoint: Optional[str]) -> None:
        return None

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Save the model with ``save_pretrained``-compatible files
        (``zerograph.export_pretrained``: the full weights, gathered, written
        by rank 0), the processing class and the training arguments.
        Collective: call it on every rank."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        export_pretrained(self.model, output_dir)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)


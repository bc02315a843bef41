"""``zerograph.initialize``: DeepSpeed's ``deepspeed.initialize`` (same
arguments, same return value), plus ``add_config_arguments`` and
``init_distributed``, so that a DeepSpeed training script runs with
``import zerograph as deepspeed`` or with ``zerograph.initialize`` in place
of ``deepspeed.initialize`` (docs/from_deepspeed.md)."""

from __future__ import annotations

import argparse
import datetime
import inspect
import logging
import os
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from zerograph.api import compile as _compile
from zerograph.config import Config, ConfigError
from zerograph.integrations.engine import ZeroGraphEngine, torch_optimizer
from zerograph.runtime.ds_optim import build_optimizer, build_scheduler
from zerograph.runtime.optimizer import _param_groups, make_optimizer

log = logging.getLogger(__name__)

__all__ = ["initialize", "add_config_arguments", "init_distributed"]

DEFAULT_PORT = 29500  # DeepSpeed's TORCH_DISTRIBUTED_DEFAULT_PORT


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """DeepSpeed's command-line options: ``--deepspeed``, ``--deepspeed_config``
    (and the old ``--deepscale``, ``--deepscale_config``)."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations (read by zerograph.initialize)")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="accepted for DeepSpeed scripts; zerograph is always on")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed json configuration file")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser


def init_distributed(dist_backend: Optional[str] = None, auto_mpi_discovery: bool = True,
                     distributed_port: int = DEFAULT_PORT, verbose: bool = True, timeout=None,
                     init_method: Optional[str] = None, dist_init_required: Optional[bool] = None,
                     config=None, rank: int = -1, world_size: int = -1) -> None:
    """Initialize the default process group from the launcher's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``; torchrun sets
    them) unless it is initialized already; NCCL on CUDA, gloo otherwise.
    Without a launcher (no ``WORLD_SIZE``, no ``rank``/``world_size``) it does
    nothing and zerograph runs as one process."""
    if dist_init_required is False or dist.is_initialized():
        return
    if world_size < 0 and "WORLD_SIZE" not in os.environ:
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(distributed_port))
    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout) if timeout is not None else 1800.0)
    kwargs: dict[str, Any] = {"timeout": timeout, "init_method": init_method}
    if rank >= 0 and world_size > 0:
        kwargs.update(rank=rank, world_size=world_size)
    if verbose:
        log.info("zerograph: initializing the process group (%s)", backend)
    dist.init_process_group(backend, **kwargs)


def _config_source(args, config, config_params):
    if config is not None and config_params is not None:
        raise ConfigError("zerograph.initialize: pass the config as config= or config_params=, not both")
    config = config if config is not None else config_params
    from_args = None
    if args is not None:
        from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None and config is not None:
        raise ConfigError(f"zerograph.initialize: got a config both from args.deepspeed_config ({from_args!r}) and "
                          "from config=; pass only one")
    return config if config is not None else from_args


def _names_of(params, names: dict[int, str], what: str) -> list[dict[str, Any]]:
    """Parameters or parameter groups as groups of parameter names."""
    out = []
    for group in _param_groups(params):
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError(f"zerograph.initialize: {what} holds {len(missing)} tensor(s) that are not parameters "
                             f"of the model (shape {tuple(missing[0].shape)})")
        out.append({**group, "params": [names[id(p)] for p in group["params"]]})
    return out


def _on_shards(groups: Optional[list[dict[str, Any]]], module: nn.Module) -> Optional[list[dict[str, Any]]]:
    """Named groups with the prepared model's (sharded) parameters."""
    if groups is None:
        return None
    by_name = dict(module.named_parameters())
    return [{**g, "params": [by_name[n] for n in g["params"]]} for g in groups]


def _constructor_kwargs(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's ``defaults`` that its constructor takes (torch keeps some it does not)."""
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in parameters}


def _build_optimizer(module, cfg: Config, optimizer, groups):
    """The optimizer over the prepared model's shards: from the client's
    optimizer (rebuilt over the shards), callable or class, or the config's
    ``optimizer`` section; None without any."""
    params = _on_shards(groups, module)
    if optimizer is None:
        return build_optimizer(module, cfg, params=params) if cfg.optimizer is not None else None
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return make_optimizer(module, optimizer, params=params)
    if callable(optimizer) and not hasattr(optimizer, "param_groups"):
        return optimizer(params if params is not None else [p for p in module.parameters() if p.requires_grad])
    cls = type(optimizer)
    kwargs = _constructor_kwargs(cls, getattr(optimizer, "defaults", {}))
    try:
        return make_optimizer(module, cls, params=params, **kwargs)
    except TypeError as exc:
        raise TypeError(f"zerograph.initialize: cannot rebuild the given {cls.__name__} over the model's shards "
                        f"({exc}); pass a callable instead: optimizer=lambda params: {cls.__name__}(params, ...)") from exc


def _client_groups(optimizer, model_parameters, names: dict[int, str]):
    """The named parameter groups the optimizer is built over (None: every parameter)."""
    if optimizer is not None and hasattr(optimizer, "param_groups"):
        if getattr(optimizer, "state", None):
            raise ValueError("zerograph.initialize: the optimizer given has already stepped; zerograph rebuilds it "
                             "over the model's shards, so create it before training (or pass a callable)")
        return _names_of(optimizer.param_groups, names, "the optimizer")
    if model_parameters is not None:
        return _names_of(model_parameters, names, "model_parameters")
    return None


def _one_pipeline_group(groups, named: dict[str, nn.Parameter]) -> dict[str, Any]:
    """A pipeline rank steps its stage's parameters in one group: the options of the one group given."""
    trainable = {n for n, p in named.items() if p.requires_grad}
    given = {n for g in groups for n in g["params"]}
    if len(groups) > 1 or given != trainable:
        raise ValueError("zerograph.initialize: with pipeline.stages > 1 the optimizer steps every trainable "
                         f"parameter of this rank's stage in one group; got {len(groups)} group(s) over {len(given)} "
                         f"of the {len(trainable)} trainable parameters")
    return {k: v for k, v in groups[0].items() if k != "params"}


def _build_scheduler(lr_scheduler, optimizer, old_optimizer, cfg: Config):
    """The LR scheduler: the client's (a callable of the optimizer, or an
    instance moved onto the rebuilt optimizer) or the config's ``scheduler``
    section. Returns ``(scheduler, rebound)``."""
    if lr_scheduler is None:
        if cfg.scheduler is None:
            return None, False
        if optimizer is None:
            raise ConfigError("the config's 'scheduler' section needs an optimizer: add an 'optimizer' section or "
                              "pass optimizer=")
        return build_scheduler(optimizer, cfg), False
    inner = torch_optimizer(optimizer)
    if hasattr(lr_scheduler, "optimizer") and hasattr(lr_scheduler, "step"):
        if lr_scheduler.optimizer is not old_optimizer and lr_scheduler.optimizer is not inner:
            raise ValueError("zerograph.initialize: the lr_scheduler given steps another optimizer than the one "
                             "given; build it on that optimizer, or pass a callable: lr_scheduler=lambda opt: ...")
        lr_scheduler.optimizer = inner
        return lr_scheduler, True
    if callable(lr_scheduler):
        return lr_scheduler(inner), False
    raise TypeError(f"lr_scheduler must be a torch LR scheduler or a callable of the optimizer, "
                    f"not {type(lr_scheduler).__name__}")


def _example_batch(training_data, cfg: Config, collate_fn: Optional[Callable]):
    """A batch of ``micro_batches`` micro-batches from the first samples of ``training_data`` (pipelines trace one)."""
    from torch.utils.data import default_collate

    micro = cfg.train_micro_batch_size_per_gpu
    if micro is None:
        raise ConfigError("pipeline.stages > 1 with training_data: set train_micro_batch_size_per_gpu, or pass "
                          "example_batch=")
    samples = [training_data[i] for i in range(micro * cfg.micro_batches)]
    return (collate_fn or default_collate)(samples)


def initialize(args=None, model: Optional[nn.Module] = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, distributed_port: int = DEFAULT_PORT, mpu=None,
               dist_init_required: Optional[bool] = None, collate_fn=None, config=None, mesh_param=None,
               config_params=None, *, loss_fn=None, example_batch=None, passes=None):
    """DeepSpeed's ``deepspeed.initialize``: compile ``model`` with zerograph
    and return ``(engine, optimizer, training_dataloader, lr_scheduler)``.

    The config comes from ``config`` (a path, dict or Config), the deprecated
    ``config_params``, or ``args.deepspeed_config``. The optimizer is the
    config's ``optimizer`` section, or ``optimizer``: a torch optimizer built
    over ``model.parameters()`` before this call (zerograph replaces the
    parameters by shards, so it is rebuilt over them with the same class,
    groups and settings; it must not have stepped), an optimizer class, or a
    callable of the parameters. ``model_parameters`` (parameters or groups,
    e.g. without weight decay for biases) picks what the config's optimizer
    steps. The scheduler is the config's ``scheduler`` section or
    ``lr_scheduler`` (a scheduler over the given optimizer, or a callable of
    the optimizer). ``training_data`` becomes a DataLoader over this rank's
    share (batches of ``train_micro_batch_size_per_gpu``).

    zerograph's own keywords: ``loss_fn`` and ``passes`` (as for
    ``zerograph.compile``), and ``example_batch`` for a pipeline (default:
    the first samples of ``training_data``). Collective: call on every rank."""
    if model is None:
        raise ValueError("zerograph.initialize: model is required")
    if mpu is not None or mesh_param is not None:
        raise ConfigError("zerograph.initialize: mpu/mesh_param (Megatron-style model parallelism) is not supported; "
                          "zerograph parallelizes with ZeRO data parallelism and the config's 'pipeline' section")
    cfg = Config.load(_config_source(args, config, config_params))
    conflicts = [f"got {given} and {section!r} section in the config; pass one of them"
                 for given, value, section in (("an optimizer", optimizer, "optimizer"),
                                               ("an lr_scheduler", lr_scheduler, "scheduler"))
                 if value is not None and getattr(cfg, section) is not None]
    if conflicts:
        raise ConfigError([f"zerograph.initialize: {c}" for c in conflicts])
    init_distributed(distributed_port=distributed_port, dist_init_required=dist_init_required,
                     timeout=cfg.zerograph.collective_timeout_s)
    world = dist.get_world_size() if dist.is_initialized() else 1
    stages = cfg.pipeline.stages
    if world % stages:
        raise ConfigError(f"pipeline.stages={stages} does not divide the world size {world}")
    sp = cfg.sequence_parallel_size  # the ranks of a sequence-parallel group read the same rows
    cfg = cfg.with_resolved_batch(max(1, world // (stages * sp)))
    pipeline = stages > 1
    named = dict(model.named_parameters())
    groups = _client_groups(optimizer, model_parameters, {id(p): n for n, p in named.items()})
    pipeline_options = None
    if pipeline and groups is not None:
        pipeline_options, groups = _one_pipeline_group(groups, named), None
    if pipeline and example_batch is None and training_data is not None:
        example_batch = _example_batch(training_data, cfg, collate_fn)
    module = _compile(model, cfg, passes=passes, loss_fn=loss_fn, example_batch=example_batch)
    built = _build_optimizer(module, cfg, optimizer, groups)
    if pipeline_options and built is not None:
        for group in built.param_groups:
            group.update(pipeline_options)
    scheduler, rebound = _build_scheduler(lr_scheduler, built, optimizer, cfg)
    engine = ZeroGraphEngine(module, cfg, built, scheduler)
    engine._rebound_scheduler = rebound
    loader = None
    if training_data is not None:
        loader = engine.deepspeed_io(training_data, collate_fn=collate_fn)
        engine.training_dataloader = loader
    log.info("zerograph.initialize: ZeRO stage %d, %d rank(s), optimizer %s, scheduler %s", cfg.stage, world,
             type(built).__name__ if built is not None else None,
             type(scheduler).__name__ if scheduler is not None else None)
    return engine, built, loader, scheduler

"""The Dynamo backend layer: the compile pipeline of named steps
(:mod:`.orchestrate`) and the entry point of
``torch.compile(model, backend="zerograph")`` (registered as a
``torch_dynamo_backends`` entry point)."""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from zerograph.backend.orchestrate import ZerographBackend
from zerograph.config import Config, ConfigError
from zerograph.graph.markers import REDUCE_GRAD, UNSHARD
from zerograph.runtime import registry

log = logging.getLogger(__name__)

__all__ = ["ZerographBackend", "zerograph_backend"]


_MARKERS = (UNSHARD, REDUCE_GRAD, torch.ops.zerograph.unshard, torch.ops.zerograph.reduce_grad)


def _state_of(gm: fx.GraphModule):
    """The model state named by the first marker op in a Dynamo graph
    (Dynamo records the op packet, AOTAutograd the overload)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _MARKERS:
            return registry.lookup(node.args[1])
    return None


def zerograph_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None):
    """Entry point of ``torch.compile(..., backend="zerograph")``.

    ``options={"config": <path | dict>}`` sets the config for a model that
    :func:`zerograph.compile` did not prepare.
    """
    state = _state_of(gm)
    if state is not None:
        backend = state.backend or ZerographBackend(state)
    else:
        config = Config.load((options or {}).get("config"))
        _check_unsharded_config(config)
        log.info("zerograph backend: model has no sharded parameters; running passes without ZeRO")
        backend = ZerographBackend(None, config)
    return backend(gm, example_inputs)


# what the backend alone (a model zerograph.shard did not prepare) carries out:
# its passes and activation checkpointing; batch sizes and logging keys are inert
_BACKEND_ONLY = ("zerograph", "activation_checkpointing", "train_batch_size", "train_micro_batch_size_per_gpu",
                 "steps_per_print", "wall_clock_breakdown")


def _check_unsharded_config(config: Config) -> None:
    """Refuse a config that needs zerograph's runtime (ZeRO sharding, mixed
    precision, clipping, accumulation, pipelines) on a model that
    ``zerograph.shard`` did not prepare: without it each rank would train on
    its own, silently."""
    changed = config.changed_settings(skip=_BACKEND_ONLY)
    if changed:
        raise ConfigError(
            f"torch.compile(model, backend=\"zerograph\", options={{\"config\": ...}}) got {', '.join(changed)}, "
            "which need the model's parameters sharded by zerograph first; the backend alone only runs the passes. "
            "Use torch.compile(zerograph.shard(model, config), backend=\"zerograph\") or zerograph.compile(model, config)"
        )

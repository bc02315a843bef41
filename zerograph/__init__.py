"""zerograph: DeepSpeed ZeRO as PyTorch compiler passes.

    model = zerograph.compile(model, "ds_config.json")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)   # this rank's shards
    loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
"""

from zerograph.api import (
    Inspection,
    batch_rows,
    compile,
    feed_sequence_slices,
    full_state_dict,
    inspect,
    sequence_shard,
    sequence_slice,
    shard,
)
from zerograph.checkpoint import export_pretrained, load_checkpoint, load_full_state_dict, save_checkpoint
from zerograph.explain import Explanation, explain
from zerograph.config import Config, ConfigError
from zerograph.runtime.errors import CheckpointError, RankFailureError, RankMismatchError, TraceError
from zerograph.runtime.memory import MemoryBudgetError
from zerograph.runtime.optimizer import make_optimizer
from zerograph.runtime.ds_optim import build_optimizer, build_scheduler
from zerograph.integrations import ZeroGraphEngine, add_config_arguments, init_distributed, initialize
from zerograph.passes import GraphPass, PassContext, PassList, PassResult, default_passes
from zerograph import pipeline  # noqa: F401  (zerograph.pipeline.PipelineModeError, schedules)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "GraphPass",
    "Inspection",
    "MemoryBudgetError",
    "PassContext",
    "PassList",
    "PassResult",
    "RankFailureError",
    "RankMismatchError",
    "TraceError",
    "ZeroGraphEngine",
    "add_config_arguments",
    "build_optimizer",
    "build_scheduler",
    "batch_rows",
    "sequence_slice",
    "sequence_shard",
    "feed_sequence_slices",
    "compile",
    "default_passes",
    "export_pretrained",
    "explain",
    "Explanation",
    "full_state_dict",
    "init_distributed",
    "initialize",
    "inspect",
    "load_checkpoint",
    "load_full_state_dict",
    "make_optimizer",
    "save_checkpoint",
    "shard",
]

"""Pipeline parallelism: split the traced model into stages, schedule
micro-batches (1F1B, GPipe, interleaved 1F1B) as data, dry-run the schedule, and run it with
point-to-point ops, each stage ZeRO-sharded over its data-parallel group.

See docs/pipeline.md.
"""

from zerograph.pipeline.runtime import PipelineModeError, PipelineModel
from zerograph.pipeline.schedule import (
    Action,
    Schedule,
    build,
    forward_only,
    gpipe,
    interleaved_one_f_one_b,
    one_f_one_b,
)
from zerograph.pipeline.simulate import ScheduleError, Timeline, format_grid, simulate
from zerograph.pipeline.split import PipelineSplit, SplitError, split_graph

__all__ = [
    "Action",
    "PipelineModeError",
    "PipelineModel",
    "PipelineSplit",
    "Schedule",
    "ScheduleError",
    "SplitError",
    "Timeline",
    "build",
    "format_grid",
    "forward_only",
    "gpipe",
    "interleaved_one_f_one_b",
    "one_f_one_b",
    "simulate",
    "split_graph",
]

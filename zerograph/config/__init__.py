"""zerograph's configuration: the DeepSpeed ds_config.json keys that carry over.

A config is loaded with :meth:`Config.load` from a JSON file path, a dict, an
existing :class:`Config`, or ``None`` (all defaults). Every section rejects
unknown keys, and every problem is reported as a :class:`ConfigError` with one
line per problem that names the dotted key. (Constructing the models directly,
e.g. ``Config(**kwargs)``, validates the same way but raises pydantic's
``ValidationError``.)

Some keys are accepted only so that existing DeepSpeed configs load; they have
no effect yet. :meth:`Config.inactive_settings` lists the ones a config changes.

Modules: ``values`` (ConfigError, strict value types, the field metadata that
says how a DeepSpeed key is treated), the sections (``precision``, ``zero``,
``sections``, ``optim``, ``ds_sections``), ``toplevel`` (every key), ``schema``
(:class:`Config`), ``normalize`` (aliases, ``"auto"``, comments), ``messages``
(error wording), ``reference`` (the generated docs/config.md reference and
docs/from_deepspeed.md table).
"""

from zerograph.config.optim import OptimizerConfig, OptimizerParams, SchedulerConfig, SchedulerParams
from zerograph.config.precision import BF16Config, DataTypesConfig, FP16Config
from zerograph.config.reference import deepspeed_markdown, reference_markdown
from zerograph.config.schema import Config
from zerograph.config.sections import ActivationCheckpointingConfig, PipelineConfig, ZerographOptions
from zerograph.config.values import ConfigError
from zerograph.config.zero import OffloadConfig, OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig

__all__ = [
    "ConfigError",
    "Config",
    "FP16Config",
    "BF16Config",
    "ZeroConfig",
    "OffloadConfig",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "DataTypesConfig",
    "OptimizerConfig",
    "OptimizerParams",
    "SchedulerConfig",
    "SchedulerParams",
    "ZerographOptions",
    "ActivationCheckpointingConfig",
    "PipelineConfig",
    "reference_markdown",
    "deepspeed_markdown",
]

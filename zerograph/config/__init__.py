"""zerograph's configuration: the DeepSpeed ds_config.json keys that carry over.

A config is loaded with :meth:`Config.load` from a JSON file path, a dict, an
existing :class:`Config`, or ``None`` (all defaults). Every section rejects
unknown keys, and every problem is reported as a :class:`ConfigError` with one
line per problem that names the dotted key. (Constructing the models directly,
e.g. ``Config(**kwargs)``, validates the same way but raises pydantic's
``ValidationError``.)

Some keys are accepted only so that existing DeepSpeed configs load; they have
no effect yet. :meth:`Config.inactive_settings` lists the ones a config changes.

Modules: ``values`` (ConfigError, strict value types), ``sections`` (the section
models), ``schema`` (:class:`Config`), ``messages`` (error wording), ``reference``
(the generated docs/config.md reference).
"""

from zerograph.config.reference import reference_markdown
from zerograph.config.schema import Config
from zerograph.config.sections import (
    ActivationCheckpointingConfig,
    BF16Config,
    FP16Config,
    OffloadConfig,
    PipelineConfig,
    ZeroConfig,
    ZerographOptions,
)
from zerograph.config.values import ConfigError

__all__ = [
    "ConfigError",
    "Config",
    "FP16Config",
    "BF16Config",
    "ZeroConfig",
    "OffloadConfig",
    "ZerographOptions",
    "ActivationCheckpointingConfig",
    "PipelineConfig",
    "reference_markdown",
]

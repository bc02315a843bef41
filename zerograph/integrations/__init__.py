"""Bring existing training code: DeepSpeed's ``deepspeed.initialize`` and
engine (:mod:`.deepspeed`, :mod:`.engine`, the monitoring sections in
:mod:`.monitor`), and the Hugging Face Trainer (:mod:`.hf`, imported on its
own: it needs ``transformers``, an optional dependency, ``pip install
zerograph[hf]``)."""

from zerograph.integrations.deepspeed import add_config_arguments, init_distributed, initialize
from zerograph.integrations.engine import ZeroGraphEngine

__all__ = ["initialize", "add_config_arguments", "init_distributed", "ZeroGraphEngine"]

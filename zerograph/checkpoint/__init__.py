"""Checkpoint files: sharded, atomic DCP checkpoints (:mod:`.dcp`), the
original model's names under any layout (:mod:`.names`), and full state
dicts / Hugging Face export (:mod:`.export`).

(Activation checkpointing, which recomputes activations, is
:mod:`zerograph.passes.activation_checkpointing`.)"""

from zerograph.checkpoint.dcp import COMMIT_MARKER, load_checkpoint, save_checkpoint
from zerograph.checkpoint.export import export_pretrained, load_full_state_dict

__all__ = ["COMMIT_MARKER", "save_checkpoint", "load_checkpoint", "export_pretrained", "load_full_state_dict"]

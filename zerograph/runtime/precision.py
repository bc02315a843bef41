"""fp16 loss scaling (static or dynamic)."""

from __future__ import annotations

import dataclasses
import logging

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LossScaler:
    """Dynamic loss scale with DeepSpeed's knobs.

    On overflow the step is skipped and, once ``hysteresis`` overflows have
    been seen since the last change, the scale halves (not below
    ``min_scale``). After ``window`` steps in a row without overflow it
    doubles. A static scaler (``dynamic=False``) never changes.
    """

    scale: float
    dynamic: bool = True
    window: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    good_steps: int = 0
    overflows_left: int = 0
    skipped_steps: int = 0

    def __post_init__(self):
        self.overflows_left = self.hysteresis

    @classmethod
    def from_config(cls, fp16) -> "LossScaler":
        if fp16.loss_scale > 0:
            return cls(scale=float(fp16.loss_scale), dynamic=False)
        return cls(
            scale=float(2**fp16.initial_scale_power),
            window=fp16.loss_scale_window,
            hysteresis=fp16.hysteresis,
            min_scale=float(fp16.min_loss_scale),
        )

    def state_dict(self) -> dict:
        """Everything that changes during training (for checkpoints)."""
        return {k: getattr(self, k) for k in ("scale", "good_steps", "overflows_left", "skipped_steps")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def update(self, overflow: bool) -> None:
        if overflow:
            self.skipped_steps += 1
            self.good_steps = 0
            if not self.dynamic:
                return
            self.overflows_left -= 1
            if self.overflows_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self.overflows_left = self.hysteresis
            log.warning("zerograph: fp16 gradient overflow; step skipped, loss scale now %g", self.scale)
            return
        self.good_steps += 1
        if self.dynamic and self.good_steps % self.window == 0:
            self.scale *= 2.0
            self.overflows_left = self.hysteresis

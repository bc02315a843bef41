"""Small reference models used by the demo, the tests and the benchmarks."""

from zerograph.models.gpt import GPT, GPTConfig, GPTOutput

__all__ = ["GPT", "GPTConfig", "GPTOutput"]

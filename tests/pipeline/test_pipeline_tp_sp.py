"""3D parallelism with the vocab-parallel embedding and cross-entropy
(``zerograph.tp_vocab_parallel``) and with Megatron sequence parallelism
(``zerograph.tp_sequence_parallel``) inside pipeline stages
(docs/tensor_parallel.md#3d-parallelism-pipeline-x-data-x-tensor).

pp=2 x tp=2 (world 4, real gloo ranks) trains 5 AdamW steps with
``train_step`` on the same global batches as single-process eager PyTorch;
every step's loss and every full parameter must match (fp32, rtol 1e-5).
"""

from __future__ import annotations

import pytest
import torch

import tests.test_tp_vocab  # noqa: F401  (registers gpt_v98, llama_v98: a vocabulary tp=2 divides)
from tests import _models
from tests._harness import TIMEOUT
from tests.pipeline.test_pipeline_tp import _check, _config, _train
from zerograph.models import GPT, GPTConfig
from zerograph.runtime.launch import spawn


def make_gpt_untied_v98():
    torch.manual_seed(1234)
    return GPT(GPTConfig(vocab_size=98, block_size=_models.SEQ, n_layer=2, n_head=2, n_embd=30, tie_weights=False))


_models.MODELS.setdefault("gpt_untied_v98", make_gpt_untied_v98)


def _run(runs):
    """On each rank (which imports this module, so knows the models above): ``_train(runs)``."""
    return _train(runs)


VOCAB = {"zerograph": {"tp_vocab_parallel": True}}
SP = {"zerograph": {"tp_sequence_parallel": True}}


@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_tp2_vocab_parallel_tied_and_untied_match_eager():
    """The embedding (stage 0) and the LM head + loss (stage 1) split over
    the vocabulary: GPT with its head tied to the embedding (one parameter
    read by both stages, vocab-split once, its gradient summed over the two
    stages' ranks of one tp index) and untied."""
    runs = [("gpt_v98", _config(0, **VOCAB)), ("gpt_untied_v98", _config(0, **VOCAB))]
    results = spawn(_run, 4, runs, timeout=TIMEOUT)
    for rank, rank_results in enumerate(results):
        for r in rank_results:
            print(rank, r["shapes"], r["comm"])
    _check(results, runs)


@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_tp2_megatron_sp_matches_eager():
    """Megatron-SP in both stages: the residual stream crosses the stage
    boundary as each tp rank's sequence shard."""
    runs = [("gpt", _config(0, **SP)), ("gpt_v98", _config(0, zerograph={"tp_sequence_parallel": True,
                                                                         "tp_vocab_parallel": True}))]
    results = spawn(_run, 4, runs, timeout=TIMEOUT)
    for rank, rank_results in enumerate(results):
        for r in rank_results:
            print(rank, r["comm"], r["p2p"])
    _check(results, runs)


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT + 30)
def test_pp2_tp2_llama_vocab_parallel_and_megatron_sp_match_eager():
    """Hugging Face Llama (untied head, grouped-query attention, its
    base_model_tp_plan) with the vocab-parallel embedding and loss and
    Megatron-SP: the hidden states cross the boundary as sequence shards,
    the rotary cos/sin (computed from the positions alone) whole."""
    llama = {"pipeline": {"stages": 2, "micro_batches": 2, "split_points": ["model.layers.1"]},
             "zerograph": {"tp_sequence_parallel": True, "tp_vocab_parallel": True}}
    runs = [("llama_v98", {**_config(0), **llama})]
    results = spawn(_run, 4, runs, timeout=TIMEOUT)
    for rank, rank_results in enumerate(results):
        for r in rank_results:
            print(rank, r["comm"], r["p2p"], r["shapes"])
    _check(results, runs)

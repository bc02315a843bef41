"""Model and data factories for the equivalence tests (module-level so that
spawned ranks can build them)."""

from __future__ import annotations

import torch
from torch import nn

from zerograph.models import GPT, GPTConfig

VOCAB = 97  # odd sizes exercise uneven shards and padding
SEQ = 16


def make_gpt(dropout: float = 0.0):
    torch.manual_seed(1234)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=30, dropout=dropout))


def make_gpt_h4():
    """nanoGPT with 4 heads (2 per rank at tp=2, 1 per rank at sp=2 x tp=2)."""
    torch.manual_seed(1234)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=32))


def make_gpt_untied():
    torch.manual_seed(1234)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=30, tie_weights=False))


def make_hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    # The class name maps to no transformers loss type, so every forward logs a
    # warning before using the default causal-LM loss: a graph break, after
    # which Dynamo traces the whole model again from each enclosing frame (five
    # traces, ~3x the compile time of each test). Naming the same loss avoids
    # it; graph breaks are tested with "breaky", and the unmodified
    # GPT2LMHeadModel (with that break) trains like eager in
    # tests/test_hf_trainer.py and runs in tests/test_examples.py.
    model.loss_type = "ForCausalLM"
    return model


def make_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
    )
    return LlamaForCausalLM(cfg)


def make_llama_kv1():
    """Llama with one key/value head for 4 query heads (grouped-query
    attention with fewer key/value heads than tp=2), without a KV cache (its
    attention then repeats the key/value heads: ``repeat_kv``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=SEQ, use_cache=False,
    )
    return LlamaForCausalLM(cfg)


class _EagerLinear(torch.nn.Linear):
    """A layer Dynamo never compiles: its parameters are read by eager code."""

    @torch.compiler.disable
    def forward(self, x):
        return super().forward(x)


class BreakyNet(torch.nn.Module):
    """A forward with graph breaks: a print, a data-dependent branch, and a
    layer that runs outside compiled regions."""

    def __init__(self):
        super().__init__()
        import io

        self.emb = torch.nn.Embedding(VOCAB, 24)
        self.fc1 = torch.nn.Linear(24, 40)
        self.eager_part = _EagerLinear(40, 40)
        self.fc2 = torch.nn.Linear(40, VOCAB)
        self._sink = io.StringIO()

    def forward(self, idx, targets):
        h = torch.relu(self.fc1(self.emb(idx)))
        print("graph break", file=self._sink)
        if h.mean() > 0.2:  # data-dependent branch
            h = h * 1.5
        else:
            h = h * 0.5
        h = torch.tanh(self.eager_part(h))
        logits = self.fc2(h)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_qwen3():
    """Qwen3: RMSNorms on each head's queries and keys (``q_norm``/``k_norm``,
    whole weights read by every tp rank's heads)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1234)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=SEQ)
    return Qwen3ForCausalLM(cfg)


def make_phi3():
    """Phi-3: fused ``qkv_proj`` cut by slices, fused ``gate_up_proj`` cut by
    ``chunk``; its Hugging Face tp plan uses styles zerograph does not do."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(1234)
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2)
    return Phi3ForCausalLM(cfg)


def make_gptj():
    """GPT-J: rotary embedding on interleaved pairs (``torch.stack`` of each
    rank's heads), attention and MLP in parallel off one LayerNorm."""
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(1234)
    cfg = GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=SEQ,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPTJForCausalLM(cfg)


def make_breaky():
    torch.manual_seed(1234)
    return BreakyNet()


MODELS = {"gpt": make_gpt, "gpt_h4": make_gpt_h4, "gpt_untied": make_gpt_untied, "breaky": make_breaky,
          "hf_gpt2": make_hf_gpt2, "llama": make_llama, "llama_kv1": make_llama_kv1, "qwen3": make_qwen3,
          "phi3": make_phi3, "hf_gptj": make_gptj}


def global_batch(step: int, batch: int):
    g = torch.Generator().manual_seed(10_000 + step)
    idx = torch.randint(0, VOCAB, (batch, SEQ + 1), generator=g)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def loss_of(model_name: str, model, idx, targets):
    if model_name.startswith("gpt"):
        return model(idx, targets).loss
    if model_name == "breaky":
        return model(idx, targets)
    return model(input_ids=idx, labels=idx).loss


class Blocks(nn.Module):
    def __init__(self, n=3, d=8):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return x.sum()


class BrokenBlocks(nn.Module):
    """Groups of ``Linear`` + ``tanh`` (one group per list of widths) with a
    graph break between groups: one compiled region per group. Every group
    ends in ``tanh``, which saves its output for its backward, so the value a
    group passes on is held by the group that made it (docs/planner.md)."""

    def __init__(self, *groups):
        super().__init__()
        assert 1 <= len(groups) <= 3
        self.groups = nn.ModuleList(
            nn.Sequential(*(m for a, b in zip(w, w[1:]) for m in (nn.Linear(a, b), nn.Tanh()))) for w in groups)

    def forward(self, x):
        x = self.groups[0](x)
        if len(self.groups) > 1:
            torch._dynamo.graph_break()
            x = self.groups[1](x)
        if len(self.groups) > 2:
            torch._dynamo.graph_break()
            x = self.groups[2](x)
        return x.sum()


class TinyMLP(nn.Module):
    """``fc2(relu(fc1(x))).sum()``, 4 -> 6 -> 3 (fc2 without bias): the
    small graph of the golden pass tests and docs/passes.md."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).sum()

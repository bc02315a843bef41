"""Train a small Hugging Face Llama (RoPE, GQA, SwiGLU, RMSNorm) from scratch with zerograph.

    torchrun --nproc-per-node 2 examples/hf_llama.py --steps 50
    torchrun --nproc-per-node 8 examples/hf_llama.py --bf16 --stage 3 --out /tmp/llama-zero3

Works for any ``LlamaForCausalLM`` (and Mistral-style models that share its layout).
"""

from transformers import LlamaConfig, LlamaForCausalLM

from _train import parse_args, train

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=args.seq)
    train(LlamaForCausalLM(config), args)

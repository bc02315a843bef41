"""Train a small Hugging Face Qwen2 (biased q/k/v projections, GQA, tied embeddings) with zerograph.

    torchrun --nproc-per-node 2 examples/hf_qwen2.py --steps 50
"""

from transformers import Qwen2Config, Qwen2ForCausalLM

from _train import parse_args, train

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    config = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=args.seq,
                         tie_word_embeddings=True)
    train(Qwen2ForCausalLM(config), args)

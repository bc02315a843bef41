"""Train a small Hugging Face GPT-2 from scratch with zerograph (ZeRO-3 by default).

    torchrun --nproc-per-node 2 examples/hf_gpt2.py --steps 50
    torchrun --nproc-per-node 8 examples/hf_gpt2.py --bf16 --out /tmp/gpt2-zero3   # on 8 GPUs

Any ``GPT2LMHeadModel`` works the same way, e.g. ``GPT2LMHeadModel.from_pretrained("gpt2")``
(then feed it GPT-2 tokens instead of the byte-level data used here).
"""

from transformers import GPT2Config, GPT2LMHeadModel

from _train import parse_args, train

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    config = GPT2Config(vocab_size=256, n_positions=args.seq, n_embd=128, n_layer=4, n_head=4)
    train(GPT2LMHeadModel(config), args)

"""Train a small GPT-2 with the Hugging Face Trainer on zerograph: ZeroGraphTrainer.

    torchrun --nproc-per-node 2 examples/hf_trainer.py --steps 20 --out /tmp/gpt2-trainer
    torchrun --nproc-per-node 8 examples/hf_trainer.py --config ds_config.json   # your DeepSpeed config

``ZeroGraphTrainer`` is a ``transformers.Trainer``: the same TrainingArguments,
datasets, callbacks and checkpoints (resume with ``--resume``), with the model
compiled and sharded by zerograph (ZeRO-3 here) and the config's ``"auto"``
values filled from the TrainingArguments. It trains on the byte-level text
shipped with zerograph, so nothing is downloaded. Needs ``pip install zerograph[hf]``.
"""

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from zerograph.integrations.hf import ZeroGraphTrainer
from zerograph.models import data as textdata

# Hugging Face's DeepSpeed template style: the Trainer fills the "auto" values
CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "overlap_comm": True},
}


class TextChunks(torch.utils.data.Dataset):
    """Consecutive ``seq``-byte chunks of the text: input_ids and labels (the model shifts them)."""

    def __init__(self, seq: int):
        data = textdata.load_corpus()
        self.chunks = data[: len(data) // seq * seq].view(-1, seq)

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="a DeepSpeed/zerograph JSON config (default: ZeRO-3, all auto)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4, help="rows per rank per micro-batch")
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default="hf_trainer_out")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    args = p.parse_args()

    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=args.seq, n_embd=64, n_layer=2, n_head=4))
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation, learning_rate=1e-3, warmup_steps=0.1, weight_decay=0.01,
        max_grad_norm=1.0, bf16=args.bf16, logging_steps=1, save_steps=max(1, args.steps // 2),
        report_to=[], disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    trainer = ZeroGraphTrainer(model=model, args=training_args, train_dataset=TextChunks(args.seq),
                               zerograph_config=args.config or CONFIG)
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(f"{args.out}/final")  # every rank: the weights are gathered; from_pretrained loads it
    if trainer.is_world_process_zero():
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        print(f"steps {result.global_step}  first loss {losses[0]:.4f}  last loss {losses[-1]:.4f}", flush=True)
        print(f"saved {args.out}/final", flush=True)


if __name__ == "__main__":
    main()

"""A DeepSpeedExamples-style training script, run by zerograph.

The only line changed from the DeepSpeed version is the import:
``import deepspeed`` became ``import zerograph as deepspeed``. Everything else,
``deepspeed.add_config_arguments``, ``deepspeed.init_distributed``,
``deepspeed.initialize(args=..., model=..., model_parameters=..., training_data=...)``
and the ``model_engine(x)`` / ``model_engine.backward(loss)`` /
``model_engine.step()`` loop, is DeepSpeed's API.

    torchrun --nproc-per-node 2 examples/deepspeed_style.py --deepspeed --deepspeed_config ds_config.json

Without ``--deepspeed_config`` it writes a ZeRO-2 config with an AdamW
optimizer, a WarmupLR schedule and gradient accumulation to ``--out``. The
task is a small classifier of synthetic data (nothing is downloaded).
"""

import argparse
import json
import logging
import os

import torch
import torch.nn.functional as F

import zerograph as deepspeed  # was: import deepspeed


class Net(torch.nn.Module):
    def __init__(self, features=32, hidden=64, classes=10):
        super().__init__()
        self.fc1 = torch.nn.Linear(features, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.fc3 = torch.nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def synthetic_data(samples=512, features=32, classes=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    return torch.utils.data.TensorDataset(x, (x @ teacher).argmax(dim=1))


DEFAULT_CONFIG = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 2,
    "steps_per_print": 5,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-3, "warmup_num_steps": 5}},
    "zero_optimization": {"stage": 2},
}


def main():
    parser = argparse.ArgumentParser(description="DeepSpeed-style training")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the DeepSpeed launcher")
    parser.add_argument("--out", default="ds_style_out", help="checkpoint directory")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("zerograph.integrations").setLevel(logging.INFO)  # steps_per_print's progress lines
    if args.deepspeed_config is None:
        os.makedirs(args.out, exist_ok=True)
        args.deepspeed_config = os.path.join(args.out, "ds_config.json")
        with open(args.deepspeed_config, "w") as f:
            json.dump(DEFAULT_CONFIG, f)

    deepspeed.init_distributed()
    torch.manual_seed(0)
    net = Net()
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    model_engine, optimizer, trainloader, _ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=synthetic_data())

    for epoch in range(args.epochs):
        running = 0.0
        for i, (inputs, labels) in enumerate(trainloader):
            inputs, labels = inputs.to(model_engine.device), labels.to(model_engine.device)
            loss = F.cross_entropy(model_engine(inputs), labels)
            model_engine.backward(loss)
            model_engine.step()
            running += loss.item()
        if model_engine.global_rank == 0:
            print(f"epoch {epoch} mean loss {running / (i + 1):.4f} optimizer steps {model_engine.global_steps}",
                  flush=True)
        model_engine.save_checkpoint(args.out, client_state={"epoch": epoch})

    _, client_state = model_engine.load_checkpoint(args.out)
    if model_engine.global_rank == 0:
        print(f"reloaded the checkpoint of epoch {client_state['epoch']}", flush=True)


if __name__ == "__main__":
    main()

"""The examples under examples/ run under torchrun on 2 CPU processes, and
what they save loads back with Hugging Face ``from_pretrained``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._harness import TIMEOUT

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: str, *args: str) -> str:
    return _run(script, "--steps", "2", "--seq", "32", *args)


def _run(script: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(REPO / "examples" / script), *args]
    # A new session, so a timeout kills torchrun's workers too.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{script} did not finish in {TIMEOUT} s:\n{stdout[-2000:]}{stderr[-2000:]}") from None
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("script,model_class", [
    # nightly: CI runs the Hugging Face Trainer example (examples/_train.py's helpers, torchrun,
    # save_pretrained, from_pretrained; below) and the DeepSpeed-style script; the same training
    # loop with each model class
    pytest.param("hf_gpt2.py", "GPT2LMHeadModel", marks=pytest.mark.slow),
    pytest.param("hf_llama.py", "LlamaForCausalLM", marks=pytest.mark.slow),
    pytest.param("hf_qwen2.py", "Qwen2ForCausalLM", marks=pytest.mark.slow),
])
def test_example_trains_and_saves_pretrained(tmp_path, script, model_class):
    import transformers

    out = _torchrun(script, "--out", str(tmp_path / "model"))
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model = getattr(transformers, model_class).from_pretrained(tmp_path / "model")
    ids = torch.randint(0, 256, (1, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.timeout(TIMEOUT + 30)
def test_deepspeed_style_script_runs_with_only_its_import_changed(tmp_path):
    import ast

    source = (REPO / "examples" / "deepspeed_style.py").read_text()
    tree = ast.parse(source)
    imports = [a for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
               for a in node.names if "zerograph" in (getattr(node, "module", None) or a.name)]
    assert [(a.name, a.asname) for a in imports] == [("zerograph", "deepspeed")]
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "zerograph"]
    out = _run("deepspeed_style.py", "--deepspeed", "--epochs", "2", "--out", str(tmp_path))
    losses = [float(line.split()[4]) for line in out.splitlines() if line.startswith("epoch")]
    assert len(losses) == 2 and losses[1] < losses[0], out
    assert "optimizer steps 16" in out and "reloaded the checkpoint of epoch 1" in out
    assert (tmp_path / "latest").read_text() == "global_step16"


@pytest.mark.timeout(TIMEOUT + 30)
def test_hf_trainer_example_trains_and_saves_pretrained(tmp_path):
    import transformers

    out = _run("hf_trainer.py", "--steps", "2", "--seq", "32", "--out", str(tmp_path))
    assert "steps 2" in out, out
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "final")
    ids = torch.randint(0, 256, (1, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert (tmp_path / "checkpoint-1" / "latest").read_text() == "global_step1"

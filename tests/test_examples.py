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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(REPO / "examples" / script), "--steps", "2", "--seq", "32", *args]
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
    ("hf_gpt2.py", "GPT2LMHeadModel"),
    ("hf_llama.py", "LlamaForCausalLM"),
    ("hf_qwen2.py", "Qwen2ForCausalLM"),
])
def test_example_trains_and_saves_pretrained(tmp_path, script, model_class):
    import transformers

    out = _torchrun(script, "--out", str(tmp_path / "model"))
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step")]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    model = getattr(transformers, model_class).from_pretrained(tmp_path / "model")
    ids = torch.randint(0, 256, (1, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)

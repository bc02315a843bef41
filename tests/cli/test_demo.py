"""The demo (``python -m zerograph demo``) end to end on 2 spawned ranks with a
tiny model, plus the pieces it is built from: the byte-level data helpers,
the ASCII curve and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import zerograph.__main__ as cli
import zerograph.cli.demo as demo
from zerograph.models import GPT, GPTConfig
from zerograph.models import data as textdata

STEPS = 12
# one xdist worker runs this module: its module-scoped fixture trains once (tests/_xdist.py)
pytestmark = pytest.mark.xdist_group("demo")
TINY = [
    "--world-size", "2", "--stage", "3",
    "--steps", str(STEPS), "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
    "--block-size", "16", "--batch-size", "8", "--lr", "1e-2",
    "--eval-batches", "2", "--sample-bytes", "8", "--no-progress", "--timeout", "280",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = demo.run(TINY + ["--out", str(out)], echo=False)
    return result, out


def _model_config(out):
    return GPTConfig(**json.loads((out / "config.json").read_text())["model"])


@pytest.mark.timeout(300)
def test_demo_saves_full_checkpoint_with_original_keys(tiny_run):
    result, out = tiny_run
    for name in ("model.pt", "config.json", "losses.json"):
        assert (out / name).is_file(), name
        assert str(out / name) in result.paths.values()

    cfg = _model_config(out)
    assert cfg == GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32,
                            dropout=0.0, bias=True, tie_weights=True)
    expected = GPT(cfg).state_dict()
    state = torch.load(out / "model.pt", weights_only=True)
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert state[key].shape == value.shape, key
        assert not isinstance(state[key], torch.distributed.tensor.DTensor), key

    config = json.loads((out / "config.json").read_text())
    assert config["zerograph"]["zero_optimization"]["stage"] == 3
    assert config["training"]["world_size"] == 2


@pytest.mark.timeout(300)
def test_demo_loss_drops_and_checkpoint_reproduces_val_loss(tiny_run):
    result, out = tiny_run
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses["train"]) == STEPS == len(result.train_losses)
    assert losses["train"][-1] < losses["train"][0]
    assert result.val_after < result.val_before

    # The saved checkpoint, loaded into a plain single-process GPT, scores the
    # same validation loss on the same global batches.
    model = GPT(_model_config(out))
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    _, val = textdata.split(textdata.load_corpus())
    with torch.no_grad():
        batches = [textdata.get_batch(val, demo.VAL_SEED_OFFSET + i, 8, 16) for i in range(2)]
        val_loss = sum(model(idx, t).loss.item() for idx, t in batches) / len(batches)
    assert val_loss == pytest.approx(result.val_after, rel=1e-4)


@pytest.mark.timeout(300)
def test_demo_report_compares_with_ddp(tiny_run):
    result, _ = tiny_run
    psi = result.num_parameters
    assert psi == GPT(GPTConfig(256, 16, 1, 2, 32, 0.0, True, True)).num_parameters()
    # Stage 3 on 2 ranks: every parameter, gradient and Adam moment is split in two.
    totals = [b["params"] + b["grads"] + b["optimizer"] for b in result.state_bytes]
    assert sum(totals) == result.ddp_state_bytes == 16 * psi
    assert all(b["params"] > 0 and b["grads"] > 0 and b["optimizer"] > 0 for b in result.state_bytes)
    assert result.ddp_comm_bytes == 8 * psi
    assert all(c["reduce_scatter"] > 0 and c["all_gather"] > 0 for c in result.comm)

    report = result.report
    assert "DDP (fp32 AdamW, 16 psi)" in report
    assert f"{16 * psi:,}" in report  # DDP's model-state bytes
    assert "DDP (2 psi x 4 B)" in report and f"{8 * psi:,}" in report
    assert "2.00x less" in report
    assert "Saved by rank 0" in report and "model.pt" in report
    assert result.sample.startswith(demo.DEFAULT_PROMPT)


@pytest.mark.timeout(300)
def test_demo_writes_and_reports_the_chrome_trace(tiny_run):
    result, out = tiny_run
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"]), "no timed events in the trace"
    assert "Chrome trace of one step's graphs (zerograph.explain): " in result.report
    assert "trace.json" in result.report.splitlines()[-1]


def test_global_batch_is_the_same_for_every_world_size():
    data = torch.arange(1000) % 256
    for step in range(3):
        idx1, t1 = textdata.get_batch(data, step, 8, 16, seed=7)
        assert idx1.shape == t1.shape == (8, 16)
        assert torch.equal(idx1[:, 1:], t1[:, :-1])
        for world in (2, 4):
            parts = [textdata.get_batch(data, step, 8, 16, rank=r, world_size=world, seed=7) for r in range(world)]
            assert torch.equal(torch.cat([p[0] for p in parts]), idx1)
            assert torch.equal(torch.cat([p[1] for p in parts]), t1)
    a, _ = textdata.get_batch(data, 0, 8, 16, seed=7)
    b, _ = textdata.get_batch(data, 1, 8, 16, seed=7)
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="multiple of world_size"):
        textdata.get_batch(data, 0, 6, 16, rank=0, world_size=4)


def test_corpus_round_trips_through_the_byte_tokenizer():
    corpus = textdata.load_corpus()
    assert corpus.dtype == torch.long and 60_000 <= len(corpus) <= 120_000
    assert int(corpus.min()) >= 0 and int(corpus.max()) < textdata.VOCAB_SIZE
    text = textdata.decode(corpus)
    assert "ZeRO" in text and torch.equal(textdata.encode(text), corpus)
    train, val = textdata.split(corpus)
    assert len(train) == int(len(corpus) * 0.9) and len(train) + len(val) == len(corpus)


def test_ascii_curve_shape():
    values = [5.0 - math.log1p(i) for i in range(50)]  # one value per column
    lines = demo.ascii_curve(values, rows=10, cols=50).splitlines()
    assert len(lines) == 12
    assert lines[0].strip().startswith("5.00")
    plot = [line.split("|", 1)[1] for line in lines[:10]]
    assert all(len(row) == 50 for row in plot)
    assert lines[9].strip().startswith(f"{values[-1]:.2f}")
    assert [row.count("*") for row in zip(*plot)] == [1] * 50  # one point per column
    assert plot[0][0] == "*" and plot[-1][-1] == "*"
    halved = demo.ascii_curve(values * 2, rows=10, cols=50).splitlines()  # 2 values per column
    assert len(halved[0].split("|", 1)[1]) == 50


def test_cli_lists_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out


def test_cli_bad_config_is_an_error_before_spawning(tmp_path, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 7}}')
    assert cli.main(["demo", "--config", str(bad), "--stage", "3"]) == 2
    assert cli.main(["demo", "--config", str(bad)]) == 2
    assert "zero_optimization.stage" in capsys.readouterr().err
    assert cli.main(["demo", "--timeout", "0"]) == 2  # not a TimeoutError traceback from the launch
    assert "--timeout must be positive" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_cli_launch_past_its_timeout_is_an_error_not_a_traceback(tmp_path, capsys):
    # the ranks cannot even import torch in 0.5 s: the launch stops them and says which knob to turn
    assert cli.main(["demo", "--timeout", "0.5", "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "did not finish within" in err and "raise --timeout" in err and "Traceback" not in err

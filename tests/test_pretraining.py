import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ch03_gpt_model.gpt import GPT_CONFIGS, GPTConfig, GPTModel
from ch04_pretraining.__main__ import parse_args
from ch04_pretraining.pretraining import (
    BatchSampler,
    CharTokenizer,
    GPT2Tokenizer,
    TrainConfig,
    TrainingDiverged,
    configure_optimizer,
    fit_micro_batch,
    get_batch,
    load_checkpoint,
    lr_at,
    read_metrics,
    scale_preset,
    steps_within_budget,
    tokenize_to_memmap,
    train,
    train_val_split,
)
from shared.data import fetch

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(n_layer=2, n_head=2, n_embd=32, context_length=16, batch_size=4, max_steps=12, warmup_steps=3,
            eval_interval=4, eval_iters=2, lr=3e-3, min_lr=3e-4)


def tiny_config(out_dir, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), **kw})


def run_cli(*args, env_extra=None, **popen):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "ch04_pretraining", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


# ---- pieces -------------------------------------------------------------------------------

def test_char_tokenizer():
    tok = CharTokenizer("hello world")
    assert tok.chars == " dehlorw" and tok.n_vocab == 8
    assert tok.decode(tok.encode("lower")) == "lower"
    with pytest.raises(ValueError, match="'z' is not in"):
        tok.encode("zoo")


def test_split_is_first_90_last_10():
    train_ids, val_ids = train_val_split(list(range(100)))
    assert train_ids.tolist() == list(range(90)) and val_ids.tolist() == list(range(90, 100))


def test_lr_schedule():
    lrs = [lr_at(s, 1.0, 0.1, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert lrs[55] == pytest.approx(0.1 + 0.5 * 0.9, rel=1e-6)
    assert lrs[100] == lrs[119] == 0.1


def test_weight_decay_only_on_matrices():
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, n_layer=1, n_head=2, n_embd=16))
    decayed, plain = configure_optimizer(model, 1e-3, 0.1).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_sampler_is_resumable_and_batches_shift_by_one():
    tokens = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(tokens, 16, seed=3)
    a.next_starts(8)
    state = a.state_dict()
    expected = a.next_starts(8)
    b = BatchSampler(tokens, 16, seed=99)
    b.load_state_dict(state)
    assert torch.equal(b.next_starts(8), expected)
    x, y = get_batch(tokens, expected, 16, "cpu")
    assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_tokenize_to_memmap_on_tinystories_format(tmp_path):
    tokenizer = GPT2Tokenizer()
    text_path = fetch("tinystories-sample")
    tokens = tokenize_to_memmap(text_path, tmp_path / "sample.bin", tokenizer, chunk_bytes=500, progress=False)
    stories = [s.strip() for s in text_path.read_text().split("<|endoftext|>") if s.strip()]
    expected = [i for s in stories for i in tokenizer.encode(s) + [tokenizer.eot]]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert int((tokens == tokenizer.eot).sum()) == len(stories) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["sample.bin"]


def test_micro_batch_fits_the_gpu():
    cfg = GPT_CONFIGS["gpt2"]
    assert fit_micro_batch(cfg, 16e9, 64) == (8, 8)          # a T4
    assert fit_micro_batch(cfg, 80e9, 64) == (32, 2)         # an A100 80GB
    with pytest.raises(ValueError, match="does not fit"):
        fit_micro_batch(GPT_CONFIGS["gpt2-xl"], 8e9, 64)


def test_gpu_preset_is_gpt2_124m_on_tinystories():
    cfg = scale_preset("gpu", gpu_memory_bytes=16e9)
    assert cfg.data == "tinystories" and cfg.tokenizer == "gpt2" and cfg.time_budget_min == 60
    assert cfg.batch_size * cfg.grad_accum == 64
    with torch.device("meta"):
        model = GPTModel(cfg.model_config(50257))
    assert model.num_parameters() == 124_439_808


def test_cli_flags_override_the_preset():
    cfg, resume = parse_args(["--scale", "smoke", "--n-layer", "3", "--lr", "0.01", "--no-bias", "--resume"])
    assert cfg.n_layer == 3 and cfg.lr == 0.01 and cfg.bias is False and resume
    assert cfg.n_embd == scale_preset("smoke").n_embd
    cfg, _ = parse_args(["--init-std", "0.02", "--no-tie-embeddings"])
    model_cfg = cfg.model_config(65)
    assert model_cfg.weight_std == 0.02 and model_cfg.tie_embeddings is False
    assert parse_args([])[0].model_config(65).weight_std == pytest.approx(0.02 * math.sqrt(768 / 128))
    with pytest.raises(SystemExit):
        parse_args(["--min-lr", "1", "--lr", "0.1"])


# ---- training -----------------------------------------------------------------------------

def test_training_learns_and_writes_read_metrics(tmp_path):
    result = train(tiny_config(tmp_path, max_steps=40, eval_interval=20), log=lambda m: None)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert set(rows[0]) >= {"step", "train_loss", "val_loss", "lr", "tokens_per_s"}
    assert rows[0]["train_loss"] == pytest.approx(math.log(65), abs=0.3)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    assert result["step"] == 40


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, tie_embeddings):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_config(full, tie_embeddings=tie_embeddings), log=lambda m: None)
    # a run that stopped after step 8: its last checkpoint is the one at step 8
    shutil.copytree(full, resumed)
    (resumed / "latest.json").write_text(json.dumps(
        {"step": 8, "weights": "ckpt-0000008.safetensors", "state": "ckpt-0000008.pt"}))
    train(tiny_config(resumed, tie_embeddings=tie_embeddings), resume=True, log=lambda m: None)
    for a, b in zip(read_metrics(full), read_metrics(resumed), strict=True):
        assert (a["step"], a["train_loss"], a["val_loss"]) == (b["step"], b["train_loss"], b["val_loss"])
    final_full = load_file(full / "ckpt-0000012.safetensors")
    final_resumed = load_file(resumed / "ckpt-0000012.safetensors")
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    assert ("lm_head.weight" in final_full) is not tie_embeddings      # a tied head is stored once


def test_checkpoints_are_safetensors_and_safe_to_load(tmp_path):
    train(tiny_config(tmp_path), log=lambda m: None)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-0000008.pt", "ckpt-0000008.safetensors", "ckpt-0000012.pt",
                     "ckpt-0000012.safetensors", "latest.json", "metrics.jsonl"]
    weights, state = load_checkpoint(tmp_path)
    assert state["step"] == 12 and "transformer.wte.weight" in weights
    with pytest.raises(ValueError, match="n_embd: checkpoint 32, now 64"):
        load_checkpoint(tmp_path, tiny_config(tmp_path, n_embd=64))
    with pytest.raises(FileNotFoundError, match="train without --resume"):
        load_checkpoint(tmp_path / "empty")


def test_checkpoints_from_before_a_config_field_existed_still_load(tmp_path):
    train(tiny_config(tmp_path, max_steps=4), log=lambda m: None)
    state_file = tmp_path / json.loads((tmp_path / "latest.json").read_text())["state"]
    state = torch.load(state_file, weights_only=True)
    del state["config"]["tie_embeddings"], state["config"]["init_std"]
    torch.save(state, state_file)
    load_checkpoint(tmp_path, tiny_config(tmp_path))
    with pytest.raises(ValueError, match="tie_embeddings: checkpoint True, now False"):
        load_checkpoint(tmp_path, tiny_config(tmp_path, tie_embeddings=False))


def test_steps_within_budget():
    # 1 s per step, evaluations of 10 s every 100 steps: 1.1 s per step; 95 % of 1,000 s minus the last evaluation
    assert steps_within_budget(40, 1.0, 1000, 10, 100, 5000) == 40 + int((950 - 10) / 1.1)
    assert steps_within_budget(40, 0.01, 1000, 10, 100, 5000) == 5000            # never longer than planned
    assert steps_within_budget(40, 100.0, 50, 10, 100, 5000) == 41               # never before the next step


def test_time_budget_shortens_the_schedule_and_resume_keeps_it(tmp_path, monkeypatch):
    import ch04_pretraining.pretraining as pretraining

    # plan for 70 % of the budget instead of 95 %, so a noisy machine cannot make the clock stop the run first
    monkeypatch.setattr(pretraining, "steps_within_budget",
                        lambda *args: steps_within_budget(*args, margin=0.7))
    lines = []
    cfg = tiny_config(tmp_path, max_steps=1_000_000, eval_interval=100_000, time_budget_min=0.05)
    start = time.time()
    result = train(cfg, log=lines.append)
    assert time.time() - start < 3 * 60 * cfg.time_budget_min + 5
    fitted = load_checkpoint(tmp_path)[1]["config"]["max_steps"]
    assert 40 < fitted < 1_000_000 and any("fitted to the time budget" in line for line in lines)
    last = read_metrics(tmp_path)[-1]
    assert result["step"] == last["step"] == fitted and last["lr"] == cfg.min_lr     # annealed, not cut off
    again = train(cfg, resume=True, log=lambda m: None)
    assert again["step"] == fitted


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        train(tiny_config(tmp_path, lr=1e30, min_lr=1e29, warmup_steps=1, grad_clip=0.0), log=lambda m: None)
    weights, state = load_checkpoint(tmp_path)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_ctrl_c_saves_then_resume_finishes_like_an_uninterrupted_run(tmp_path):
    args = ["--scale", "smoke", "--max-steps", "400", "--eval-interval", "50"]
    uninterrupted = run_cli(*args, "--out-dir", str(tmp_path / "a"))
    interrupted = run_cli(*args, "--out-dir", str(tmp_path / "b"))
    deadline = time.time() + 60
    while not (tmp_path / "b" / "latest.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGINT)
    out, err = interrupted.communicate(timeout=60)
    assert uninterrupted.wait(timeout=120) == 0
    assert interrupted.returncode == 130, err
    assert "checkpoint saved" in out
    resumed = run_cli(*args, "--out-dir", str(tmp_path / "b"), "--resume")
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert read_metrics(tmp_path / "a")[-1]["val_loss"] == read_metrics(tmp_path / "b")[-1]["val_loss"]


def test_cli_errors_are_one_clear_line(tmp_path):
    proc = run_cli("--scale", "smoke", "--out-dir", str(tmp_path), "--resume")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "no checkpoint" in err and "Traceback" not in err
    proc = run_cli("--scale", "smoke", "--data", "no-such-data")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "neither a registered data set" in err


def test_ddp_two_processes_equal_one_process_with_accumulation(tmp_path):
    common = ["--scale", "smoke", "--max-steps", "6", "--eval-interval", "6", "--batch-size", "4"]
    single = run_cli(*common, "--grad-accum", "2", "--out-dir", str(tmp_path / "single"))
    assert single.wait(timeout=120) == 0, single.stderr.read()
    with socket.socket() as probe:                      # a free port for the processes to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "-m", "ch04_pretraining", *common, "--grad-accum", "1", "--out-dir", str(tmp_path / "ddp")]
    ddp = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    a = load_file(tmp_path / "single" / "ckpt-0000006.safetensors")
    b = load_file(tmp_path / "ddp" / "ckpt-0000006.safetensors")
    # The key bias adds q.b_k to every score of a row, which softmax ignores: its true gradient is 0, so
    # Adam's normalised step turns round-off noise into moves of its own. Every other weight must agree.
    for name in a:
        if name.endswith("attn.c_attn.bias"):
            width = a[name].numel() // 3
            a[name], b[name] = (torch.cat([t[:width], t[2 * width:]]) for t in (a[name], b[name]))  # q and v
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert not torch.equal(a["transformer.wte.weight"],
                           load_file(tmp_path / "single" / "ckpt-0000000.safetensors")["transformer.wte.weight"])


# ---- HellaSwag ----------------------------------------------------------------------------

def test_ending_losses_match_scoring_each_ending_alone():
    from ch04_pretraining.pretraining import ending_losses

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50, context_length=12, n_layer=1, n_head=2, n_embd=16)).eval()
    context, endings = [1, 2, 3, 4, 5, 6], [[7], [8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19]]
    totals, means = ending_losses(model, context, endings, "cpu")
    for i, ending in enumerate(endings):
        ids = torch.tensor([(context + ending)[-12:]])
        with torch.no_grad():
            logits = model(ids)[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[-len(ending):]
        assert totals[i].item() == pytest.approx(loss.sum().item(), abs=1e-5)
        assert means[i].item() == pytest.approx(loss.mean().item(), abs=1e-5)


def test_hellaswag_on_the_sample():
    from ch04_pretraining.pretraining import evaluate_hellaswag, hellaswag_rows

    rows = hellaswag_rows(fetch("hellaswag-val-sample"))
    assert len(rows) == 1000 and all(len(r["endings"]) == 4 for r in rows)
    torch.manual_seed(0)
    tokenizer = GPT2Tokenizer()
    model = GPTModel(GPTConfig(vocab_size=tokenizer.n_vocab, context_length=128, n_layer=1, n_head=2, n_embd=16))
    result = evaluate_hellaswag(model, tokenizer, rows[:40], "cpu")
    assert result["n"] == 40 and result["skipped"] == 0 and 0 <= result["acc_norm"] <= 1
    chars = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    model = GPTModel(GPTConfig(vocab_size=chars.n_vocab, context_length=512, n_layer=1, n_head=2, n_embd=16))
    result = evaluate_hellaswag(model, chars, rows[:40], "cpu")
    assert result["n"] + result["skipped"] == 40 and result["skipped"] > 0


def test_mixed_precision_branch_with_grad_scaler_runs_on_cpu(tmp_path, monkeypatch):
    """The fp16-with-GradScaler path of a T4, exercised on the CPU with bf16 autocast and a CPU scaler."""
    from ch04_pretraining import pretraining
    from shared.device import Precision

    chosen = []

    def t4_like(device):
        chosen.append(device)
        return Precision(torch.bfloat16, use_grad_scaler=True)

    monkeypatch.setattr(pretraining, "choose_precision", t4_like)
    result = train(tiny_config(tmp_path, max_steps=8), log=lambda m: None)
    rows = read_metrics(tmp_path)
    assert chosen and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert math.isfinite(result["val_loss"])

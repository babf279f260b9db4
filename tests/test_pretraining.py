import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ch01_tokenization.tokenization import BPETokenizer, CharTokenizer, TiktokenTokenizer
from ch03_gpt_model.gpt import ACTIVATION_BYTES, GPT_CONFIGS, GPTConfig, GPTModel, generate
from ch04_pretraining import data as corpora
from ch04_pretraining import pretraining
from ch04_pretraining.__main__ import parse_args, run_or_report, train_parser
from ch04_pretraining.config import (
    TrainConfig,
    activation_bytes_per_token,
    fit_micro_batch,
    model_settings,
    scale_preset,
)
from ch04_pretraining.data import BatchSampler, get_batch, load_data, tokenize_to_memmap, train_val_split
from ch04_pretraining.evaluation import (
    attention_maps,
    ending_losses,
    evaluate_hellaswag,
    hellaswag_rows,
    nats_per_character,
)
from ch04_pretraining.pretraining import (
    Muon,
    TrainingDiverged,
    configure_optimizer,
    estimate_loss,
    lr_at,
    orthogonalize,
    steps_within_budget,
    train,
)
from ch04_pretraining.runs import (
    CheckpointError,
    checkpoint_is_whole,
    checkpoint_steps,
    load_checkpoint,
    load_run,
    read_metrics,
    read_steps,
    record_checkpoint,
    run_lock,
)
from shared.config import ConfigError
from shared.data import fetch
from shared.network import free_port
from shared.timing import TickingClock

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, context_length=16)
TINY = dict(batch_size=4, max_steps=12, warmup_steps=3,
            eval_interval=4, eval_iters=2, log_interval=2, lr=3e-3, min_lr=3e-4)
QUIET = dict(log=lambda message: None, progress=False)


def tiny_config(out_dir, arch="gpt", **kw) -> TrainConfig:
    """The tiny run, with any training setting or model setting (n_layer, ...) changed by keyword."""
    settings = {f.name for f in model_settings(arch)}
    model = {**(TINY_MODEL if arch == "gpt" else TINY_LLAMA), **{k: v for k, v in kw.items() if k in settings}}
    training = {k: v for k, v in kw.items() if k not in settings}
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), "arch": arch, "model": model, **training})


TINY_LLAMA = dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=64, context_length=16, rope_theta=10000.0,
                  rope_scaling=None)


def run_cli(*args, env_extra=None, **popen):
    # MKL may sum in another order from one process to the next (its kernels depend on how buffers happen to be
    # aligned), which moves results in the last bits; "AUTO,STRICT" (conditional numerical reproducibility) fixes
    # the order, so that runs in separate processes can be compared bit for bit.
    env = {**os.environ, "MKL_CBWR": "AUTO,STRICT", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "ch04_pretraining", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


# ---- pieces -------------------------------------------------------------------------------

def test_split_is_first_90_last_10():
    train_ids, val_ids = train_val_split(list(range(100)))
    assert train_ids.tolist() == list(range(90)) and val_ids.tolist() == list(range(90, 100))


def test_lr_schedule():
    lrs = [lr_at(s, 1.0, 0.1, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))
    assert lrs[55] == pytest.approx(0.1 + 0.5 * 0.9, rel=1e-6)
    assert lrs[100] == lrs[119] == 0.1


def test_warmup_stable_decay_holds_the_peak_then_falls_linearly():
    lrs = [lr_at(s, 1.0, 0.1, 10, 100, decay_steps=20) for s in range(110)]
    assert lrs[:10] == [lr_at(s, 1.0, 0.1, 10, 100) for s in range(10)]            # the same warm-up
    assert lrs[9:81] == [1.0] * 72                                                  # held until 20 steps are left
    assert lrs[90] == pytest.approx(0.1 + 0.9 * 10 / 20) and lrs[99] == pytest.approx(0.1 + 0.9 / 20)
    assert all(a > b for a, b in zip(lrs[80:100], lrs[81:101])) and lrs[100] == lrs[109] == 0.1


def test_a_wsd_run_follows_its_schedule(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=40, eval_interval=20, log_interval=1, schedule="wsd", decay_fraction=0.25)
    result = train(cfg, **QUIET)
    logged = {row["step"]: row["lr"] for row in read_steps(tmp_path)}       # row n: the lr of step n - 1
    assert result["step"] == 40 and [logged[s] for s in (10, 21, 30)] == [3e-3] * 3
    assert [logged[s] for s in (31, 40)] == pytest.approx([lr_at(s, 3e-3, 3e-4, 3, 40, 10) for s in (30, 39)])
    assert logged[40] == pytest.approx(3e-4 + 2.7e-3 / 10) and read_metrics(tmp_path)[1]["lr"] == 3e-3


# ---- Muon ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_pytorchs_muon(shape, nesterov):
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
    theirs.data.copy_(ours.data)
    opt_ours = Muon([ours], lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    opt_theirs = torch.optim.Muon([theirs], lr=0.01, weight_decay=0.1, momentum=0.9, nesterov=nesterov,
                                  adjust_lr_fn="match_rms_adamw")
    for _ in range(5):
        ours.grad = torch.randn(shape)
        theirs.grad = ours.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.equal(opt_ours.state[ours]["momentum_buffer"], opt_theirs.state[theirs]["momentum_buffer"])


def test_orthogonalize_keeps_the_directions_and_evens_the_singular_values():
    torch.manual_seed(0)
    gradient = torch.randn(64, 8) @ torch.randn(8, 256) + 0.1 * torch.randn(64, 256)   # 8 strong directions
    before = torch.linalg.svd(gradient, full_matrices=False)
    result = orthogonalize(gradient).float()
    after = torch.linalg.svd(result, full_matrices=False)
    assert before.S[-1] / before.S[0] < 0.01                        # far from even...
    assert 0.5 < after.S.min() and after.S.max() < 1.5              # ...and now close to it
    # the strong directions are kept: along them the result is about diag(1), as U V^T is
    along = before.U[:, :8].T @ result @ before.Vh[:8].T                    # (8, 8)
    assert 0.5 < along.diagonal().min() and along.diagonal().max() < 1.5
    assert (along - torch.diag(along.diagonal())).abs().max() < 0.05
    # the part of U V^T that the weak directions make up is approximated too
    exact = before.U @ before.Vh
    assert torch.nn.functional.cosine_similarity(result.flatten(), exact.flatten(), dim=0) > 0.95


@pytest.mark.parametrize("arch, per_block", [("gpt", 4), ("llama", 7)])
def test_muon_takes_the_matrices_of_the_blocks_and_adamw_the_rest(arch, per_block):
    model = tiny_config("x", arch).build_model(65)
    optimizer = configure_optimizer(model, 1e-3, 0.1, optimizer="muon")
    matrices = optimizer.optimizers["muon"].param_groups[0]["params"]
    rest = [p for group in optimizer.optimizers["adamw"].param_groups for p in group["params"]]
    assert len(matrices) == per_block * 2 and all(p.dim() == 2 for p in matrices)
    assert {id(p) for p in matrices}.isdisjoint(id(p) for p in rest)
    assert {id(p) for p in matrices + rest} == {id(p) for p in model.parameters()}
    embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert {id(p) for p in embeddings} <= {id(p) for p in rest}
    assert all(group["lr"] == 1e-3 and group["weight_decay"] in (0.1, 0.0) for group in optimizer.param_groups)


def test_a_grad_scaler_unscales_and_steps_both_optimizers():
    torch.manual_seed(0)
    plain, scaled = (tiny_config("x").build_model(65) for _ in range(2))
    scaled.load_state_dict(plain.state_dict())
    x, y = torch.randint(0, 65, (2, 16)), torch.randint(0, 65, (2, 16))
    plain_opt, scaled_opt = (configure_optimizer(m, 1e-2, 0.1, optimizer="muon") for m in (plain, scaled))
    plain(x, y).backward()
    plain_opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)                   # a power of two: exact unscaling
    scaler.scale(scaled(x, y)).backward()
    scaler.unscale_(scaled_opt)
    scaler.step(scaled_opt)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain.parameters(), scaled.parameters()))


def test_a_muon_run_resumes_exactly_and_keeps_its_optimizer(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_config(full, optimizer="muon"), **QUIET)
    shutil.copytree(full, resumed)
    (resumed / "latest.json").write_text(json.dumps(
        {"step": 8, "weights": "ckpt-0000008.safetensors", "state": "ckpt-0000008.pt"}))
    train(tiny_config(resumed, optimizer="muon"), resume=True, **QUIET)
    assert [r["loss"] for r in read_steps(full)] == [r["loss"] for r in read_steps(resumed)]
    rows = read_metrics(full)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    final_full, final_resumed = (load_file(d / "ckpt-0000012.safetensors") for d in (full, resumed))
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    assert set(load_checkpoint(full)[1]["optimizer"]) == {"muon", "adamw"}
    with pytest.raises(ConfigError, match="optimizer: checkpoint 'muon', now 'adamw'"):
        train(tiny_config(resumed, max_steps=16), resume=True, **QUIET)


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
    tokenizer = TiktokenTokenizer("gpt2")
    text_path = fetch("tinystories-sample")
    tokens = tokenize_to_memmap(text_path, tmp_path / "sample.bin", tokenizer, chunk_bytes=500, progress=False)
    stories = [s.strip() for s in text_path.read_text().split("<|endoftext|>") if s.strip()]
    expected = [i for s in stories for i in tokenizer.encode(s) + [tokenizer.eot_token]]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    assert int((tokens == tokenizer.eot_token).sum()) == len(stories) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["sample.bin"]


def test_tinystories_tokens_go_to_the_cache_not_beside_a_read_only_text(tmp_path, monkeypatch):
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    for name in ("train", "valid"):
        shutil.copy(fetch("tinystories-sample"), mirror / f"TinyStoriesV2-GPT4-{name}.txt")
    mirror.chmod(0o555)
    monkeypatch.setenv("LLM_DATA_DIR", str(cache))
    monkeypatch.setattr(corpora, "fetch", lambda name: mirror / f"TinyStoriesV2-GPT4-{name.split('-')[1]}.txt")
    try:
        tokenizer, train_tokens, val_tokens = load_data(TrainConfig(data="tinystories", tokenizer="gpt2"))
    finally:
        mirror.chmod(0o755)
    assert sorted(p.name for p in mirror.iterdir()) == ["TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt"]
    assert len(list((cache / "tokens").glob("*.gpt2.bin"))) == 2 and len(train_tokens) == len(val_tokens) == 911


def test_micro_batch_fits_the_gpu():
    cfg = scale_preset("gpu", gpu_memory_bytes=16e9)
    assert fit_micro_batch(cfg, 16e9) == (16, 4)          # a T4
    assert fit_micro_batch(cfg, 24e9) == (32, 2)          # an L4
    assert fit_micro_batch(cfg, 80e9) == (64, 1)          # an A100 80GB
    assert fit_micro_batch(cfg, 16e9, mixed_precision=False) == (16, 4)
    xl = GPT_CONFIGS["gpt2-xl"]
    with pytest.raises(ConfigError, match="does not fit"):
        fit_micro_batch(replace(cfg, model=dict(n_layer=xl.n_layer, n_head=xl.n_head, n_embd=xl.n_embd)), 8e9)


def test_measured_activation_bytes_are_chapter_3s_for_gpt():
    """Measured on small copies of the model, the bytes per layer and token are chapter 3's figures for GPT."""
    cfg = scale_preset("gpu", gpu_memory_bytes=16e9)
    for precision, mixed in [("fp32", False), ("mixed", True)]:
        measured = activation_bytes_per_token(cfg, mixed) / cfg.model["n_embd"]
        assert measured == pytest.approx(ACTIVATION_BYTES[precision], abs=0.5)
    llama = scale_preset("gpu", "llama", gpu_memory_bytes=16e9)
    assert activation_bytes_per_token(llama, False) > activation_bytes_per_token(cfg, False)   # SwiGLU is wider


def test_gpu_preset_is_what_a_gpu_user_expects():
    cfg = scale_preset("gpu", gpu_memory_bytes=16e9)
    assert cfg.data == "fineweb-edu" and cfg.data_files == 2 and cfg.tokenizer == "gpt2" and cfg.time_budget_min == 60
    assert cfg.batch_size * cfg.grad_accum == 64 and cfg.compile and cfg.vocab_multiple == 64
    model_cfg = cfg.model_config(50257)
    assert model_cfg.vocab_size == 50304
    with torch.device("meta"):
        model = GPTModel(model_cfg)
    assert model.num_parameters() == 124_439_808 + 47 * 768


def test_cli_flags_override_the_preset_and_every_flag_says_what_it_does():
    cfg, resume, overwrite = parse_args(["--scale", "smoke", "--n-layer", "3", "--lr", "0.01", "--no-bias"])
    assert cfg.model["n_layer"] == 3 and cfg.lr == 0.01 and cfg.model["bias"] is False
    assert set(cfg.model) == {f.name for f in model_settings("gpt")}          # written out in full
    assert not resume and not overwrite and cfg.model["n_embd"] == scale_preset("smoke").model["n_embd"]
    cfg, _, _ = parse_args(["--init-std", "0.02", "--no-tie-embeddings"])
    model_cfg = cfg.model_config(65)
    assert model_cfg.weight_std == 0.02 and model_cfg.tie_embeddings is False
    assert parse_args([])[0].model_config(65).weight_std == pytest.approx(0.02 * math.sqrt(768 / 128))
    for action in train_parser()._actions:
        if action.dest != "help":
            assert action.help and (action.dest in ("resume", "overwrite") or "(default:" in action.help), action.dest
    with pytest.raises(SystemExit):
        parse_args(["--min-lr", "1", "--lr", "0.1"])
    with pytest.raises(SystemExit):
        parse_args(["--resume", "--overwrite"])


# ---- settings that cannot work --------------------------------------------------------------

@pytest.mark.parametrize("field, value, match", [
    ("grad_clip", -1.0, "grad_clip: must be a number >= 0"),
    ("weight_decay", -0.1, "weight_decay: must be a number >= 0"),
    ("warmup_steps", -1, "warmup_steps: must be an integer >= 0"),
    ("sample_tokens", -5, "sample_tokens: must be an integer >= 0"),
    ("time_budget_min", -1.0, "time_budget_min: must be a number >= 0"),
    ("lr", 0.0, "lr: must be a positive number"),
    ("lr", float("nan"), "lr: must be a positive number"),
    ("min_lr", 1.0, r"min_lr: \(1.0\) must not exceed lr"),
    ("schedule", "linear", "schedule: must be cosine or wsd"),
    ("optimizer", "sgd", "optimizer: must be adamw or muon"),
    ("parallel", "zero", "parallel: must be ddp or fsdp"),
    ("decay_fraction", 0.0, r"decay_fraction: must be in \(0, 1\]"),
    ("model", dict(dropout=1.0), r"dropout: must be in \[0, 1\)"),
    ("beta2", 1.0, "beta2"),
    ("model", dict(n_embd=128, n_head=3), r"n_head: n_embd \(128\) must be divisible by n_head \(3\)"),
    ("model", dict(n_layers=4), "n_layers: is not a setting of the gpt model"),
    ("arch", "mamba", "arch: must be one of gpt, llama"),
    ("batch_size", 0, "batch_size: must be a positive integer"),
    ("device", "gpu", "device: must be auto, cpu, cuda or mps"),
])
def test_bad_settings_are_refused_naming_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match) as info:
        TrainConfig(**{field: value})
    assert info.value.field == (match.split(":")[0] if field == "model" else field)


def test_the_command_line_reports_mistakes_in_one_line_and_bugs_with_their_traceback(capsys):
    def mistake():
        raise ConfigError("lr", "must be a positive number, got 0")

    def bug():
        raise ValueError("operands could not be broadcast together")

    assert run_or_report(mistake) is None
    assert capsys.readouterr().err == "error: --lr: must be a positive number, got 0\n"
    with pytest.raises(ValueError, match="could not be broadcast"):
        run_or_report(bug)


def test_bad_data_is_named_in_the_callers_terms(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def" * 100)
    (tmp_path / "short.txt").write_text("A few words only.\n")
    for name, match in [("empty.txt", "is empty"), ("weights.bin", "is not UTF-8 text"),
                        ("nul.txt", "holds NUL bytes"), ("short.txt", "too short for validation windows"),
                        ("missing.txt", "neither a registered data set")]:
        with pytest.raises(ConfigError, match=match) as info:
            train(tiny_config(tmp_path / f"run-{name}", data=str(tmp_path / name)), **QUIET)
        assert info.value.field == "data" and "--" not in info.value.message
    proc = run_cli("--scale", "smoke", "--data", str(tmp_path / "weights.bin"), "--out-dir", str(tmp_path / "cli"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.startswith("error: --data: ") and "Traceback" not in err


def test_data_that_cannot_be_had_offline_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from ch04_pretraining.__main__ import main
    from shared import data

    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    gone = data.DataFile("gone", "gone.txt", ((tmp_path / "nowhere.txt").as_uri(),), "0" * 64)
    monkeypatch.setitem(data.REGISTRY, "gone", gone)
    assert main(["--scale", "smoke", "--data", "gone", "--out-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: could not get data file 'gone'") and "Place gone.txt in" in err


def test_a_chapter_1_tokenizer_file_trains_and_is_kept_with_the_run(tmp_path):
    text = fetch("tinyshakespeare").read_text()[:200_000]
    (tmp_path / "text.txt").write_text(text)
    BPETokenizer().train(text, 300).save(tmp_path / "bpe.json")
    cfg = tiny_config(tmp_path / "run", data=str(tmp_path / "text.txt"), tokenizer=str(tmp_path / "bpe.json"))
    result = train(cfg, **QUIET)
    assert result["tokenizer"].n_vocab == 300 and isinstance(load_run(tmp_path / "run")[1], BPETokenizer)
    with pytest.raises(ConfigError, match="tokenizer: .*is not a tokenizer"):
        train(tiny_config(tmp_path / "run2", tokenizer=str(tmp_path / "text.txt")), **QUIET)


# ---- training -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_training_learns_and_logs_evaluations_and_steps(tmp_path, arch):
    result = train(tiny_config(tmp_path, arch, max_steps=40, eval_interval=20), **QUIET)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 20, 40]
    assert set(rows[0]) >= {"step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"}
    assert rows[0]["train_loss"] == pytest.approx(math.log(65), abs=0.3)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    # Tiny Shakespeare is ASCII, one byte per character and token: bits per byte are nats per token over ln 2
    assert all(r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2)) for r in rows)
    steps = read_steps(tmp_path)
    assert [r["step"] for r in steps] == list(range(2, 41, 2))
    assert all(r["grad_norm"] > 0 and r["step_s"] > 0 and r["loss"] > 0 for r in steps)
    assert steps[0]["lr"] == pytest.approx(lr_at(1, 3e-3, 3e-4, 3, 40))
    assert result["step"] == 40 and result["best_step"] == 40 and result["stopped_by"] is None


def test_the_run_ends_with_a_summary_and_a_progress_bar(tmp_path, capsys):
    lines = []
    train(tiny_config(tmp_path), log=lines.append)
    summary = lines[-1]
    assert "finished 12 steps" in summary and "best" in summary
    assert f"checkpoint: {tmp_path / 'ckpt-0000012.safetensors'}" in summary
    assert f"python -m ch04_pretraining sample --out-dir {tmp_path}" in summary
    bar = capsys.readouterr().err
    assert "12/12" in bar and "step/s" in bar


@pytest.mark.parametrize("arch, tie_embeddings", [("gpt", True), ("gpt", False), ("llama", True), ("llama", False)])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, arch, tie_embeddings):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_config(full, arch, tie_embeddings=tie_embeddings), **QUIET)
    # a run that stopped after step 8: its last checkpoint is the one at step 8
    shutil.copytree(full, resumed)
    (resumed / "latest.json").write_text(json.dumps(
        {"step": 8, "weights": "ckpt-0000008.safetensors", "state": "ckpt-0000008.pt"}))
    train(tiny_config(resumed, arch, tie_embeddings=tie_embeddings), resume=True, **QUIET)
    for a, b in zip(read_metrics(full), read_metrics(resumed), strict=True):
        assert (a["step"], a["train_loss"], a["val_loss"]) == (b["step"], b["train_loss"], b["val_loss"])
    assert [r["loss"] for r in read_steps(full)] == [r["loss"] for r in read_steps(resumed)]
    final_full = load_file(full / "ckpt-0000012.safetensors")
    final_resumed = load_file(resumed / "ckpt-0000012.safetensors")
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)
    assert ("lm_head.weight" in final_full) is not tie_embeddings      # a tied head is stored once


def test_a_llama_run_keeps_transformers_names_and_refuses_another_architecture(tmp_path):
    result = train(tiny_config(tmp_path, "llama", max_steps=4), **QUIET)
    weights, state = load_checkpoint(tmp_path)
    assert "model.layers.0.self_attn.k_proj.weight" in weights and "lm_head.weight" not in weights
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)        # one kv head of 16
    model, _, _ = load_run(tmp_path)
    assert type(model).__name__ == "LlamaModel" and model.cfg == result["model"].cfg
    with pytest.raises(ConfigError, match="arch: checkpoint 'llama', now 'gpt'"):
        load_checkpoint(tmp_path, tiny_config(tmp_path))
    with pytest.raises(ConfigError, match="n_kv_head: checkpoint 1, now 2"):
        load_checkpoint(tmp_path, tiny_config(tmp_path, "llama", n_kv_head=2))


def test_cli_flags_come_from_the_architectures_config(tmp_path):
    llama_flags = {action.dest for action in train_parser("llama")._actions}
    gpt_flags = {action.dest for action in train_parser("gpt")._actions}
    assert {"n_kv_head", "ffn_hidden", "rope_theta"} <= llama_flags - gpt_flags
    assert {"bias", "dropout"} <= gpt_flags - llama_flags and "vocab_size" not in gpt_flags | llama_flags
    cfg, _, _ = parse_args(["--arch", "llama", "--scale", "smoke", "--n-kv-head", "2", "--rope-theta", "500000"])
    assert cfg.arch == "llama" and cfg.model["n_kv_head"] == 2 and cfg.model_config(65).rope_theta == 500000
    # a shape that cannot work is refused before any data is read: the missing file is never looked at
    proc = run_cli("--arch", "llama", "--n-kv-head", "3", "--data", str(tmp_path / "missing.txt"),
                   "--out-dir", str(tmp_path / "run"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--n-kv-head: must divide n_head (4), got 3" in err and "missing" not in err
    assert not (tmp_path / "run").exists()


def test_the_hybrid_of_chapter_6_trains_and_has_its_own_flags(tmp_path):
    result = train(tiny_config(tmp_path, "hybrid", norm="layer", positions="learned", mlp="gelu", ffn_hidden=128,
                               max_steps=20, eval_interval=20), **QUIET)
    rows = read_metrics(tmp_path)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.3 and type(result["model"]).__name__ == "HybridModel"
    assert {"norm", "positions", "mlp"} <= {action.dest for action in train_parser("hybrid")._actions}
    cfg, _, _ = parse_args(["--arch", "hybrid", "--scale", "smoke", "--norm", "layer"])
    assert cfg.model["norm"] == "layer" and cfg.model["n_kv_head"] == scale_preset("smoke", "llama").model["n_kv_head"]


def test_cli_fits_the_gpu_batch_to_the_model_after_the_flags():
    default, _, _ = parse_args(["--scale", "gpu"])
    wide, _, _ = parse_args(["--scale", "gpu", "--n-embd", "1536", "--n-head", "16"])
    assert default.batch_size * default.grad_accum == wide.batch_size * wide.grad_accum == 64
    assert wide.batch_size < default.batch_size
    given, _, _ = parse_args(["--scale", "gpu", "--n-embd", "1536", "--n-head", "16", "--batch-size", "8"])
    assert given.batch_size == 8                                     # a batch size given by hand is kept
    llama, _, _ = parse_args(["--scale", "gpu", "--arch", "llama"])
    assert llama.arch == "llama" and llama.model["n_embd"] == 768 and llama.out_dir == "runs/llama-fineweb-edu"


def test_resume_on_the_command_line_takes_the_saved_architecture(tmp_path):
    train(tiny_config(tmp_path, "llama", max_steps=4), **QUIET)
    cfg, resume, _ = parse_args(["--out-dir", str(tmp_path), "--resume", "--max-steps", "8"])
    assert resume and cfg.arch == "llama" and cfg.model == tiny_config(tmp_path, "llama").model
    assert cfg.max_steps == 8


def test_presets_give_both_architectures_about_the_same_size():
    for scale in ("smoke", "cpu", "gpu"):
        sizes = {}
        for arch in ("gpt", "llama"):
            cfg = scale_preset(scale, arch, gpu_memory_bytes=16e9)
            with torch.device("meta"):
                sizes[arch] = sum(p.numel() for p in cfg.build_model(50257 if scale == "gpu" else 65).parameters())
        assert abs(sizes["llama"] / sizes["gpt"] - 1) < 0.1, (scale, sizes)


def test_checkpoints_are_safetensors_and_safe_to_load(tmp_path):
    train(tiny_config(tmp_path), **QUIET)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-0000008.pt", "ckpt-0000008.safetensors", "ckpt-0000012.pt", "ckpt-0000012.safetensors",
                     "config.json", "latest.json", "metrics.jsonl", "steps.jsonl", "tokenizer.json"]
    weights, state = load_checkpoint(tmp_path)
    assert state["step"] == 12 and "transformer.wte.weight" in weights
    with pytest.raises(ConfigError, match="n_embd: checkpoint 32, now 64"):
        load_checkpoint(tmp_path, tiny_config(tmp_path, n_embd=64))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_checkpoints_from_before_a_config_field_existed_still_load(tmp_path):
    train(tiny_config(tmp_path, max_steps=4), **QUIET)
    state_file = tmp_path / json.loads((tmp_path / "latest.json").read_text())["state"]
    state = torch.load(state_file, weights_only=True)
    # the layout of a run from before `arch`: the GPT's settings among the training settings, init_std 0 for
    # "the default", and no tie_embeddings (older still)
    config = {**state["config"], **state["config"].pop("model"), "init_std": 0.0}
    del config["arch"], config["tie_embeddings"]
    state["config"] = config
    torch.save(state, state_file)
    load_checkpoint(tmp_path, tiny_config(tmp_path))
    model = load_run(tmp_path)[0]
    assert model.cfg.tie_embeddings and model.cfg.init_std is None and model.cfg.n_embd == 32
    old = TrainConfig.from_dict({**config, "a_field_of_the_future": 1})
    assert old.model == TrainConfig(model=TINY_MODEL).model          # every setting, the missing ones defaulted
    with pytest.raises(ConfigError, match="tie_embeddings: checkpoint True, now False"):
        load_checkpoint(tmp_path, tiny_config(tmp_path, tie_embeddings=False))


def test_steps_within_budget():
    # 1 s per step, evaluations of 10 s every 100 steps: 1.1 s per step; 95 % of 1,000 s minus the last evaluation
    assert steps_within_budget(40, 1.0, 1000, 10, 100, 5000) == 40 + int((950 - 10) / 1.1)
    assert steps_within_budget(40, 0.01, 1000, 10, 100, 5000) == 5000            # never longer than planned
    assert steps_within_budget(40, 100.0, 50, 10, 100, 5000) == 41               # never before the next step


def test_time_budget_fits_the_schedule_and_resume_keeps_it(tmp_path):
    lines = []
    cfg = tiny_config(tmp_path, max_steps=1_000_000, eval_interval=100_000, time_budget_min=0.05)
    result = train(cfg, log=lines.append, progress=False, clock=TickingClock(0.005))
    saved = load_checkpoint(tmp_path)[1]["config"]
    fitted = saved["max_steps"]
    assert 40 < fitted < 1_000_000 and any("fitted to the time budget" in line for line in lines)
    assert saved["warmup_steps"] == max(1, round(cfg.warmup_steps * fitted / 1_000_000))   # its share kept
    last = read_metrics(tmp_path)[-1]
    assert result["step"] == last["step"] == result["max_steps"] == fitted and last["lr"] == cfg.min_lr
    assert result["stopped_by"] is None
    again = train(cfg, resume=True, progress=False, log=lambda m: None, clock=TickingClock(0.005))
    assert again["step"] == fitted


def test_a_warm_up_longer_than_the_fitted_run_shrinks_with_it(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=10_000, warmup_steps=2_000, eval_interval=100_000, time_budget_min=0.05)
    result = train(cfg, log=lambda m: None, progress=False, clock=TickingClock(0.005))
    saved = load_checkpoint(tmp_path)[1]["config"]
    assert saved["warmup_steps"] == round(2_000 * result["max_steps"] / 10_000) < result["max_steps"]
    rows = read_metrics(tmp_path)
    assert rows[-1]["lr"] == cfg.min_lr                               # it warmed up, then decayed to the end
    again = train(cfg, resume=True, progress=False, log=lambda m: None, clock=TickingClock(0.005))
    assert again["step"] == result["max_steps"]                       # the resumed run keeps the fitted schedule


def test_what_one_process_must_do_runs_once_on_the_main_process_before_setup(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = tiny_config(tmp_path, max_steps=2, eval_interval=2)
    data = pretraining.load_data(dataclasses.replace(cfg, data="tinyshakespeare"))

    def setup(cfg):
        calls.append("setup")
        return cfg, cfg.build_model(data[0].n_vocab), data[0], pretraining.TokenWindows(data[1], data[2], cfg)

    pretraining.run_training(cfg, setup, log=lambda m: None, progress=False,
                             prepare=lambda cfg: calls.append("prepare"))
    assert calls == ["prepare", "setup"]        # under torchrun (one process here): prepared once, then set up


def test_the_clock_stops_a_run_whose_schedule_was_too_hopeful(tmp_path, monkeypatch):
    monkeypatch.setattr(pretraining, "steps_within_budget", lambda *args: 1_000_000)    # a wildly hopeful fit
    cfg = tiny_config(tmp_path, max_steps=1_000_000, eval_interval=100_000, time_budget_min=0.01)
    result = train(cfg, progress=False, log=lambda m: None, clock=TickingClock(0.01))
    assert result["stopped_by"] == "time budget" and 10 < result["step"] < 1_000_000
    assert load_checkpoint(tmp_path)[1]["step"] == result["step"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match="last good checkpoint is step 0"):
        train(tiny_config(tmp_path, lr=1e30, min_lr=1e29, warmup_steps=1, grad_clip=0.0), **QUIET)
    weights, state = load_checkpoint(tmp_path)
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_divergence_first_seen_at_an_evaluation_saves_nothing(tmp_path, monkeypatch):
    real = pretraining.estimate_loss
    calls = []

    def diverging(*args, **kwargs):
        calls.append(1)
        losses = real(*args, **kwargs)
        return {k: math.nan for k in losses} if len(calls) == 3 else losses       # the evaluation of step 8

    monkeypatch.setattr(pretraining, "estimate_loss", diverging)
    with pytest.raises(TrainingDiverged, match="evaluation at step 8.*last good checkpoint is step 4"):
        train(tiny_config(tmp_path), **QUIET)
    assert load_checkpoint(tmp_path)[1]["step"] == 4
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 4]
    monkeypatch.setattr(pretraining, "estimate_loss", real)
    assert train(tiny_config(tmp_path), resume=True, **QUIET)["step"] == 12


# ---- one run per folder ----------------------------------------------------------------------

def test_a_new_run_refuses_a_folder_that_holds_another(tmp_path):
    train(tiny_config(tmp_path, max_steps=40, eval_interval=20), **QUIET)
    with pytest.raises(ConfigError, match="already holds a run with checkpoints up to step 40") as info:
        train(tiny_config(tmp_path, max_steps=12), **QUIET)
    assert info.value.field == "out_dir"
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 20, 40]          # nothing of the old run was lost
    (tmp_path / "notes.txt").write_text("mine")
    train(tiny_config(tmp_path, max_steps=12), overwrite=True, **QUIET)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 4, 8, 12]
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.safetensors")) == ["ckpt-0000008.safetensors",
                                                                             "ckpt-0000012.safetensors"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert train(tiny_config(tmp_path, max_steps=16), resume=True, **QUIET)["step"] == 16
    with pytest.raises(ConfigError, match="no checkpoint in .* to resume from"):
        train(tiny_config(tmp_path / "fresh"), resume=True, **QUIET)


def test_rotation_keeps_the_newest_checkpoints_before_the_current_step(tmp_path):
    train(tiny_config(tmp_path, max_steps=20), **QUIET)
    (tmp_path / "latest.json").write_text(json.dumps({"step": 16, "weights": "x", "state": "y"}))
    for step in (8, 12):                                   # the folder as a run that stopped at step 8 would have it
        for suffix in (".safetensors", ".pt"):
            shutil.copy(tmp_path / f"ckpt-0000016{suffix}", tmp_path / f"ckpt-{step:07d}{suffix}")
    pretraining.save_checkpoint(tmp_path, *_model_and_optimizer(), 12, tiny_config(tmp_path), _sampler())
    kept = sorted(p.name for p in tmp_path.glob("ckpt-*.safetensors"))
    assert kept == ["ckpt-0000008.safetensors", "ckpt-0000012.safetensors", "ckpt-0000016.safetensors",
                    "ckpt-0000020.safetensors"]


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


@pytest.mark.parametrize("damage", [
    lambda run: _cut_short(run / "ckpt-0000020.safetensors"),
    lambda run: _cut_short(run / "ckpt-0000020.pt"),
    lambda run: (run / "ckpt-0000020.pt").unlink(),
    lambda run: ((run / "ckpt-0000020.safetensors").unlink(), (run / "ckpt-0000020.dcp").mkdir()),  # no index
], ids=["weights cut short", "state cut short", "state missing", "shards without their index"])
def test_rotation_never_keeps_a_damaged_checkpoint_in_place_of_a_whole_one(tmp_path, damage):
    train(tiny_config(tmp_path, max_steps=20), **QUIET)
    damage(tmp_path)
    assert not checkpoint_is_whole(tmp_path, 20) and checkpoint_is_whole(tmp_path, 16)
    pretraining.save_checkpoint(tmp_path, *_model_and_optimizer(), 24, tiny_config(tmp_path), _sampler())
    assert sorted(checkpoint_steps(tmp_path)) == [16, 24]       # the whole one before stays
    _cut_short(tmp_path / "ckpt-0000024.safetensors")
    with pytest.warns(UserWarning, match="step 24 .* unreadable"):
        assert load_checkpoint(tmp_path)[1]["step"] == 16


@pytest.mark.parametrize("sharded", [False, True], ids=["weights file", "folder of shards"])
def test_weights_whose_state_was_never_written_are_removed(tmp_path, monkeypatch, sharded):
    train(tiny_config(tmp_path, max_steps=4), **QUIET)
    weights = tmp_path / ("ckpt-0000008.dcp" if sharded else "ckpt-0000008.safetensors")
    if sharded:
        weights.mkdir()
        (weights / ".metadata").write_bytes(b"shards' index")
    else:
        weights.write_bytes(b"weights")

    def interrupted(*args, **kwargs):                     # Ctrl-C while the training state is written
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        record_checkpoint(tmp_path, 8, tiny_config(tmp_path), _sampler(), None, weights, keep=2)
    assert not weights.exists() and sorted(checkpoint_steps(tmp_path)) == [0, 4]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 4


def _model_and_optimizer():
    model = GPTModel(tiny_config("x").model_config(65))
    return model, configure_optimizer(model, 1e-3, 0.1)


def _sampler():
    return BatchSampler(np.arange(100), 16, seed=0)


def test_two_runs_cannot_share_a_folder(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(ConfigError, match=f"in use by another run \\(process {os.getpid()}"):
        train(tiny_config(tmp_path), **QUIET)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout)}))
    train(tiny_config(tmp_path), **QUIET)                                         # a stale lock is taken over
    assert not (tmp_path / ".lock").exists()
    with run_lock(tmp_path):
        proc = run_cli("--scale", "smoke", "--out-dir", str(tmp_path), "--resume")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.startswith("error: --out-dir: ") and "in use by another run" in err
    with pytest.raises(TrainingDiverged):
        train(tiny_config(tmp_path / "diverges", lr=1e30, min_lr=1e29, warmup_steps=1, grad_clip=0.0), **QUIET)
    assert not (tmp_path / "diverges" / ".lock").exists()                         # released on errors too


# ---- reading back what a run wrote ---------------------------------------------------------

def test_a_checkpoint_written_on_a_gpu_loads_on_a_cpu(tmp_path):
    """Storages saved as 'cuda:0' (faked by a location tagger) must come back to the CPU."""
    train(tiny_config(tmp_path, max_steps=4), **QUIET)
    state_file = tmp_path / "ckpt-0000004.pt"
    state = torch.load(state_file, weights_only=True)
    entry = (1, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda storage, location: None)
    torch.serialization._package_registry.append(entry)
    torch.serialization._package_registry.sort(key=lambda registered: registered[0])
    try:
        torch.save(state, state_file)
    finally:
        torch.serialization._package_registry.remove(entry)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(state_file, weights_only=True)                  # what a CPU-only machine saw before
    assert load_checkpoint(tmp_path)[1]["step"] == 4
    assert train(tiny_config(tmp_path, max_steps=8), resume=True, **QUIET)["step"] == 8


def test_resume_refuses_data_whose_tokenizer_changed(tmp_path):
    text = fetch("tinyshakespeare").read_text()[:100_000]
    (tmp_path / "text.txt").write_text(text)
    train(tiny_config(tmp_path / "run", data=str(tmp_path / "text.txt")), **QUIET)
    (tmp_path / "text.txt").write_text(text + "zebra café")
    with pytest.raises(ConfigError, match=r"tokenizer differs .*only in the data now: \['é'\]") as info:
        train(tiny_config(tmp_path / "run", data=str(tmp_path / "text.txt"), max_steps=16), resume=True, **QUIET)
    assert info.value.field == "data"


def test_a_bad_metrics_line_does_not_block_resume(tmp_path):
    train(tiny_config(tmp_path), **QUIET)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "train_lo')                   # the half line a killed run leaves
    (tmp_path / "latest.json").write_text(json.dumps({"step": 8, "weights": "x", "state": "y"}))
    with pytest.warns(UserWarning, match=r"metrics.jsonl, line 5: skipped"):
        train(tiny_config(tmp_path), resume=True, **QUIET)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 4, 8, 12]


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(tmp_path):
    train(tiny_config(tmp_path), **QUIET)
    newest = tmp_path / "ckpt-0000012.pt"
    newest.write_bytes(newest.read_bytes()[:1000])                # truncated, as by a full disk
    with pytest.warns(UserWarning, match="step 12 .* is unreadable"):
        assert load_checkpoint(tmp_path)[1]["step"] == 8
    with pytest.warns(UserWarning):
        assert train(tiny_config(tmp_path, max_steps=16), resume=True, **QUIET)["step"] == 16
    for path in tmp_path.glob("ckpt-*.safetensors"):
        path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError,
                                                  match="(?s)no readable checkpoint.*ckpt-0000016.pt: "):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("pointer", ['{"step": "8"}', '{"step": null}', '{"step": "../elsewhere"}', '{"step": true}',
                                     '{"step": 99}', '[8]', 'not json'])
def test_a_broken_latest_json_falls_back_to_the_files(tmp_path, pointer):
    train(tiny_config(tmp_path), **QUIET)
    (tmp_path / "latest.json").write_text(pointer)
    assert load_checkpoint(tmp_path)[1]["step"] == 12                  # the newest checkpoint on disk


@pytest.mark.parametrize("config", ["not json", "[1, 2]", None])
def test_a_resume_whose_config_json_is_broken_or_gone_takes_the_checkpoints_settings(tmp_path, config):
    train(tiny_config(tmp_path, n_layer=1), **QUIET)
    if config is None:
        (tmp_path / "config.json").unlink()
    else:
        (tmp_path / "config.json").write_text(config)
    with pytest.warns(UserWarning, match="config.json cannot be read .*checkpoint of step 12"):
        cfg, resume, _ = parse_args(["--out-dir", str(tmp_path), "--resume", "--max-steps", "14"])
    assert resume and cfg.model["n_layer"] == 1 and cfg.max_steps == 14


def test_a_bad_saved_setting_a_file_for_a_folder_and_another_chapters_run_are_one_line_each(tmp_path, capsys):
    train(tiny_config(tmp_path / "run"), **QUIET)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, "lr": -1}))
    with pytest.raises(SystemExit):
        parse_args(["--out-dir", str(tmp_path / "run"), "--resume"])
    assert "the settings saved in" in capsys.readouterr().err
    (tmp_path / "run" / "config.json").write_text(json.dumps({**saved, "task": "instruct"}))
    with pytest.raises(SystemExit):
        parse_args(["--out-dir", str(tmp_path / "run"), "--resume"])
    assert "is a chapter 5 instruct run: resume it with python -m ch05_finetuning instruct" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="file is a file, not a folder"):
        train(tiny_config(tmp_path / "file"), **QUIET)
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    from ch05_finetuning.__main__ import parse_args as finetune_args
    with pytest.raises(SystemExit):
        finetune_args(["classify", "--out-dir", str(tmp_path / "run"), "--resume"])
    assert "is a chapter 4 pretraining run, not a classify run" in capsys.readouterr().err


def test_load_run_and_the_sample_command(tmp_path):
    train(tiny_config(tmp_path), **QUIET)
    model, tokenizer, state = load_run(tmp_path)
    assert state["step"] == 12 and isinstance(tokenizer, CharTokenizer) and not model.training
    proc = run_cli("sample", "--out-dir", str(tmp_path), "--prompt", "ROMEO:", "--max-new-tokens", "30",
                   "--num-samples", "2", "--top-k", "5")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    samples = out.split("--- sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("ROMEO:") for s in samples)
    for args, message in [(["--prompt", "café"], "'é' is not in this tokenizer's vocabulary"),
                          (["--top-k", "0"], "--top-k must be at least 1")]:
        proc = run_cli("sample", "--out-dir", str(tmp_path), *args)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and message in err and "Traceback" not in err
    proc = run_cli("sample", "--out-dir", str(tmp_path / "nothing"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "no checkpoint" in err


def test_a_padded_vocabulary_never_samples_an_id_the_tokenizer_lacks(tmp_path):
    lines = []
    train(tiny_config(tmp_path, vocab_multiple=64, sample_tokens=200), log=lines.append, progress=False)
    model, tokenizer, _ = load_run(tmp_path)
    assert model.cfg.vocab_size == 128 and tokenizer.n_vocab == 65
    assert sum(line.startswith("  sample: ") for line in lines) == 4
    out = generate(model, torch.zeros(32, 1, dtype=torch.long), 50, temperature=5.0, vocab_size=tokenizer.n_vocab,
                   generator=torch.Generator().manual_seed(0))
    assert out.max() < 65


# ---- signals, processes, precision ----------------------------------------------------------

@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_saves_then_resume_finishes_like_an_uninterrupted_run(tmp_path, stop_signal):
    args = ["--scale", "smoke", "--max-steps", "400", "--eval-interval", "50"]
    uninterrupted = run_cli(*args, "--out-dir", str(tmp_path / "a"))
    interrupted = run_cli(*args, "--out-dir", str(tmp_path / "b"))
    wait_for(tmp_path / "b" / "latest.json")
    interrupted.send_signal(stop_signal)
    out, err = interrupted.communicate(timeout=60)
    assert uninterrupted.wait(timeout=120) == 0
    assert interrupted.returncode == 130, err
    assert "stopped at step" in out and f"({stop_signal.name})" in out and "--resume" in out
    resumed = run_cli("--out-dir", str(tmp_path / "b"), "--resume")                # its own settings, from config.json
    assert resumed.wait(timeout=120) == 0, resumed.stderr.read()
    assert read_metrics(tmp_path / "a")[-1]["val_loss"] == read_metrics(tmp_path / "b")[-1]["val_loss"]


def torchrun(*args, port=None):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={port or free_port()}", "-m", "ch04_pretraining", *args]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_equal_one_process_with_accumulation(tmp_path, optimizer):
    # the rule: each process takes batch_size * grad_accum sequences a step, so 2 processes with grad_accum 1
    # take the global batch of 1 process with grad_accum 2; the data is tokenised by rank 0 alone, first
    common = ["--scale", "smoke", "--max-steps", "6", "--eval-interval", "6", "--batch-size", "4",
              "--optimizer", optimizer]
    single = run_cli(*common, "--grad-accum", "2", "--out-dir", str(tmp_path / "single"))
    assert single.wait(timeout=120) == 0, single.stderr.read()
    ddp = subprocess.run(torchrun(*common, "--grad-accum", "1", "--out-dir", str(tmp_path / "ddp")), cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-8000:]
    a = load_file(tmp_path / "single" / "ckpt-0000006.safetensors")
    b = load_file(tmp_path / "ddp" / "ckpt-0000006.safetensors")
    drop_key_bias(a, b)
    start = load_file(tmp_path / "single" / "ckpt-0000000.safetensors")
    # Muon orthogonalises in bfloat16, where a last-bit difference in a summed gradient can round the other way:
    # its matrices must agree to within 3% of how far they moved (in norm), everything else to round-off
    muon = {name for name in a if optimizer == "muon" and ".h." in name and a[name].dim() == 2}
    for name in a:
        if name in muon:
            assert (a[name] - b[name]).norm() < 0.03 * (a[name] - start[name]).norm(), name
        else:
            assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert len(muon) == (8 if optimizer == "muon" else 0)
    assert not torch.equal(a["transformer.wte.weight"], start["transformer.wte.weight"])


def drop_key_bias(*weights: dict) -> None:
    """The key bias adds q.b_k to every score of a row, which softmax ignores: its true gradient is 0, so
    Adam's normalised step turns round-off noise into moves of its own. Compare the queries' and values'."""
    for name in weights[0]:
        if name.endswith("attn.c_attn.bias"):
            width = weights[0][name].numel() // 3
            for w in weights:
                w[name] = torch.cat([w[name][:width], w[name][2 * width:]])


def test_fsdp_two_processes_equal_one_process_and_resume_from_their_shards(tmp_path):
    common = ["--scale", "smoke", "--max-steps", "6", "--eval-interval", "3", "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = run_cli(*common, "--grad-accum", "2", "--out-dir", str(tmp_path / "single"))
    assert single.wait(timeout=120) == 0, single.stderr.read()
    sharded = ["--grad-accum", "1", "--parallel", "fsdp", "--out-dir", str(tmp_path / "fsdp")]
    fsdp = subprocess.run(torchrun(*common, *sharded), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert fsdp.returncode == 0, fsdp.stderr[-8000:]
    shards = tmp_path / "fsdp" / "ckpt-0000006.dcp"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not list(tmp_path.glob("fsdp/*.safetensors")) and f"checkpoint: {shards}" in fsdp.stdout
    a = load_file(tmp_path / "single" / "ckpt-0000006.safetensors")
    b, state = load_checkpoint(tmp_path / "fsdp")                      # read whole, in this one process
    assert state["step"] == 6 and state["optimizer"] is None and set(a) <= set(b)
    whole = dict(b)
    drop_key_bias(a, b)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name

    # resumed from its sharded checkpoint of step 3 (each process reading its shards, optimizer state included)
    shutil.copytree(tmp_path / "fsdp", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "ckpt-0000006.dcp")
    (tmp_path / "resumed" / "ckpt-0000006.pt").unlink()
    resumed = subprocess.run(torchrun("--out-dir", str(tmp_path / "resumed"), "--resume"), cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0 and "resumed from step 3" in resumed.stdout, resumed.stderr[-8000:]
    c = load_checkpoint(tmp_path / "resumed")[0]
    assert all(torch.equal(whole[name], c[name]) for name in whole)             # bit for bit where it would have been

    # a sharded checkpoint whose index was never written is passed over for the one before
    (tmp_path / "resumed" / "ckpt-0000006.dcp" / ".metadata").unlink()
    with pytest.warns(UserWarning, match="checkpoint of step 6 .* unreadable"):
        assert load_checkpoint(tmp_path / "resumed", sharded=True)[1]["step"] == 3
    # and a sharded run is resumed only as one
    plain = run_cli("--out-dir", str(tmp_path / "resumed"), "--resume")
    assert plain.wait(timeout=120) == 1 and "fsdp shards the model across torchrun's processes" in plain.stderr.read()


def test_fsdp_needs_torchrun_and_adamw(tmp_path):
    with pytest.raises(ConfigError, match="parallel: fsdp splits every matrix"):
        tiny_config(tmp_path, parallel="fsdp", optimizer="muon")
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node=N") as info:
        train(tiny_config(tmp_path, parallel="fsdp"), **QUIET)
    assert info.value.field == "parallel" and not (tmp_path / "config.json").exists()


def test_overwriting_a_run_removes_its_sharded_checkpoints_and_only_its_files(tmp_path):
    (tmp_path / "ckpt-0000004.dcp").mkdir()
    (tmp_path / "ckpt-0000004.dcp" / "__0_0.distcp").write_bytes(b"shards")
    (tmp_path / "ckpt-0000008.dcp.partial").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="checkpoints up to step 4"):
        pretraining.prepare_run_dir(tmp_path, resume=False)
    pretraining.prepare_run_dir(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_ctrl_c_under_torchrun_saves_a_checkpoint_and_no_rank_crashes(tmp_path):
    out_dir = tmp_path / "ddp"
    proc = subprocess.Popen(torchrun("--scale", "smoke", "--max-steps", "100000", "--eval-interval", "100000",
                                     "--out-dir", str(out_dir)),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out_dir / "steps.jsonl").is_file() or not (out_dir / "steps.jsonl").read_text():
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.05)                                       # training, past the first evaluation
    os.killpg(proc.pid, signal.SIGINT)                         # what Ctrl-C in a terminal does: the whole group
    out, err = proc.communicate(timeout=120)
    step = load_checkpoint(out_dir)[1]["step"]
    assert step > 0 and f"stopped at step {step} (SIGINT)" in out, err[-3000:]
    # torchrun's own agent reports the signal with a traceback of its own; no worker may crash
    assert "KeyboardInterrupt" not in err and "pretraining.py" not in err, err[-3000:]


def test_mixed_precision_branch_with_grad_scaler_runs_on_cpu(tmp_path, monkeypatch):
    """The fp16-with-GradScaler path of a T4, exercised on the CPU with bf16 autocast and a CPU scaler."""
    from shared.device import Precision

    chosen = []

    def t4_like(device):
        chosen.append(device)
        return Precision(torch.bfloat16, use_grad_scaler=True)

    monkeypatch.setattr(pretraining, "choose_precision", t4_like)
    result = train(tiny_config(tmp_path, max_steps=8), **QUIET)
    rows = read_metrics(tmp_path)
    assert chosen and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert math.isfinite(result["val_loss"])


def test_the_compiled_model_trains(tmp_path):
    """The gpu preset compiles the model; the same branch runs on a CPU (inductor, a C++ compiler)."""
    result = train(tiny_config(tmp_path, n_layer=1, max_steps=6, eval_interval=3, compile=True), **QUIET)
    rows = read_metrics(tmp_path)
    assert result["step"] == 6 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "_orig_mod" not in "".join(load_file(tmp_path / "ckpt-0000006.safetensors"))    # saved unwrapped


# ---- measuring a trained model -------------------------------------------------------------

def test_ending_losses_match_scoring_each_ending_alone():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50, context_length=12, n_layer=1, n_head=2, n_embd=16)).eval()
    context, endings = [1, 2, 3, 4, 5, 6], [[7], [8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19]]
    totals, means = ending_losses(model, context, endings)
    for i, ending in enumerate(endings):
        ids = torch.tensor([(context + ending)[-12:]])
        with torch.no_grad():
            logits = model(ids)[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")[-len(ending):]
        assert totals[i].item() == pytest.approx(loss.sum().item(), abs=1e-5)
        assert means[i].item() == pytest.approx(loss.mean().item(), abs=1e-5)


def test_rows_that_do_not_fit_the_model_are_skipped_and_counted():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50, context_length=8, n_layer=1, n_head=2, n_embd=16)).eval()
    assert ending_losses(model, [1, 2, 3], [[4] * 7, [5]]) is not None            # 7 + 1 context token fit
    assert ending_losses(model, [1, 2, 3], [[4] * 8, [5]]) is None                # no context token left
    assert ending_losses(model, [], [[4], [5]]) is None
    chars = CharTokenizer("abcdefghijklmnopqrstuvwxyz ")
    rows = [{"ctx": "a cat", "endings": ["sat", "ran", "fell down", "x" * 20], "label": 0},
            {"ctx": "a dog", "endings": ["sat", "ran", "fell", "hid"], "label": 1},
            {"ctx": "A Dog", "endings": ["sat", "ran", "fell", "hid"], "label": 1}]
    result = evaluate_hellaswag(model, chars, rows)
    assert (result["n"], result["too_long"], result["unencodable"], result["skipped"]) == (1, 1, 1, 2)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_hellaswag_on_the_sample(arch):
    """The gpu scale scores HellaSwag after chapter 4's GPT-2 run and after chapter 6's Llama run."""
    rows = hellaswag_rows(fetch("hellaswag-val-sample"))
    assert len(rows) == 1000 and all(len(r["endings"]) == 4 for r in rows)
    torch.manual_seed(0)
    tokenizer = TiktokenTokenizer("gpt2")
    cfg = tiny_config("unused", arch, context_length=128)
    model = cfg.build_model(tokenizer.n_vocab)
    result = evaluate_hellaswag(model, tokenizer, rows[:40])
    assert result["n"] == 40 and result["skipped"] == 0 and 0 <= result["acc_norm"] <= 1


def test_text_bytes_counts_the_utf8_of_the_text_and_not_the_document_marks():
    gpt2 = TiktokenTokenizer("gpt2")
    documents = ["Grüße aus Köln", "日本語のテキスト", "plain ASCII"]
    ids = [i for doc in documents for i in [gpt2.eot_token, *gpt2.encode(doc)]]
    expected = sum(len(doc.encode("utf-8")) for doc in documents)
    # chunks of 3 ids cut through characters that GPT-2 spreads over several tokens: bytes still add up
    assert pretraining.text_bytes(gpt2, np.array(ids, dtype=np.uint16), chunk=3) == expected
    assert pretraining.text_bytes(CharTokenizer("hé llo"), CharTokenizer("hé llo").encode("hé hé")) == 7


def test_a_run_reports_bits_per_byte_from_its_tokenizers_bytes_per_token(tmp_path):
    text = "Grüße, 日本語! " * 400                    # many bytes per character: bits per byte differ from nats
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    cfg = tiny_config(tmp_path / "run", data=str(tmp_path / "text.txt"), max_steps=4)
    tokenizer, _, val_tokens = load_data(cfg)
    bytes_per_token = len(tokenizer.decode(val_tokens.tolist()).encode("utf-8")) / len(val_tokens)
    assert bytes_per_token > 1.5
    train(cfg, **QUIET)
    for row in read_metrics(tmp_path / "run"):
        assert row["val_bpb"] == pytest.approx(row["val_loss"] / (math.log(2) * bytes_per_token))


def test_nats_per_character_is_the_token_loss_rescaled():
    torch.manual_seed(0)
    chars = CharTokenizer("abcd ")
    model = GPTModel(GPTConfig(vocab_size=5, context_length=8, n_layer=1, n_head=1, n_embd=8)).eval()
    text = "abcd dcba " * 10
    ids = torch.tensor(chars.encode(text))
    x, y = ids[:96].view(12, 8), ids[1:97].view(12, 8)
    with torch.no_grad():
        expected = model(x, y).item()                    # one character per token: the same number
    assert nats_per_character(model, chars, text) == pytest.approx(expected, abs=1e-6)


def test_notebook_helpers_take_the_device_from_the_model(tmp_path):
    """Tensors made without a device land on `meta` here, while the model is on the CPU: a helper that forgets
    to put its inputs on the model's device (as chapter 4's cells once did for a GPU model) fails."""
    torch.manual_seed(0)
    chars = CharTokenizer(fetch("tinyshakespeare").read_text())
    model = GPTModel(GPTConfig(vocab_size=chars.n_vocab, context_length=64, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = np.asarray(chars.encode(fetch("tinyshakespeare").read_text()[:5000]), dtype=np.uint16)
    rows = [{"ctx": "He sat down", "endings": [" and ate.", " on it.", " quickly.", " there."], "label": 0}]
    device = next(model.parameters()).device
    with torch.device("meta"):
        losses = estimate_loss(model, {"val": tokens}, 2, 4, 64)
        hellaswag = evaluate_hellaswag(model, chars, rows)
        per_char = nats_per_character(model, chars, "ROMEO: what light through yonder window breaks? " * 3)
        maps = attention_maps(model, torch.tensor(chars.encode("ROMEO: hello"), device=device))
        prompt = torch.tensor([chars.encode("ROMEO:")], device=device)
        out = generate(model, prompt, 5, top_k=3, generator=torch.Generator(device=device).manual_seed(0))
    assert math.isfinite(losses["val"]) and hellaswag["n"] == 1 and per_char > 0
    assert maps.shape == (1, 2, 12, 12) and out.shape == (1, 11)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs, a disk a test can fill. Mounting needs root: elsewhere the test is skipped, saying so."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk is made by mounting a small tmpfs, which needs root")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield mountpoint
    subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_full_disk_is_one_line_leaves_no_half_checkpoint_and_the_run_resumes(small_disk, capsys):
    run = small_disk / "run"
    train(tiny_config(run, max_steps=4), **QUIET)
    free = shutil.disk_usage(small_disk).free
    filler = small_disk / "filler"
    filler.write_bytes(bytes(free - 200_000))                    # room for the metrics, not for a checkpoint
    assert run_or_report(lambda: train(tiny_config(run, max_steps=12), resume=True, **QUIET)) is None
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: the disk holding") and "is full" in message and "\n" not in message
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-0000000.pt", "ckpt-0000000.safetensors",
                                                          "ckpt-0000004.pt", "ckpt-0000004.safetensors"]
    assert json.loads((run / "latest.json").read_text())["step"] == 4 and not list(run.glob(".*.tmp"))
    filler.unlink()                                              # space again: the run goes on from step 4
    assert train(tiny_config(run, max_steps=12), resume=True, **QUIET)["step"] == 12


def test_a_full_disk_during_a_sharded_checkpoint_leaves_no_shards_and_the_previous_one(small_disk):
    import torch.distributed as dist

    from ch04_pretraining.runs import save_sharded_checkpoint
    from shared.files import DiskFullError

    run = small_disk / "run"
    run.mkdir()
    cfg = tiny_config(run, parallel="fsdp")
    model = cfg.build_model(65)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()   # the loss
    optimizer.step()
    sampler = BatchSampler(np.zeros(100, dtype=np.uint16), 4, seed=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        save_sharded_checkpoint(run, model, optimizer, 4, cfg, sampler, main=True)
        filler = small_disk / "filler"
        filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - 100_000))
        with pytest.raises(DiskFullError, match=r"^the disk holding .* is full: the shards of step 8 need more room"):
            save_sharded_checkpoint(run, model, optimizer, 8, cfg, sampler, main=True)
    finally:
        dist.destroy_process_group()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-")) == ["ckpt-0000004.dcp",
                                                                                  "ckpt-0000004.pt"]
    assert load_checkpoint(run)[1]["step"] == 4

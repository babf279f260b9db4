"""Chapter 4b's modern GPT: each switch against its formula or torch's own layer, the cache path, and training."""
import dataclasses
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from ch03_gpt_model import gpt
from ch03_gpt_model.gpt import GPTConfig, GPTModel, generate, linear_cross_entropy
from ch04_pretraining.__main__ import parse_args
from ch04_pretraining.config import TrainConfig
from ch04_pretraining.pretraining import hidden_matrices, train
from ch04_pretraining.recipe import (
    RECIPE,
    ModernConfig,
    ModernGPT,
    newton_schulz_flops,
    recipe_preset,
)
from ch04_pretraining.runs import load_run, read_metrics
from shared.config import ConfigError

SMALL = dict(vocab_size=40, context_length=16, n_layer=2, n_head=2, n_embd=32)
ALL = dict(qk_norm=True, mlp="relu2", logit_softcap=5.0, zero_init_proj=True, tie_embeddings=False)
QUIET = dict(log=lambda message: None, progress=False)


def ids(batch=2, seq=16):
    return torch.randint(0, SMALL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("field, value, message", [
    ("mlp", "swiglu", "mlp: must be gelu or relu2"),
    ("logit_softcap", -1.0, "logit_softcap: must be a number >= 0"),
    ("logit_softcap", float("nan"), "logit_softcap: must be a number >= 0"),
    ("logit_softcap", float("inf"), "logit_softcap: must be a number >= 0"),
    ("logit_softcap", True, "logit_softcap: must be a number >= 0"),
    ("qk_norm", "yes", "qk_norm: must be true or false"),
    ("zero_init_proj", 1, "zero_init_proj: must be true or false"),
    ("n_head", 5, "n_head: n_embd"),                               # chapter 3's checks still run
])
def test_a_bad_switch_is_refused_by_name(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModernConfig(**{**SMALL, field: value})


def test_with_every_switch_off_it_is_chapter_3s_gpt():
    torch.manual_seed(0)
    gpt2, modern = GPTModel(GPTConfig(**SMALL)), ModernGPT(ModernConfig(**SMALL))
    assert gpt2.state_dict().keys() == modern.state_dict().keys()
    modern.load_state_dict(gpt2.state_dict())
    x, y = ids(), ids().roll(1, dims=1)
    assert torch.allclose(modern(x), gpt2(x), atol=1e-6) and torch.allclose(modern(x, y), gpt2(x, y), atol=1e-6)
    assert ModernConfig(**SMALL).is_gpt2 and ModernConfig(**SMALL, tie_embeddings=False).is_gpt2


def test_qk_norm_normalises_each_heads_queries_and_keys_as_torchs_rms_norm():
    torch.manual_seed(0)
    model = ModernGPT(ModernConfig(**SMALL, qk_norm=True)).eval()
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 16, 32)
    # by hand: project, split into heads, normalise over each head's dimensions, attend causally
    q, k, v = (t.view(2, 16, 2, 16).transpose(1, 2) for t in attn.c_attn(x).split(32, dim=-1))
    q = F.rms_norm(q, (16,), attn.q_norm.weight, eps=1e-5)
    k = F.rms_norm(k, (16,), attn.k_norm.weight, eps=1e-5)
    expected = attn.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 32))
    assert torch.allclose(attn(x), expected, atol=1e-6)


def test_relu2_is_relu_squared():
    torch.manual_seed(0)
    mlp = ModernGPT(ModernConfig(**SMALL, mlp="relu2")).transformer.h[0].mlp
    x = torch.randn(3, 32)
    assert torch.allclose(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2), atol=1e-6)
    assert not hasattr(mlp, "gelu")


@pytest.mark.parametrize("tied", [True, False])
def test_the_soft_cap_bounds_the_logits_and_the_loss_is_taken_from_them(tied):
    torch.manual_seed(0)
    model = ModernGPT(ModernConfig(**SMALL, logit_softcap=2.0, tie_embeddings=tied))
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert model.lm_head.weight.std().item() == pytest.approx(model.cfg.weight_std, rel=0.2)
    x, y = ids(), ids().roll(1, dims=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    raw = model.hidden_states(x) @ model.lm_head.weight.T
    logits = model(x)
    assert raw.abs().max() > 20 and logits.abs().max() <= 2
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0), atol=1e-6)
    assert torch.allclose(model(x, y), F.cross_entropy(logits.flatten(0, 1), y.flatten()), atol=1e-6)


@pytest.mark.parametrize("whole_max, chunk_size", [(None, None), (0, 7), (0, 1000)])
def test_the_chunked_capped_loss_equals_cross_entropy_on_the_capped_logits(monkeypatch, whole_max, chunk_size):
    if whole_max is not None:                          # the chunked path, even for logits this small
        monkeypatch.setattr(gpt, "WHOLE_LOGITS_MAX", whole_max)
    torch.manual_seed(0)
    hidden = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    weight = (3 * torch.randn(50, 8, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 50, (30,))
    targets[[2, 11, 29]] = -100                                     # ignored rows count for nothing
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size, softcap=4.0)
    expected = F.cross_entropy(4.0 * torch.tanh(hidden @ weight.T / 4.0), targets)
    assert (hidden @ weight.T).abs().max() > 4.0                    # the cap bites
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(expected, (hidden, weight))
    assert all(torch.allclose(g, w, atol=1e-12) for g, w in zip(got, want))
    with torch.no_grad():                                           # evaluation: the loss alone
        assert linear_cross_entropy(hidden, weight, targets, softcap=4.0).item() == pytest.approx(expected.item())


def test_newton_schulz_flops_are_what_torchs_flop_counter_counts():
    from torch.utils.flop_counter import FlopCounterMode

    from ch04_pretraining.pretraining import orthogonalize
    model = ModernGPT(ModernConfig(**SMALL, **ALL))
    with FlopCounterMode(display=False) as counter:
        for weight in hidden_matrices(model):
            orthogonalize(weight.detach())
    assert newton_schulz_flops(model) == counter.get_total_flops()


def test_the_recipe_preset_is_the_command_line_the_chapter_gives():
    command = ("--scale gpu --arch modern --qk-norm --mlp relu2 --logit-softcap 15 --zero-init-proj "
               "--no-tie-embeddings --optimizer muon --schedule wsd")
    cfg = recipe_preset("gpu", gpu_memory_bytes=16e9)
    assert parse_args(command.split())[0] == cfg
    assert {k: cfg.model[k] for k in RECIPE} == RECIPE and (cfg.optimizer, cfg.schedule) == ("muon", "wsd")
    assert cfg.data == "fineweb-edu" and cfg.batch_size * cfg.grad_accum == 64
    # every scale has a modern preset (before, --arch modern on the command line failed as an "unknown scale")
    for scale in ("smoke", "cpu"):
        assert parse_args(["--scale", scale, "--arch", "modern"])[0].arch == "modern"
        assert recipe_preset(scale).model["qk_norm"]


def test_zero_projections_start_at_zero_and_move_at_the_first_step():
    torch.manual_seed(0)
    model = ModernGPT(ModernConfig(**SMALL, zero_init_proj=True))
    projections = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(not p.any() for p in projections)
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(model.cfg.weight_std, rel=0.1)
    model(ids(), ids().roll(1, dims=1)).backward()
    assert all(p.grad.abs().max() > 0 for p in projections)


def test_generation_with_the_cache_equals_recomputing_with_every_switch_on():
    torch.manual_seed(0)
    model = ModernGPT(ModernConfig(**SMALL, **{**ALL, "zero_init_proj": False})).eval()
    prompt = ids(2, 5)
    cached = generate(model, prompt, 8, temperature=0, use_cache=True)
    recomputed = generate(model, prompt, 8, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_muon_takes_the_same_matrices_with_every_switch_on():
    model = ModernGPT(ModernConfig(**SMALL, **ALL))
    assert len(hidden_matrices(model)) == 4 * SMALL["n_layer"]
    assert all(p.dim() == 2 for p in hidden_matrices(model))
    assert all(p is not model.lm_head.weight for p in hidden_matrices(model))


def test_only_a_model_with_its_switches_off_saves_as_gpt2(tmp_path):
    with pytest.raises(ValueError, match="is not a GPT-2"):
        ModernGPT(ModernConfig(**SMALL, qk_norm=True)).save_pretrained_hf(tmp_path / "qk")
    assert (ModernGPT(ModernConfig(**SMALL)).save_pretrained_hf(tmp_path / "plain") / "config.json").is_file()


def test_a_modern_run_trains_resumes_and_loads(tmp_path):
    shape = {name: value for name, value in SMALL.items() if name != "vocab_size"}   # the tokenizer's
    cfg = TrainConfig(arch="modern", model=shape | ALL, optimizer="muon",
                      batch_size=4, max_steps=12, warmup_steps=3, eval_interval=4, eval_iters=2, lr=3e-3,
                      min_lr=3e-4, out_dir=str(tmp_path / "full"))
    train(cfg, **QUIET)
    rows = read_metrics(tmp_path / "full")
    assert math.isfinite(rows[-1]["val_loss"]) and rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    (tmp_path / "resumed" / "latest.json").write_text(
        '{"step": 8, "weights": "ckpt-0000008.safetensors", "state": "ckpt-0000008.pt"}')
    train(dataclasses.replace(cfg, out_dir=str(tmp_path / "resumed")), resume=True, **QUIET)
    assert read_metrics(tmp_path / "resumed")[-1]["val_loss"] == rows[-1]["val_loss"]
    model, tokenizer, _ = load_run(tmp_path / "full")
    assert isinstance(model, ModernGPT) and model.cfg.qk_norm and model.cfg.logit_softcap == 5.0
    assert model.transformer.h[0].mlp.__class__.__name__ == "ReLU2MLP"

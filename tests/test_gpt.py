import json
import math
import warnings

import pytest
import torch

from ch03_gpt_model.gpt import (
    GPT_CONFIGS,
    GPTConfig,
    GPTModel,
    flops_per_token,
    generate,
    sample_next,
    state_dict_to_hf,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

TINY = GPTConfig(vocab_size=101, context_length=32, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture
def chunked(monkeypatch):
    """The chunked loss even for the small logits of these tests (they would be computed whole)."""
    from ch03_gpt_model import gpt

    monkeypatch.setattr(gpt, "WHOLE_LOGITS_MAX", 0)


def tiny_model(seed=0, cfg=TINY):
    torch.manual_seed(seed)
    return GPTModel(cfg).eval()


@pytest.fixture
def hf_model():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, n_positions=32, n_layer=2, n_head=4, n_embd=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


# ---- configuration ----------------------------------------------------------------------

@pytest.mark.parametrize("name, count", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                         ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_presets_have_the_published_parameter_counts(name, count):
    with torch.device("meta"):
        model = GPTModel(GPT_CONFIGS[name])
    assert model.num_parameters() == count


def test_config_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"n_embd \(100\) must be divisible by n_head \(12\)"):
        GPTConfig(n_embd=100, n_head=12)
    with pytest.raises(ValueError, match="n_layer: must be a positive int"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)


# ---- the model --------------------------------------------------------------------------

def test_forward_shapes_and_tying():
    model = tiny_model()
    assert model(torch.randint(0, 101, (3, 32))).shape == (3, 32, 101)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_too_long_input_is_a_clear_error():
    with pytest.raises(ValueError, match="33 tokens but the context length is 32"):
        tiny_model()(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(batch, seq\)"):
        tiny_model()(torch.zeros(33, dtype=torch.long))


def test_initial_loss_is_near_ln_vocab():
    cfg = GPTConfig(vocab_size=1000, context_length=32, n_layer=2, n_head=4, n_embd=64)
    model = tiny_model(cfg=cfg)
    x, y = torch.randint(0, 1000, (16, 32)), torch.randint(0, 1000, (16, 32))
    with torch.no_grad():
        logits = model(x)
    spread = logits.std().item()          # sigma * sqrt(width): 0.02 * sqrt(768) for every default width
    assert spread == pytest.approx(0.02 * math.sqrt(768), rel=0.1)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert loss == pytest.approx(math.log(1000) + spread**2 / 2, abs=0.08)


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=101, context_length=32, n_layer=8, n_head=4, n_embd=256, init_std=0.03))
    proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert fc == pytest.approx(0.03, rel=0.05)
    assert proj == pytest.approx(0.03 / math.sqrt(16), rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.03, rel=0.05)


def test_default_init_is_gpt2s_scaled_to_the_width():
    assert GPT_CONFIGS["gpt2"].weight_std == 0.02
    assert GPTConfig(n_embd=128, n_head=4).weight_std == pytest.approx(0.02 * math.sqrt(6))
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=101, context_length=32, n_layer=2, n_head=4, n_embd=192))
    assert model.transformer.h[1].attn.c_attn.weight.std().item() == pytest.approx(0.04, rel=0.05)
    # the output scale sigma * sqrt(width) is the same as GPT-2 small's 0.02 * sqrt(768)
    assert model.cfg.weight_std * math.sqrt(192) == pytest.approx(0.02 * math.sqrt(768))
    with pytest.raises(ValueError, match="init_std: must be positive"):
        GPTConfig(init_std=0.0)


def test_state_dict_uses_hugging_face_names():
    names = set(tiny_model().state_dict())
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight", "lm_head.weight"} <= names


# ---- Hugging Face round trip ------------------------------------------------------------

def test_loads_a_transformers_checkpoint(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    x = torch.randint(0, 101, (2, 32))
    for source in [tmp_path, tmp_path / "model.safetensors"]:
        ours = GPTModel.from_pretrained_hf(source).eval()
        with torch.no_grad():
            assert (ours(x) - hf_model(x).logits).abs().max() < 1e-4


def test_exports_a_checkpoint_transformers_loads(tmp_path):
    ours = tiny_model(3)
    ours.save_pretrained_hf(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() < 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["n_layer"] == 2


def test_untied_head_is_its_own_matrix():
    tied, untied = tiny_model(), tiny_model(cfg=GPTConfig(**{**TINY.__dict__, "tie_embeddings": False}))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_parameters() == tied.num_parameters() + 101 * 64
    loss = untied(torch.randint(0, 101, (2, 8)), torch.randint(0, 101, (2, 8)))
    loss.backward()
    assert untied.lm_head.weight.grad is not None and untied.transformer.wte.weight.grad is not None
    assert not torch.equal(untied.lm_head.weight.grad, untied.transformer.wte.weight.grad)


def test_untied_checkpoints_round_trip_with_transformers(tmp_path):
    torch.manual_seed(1)
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=32, n_layer=2, n_head=4, n_embd=64,
                                        tie_word_embeddings=False)).eval()
    assert not torch.equal(theirs.lm_head.weight, theirs.transformer.wte.weight)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = GPTModel.from_pretrained_hf(tmp_path / "theirs").eval()
    assert ours.cfg.tie_embeddings is False
    x = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() < 1e-4
    ours.save_pretrained_hf(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] is False
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (back(x).logits - theirs(x).logits).abs().max() < 1e-4


def test_untied_model_refuses_a_tied_checkpoint(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    untied = GPTConfig(vocab_size=101, context_length=32, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False)
    with pytest.raises(ValueError, match="missing.*lm_head.weight"):
        GPTModel.from_pretrained_hf(tmp_path, cfg=untied)


def test_round_trip_through_our_own_files(tmp_path):
    model = tiny_model(5)
    again = GPTModel.from_pretrained_hf(model.save_pretrained_hf(tmp_path)).eval()
    x = torch.randint(0, 101, (1, 16))
    assert torch.equal(model(x), again(x))


def test_old_style_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    from safetensors.torch import save_file

    model = tiny_model(1)
    tensors = {k.removeprefix("transformer."): v for k, v in state_dict_to_hf(model.state_dict()).items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    save_file(tensors, tmp_path / "old.safetensors")
    loaded = GPTModel.from_pretrained_hf(tmp_path / "old.safetensors", cfg=TINY).eval()
    x = torch.randint(0, 101, (1, 8))
    assert torch.equal(loaded(x), model(x))


def test_checkpoint_from_another_config_is_refused(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    other = GPTConfig(vocab_size=101, context_length=32, n_layer=2, n_head=4, n_embd=128)
    with pytest.raises(ValueError, match="another config"):
        GPTModel.from_pretrained_hf(tmp_path, cfg=other)
    deeper = GPTConfig(vocab_size=101, context_length=32, n_layer=3, n_head=4, n_embd=64)
    with pytest.raises(ValueError, match="the number of blocks is 3 in the settings but 2 in the weights"):
        GPTModel.from_pretrained_hf(tmp_path, cfg=deeper)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
        GPTModel.from_pretrained_hf(tmp_path)
    tiny_model().save_pretrained_hf(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json is missing"):
        GPTModel.from_pretrained_hf(tmp_path)


def test_export_without_biases_is_refused(tmp_path):
    cfg = GPTConfig(vocab_size=101, context_length=32, n_layer=1, n_head=4, n_embd=64, bias=False)
    with pytest.raises(ValueError, match="always has biases"):
        GPTModel(cfg).save_pretrained_hf(tmp_path)


def test_preset_name_offline_names_the_file(monkeypatch, tmp_path):
    from shared import data

    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(data.MIRROR_ENV, str(tmp_path))
    entry = data.REGISTRY["hf-gpt2"]
    monkeypatch.setitem(data.REGISTRY, "hf-gpt2",
                        data.DataFile(entry.name, entry.filename, ((tmp_path / "x").as_uri(),), None,
                                      min_bytes=entry.min_bytes))
    with pytest.raises(data.DataUnavailableError, match="hf-gpt2.safetensors"):
        GPTModel.from_pretrained_hf("gpt2")
    assert "huggingface.co/openai-community/gpt2" in entry.urls[0]


# ---- generation -------------------------------------------------------------------------

def test_greedy_is_argmax_and_deterministic():
    model = tiny_model()
    prompt = torch.randint(0, 101, (2, 5))
    out = generate(model, prompt, 6, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, generate(model, prompt, 6, temperature=0))
    with torch.no_grad():
        assert torch.equal(out[:, 5], model(prompt)[:, -1].argmax(-1))


def test_long_prompts_are_cropped_to_the_context():
    model = tiny_model()
    prompt = torch.randint(0, 101, (1, 50))
    out = generate(model, prompt, 3, temperature=0)
    assert out.shape == (1, 53)
    assert torch.equal(out[:, 50:], generate(model, prompt[:, -32:], 3, temperature=0)[:, 32:])


def test_eos_stops_generation():
    model = tiny_model()
    prompt = torch.randint(0, 101, (1, 4))
    first = generate(model, prompt, 1, temperature=0)[0, -1].item()
    out = generate(model, prompt, 10, temperature=0, eos_id=first)
    assert out.shape == (1, 5)


def test_sampling_rules():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).expand(3000, -1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # softmax: 0.636, 0.234, 0.086, ... -> top_p=0.8 keeps the first two only
    assert set(sample_next(logits, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {0}
    cold = sample_next(logits, temperature=0.1, generator=g)
    assert (cold == 0).float().mean() > 0.99
    with pytest.raises(ValueError):
        generate(tiny_model(), torch.zeros(1, 1, dtype=torch.long), 1, temperature=-1)
    with pytest.raises(ValueError):
        generate(tiny_model(), torch.zeros(1, 1, dtype=torch.long), 1, top_p=0.0)


def test_generate_restores_training_mode():
    model = tiny_model().train()
    generate(model, torch.zeros(1, 1, dtype=torch.long), 2)
    assert model.training


def test_flops_per_token():
    cfg = GPT_CONFIGS["gpt2"]
    n = 12 * 12 * 768**2 + 50257 * 768
    assert flops_per_token(cfg) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(cfg, seq=0, n_params=10) == 60


def test_linear_cross_entropy_matches_pytorch_in_value_and_gradients(chunked):
    from ch03_gpt_model.gpt import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(300, 32, requires_grad=True)       # not a multiple of the chunk size
    weight = (0.1 * torch.randn(1000, 32)).requires_grad_()
    targets = torch.randint(0, 1000, (300,))
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    expected_grads = torch.autograd.grad(2.5 * expected, [hidden, weight])
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=64)
    grads = torch.autograd.grad(2.5 * loss, [hidden, weight])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-6)
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets).item() == pytest.approx(expected.item(), abs=1e-5)


def test_model_with_targets_returns_the_loss():
    model = tiny_model()
    x, y = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    expected = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    assert model(x, y).item() == pytest.approx(expected.item(), abs=1e-5)


# ---- the loss: ignore_index, evaluation, precision, bad targets ---------------------------

def _loss_case(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(300, 32, dtype=dtype, requires_grad=True)
    weight = (0.1 * torch.randn(1000, 32, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, 1000, (300,))
    return hidden, weight, targets


def test_ignore_index_like_pytorch_in_value_and_gradients(chunked):
    from ch03_gpt_model.gpt import linear_cross_entropy

    hidden, weight, targets = _loss_case()
    targets[:70] = -100                                   # a whole chunk of 64 ignored, and part of the next
    targets[200::3] = -100
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    expected_grads = torch.autograd.grad(expected, [hidden, weight])
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=64)
    grads = torch.autograd.grad(loss, [hidden, weight])
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(grads, expected_grads))
    assert torch.all(grads[0][:70] == 0)
    model = tiny_model()
    x, y = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    y[0, :5] = -100
    plain = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    assert model(x, y).item() == pytest.approx(plain.item(), abs=1e-5)


def test_evaluation_computes_the_loss_alone(monkeypatch, chunked):
    from ch03_gpt_model import gpt

    calls = []
    real = gpt._cross_entropy_sum

    def spy(*args, with_grads=None, **kwargs):
        with_grads = args[5] if with_grads is None else with_grads
        calls.append(with_grads)
        return real(*args[:5], with_grads=with_grads)

    monkeypatch.setattr(gpt, "_cross_entropy_sum", spy)
    hidden, weight, targets = _loss_case()
    with torch.no_grad():
        evaluated = gpt.linear_cross_entropy(hidden, weight, targets)
    trained = gpt.linear_cross_entropy(hidden, weight, targets)
    assert calls == [False, True] and evaluated.item() == pytest.approx(trained.item(), abs=1e-6)


def test_float64_models_get_float64_losses_and_gradients(chunked):
    from ch03_gpt_model.gpt import linear_cross_entropy

    hidden, weight, targets = _loss_case(torch.float64)
    expected = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)
    loss = linear_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad(loss, [hidden, weight])
    expected_grads = torch.autograd.grad(expected, [hidden, weight])
    assert loss.dtype == torch.float64 and abs(loss.item() - expected.item()) < 1e-12
    assert all(g.dtype == torch.float64 and torch.allclose(g, w, atol=1e-12) for g, w in zip(grads, expected_grads))


def test_bad_targets_are_clear_errors():
    from ch03_gpt_model.gpt import linear_cross_entropy

    model = tiny_model()
    x = torch.randint(0, 101, (2, 16))
    with pytest.raises(ValueError, match=r"targets must have the shape of idx, \(2, 16\), got \(2, 15\)"):
        model(x, torch.randint(0, 101, (2, 15)))
    hidden, weight, targets = _loss_case()
    for wrong in (-5, 1000):
        targets[7] = wrong
        with pytest.raises(ValueError, match=f"target id {wrong} is outside the vocabulary 0..999"):
            linear_cross_entropy(hidden, weight, targets)



def test_under_autocast_the_chunks_multiply_in_bfloat16_like_pytorch(chunked):
    """Under autocast the chunked loss runs its matmuls in bfloat16, as F.cross_entropy's logits would be: its
    loss is far closer to autocast's reference than to float32's."""
    from ch03_gpt_model.gpt import linear_cross_entropy

    hidden, weight, targets = _loss_case()

    def loss_and_grads(loss_fn, autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        return [loss.detach(), *torch.autograd.grad(loss, [hidden, weight])]

    pytorch = lambda: torch.nn.functional.cross_entropy(hidden @ weight.t(), targets)  # noqa: E731
    ours = loss_and_grads(lambda: linear_cross_entropy(hidden, weight, targets, chunk_size=64), True)
    bf16, fp32 = loss_and_grads(pytorch, True), loss_and_grads(pytorch, False)
    assert ours[0].dtype == torch.float32 and [g.dtype for g in ours[1:]] == [torch.float32] * 2
    assert (ours[0] - bf16[0]).abs() < (ours[0] - fp32[0]).abs() / 30
    # the gradients round in other places than autograd's (the weight's sums the chunks' bfloat16 products in
    # float32): within bfloat16's precision of float32's
    for mine, full in zip(ours[1:], fp32[1:]):
        assert (mine - full).abs().max() < 1e-2 * full.abs().max()


def test_the_chunked_loss_compiles_into_one_graph(chunked):
    """Nothing in the loss asks the host to wait for the device (no .item(), no .tolist()), so torch.compile
    traces model(idx, targets) as one graph, in float32 and under autocast."""
    model = tiny_model()
    x, y = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    for autocast in (False, True):
        torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            explained = torch._dynamo.explain(model)(x, y)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

# ---- Hugging Face config fields that change the computation -------------------------------

def test_layer_norm_epsilon_is_honoured(tmp_path):
    torch.manual_seed(0)
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=32, n_layer=2, n_head=4, n_embd=64,
                                        layer_norm_epsilon=0.5)).eval()
    theirs.save_pretrained(tmp_path)
    ours = GPTModel.from_pretrained_hf(tmp_path).eval()
    assert ours.cfg.norm_eps == 0.5 and ours.transformer.ln_f.eps == 0.5
    x = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() < 1e-4
    ours.save_pretrained_hf(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["layer_norm_epsilon"] == 0.5


@pytest.mark.parametrize("field, value, match", [
    ("activation_function", "relu", "activation_function='relu'"),
    ("scale_attn_weights", False, "scale_attn_weights=False"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True"),
    ("n_inner", 100, "n_inner=100"),
])
def test_config_fields_gptmodel_does_not_implement_are_refused(tmp_path, field, value, match):
    GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=32, n_layer=1, n_head=4, n_embd=64,
                               **{field: value})).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"computes differently from GPTModel: {match}"):
        GPTModel.from_pretrained_hf(tmp_path)


def test_a_broken_config_json_names_the_file(tmp_path):
    tiny_model().save_pretrained_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not a Hugging Face config.json"):
        GPTModel.from_pretrained_hf(tmp_path)


# ---- generate refuses what it cannot use ---------------------------------------------------

@pytest.mark.parametrize("prompt, kwargs, match", [
    (torch.zeros(3, dtype=torch.long), {}, r"idx must be a \(batch, seq\) tensor"),
    (torch.zeros(1, 0, dtype=torch.long), {}, "seq >= 1"),
    (torch.zeros(1, 3), {}, "tensor of token ids"),
    ([[1, 2]], {}, "tensor of token ids"),
    (torch.tensor([[1, 101]]), {}, r"token ids from 1 to 101; this model's vocabulary is 0..100"),
    (torch.tensor([[-1, 2]]), {}, "token ids from -1"),
    (torch.zeros(1, 2, dtype=torch.long), {"temperature": float("nan")}, "temperature must be a finite number"),
    (torch.zeros(1, 2, dtype=torch.long), {"temperature": -0.5}, "temperature"),
    (torch.zeros(1, 2, dtype=torch.long), {"top_k": 2.0}, "top_k must be a positive int"),
    (torch.zeros(1, 2, dtype=torch.long), {"top_k": 0}, "top_k"),
    (torch.zeros(1, 2, dtype=torch.long), {"top_p": float("nan")}, "top_p"),
    (torch.zeros(1, 2, dtype=torch.long), {"max_new_tokens": 2.5}, "max_new_tokens must be an int"),
    (torch.zeros(1, 2, dtype=torch.long), {"eos_id": 101}, "eos_id must be a token id in 0..100"),
    (torch.zeros(1, 2, dtype=torch.long), {"vocab_size": 500}, "vocab_size must be an int in 1..101"),
])
def test_generate_names_the_argument_at_fault(prompt, kwargs, match):
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), prompt, **kwargs)


def test_generate_refuses_a_prompt_on_another_device():
    with pytest.raises(ValueError, match="idx is on meta but the model is on cpu"):
        generate(tiny_model(), torch.zeros(1, 2, dtype=torch.long, device="meta"), 2)


def test_vocab_size_keeps_sampling_among_the_first_ids():
    model = tiny_model()
    out = generate(model, torch.zeros(64, 1, dtype=torch.long), 8, temperature=2.0, vocab_size=10,
                   generator=torch.Generator().manual_seed(0))
    assert out[:, 1:].max() < 10


# ---- arithmetic ---------------------------------------------------------------------------

def test_peak_flops_from_the_datasheet_or_measured(monkeypatch):
    from ch03_gpt_model import gpt

    assert gpt.peak_flops("cuda", "mixed", gpu_name="Tesla T4") == (65e12, "Tesla T4 datasheet, mixed")
    assert gpt.peak_flops("cuda", "tf32", gpu_name="NVIDIA A100-SXM4-80GB")[0] == 156e12
    assert gpt.peak_flops("cuda", "mixed", gpu_name="NVIDIA H100 PCIe")[0] == 756e12
    assert gpt.peak_flops("cuda", "mixed", gpu_name="NVIDIA H100 80GB HBM3")[0] == 989e12
    for name, expected in [("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165e12),
                           ("NVIDIA A10", 125e12), ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                           ("NVIDIA B200", 2250e12), ("NVIDIA A100 80GB PCIe", 312e12)]:
        assert gpt.peak_flops("cuda", "mixed", gpu_name=name)[0] == expected, name
    monkeypatch.setattr(gpt, "measure_peak_flops", lambda device: 1.0)
    peak, source = gpt.peak_flops("cuda", "mixed", gpu_name="NVIDIA A10G")         # no NVIDIA datasheet
    assert math.isnan(peak) and "no datasheet figure for NVIDIA A10G" in source
    assert gpt.peak_flops("cpu", "mixed") == (1.0, "measured fp32 matmul peak of this cpu")
    with pytest.raises(ValueError, match="precision must be"):
        gpt.peak_flops("cpu", "bf16")


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("mixed", torch.bfloat16)])
def test_activation_bytes_per_layer_are_what_autograd_keeps(precision, dtype):
    from ch03_gpt_model.gpt import ACTIVATION_BYTES, saved_activation_bytes

    measured = {}
    for n_layer in (1, 3):
        for batch in (2, 4):
            cfg = GPTConfig(vocab_size=300, context_length=64, n_layer=n_layer, n_head=4, n_embd=96)
            x, y = torch.randint(0, 300, (batch, 64)), torch.randint(0, 300, (batch, 64))
            measured[n_layer, batch] = saved_activation_bytes(tiny_model(cfg=cfg).train(), x, y, dtype)
    # what 2 more layers keep for 2 more sequences: the embeddings, the loss and autocast's weight copies cancel
    per_layer = (measured[3, 4] - measured[3, 2] - measured[1, 4] + measured[1, 2]) / (2 * 2 * 64 * 96)
    assert per_layer == pytest.approx(ACTIVATION_BYTES[precision], rel=0.05)


def test_small_logits_are_computed_whole_and_agree(monkeypatch):
    from ch03_gpt_model import gpt

    hidden, weight, targets = _loss_case()
    targets[:5] = -100
    whole = gpt.linear_cross_entropy(hidden, weight, targets)
    whole_grads = torch.autograd.grad(whole, [hidden, weight])
    monkeypatch.setattr(gpt, "WHOLE_LOGITS_MAX", 0)
    chunks = gpt.linear_cross_entropy(hidden, weight, targets)
    chunk_grads = torch.autograd.grad(chunks, [hidden, weight])
    assert whole.item() == pytest.approx(chunks.item(), abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole_grads, chunk_grads))

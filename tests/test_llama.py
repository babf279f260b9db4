"""Chapter 6: Llama's parts against PyTorch and transformers, the released shapes, GGUF, the chat model."""
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from gguf_files import gguf_name, write_llama_gguf

from ch01_tokenization.tokenization import BPETokenizer
from ch03_gpt_model.gpt import generate
from ch06_llama.chat import chat_prompt
from ch06_llama.checkpoints import (
    config_from_hf,
    dequantize_q4_1,
    dequantize_q8_0,
    download_llama_hf,
    quantize_q4_1,
    special_tokens_from_hf,
)
from ch06_llama.layers import (
    LLAMA_CONFIGS,
    GroupedQueryAttention,
    LlamaConfig,
    RMSNorm,
    RopeScaling,
    apply_rope,
    apply_rope_interleaved,
    half_to_interleaved,
    interleaved_to_half,
    rope_cos_sin,
    rope_frequencies,
    swiglu_hidden_size,
)
from ch06_llama.llama import GeluMLP, HybridConfig, HybridModel, LlamaModel, document_mask
from shared.config import ConfigError
from shared.data import DataUnavailableError, fetch, read_text

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def small(**changes) -> LlamaConfig:
    base = dict(vocab_size=97, context_length=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48,
                rope_theta=10000.0, rope_scaling=None)
    return LlamaConfig(**{**base, **changes})


# ---- the parts ------------------------------------------------------------------------------

def test_rmsnorm_equals_transformers_and_keeps_the_dtype():
    torch.manual_seed(0)
    ours = RMSNorm(48, eps=1e-6)
    torch.nn.init.normal_(ours.weight)
    theirs = transformers.models.llama.modeling_llama.LlamaRMSNorm(48, eps=1e-6)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 48) * 4 + 2
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    assert ours(x.bfloat16()).dtype == torch.float32     # the fp32 weight promotes, as transformers does
    assert torch.allclose(ours(x.bfloat16()), theirs(x.bfloat16()), atol=1e-2)


@pytest.mark.parametrize("n_embd, multiple_of, multiplier, expected", [
    (4096, 1024, 1.3, 14336), (2048, 256, 1.5, 8192), (3072, 256, 1.0, 8192), (8192, 4096, 1.3, 28672),
    (4096, 256, None, 11008)])                              # the last: Llama 2 7B
def test_swiglu_hidden_size_reproduces_released_widths(n_embd, multiple_of, multiplier, expected):
    assert swiglu_hidden_size(n_embd, multiple_of, multiplier) == expected


def test_rope_scores_depend_only_on_distance():
    torch.manual_seed(0)
    inv_freq = rope_frequencies(32, 10000.0)
    q, k = torch.randn(2, 1, 32, dtype=torch.float64).unbind(0)

    def score(m, n):
        cm, sm = rope_cos_sin(inv_freq, torch.tensor([m]))
        cn, sn = rope_cos_sin(inv_freq, torch.tensor([n]))
        return (apply_rope(q, cm.double(), sm.double()) * apply_rope(k, cn.double(), sn.double())).sum()

    assert torch.allclose(score(5, 2), score(1005, 1002), atol=1e-4)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-4)


def test_rope_layouts_agree_only_with_the_permutation():
    torch.manual_seed(0)
    n_heads, dim, width, seq = 3, 8, 24, 7
    inv_freq, positions = rope_frequencies(dim, 10000.0), torch.arange(seq)
    cos, sin = rope_cos_sin(inv_freq, positions)
    w, x = torch.randn(n_heads * dim, width), torch.randn(1, seq, width)

    def heads(weight):
        return (x @ weight.t()).view(1, seq, n_heads, dim).transpose(1, 2)

    meta = apply_rope_interleaved(heads(w), inv_freq, positions)
    hf = apply_rope(heads(interleaved_to_half(w, n_heads)), cos, sin)
    # the layouts store the same vector in different orders: compare scores, which ignore the order
    assert torch.allclose(meta @ meta.transpose(-1, -2), hf @ hf.transpose(-1, -2), atol=1e-4)
    wrong = apply_rope(heads(w), cos, sin)
    assert not torch.allclose(meta @ meta.transpose(-1, -2), wrong @ wrong.transpose(-1, -2), atol=1e-2)
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, n_heads), n_heads), w)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_frequency_scaling_equals_transformers(factor):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    config = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0,
                                      rope_scaling={"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_frequencies(128, 500000.0, scaling)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=0)
    plain = rope_frequencies(128, 500000.0)
    assert torch.equal(ours[:10], plain[:10]) and torch.allclose(ours[-10:], plain[-10:] / factor)


def test_grouped_query_attention_equals_torch_enable_gqa():
    if "enable_gqa" not in (F.scaled_dot_product_attention.__doc__ or ""):
        pytest.skip("this torch has no enable_gqa (added in 2.5)")
    torch.manual_seed(0)
    attn = GroupedQueryAttention(48, n_head=6, n_kv_head=2)
    x = torch.randn(2, 9, 48)
    cos, sin = rope_cos_sin(rope_frequencies(8, 10000.0), torch.arange(9))
    q = apply_rope(attn.heads(x, attn.q_proj, 6), cos, sin)
    k = apply_rope(attn.heads(x, attn.k_proj, 2), cos, sin)
    context = F.scaled_dot_product_attention(q, k, attn.heads(x, attn.v_proj, 2), is_causal=True, enable_gqa=True)
    assert torch.allclose(attn(x, cos, sin), attn.o_proj(context.transpose(1, 2).flatten(2)), atol=1e-5)


# ---- configs and the model -----------------------------------------------------------------

def test_released_configs_have_their_exact_parameter_counts():
    counts = {}
    for name, cfg in LLAMA_CONFIGS.items():
        with torch.device("meta"):
            counts[name] = LlamaModel(cfg).num_parameters()
    assert counts == {"llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
                      "llama-3.1-8b": 8_030_261_248, "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("changes, match", [
    (dict(n_kv_head=3), "must divide n_head"), (dict(n_head=5), "divisible by n_head"),
    (dict(n_embd=12, n_head=4, n_kv_head=4), "must be even"), (dict(n_layer=0), "n_layer"),
    (dict(rope_theta=0.5), "rope_theta"), (dict(rope_scaling={"factor": 0.5}), "rope_scaling: .*factor"),
    (dict(rope_scaling={"fctor": 8.0}), "rope_scaling: .*is not a RopeScaling"),
    (dict(rope_divisors=(1.0, 2.0)), "rope_divisors: must be 4 positive"),
    (dict(rope_divisors=(1.0, 2.0, 0.0, 4.0)), "rope_divisors: must be 4 positive"),
    (dict(rope_divisors="1234"), "rope_divisors: must be a list of numbers"),
    (dict(rope_divisors=(1.0,) * 4, rope_scaling={"factor": 8.0}), "rope_divisors: give rope_scaling or"),
    (dict(rope_scaling=8.0), "rope_scaling"),
    (dict(norm_eps=0), "norm_eps"), (dict(vocab_size=True), "vocab_size"),
    (dict(document_separator=97), "document_separator: must be a token id below vocab_size"),
    (dict(document_separator=True), "document_separator")])
def test_bad_configs_are_refused_naming_the_field(changes, match):
    with pytest.raises(ConfigError, match=match) as info:
        small(**changes)
    assert info.value.field in changes or info.value.field == "n_head"


def test_rope_scaling_may_be_a_dict_and_a_config_round_trips_through_json():
    cfg = small(rope_scaling={"factor": 32.0, "original_max_position_embeddings": 16})
    assert cfg.rope_scaling == RopeScaling(factor=32.0, original_max_position_embeddings=16)
    assert LlamaConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


@pytest.mark.parametrize("bad, match", [
    (dict(factor=0.5), "factor"), (dict(low_freq_factor=4.0, high_freq_factor=1.0), "low_freq_factor"),
    (dict(original_max_position_embeddings=0), "original_max")])
def test_bad_rope_scaling_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(**bad)


VARIANTS = {"gqa-llama3-tied": dict(n_kv_head=2, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16)),
            "mha-untied": dict(n_kv_head=4, tie_embeddings=False),
            "mqa-factor32-untied": dict(n_kv_head=1, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8),
                                        tie_embeddings=False),
            "linear-scaling": dict(rope_divisors=[4.0] * 4)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers_in_both_directions(variant, tmp_path):
    torch.manual_seed(0)
    ours = LlamaModel(small(**VARIANTS[variant])).eval()
    idx = torch.randint(0, 97, (2, 60))
    with torch.no_grad():
        theirs = transformers.LlamaForCausalLM.from_pretrained(ours.save_pretrained_hf(tmp_path / "ours")).eval()
        assert torch.allclose(ours(idx), theirs(idx).logits, atol=1e-4)
        fresh = transformers.LlamaForCausalLM(theirs.config).eval()
        fresh.save_pretrained(tmp_path / "theirs")
        back = LlamaModel.from_pretrained_hf(tmp_path / "theirs").eval()
        assert back.cfg == ours.cfg
        assert torch.allclose(back(idx), fresh(idx).logits, atol=1e-4)


def test_pair_by_pair_divisors_have_no_hugging_face_config(tmp_path):
    with pytest.raises(ValueError, match="differ from pair to pair"):
        LlamaModel(small(rope_divisors=(1.0, 1.0, 2.0, 8.0))).save_pretrained_hf(tmp_path)


def test_from_pretrained_hf_loads_without_initialising_first(tmp_path, monkeypatch):
    torch.manual_seed(0)
    LlamaModel(small()).save_pretrained_hf(tmp_path)
    normal_ = torch.nn.init.normal_

    def only_on_meta(tensor, *args, **kwargs):           # shapes may be "initialised"; memory must not be
        assert tensor.device.type == "meta", "from_pretrained_hf filled real memory with random weights"
        return normal_(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", only_on_meta)
    loaded = LlamaModel.from_pretrained_hf(tmp_path)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())


def test_a_tied_head_is_the_embedding_and_is_not_saved_twice(tmp_path):
    model = LlamaModel(small())
    assert model.output_weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not any(name.startswith("lm_head") for name in model.state_dict())
    untied = LlamaModel(small(tie_embeddings=False))
    assert untied.output_weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" in untied.state_dict()


def test_loss_is_cross_entropy_of_the_logits_with_ignored_targets():
    torch.manual_seed(0)
    model = LlamaModel(small())
    idx, targets = torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 20))
    targets[0, :5] = -100
    expected = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert torch.allclose(model(idx, targets), expected, atol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="shape of idx"):
        model(idx, targets[:, :3])


def test_generate_from_chapter_3_drives_a_llama():
    torch.manual_seed(0)
    model = LlamaModel(small())
    out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=70, temperature=0)   # past the context
    assert out.shape == (1, 73)


def test_config_from_hf_refuses_what_llama_model_does_not_compute():
    hf = json.loads(json.dumps({"model_type": "llama", "vocab_size": 97, "max_position_embeddings": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32,
                                "intermediate_size": 48}))
    assert config_from_hf(hf).n_kv_head == 4 and not config_from_hf(hf).tie_embeddings
    for bad in [{"hidden_act": "gelu"}, {"attention_bias": True}, {"head_dim": 16},
                {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}]:
        with pytest.raises(ValueError, match="computes differently"):
            config_from_hf({**hf, **bad})
    with pytest.raises(ValueError, match="not a Llama"):
        config_from_hf({**hf, "model_type": "gpt2"})


def test_special_tokens_from_hf_reads_added_tokens(tmp_path):
    path = tmp_path / "tokenizer_config.json"
    path.write_text(json.dumps({"added_tokens_decoder": {
        "128000": {"content": "<|begin_of_text|>", "special": True},
        "128009": {"content": "<|eot_id|>", "special": True}, "5": {"content": "word", "special": False}}}))
    assert special_tokens_from_hf(path) == {"<|begin_of_text|>": 128000, "<|eot_id|>": 128009}


def test_download_without_a_token_says_what_to_do(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(DataUnavailableError, match="HF_TOKEN"):
        download_llama_hf("meta-llama/Llama-3.2-1B-Instruct")


def test_download_offline_is_a_data_unavailable_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataUnavailableError, match="could not download"):
        download_llama_hf("meta-llama/Llama-3.2-1B-Instruct", token="hf_not_a_real_token")


# ---- documents packed into one window --------------------------------------------------------

def test_document_mask_is_causal_within_each_document():
    separator = 0
    idx = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9], [0, 3, 3, 3, 0, 4, 4, 4]])
    document = [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 2, 2, 2]]       # a separator ends its own document
    expected = torch.tensor([[[j <= i and row[i] == row[j] for j in range(8)] for i in range(8)] for row in document])
    assert torch.equal(document_mask(idx, separator), expected[:, None])


@pytest.mark.parametrize("kind", ["llama", "hybrid-mla"])
def test_a_packed_document_gets_the_logits_it_has_alone_only_with_the_mask(kind):
    torch.manual_seed(0)
    cfg = small(document_separator=0)
    build = {"llama": lambda c: LlamaModel(c),
             "hybrid-mla": lambda c: HybridModel(HybridConfig(**dataclasses.asdict(c), attention="mla",
                                                              kv_lora_rank=16, rope_head_dim=4))}[kind]
    masked = build(cfg).eval()
    across = build(dataclasses.replace(cfg, document_separator=None)).eval()
    across.load_state_dict(masked.state_dict())
    first, second = torch.randint(1, 97, (1, 11)), torch.randint(1, 97, (1, 9))
    separator = torch.zeros(1, 1, dtype=torch.long)
    packed = torch.cat([first, separator, second, separator], dim=1)
    alone = torch.cat([second, separator], dim=1)
    with torch.no_grad():
        assert torch.allclose(masked(packed)[:, 12:], masked(alone), atol=1e-5)
        assert torch.equal(masked(first), across(first))                  # no separator: the causal mask
        assert not torch.allclose(across(packed)[:, 12:], across(alone), atol=1e-3)
    loss = masked(packed, packed)                                          # it trains: the loss has gradients
    loss.backward()
    assert masked.model.embed_tokens.weight.grad is not None


def test_the_trainer_takes_a_document_separator():
    from ch04_pretraining.__main__ import parse_args

    cfg, _, _ = parse_args(["--arch", "llama", "--scale", "smoke", "--document-separator", "0"])
    assert cfg.model["document_separator"] == 0
    assert cfg.build_model(65).cfg.document_separator == 0


# ---- the hybrid of the ablation ------------------------------------------------------------

def test_hybrid_with_llamas_parts_is_a_llama():
    torch.manual_seed(0)
    llama = LlamaModel(small())
    hybrid = HybridModel(HybridConfig(**dataclasses.asdict(small())))
    hybrid.load_state_dict(llama.state_dict())
    idx = torch.randint(0, 97, (2, 30))
    assert torch.equal(hybrid(idx), llama(idx))


def test_hybrid_swaps_each_part_back_to_gpt2s():
    cfg = HybridConfig(**{**dataclasses.asdict(small()), "norm": "layer", "positions": "learned", "mlp": "gelu",
                          "ffn_hidden": 128})
    model = HybridModel(cfg)
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.LayerNorm) and layer.input_layernorm.bias is None
    assert isinstance(model.model.norm, torch.nn.LayerNorm) and isinstance(layer.mlp, GeluMLP)
    assert model.model.wpe.weight.shape == (64, 32)
    cos, sin = model.rope(torch.arange(5))
    assert torch.equal(cos, torch.ones(5, 8)) and torch.equal(sin, torch.zeros(5, 8))     # no rotation
    idx = torch.randint(0, 97, (1, 20))
    shifted = model(torch.cat([idx[:, :1], idx], dim=1))[:, 1:]
    assert not torch.allclose(model(idx), shifted, atol=1e-4)        # learned positions: the position matters
    assert model(idx, idx).isfinite()
    with pytest.raises(ConfigError, match="mlp: must be swiglu or gelu"):
        HybridConfig(**{**dataclasses.asdict(small()), "mlp": "relu"})


# ---- quantization and the real model --------------------------------------------------------

def test_q4_1_round_trip_and_layout():
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((4, 64)).astype(np.float32)
    packed = quantize_q4_1(weights)
    assert packed.shape == (4, 40) and packed.dtype == np.uint8
    restored = dequantize_q4_1(packed)
    step = (weights.reshape(-1, 32).max(1) - weights.reshape(-1, 32).min(1)) / 15
    assert np.all(np.abs(restored - weights).reshape(-1, 32) <= step[:, None] * 0.5 + 1e-2)
    # weights 0, 2, ..., 30 twice: minimum 0, step 2, so weights j and j + 16 are both at level j ...
    block = quantize_q4_1(np.tile(np.arange(16, dtype=np.float32) * 2, 2)[None, :])
    assert block[0, 4] == 0x00 and block[0, 5] == 0x11 and block[0, 19] == 0xFF   # ... and share byte j
    assert dequantize_q8_0(np.zeros((1, 34), dtype=np.uint8)).shape == (1, 32)
    with pytest.raises(ValueError, match="whole number"):
        dequantize_q4_1(np.zeros((1, 30), dtype=np.uint8))


@pytest.fixture(scope="module")
def gguf_path():
    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reader(gguf_path):
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(gguf_path)


def test_dequantization_is_bit_identical_to_the_gguf_package(reader):
    from gguf.quants import dequantize

    seen = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind in ("Q4_1", "Q8_0"):
            ours = dequantize_q4_1(tensor.data) if kind == "Q4_1" else dequantize_q8_0(tensor.data)
            assert np.array_equal(ours, dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)), tensor.name
            seen.add(kind)
    assert seen == {"Q4_1", "Q8_0"}


@pytest.fixture(scope="module")
def smollm(reader):
    return LlamaModel.from_gguf(reader)                  # an open reader (the tokenizer below reads the path)


def test_from_gguf_logits_equal_transformers(smollm, gguf_path):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                               dtype=torch.float32).eval()
    torch.manual_seed(0)
    idx = torch.randint(0, smollm.cfg.vocab_size, (2, 33))
    with torch.no_grad():
        assert torch.allclose(smollm(idx), theirs(idx).logits, atol=1e-4)
    assert smollm.cfg.n_kv_head == 3 and smollm.cfg.tie_embeddings


def llama_cpp_rope_divisors(head_dim: int, theta: float, rope: dict) -> list[float]:
    """What llama.cpp's converter stores as `rope_freqs` for a Hugging Face config with Llama 3's scaling: per
    pair, 1 for the short wavelengths, `factor` for the long ones, the reciprocal of the blend between (written
    here from the converter's rule, not from chapter 6's code)."""
    context, low, high, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                                  rope["high_freq_factor"], rope["factor"])
    divisors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < context / high:
            divisors.append(1.0)
        elif wavelength > context / low:
            divisors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return divisors


def write_llama3_gguf(model: transformers.LlamaForCausalLM, path, block_count: int | None = None,
                      head_count: int | None = None, extra: dict | None = None) -> None:
    """`model` as a float32 GGUF file the way llama.cpp's converter writes a Llama 3.1/3.2: llama.* metadata, q
    and k rows in Meta's interleaved layout, and the RoPE scaling only as the `rope_freqs` tensor. `block_count`,
    `head_count` and `extra` tensors (name -> array) make a damaged or foreign file."""
    cfg, rope = config_from_hf(model.config.to_dict()), model.config.rope_parameters
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.float()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = half_to_interleaved(tensor, cfg.n_head if "q_proj" in name else cfg.n_kv_head)
        tensors[gguf_name(name)] = tensor.numpy()
    divisors = llama_cpp_rope_divisors(cfg.head_dim, rope["rope_theta"], rope)
    tensors |= {**(extra or {}), "rope_freqs.weight": np.array(divisors, dtype=np.float32)}
    write_llama_gguf(path, cfg, tensors, block_count=block_count, head_count=head_count)


def test_a_llama_3_gguf_with_rope_freqs_equals_the_model_it_was_written_from(tmp_path):
    pytest.importorskip("gguf")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=10000.0,
        initializer_range=0.2)                                 # large weights: attention that positions change
    theirs = transformers.LlamaForCausalLM(config).eval()
    write_llama3_gguf(theirs, tmp_path / "llama3.gguf")
    ours = LlamaModel.from_gguf(tmp_path / "llama3.gguf")
    divisors = ours.cfg.rope_divisors
    assert divisors[0] == 1.0 and divisors[-1] == 8.0 and 1.0 < divisors[1] < 8.0     # kept, blended, stretched
    idx = torch.randint(0, 97, (2, 250))                       # far past the 64 positions of the original context
    with torch.no_grad():
        expected = theirs(idx).logits
        assert torch.allclose(ours(idx), expected, atol=1e-4)
        unscaled = LlamaModel(dataclasses.replace(ours.cfg, rope_divisors=None)).eval()
        unscaled.load_state_dict(ours.state_dict())
        assert (unscaled(idx) - expected)[:, 64:].abs().max() > 0.1       # the file's divisors are what matter


def tiny_llama3() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}, rope_theta=10000.0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("damage, message", [
    (dict(block_count=200_000), "llama.block_count does not match its tensor table (the number of blocks is "
                                "200,000 in the settings but 2 in the weights): the file is damaged"),
    (dict(block_count=1), "the number of blocks is 1 in the settings but 2 in the weights"),
    (dict(head_count=0), "llama.attention.head_count is 0, which must be a whole number >= 1"),
    (dict(extra={"blk.0.attn_q_norm.weight": np.ones(16, dtype=np.float32)}),
     "tensor 'blk.0.attn_q_norm.weight' has no place in this chapter's Llama"),
    (dict(extra={"token_embd_norm.weight": np.ones(64, dtype=np.float32)}),
     "tensor 'token_embd_norm.weight' has no place"),
])
def test_a_gguf_whose_metadata_and_tensors_disagree_is_refused_before_anything_is_built(tmp_path, damage, message):
    pytest.importorskip("gguf")
    path = tmp_path / "damaged.gguf"
    write_llama3_gguf(tiny_llama3(), path, **damage)
    with pytest.raises(ValueError, match=re.escape(f"{path}: its ") + ".*" + re.escape(message)):
        LlamaModel.from_gguf(path)


@pytest.fixture(scope="module")
def smollm_tokenizer(gguf_path):
    return BPETokenizer.from_gguf(gguf_path)


def test_gguf_tokenizer_and_chat_template_equal_transformers(smollm_tokenizer, gguf_path, reader):
    import random

    theirs = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    rng = random.Random(1)
    alphabet = list("abcXYZ019 '\t\n\r.,!?-_\"") + ["é", "ß", "日", "🤗", "👍🏽", "\u200b", "\u00a0", "'s", "'LL",
                                                     " the", "   ", "\n\n", "ﬁ", "Ω"]
    texts = [read_text("the-verdict"), read_text("tinyshakespeare")[:20_000]]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(500)]
    for text in texts:
        assert smollm_tokenizer.encode(text) == theirs.encode(text), text
    chat = "<|im_start|>user\nhi<|im_end|>\n"
    assert smollm_tokenizer.encode(chat, allowed_special="all") == theirs.encode(chat)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    template = reader.fields["tokenizer.chat_template"].contents()
    for generation_prompt in (True, False):
        assert chat_prompt(messages, template, generation_prompt) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_chat_template_and_answer(smollm, smollm_tokenizer, reader):
    template = reader.fields["tokenizer.chat_template"].contents()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = chat_prompt(messages, template)
    assert prompt.endswith("<|im_start|>assistant\n") and "You are a helpful AI assistant" in prompt
    ids = smollm_tokenizer.encode(prompt, allowed_special="all")
    out = generate(smollm, torch.tensor([ids]), 20, temperature=0, eos_id=smollm_tokenizer.special_tokens["<|im_end|>"])
    assert "Paris" in smollm_tokenizer.decode(out[0, len(ids):].tolist())
    with pytest.raises(ValueError, match="role"):
        chat_prompt([{"content": "no role"}], template)
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with the user') }}{% endif %}ok"
    assert chat_prompt(messages, strict) == "ok"
    with pytest.raises(ValueError, match="refuses these messages: start with the user"):
        chat_prompt([{"role": "assistant", "content": "hi"}], strict)


# ---- chat templates as models ship them -------------------------------------------------------

TEMPLATES = Path(__file__).resolve().parent.parent / "shared" / "fixtures" / "chat_templates"
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Today's weather <in °C> & wind",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "e.g. Zürich"}}}}}]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, 日本?"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather in Zürich?"}]


@pytest.fixture(scope="module")
def hf_chat_tokenizer():
    """A transformers tokenizer with a one-word vocabulary: apply_chat_template renders with no model files."""
    from tokenizers import Tokenizer, models

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1}, unk_token="<unk>")),
        bos_token="<s>", eos_token="<s>")


@pytest.fixture()
def frozen_clock(monkeypatch):
    """Today, for transformers' templates and ours, 2024-02-29 (so a date printed is this one)."""
    import datetime as dt

    from transformers.utils import chat_template_utils

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2024, 2, 29, 12, 0)

    monkeypatch.setattr(chat_template_utils, "datetime", Frozen)
    return Frozen.now


@pytest.mark.parametrize("name", ["llama-3.2", "qwen3", "smollm2-chatml"])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_shipped_chat_templates_render_as_transformers_renders_them(name, tools, hf_chat_tokenizer, frozen_clock):
    template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        for generation_prompt in (True, False):
            theirs = hf_chat_tokenizer.apply_chat_template(messages, chat_template=template, tools=tools,
                                                           tokenize=False, add_generation_prompt=generation_prompt)
            ours = chat_prompt(messages, template, generation_prompt, now=frozen_clock, tools=tools,
                               bos_token="<s>", eos_token="<s>")
            assert ours == theirs
    if name == "llama-3.2":
        assert "Today Date: 29 Feb 2024" in ours                # strftime_now, read from the clock we gave
    if tools and name != "smollm2-chatml":                      # (SmolLM2's template has no place for tools)
        assert "Zürich" in ours and "<in °C> & wind" in ours   # tojson as json.dumps writes it, not HTML-escaped


def test_chat_templates_may_break_and_continue_loops(hf_chat_tokenizer):
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                "{{ m.content }};{% if m.role == 'assistant' %}{% break %}{% endif %}{% endfor %}")
    theirs = hf_chat_tokenizer.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    assert chat_prompt(CONVERSATION, template) == theirs == "Hi, 日本?;Hello!;"

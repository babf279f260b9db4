"""Fast generation: chapter 3's KV cache against recomputation (for chapter 3's GPT-2 and chapter 6's Llamas),
batches against single prompts, packed weights against plain ones, and our tokens against transformers'."""
import copy

import pytest
import torch
import transformers

from ch03_gpt_model.gpt import (
    CachedLogits,
    GPTConfig,
    GPTModel,
    KVCache,
    generate,
    left_pad,
    output_layer,
    supports_cache,
)
from ch06_llama.checkpoints import dequantize_q4_1, quantize_q4_1
from ch06_llama.decoding import (
    DecodeLinear,
    Int4Linear,
    PackedLinear,
    decode_bytes_per_token,
    pack_for_decoding,
    quantize_for_decoding,
    quantize_int4,
    quantize_int4_for_decoding,
    quantize_int8,
)
from ch06_llama.layers import LLAMA_CONFIGS, LlamaConfig, rope_cos_sin, rope_frequencies
from ch06_llama.llama import (
    HybridConfig,
    HybridModel,
    LatentAttention,
    LatentCache,
    LlamaModel,
    kv_cache_bytes_per_token,
    latent_cache_bytes_per_token,
)
from shared.config import ConfigError

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

VOCAB = 97


def gpt(context_length: int = 64) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=VOCAB, context_length=context_length, n_layer=2, n_head=4, n_embd=32))


def llama(context_length: int = 64) -> LlamaModel:
    torch.manual_seed(0)
    return LlamaModel(LlamaConfig(vocab_size=VOCAB, context_length=context_length, n_layer=2, n_head=4,
                                  n_kv_head=2, n_embd=32, ffn_hidden=48, rope_theta=10000.0, rope_scaling=None))


def hybrid(context_length: int = 64) -> HybridModel:
    torch.manual_seed(0)
    return HybridModel(HybridConfig(vocab_size=VOCAB, context_length=context_length, n_layer=2, n_head=4,
                                    n_kv_head=1, n_embd=32, ffn_hidden=48, rope_theta=10000.0, rope_scaling=None,
                                    positions="learned", norm="layer", mlp="gelu"))


def mla(context_length: int = 64, q_lora_rank: int = 0) -> HybridModel:
    torch.manual_seed(0)
    return HybridModel(HybridConfig(vocab_size=VOCAB, context_length=context_length, n_layer=2, n_head=4,
                                    n_kv_head=4, n_embd=32, ffn_hidden=48, rope_theta=10000.0, rope_scaling=None,
                                    attention="mla", kv_lora_rank=16, rope_head_dim=4, q_lora_rank=q_lora_rank))


MODELS = {"gpt": gpt, "llama": llama, "hybrid": hybrid, "mla": mla}


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the cache against recomputing everything ---------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_cached_logits_equal_recomputed_logits_at_every_step_past_the_context(name):
    model = MODELS[name](context_length=24).eval()
    idx = prompt(2, 10)
    logits_of = CachedLogits(model, 2, 10 + 30)
    assert logits_of.cache.max_length == 24                  # the context, not prompt + new tokens
    for _ in range(30):                                      # 16 steps past the context: the window slides
        cached = logits_of(idx, None)
        with torch.no_grad():
            recomputed = model(idx[:, -24:])[:, -1]
        torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)
        idx = torch.cat([idx, cached.argmax(-1, keepdim=True)], dim=1)


@pytest.mark.parametrize("name", MODELS)
def test_greedy_tokens_are_identical_for_200_tokens(name):
    model = MODELS[name](context_length=256)
    idx = prompt(1, 8)
    cached = generate(model, idx, 200, temperature=0)
    assert cached.shape == (1, 208)
    assert torch.equal(cached, generate(model, idx, 200, temperature=0, use_cache=False))


@pytest.mark.parametrize("name", MODELS)
def test_seeded_sampling_is_identical_with_and_without_the_cache(name):
    model = MODELS[name]()
    runs = [generate(model, prompt(3, 5), 40, temperature=0.9, top_k=30, top_p=0.95,
                     generator=torch.Generator().manual_seed(7), use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(*runs)


def test_a_prompt_longer_than_the_context_is_cropped_to_its_last_tokens():
    model = gpt(context_length=24)
    long = prompt(1, 40)
    out = generate(model, long, 5, temperature=0)
    assert torch.equal(out[:, 40:], generate(model, long[:, -24:], 5, temperature=0)[:, 24:])


@pytest.mark.parametrize("name", MODELS)
def test_a_kept_cache_truncated_to_a_shared_start_gives_the_tokens_of_a_fresh_one(name):
    model = MODELS[name](context_length=128)
    first = generate(model, prompt(1, 12), 10, temperature=0)
    cache = model.new_cache(1, 128)
    kept = generate(model, first[:, :6], 6, temperature=0, cache=cache)
    assert cache.length == kept.shape[1] - 1                 # every token but the last one went through the model
    follow_up = torch.cat([kept[:, :9], prompt(1, 5, seed=2)], dim=1)     # shares 9 tokens with what it holds
    cache.truncate(9)
    assert cache.length == 9 and int(cache.next_position[0]) == 9
    assert torch.equal(generate(model, follow_up, 12, temperature=0, cache=cache),
                       generate(model, follow_up, 12, temperature=0))


def test_a_kept_cache_is_refused_where_it_cannot_go_on():
    model = llama(context_length=64)
    cache = model.new_cache(1, 20)
    generate(model, prompt(1, 8), 4, temperature=0, cache=cache)
    for idx, new, match in [(prompt(1, 11), 4, "longer than the 11 tokens"), (prompt(1, 15), 10, "room for")]:
        with pytest.raises(ValueError, match=match):
            generate(model, idx, new, temperature=0, cache=cache)
    with pytest.raises(ValueError, match="use_cache=True"):
        generate(model, prompt(1, 15), 2, temperature=0, cache=cache, use_cache=False)
    with pytest.raises(ValueError, match="can keep 0 to 11"):
        cache.truncate(12)


def test_the_model_is_left_in_the_mode_it_was_in():
    model = llama().train()
    generate(model, prompt(1, 4), 3)
    assert model.training


# ---- batches of different lengths, stopping, streaming ----------------------------------------------------

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16], [17], [20, 21, 22, 23]]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_rows_get_exactly_the_tokens_they_get_alone(name, use_cache):
    model = MODELS[name]()
    idx, mask = left_pad(PROMPTS, pad_id=0)
    out = generate(model, idx, 25, temperature=0, attention_mask=mask, use_cache=use_cache)
    for row, tokens in zip(out, PROMPTS):
        alone = generate(model, torch.tensor([tokens]), 25, temperature=0)[0]
        assert torch.equal(row[idx.shape[1]:], alone[len(tokens):])


@pytest.mark.parametrize("name", MODELS)
def test_rows_taken_from_other_caches_go_on_as_they_would_alone(name):
    """take_rows: rows of a padded batch's cache and of a single prompt's, moved into one new cache in another
    order, give each row the next logits it would get where it was."""
    model = MODELS[name]().double()
    idx, mask = left_pad(PROMPTS[:2])
    batch_cache, single_cache = model.new_cache(2, 16), model.new_cache(1, 16)
    model.hidden_states(idx, batch_cache, mask.bool())
    model.hidden_states(torch.tensor([PROMPTS[3]]), single_cache)
    joined = model.new_cache(3, 20)
    joined.take_rows([(batch_cache, 1), (single_cache, 0), (batch_cache, 0)])
    assert joined.length == len(PROMPTS[1]) and joined.padded
    new = torch.tensor([[1], [2], [3]])
    head = output_layer(model)
    together = head(model.hidden_states(new, joined)[:, -1])
    for row, tokens in enumerate([PROMPTS[1], PROMPTS[3], PROMPTS[0]]):
        alone = head(model.hidden_states(torch.tensor([tokens + [row + 1]]))[:, -1])
        assert torch.allclose(together[row], alone[0], atol=1e-10), (name, row)
    with pytest.raises(ValueError, match="empty cache of 2 rows"):
        joined.take_rows([(single_cache, 0), (single_cache, 0)])


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_padded_rows_slide_past_the_context_like_single_prompts(name):
    model = MODELS[name](context_length=16)
    idx, mask = left_pad(PROMPTS)
    out = generate(model, idx, 20, temperature=0, attention_mask=mask)
    for row, tokens in zip(out, PROMPTS):
        alone = generate(model, torch.tensor([tokens]), 20, temperature=0)[0]
        assert torch.equal(row[idx.shape[1]:], alone[len(tokens):])


def test_each_row_stops_at_its_own_end_token():
    model = llama()
    idx, mask = left_pad(PROMPTS)
    free = generate(model, idx, 12, temperature=0, attention_mask=mask)[:, idx.shape[1]:]
    eos = int(free[0, 3])                                   # row 0 produces it at step 3 (or earlier)
    out = generate(model, idx, 12, temperature=0, attention_mask=mask, eos_id=eos)[:, idx.shape[1]:]
    for row, free_row in zip(out, free):
        hits = (free_row == eos).nonzero()
        stop = int(hits[0]) if len(hits) else len(free_row)
        assert torch.equal(row[:stop + 1], free_row[:stop + 1])     # the same tokens up to its end token...
        assert (row[stop:] == eos).all() if len(hits) else True     # ...then only end tokens
    first = int((free[0] == eos).nonzero()[0])
    assert first <= 3 and (out[0, first:] == eos).all()


def test_generation_ends_when_every_row_has_stopped():
    model = gpt()
    free = generate(model, prompt(1, 4), 10, temperature=0)
    eos = int(free[0, 4 + 2])
    out = generate(model, prompt(1, 4), 10, temperature=0, eos_id=eos)
    assert out.shape[1] <= 4 + 3 and int(out[0, -1]) == eos


def test_streaming_receives_every_token_as_it_is_chosen():
    model = llama()
    idx, mask = left_pad(PROMPTS)
    received = []

    def on_token(ids: torch.Tensor) -> None:
        received.append(ids.clone())

    out = generate(model, idx, 9, temperature=0, attention_mask=mask, on_token=on_token)
    assert len(received) == 9 and all(ids.shape == (len(PROMPTS),) for ids in received)
    assert torch.equal(torch.stack(received, dim=1), out[:, idx.shape[1]:])


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 3), "idx's shape"),
    (torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), "padded on the right"),
    (torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1]]), "padding after a real token"),
    (torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), "no real token"),
    (torch.tensor([[2, 1, 1, 1], [1, 1, 1, 1]]), "only 1"),
])
def test_a_bad_attention_mask_is_refused(mask, match):
    with pytest.raises(ValueError, match=match):
        generate(gpt(), prompt(2, 4), 2, attention_mask=mask)


def test_left_pad_refuses_empty_prompts():
    with pytest.raises(ValueError, match="empty"):
        left_pad([[1, 2], []])


def test_generate_keeps_chapter_3s_checks():
    with pytest.raises(ValueError, match="context length|crop"):
        gpt()(prompt(1, 65))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(gpt(), prompt(1, 3), -1)
    with pytest.raises(ValueError, match="top_p"):
        generate(llama(), prompt(1, 3), 2, top_p=0)


def test_a_model_without_cache_support_falls_back_to_recomputing():
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.cfg = inner, inner.cfg

        def forward(self, idx):
            return self.inner(idx)

    model = llama()
    assert not supports_cache(Wrapped(model)) and supports_cache(model)
    assert torch.equal(generate(Wrapped(model), prompt(2, 5), 12, temperature=0),
                       generate(model, prompt(2, 5), 12, temperature=0))


# ---- the cache's memory -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kv_heads", [("gpt", 4), ("llama", 2), ("hybrid", 1)])
def test_cache_bytes_follow_the_formula(name, kv_heads):
    model = MODELS[name]()
    cfg, batch, length = model.cfg, 3, 50
    cache = model.new_cache(batch, length)
    assert isinstance(cache, KVCache)
    per_token = kv_cache_bytes_per_token(cfg.n_layer, kv_heads, cfg.n_embd // cfg.n_head, bytes_per_value=4)
    assert per_token == 2 * kv_heads * (cfg.n_embd // cfg.n_head) * cfg.n_layer * 4      # keys and values, fp32
    assert cache.nbytes == per_token * batch * length


def test_latent_cache_bytes_follow_the_formula():
    model = mla()
    cache = model.new_cache(3, 50)
    assert isinstance(cache, LatentCache)
    assert cache.nbytes == latent_cache_bytes_per_token(2, 16, 4, bytes_per_value=4) * 3 * 50 == (16 + 4) * 2 * 4 * 150


def test_released_models_cache_bytes_per_token_in_bf16():
    llama_1b, llama_8b = LLAMA_CONFIGS["llama-3.2-1b"], LLAMA_CONFIGS["llama-3.1-8b"]
    assert kv_cache_bytes_per_token(llama_1b.n_layer, llama_1b.n_kv_head, llama_1b.head_dim) == 32_768
    assert kv_cache_bytes_per_token(llama_8b.n_layer, llama_8b.n_kv_head, llama_8b.head_dim) == 131_072
    assert latent_cache_bytes_per_token(61, 512, 64) == 70_272           # DeepSeek-V3: 61 layers, rank 512, rope 64


def test_a_full_cache_refuses_more_tokens():
    cache = KVCache.for_model(gpt(), 1, 5)
    cache.extend(prompt(1, 4))
    with pytest.raises(ValueError, match="do not fit"):
        cache.extend(prompt(1, 2))


# ---- packed weights ------------------------------------------------------------------------------------------

def test_packed_linear_computes_the_linear_layer_or_packing_is_skipped():
    layer = torch.nn.Linear(40, 24)
    x = torch.randn(3, 5, 40)
    model = pack_for_decoding(copy.deepcopy(llama()))
    if PackedLinear.available():
        torch.testing.assert_close(PackedLinear(layer.weight, layer.bias)(x), layer(x), atol=1e-5, rtol=1e-5)
        assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
        assert isinstance(model.lm_head, PackedLinear)
    else:
        assert any(isinstance(m, torch.nn.Linear) for m in model.modules())


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_a_packed_model_generates_the_same_tokens(name):
    model = MODELS[name]()
    packed = pack_for_decoding(copy.deepcopy(model))
    idx, mask = left_pad(PROMPTS)
    assert torch.equal(generate(packed, idx, 30, temperature=0, attention_mask=mask),
                       generate(model, idx, 30, temperature=0, attention_mask=mask))


# ---- against transformers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_batched_greedy_tokens_equal_transformers_generate(name, tmp_path):
    model = MODELS[name]()
    hf_class = transformers.GPT2LMHeadModel if name == "gpt" else transformers.LlamaForCausalLM
    hf = hf_class.from_pretrained(model.save_pretrained_hf(tmp_path), attn_implementation="sdpa").eval()
    idx, mask = left_pad(PROMPTS)
    with torch.no_grad():
        theirs = hf.generate(idx, attention_mask=mask, max_new_tokens=30, min_new_tokens=30, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(generate(model, idx, 30, temperature=0, attention_mask=mask), theirs)


# ---- latent attention ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_latent_attention_equals_transformers_deepseek_v3_and_absorbing_changes_nothing(q_lora_rank):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as deepseek

    torch.manual_seed(0)
    ours = LatentAttention(64, 4, kv_lora_rank=32, rope_dim=8, q_lora_rank=q_lora_rank, norm_eps=1e-6).eval()
    for parameter in ours.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    config = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank or None,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, rope_interleave=False,
        rms_norm_eps=1e-6, attention_bias=False, max_position_embeddings=64)
    config._attn_implementation = "eager"
    theirs = deepseek.DeepseekV3Attention(config, layer_idx=0).eval()
    theirs.load_state_dict(ours.state_dict())                           # the same names, the same shapes
    x = torch.randn(2, 9, 64)
    cos, sin = rope_cos_sin(rope_frequencies(8, config.rope_parameters["rope_theta"]), torch.arange(9))
    causal = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected = theirs(x, deepseek.DeepseekV3RotaryEmbedding(config)(x, torch.arange(9)[None]), causal)[0]
        expanded, absorbed = (ours(x, cos, sin, absorb=absorb) for absorb in (False, True))
    torch.testing.assert_close(expanded, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(absorbed, expanded, atol=1e-5, rtol=1e-5)


def test_latent_attention_decodes_with_the_absorbed_path_and_trains_with_the_expanded_one(monkeypatch):
    model = mla(q_lora_rank=8)
    calls = []

    def recorded(path: str):
        original = getattr(LatentAttention, path)

        def run(self, *args):
            calls.append(path)
            return original(self, *args)
        return run

    for path in ("absorbed", "expanded"):
        monkeypatch.setattr(LatentAttention, path, recorded(path))
    generate(model, prompt(1, 4), 2, temperature=0)
    assert set(calls) == {"absorbed"}
    calls.clear()
    model.train()(prompt(2, 8), prompt(2, 8, seed=2)).backward()
    assert set(calls) == {"expanded"}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_packing_keeps_the_weight_the_absorbed_path_reads():
    model = mla()
    packed = pack_for_decoding(copy.deepcopy(model))
    assert all(isinstance(layer.self_attn.kv_b_proj, torch.nn.Linear) for layer in packed.model.layers)
    idx, mask = left_pad(PROMPTS)
    assert torch.equal(generate(packed, idx, 20, temperature=0, attention_mask=mask),
                       generate(model, idx, 20, temperature=0, attention_mask=mask))


@pytest.mark.parametrize("changes, match", [
    (dict(attention="mqa"), "attention"), (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(rope_head_dim=5), "rope_head_dim"), (dict(q_lora_rank=-1), "q_lora_rank"),
])
def test_bad_latent_attention_settings_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        HybridConfig(**changes)


# ---- int8 weights --------------------------------------------------------------------------------------------

def test_int8_quantization_is_within_half_a_step_per_channel():
    weight = torch.randn(48, 80) * torch.logspace(-3, 1, 48)[:, None]      # rows of very different sizes
    weight[5] = 0.0                                                          # and an all-zero row
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (48,) and int(q.abs().max()) == 127
    assert (q.abs().amax(dim=1)[torch.arange(48) != 5] == 127).all()        # each row's largest weight: +-127
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 * (1 + 1e-6)).all() and torch.isfinite(scale).all()


@pytest.mark.parametrize("int8", [True, False])
def test_decode_linear_computes_the_dequantized_layer_eagerly_and_compiled(int8):
    torch.manual_seed(0)
    for width in (40, 64):                                 # PyTorch's int8 kernel takes only the second
        layer = torch.nn.Linear(width, 24)
        q, scale = quantize_int8(layer.weight)
        expected_weight = q.float() * scale[:, None] if int8 else layer.weight
        for compiled in (False, True):
            check_decode_linear(DecodeLinear(layer.weight, layer.bias, int8=int8, compiled=compiled), expected_weight,
                                layer.bias)
    assert DecodeLinear.kernel() is not None or DecodeLinear._kernel is False      # compiled, or said why not


def check_decode_linear(decode, expected_weight, bias):
    width = decode.in_features
    for x in (torch.randn(1, width), torch.randn(2, 3, width), torch.randn(40, width)):   # decode rows, a prompt
        expected = torch.nn.functional.linear(x, expected_weight, bias)
        rows = x.numel() // width
        bf16_kernel = (decode.int8 and width % 32 == 0 and DecodeLinear.int8_kernel(x.device)
                       and not (decode.compiled and rows <= DecodeLinear.KERNEL_ROWS))
        if bf16_kernel:                                    # PyTorch's int8 kernel rounds the activations to bf16
            assert ((decode(x) - expected).norm() / expected.norm()).item() < 1e-2
        else:
            torch.testing.assert_close(decode(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["gpt", "llama", "mla"])
def test_a_quantized_model_reads_a_quarter_of_the_bytes_and_still_generates(name):
    model = MODELS[name]()
    quantized = quantize_for_decoding(copy.deepcopy(model))
    left = [n for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(n.endswith("self_attn.kv_b_proj") for n in left) and (len(left) == 2) == (name == "mla")
    assert isinstance(quantized.lm_head, DecodeLinear)
    ratio = decode_bytes_per_token(quantized) / decode_bytes_per_token(model)
    assert 0.25 < ratio < (0.3 if name != "mla" else 0.45)                # scales, and MLA's kept kv_b_proj
    idx, mask = left_pad(PROMPTS)
    out = generate(quantized, idx, 10, temperature=0, attention_mask=mask)
    assert out.shape == (len(PROMPTS), idx.shape[1] + 10)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_smollm_stays_close_to_fp32(bits):
    from ch06_llama.chat import load_chat_model

    chat_model = load_chat_model()
    fp32 = chat_model.model
    quantize = quantize_for_decoding if bits == 8 else quantize_int4_for_decoding
    quantized = quantize(copy.deepcopy(fp32))
    text = "The quick brown fox jumps over the lazy dog. " * 3 + "Paris is the capital of France, and Rome of Italy."
    ids = torch.tensor([chat_model.tokenizer.encode(text)])
    with torch.no_grad():
        logits = [output_layer(m)(m.hidden_states(ids[:, :-1]))[0] for m in (fp32, quantized)]
    losses = [torch.nn.functional.cross_entropy(values, ids[0, 1:]).item() for values in logits]
    agreement = (logits[0].argmax(-1) == logits[1].argmax(-1)).float().mean().item()
    assert abs(losses[1] - losses[0]) < 0.05 and agreement > 0.9


def test_int4_finds_a_q4_1_files_blocks_again():
    weight = torch.randn(32, 128) * torch.logspace(-2, 0, 32)[:, None]
    stored = torch.from_numpy(dequantize_q4_1(quantize_q4_1(weight.numpy())).reshape(32, 128).copy())
    q, scale, low = quantize_int4(stored)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15 and scale.shape == (32, 4)
    again = q.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)
    torch.testing.assert_close(again, stored, atol=1e-6, rtol=1e-5)          # the file's blocks, found again


def test_int4_linear_multiplies_by_its_blocks_and_falls_back_where_it_cannot():
    assert Int4Linear.available()                          # the pinned PyTorch has the kernel on every CPU
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    q, scale, low = quantize_int4(layer.weight)
    expected_weight = q.float() * scale.repeat_interleave(32, 1) + low.repeat_interleave(32, 1)
    int4 = Int4Linear(layer.weight, layer.bias)
    for x in (torch.randn(1, 64), torch.randn(2, 3, 64)):
        expected = torch.nn.functional.linear(x, expected_weight, layer.bias)
        assert ((int4(x) - expected).norm() / expected.norm()).item() < 1e-2          # bf16 activations
    model = quantize_int4_for_decoding(torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(40, 24),
                                                           torch.nn.Linear(64, 24)))
    assert [type(m).__name__ for m in model] == ["Int4Linear", "DecodeLinear", "DecodeLinear"]
    assert model[0].weight_bytes == 48 * 64 // 2 + 2 * 2 * 48 * 2          # 4 bits a weight, 2 bf16 a block


def test_a_4_bit_llama_keeps_its_output_layer_in_8_bits_and_generates():
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=96, context_length=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                   ffn_hidden=128, rope_scaling=None)).eval()
    quantized = quantize_int4_for_decoding(copy.deepcopy(model))
    assert isinstance(quantized.lm_head, DecodeLinear) and quantized.lm_head.int8
    assert all(isinstance(m, Int4Linear) for name, m in quantized.named_modules() if name.endswith("_proj"))
    assert 0.15 < decode_bytes_per_token(quantized) / decode_bytes_per_token(model) < 0.25
    idx, mask = left_pad([[5, 6, 7], [8, 9]])
    out = generate(quantized, idx, 6, temperature=0, attention_mask=mask)
    assert out.shape == (2, 9)

"""Decoding speed: chapter 3's KV cache against recomputation and against transformers' `generate`, in one run.

    python benchmarks/generation.py [--new-tokens 512] [--race-tokens 128] [--rounds 2] [--skip-recompute]

1. The cache against recomputing the whole sequence for every token (`generate(..., use_cache=False)`): GPT-2 124M's
   shape with random weights, one prompt of 16 tokens, `--new-tokens` greedy tokens, fp32, CPU.
2. Against `transformers` `generate(do_sample=False)`, with the same weights and the same tokens out: GPT-2
   124M's shape and the real SmolLM2-135M-Instruct (from the GGUF mirror), batch 1 and batch 8, our plain
   fp32 model, the same model after `pack_for_decoding`, with int8 weights through PyTorch's weight-only int8
   kernel (`torch._weight_int8pack_mm`, bf16 activations; the default of `quantize_for_decoding`), with 4-bit
   blocks through its int4 kernel (`quantize_int4_for_decoding`; on SmolLM2 the GGUF file's own blocks), and
   (optional, where torch.compile works) through our compiled matrix-vector kernel in fp32 and with int8
   weights; for SmolLM2 also llama.cpp on the same
   GGUF file where `llama-cpp-python` is installed (optional). Contestants alternate round by round, so the
   machine's noise hits all alike. int8 and llama.cpp compute with other weights: their tokens are compared,
   not required to match.
3. Prefill against decode, per token, and decode against its memory-bandwidth bound (weights read per
   token / this machine's read bandwidth, both measured here).
Every ratio printed comes from this run; none is compared with a time taken elsewhere.
"""

import argparse
import copy
import tempfile
import time
import warnings

import torch

from ch03_gpt_model.gpt import GPT_CONFIGS, GPTModel, generate
from ch06_llama.decoding import (
    DecodeLinear,
    decode_bytes_per_token,
    measure_read_bandwidth,
    pack_for_decoding,
    quantize_for_decoding,
    quantize_int4_for_decoding,
)
from ch06_llama.llama import LlamaModel
from shared.data import fetch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers import GPT2LMHeadModel, LlamaForCausalLM
    from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

PROMPT_TOKENS = 16


def timed(run) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def cache_against_recompute(model: GPTModel, new_tokens: int) -> None:
    prompt = torch.randint(0, 50257, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    generate(model, prompt, 4, temperature=0)                                    # warm-up
    cached_s, cached = timed(lambda: generate(model, prompt, new_tokens, temperature=0))
    recompute_s, recomputed = timed(lambda: generate(model, prompt, new_tokens, temperature=0, use_cache=False))
    assert torch.equal(cached, recomputed), "the cache changed the tokens"
    print(f"\n1. GPT-2 124M shape, batch 1, {new_tokens} new tokens, fp32, {torch.get_num_threads()} threads")
    print(f"   recompute every token             {new_tokens / recompute_s:8.1f} tokens/s")
    print(f"   KV cache                          {new_tokens / cached_s:8.1f} tokens/s")
    print(f"   cache speed-up: {recompute_s / cached_s:.1f}x  (same {new_tokens} tokens)")


def llama_cpp_contestant(gguf_path, prompt: torch.Tensor, new_tokens: int):
    """llama.cpp generating greedily from the same prompt ids (batch 1), or None without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

    def run():
        llm.reset()                                           # or it would reuse the prompt it saw last time
        out = []
        for token in llm.generate(prompt[0].tolist(), temp=0.0, reset=True):
            out.append(token)
            if len(out) == new_tokens:
                break
        return torch.cat([prompt, torch.tensor([out])], dim=1)
    return run


def race(name: str, ours: torch.nn.Module, hf_class, batch: int, new_tokens: int, rounds: int,
         gguf_path=None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        hf = hf_class.from_pretrained(ours.save_pretrained_hf(folder), attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id = None           # no end-of-text stop: every contestant runs new_tokens
    variants = {"ours, KV cache": ours,
                "ours, KV cache + packed weights": pack_for_decoding(copy.deepcopy(ours), batch_hint=batch),
                "ours, int8 (PyTorch's kernel)": quantize_for_decoding(copy.deepcopy(ours)),
                "ours, 4-bit (PyTorch's int4 kernel)": quantize_int4_for_decoding(copy.deepcopy(ours))}
    if DecodeLinear.kernel() is not None:                                        # optional: torch.compile
        variants["ours, compiled kernel, fp32"] = quantize_for_decoding(copy.deepcopy(ours), int8=False,
                                                                         compiled=True)
        variants["ours, compiled kernel, int8"] = quantize_for_decoding(copy.deepcopy(ours), compiled=True)
    prompt = torch.randint(0, 1000, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(prompt)

    def theirs():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)

    contestants = {"transformers generate": theirs}
    for variant, model in variants.items():
        contestants[variant] = lambda model=model: generate(model, prompt, new_tokens, temperature=0)
    llama_cpp_run = llama_cpp_contestant(gguf_path, prompt, new_tokens) if gguf_path and batch == 1 else None
    if llama_cpp_run is not None:
        contestants["llama.cpp (Q4_1 file)"] = llama_cpp_run
    seconds, outputs = dict.fromkeys(contestants, 0.0), {}
    for run in contestants.values():                                             # warm-up
        run()
    for _ in range(rounds):
        for contestant, run in contestants.items():
            took, outputs[contestant] = timed(run)
            seconds[contestant] += took
    reference = outputs["transformers generate"]
    tokens = rounds * batch * new_tokens
    print(f"   {name}, batch {batch}:")
    for contestant, took in seconds.items():
        same = "" if contestant == "transformers generate" else \
            f"  {seconds['transformers generate'] / took:4.2f}x transformers, same tokens: " \
            f"{(outputs[contestant] == reference).float().mean().item():.0%}"
        print(f"     {contestant:34s} {tokens / took:7.1f} tokens/s{same}")
    for contestant in ("ours, KV cache", "ours, KV cache + packed weights"):
        assert torch.equal(outputs[contestant], reference), f"{contestant} changed the tokens"


def prefill_and_roofline(name: str, model: torch.nn.Module, bandwidth: float) -> None:
    prompt = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(3))
    generate(model, prompt[:, :8], 2, temperature=0)                             # warm-up
    prefill_s, _ = timed(lambda: generate(model, prompt, 1, temperature=0))
    steps = 64
    decode_s, _ = timed(lambda: generate(model, prompt[:, :PROMPT_TOKENS], steps + 1, temperature=0))
    decode_s -= timed(lambda: generate(model, prompt[:, :PROMPT_TOKENS], 1, temperature=0))[0]
    per_token = decode_s / steps
    weight_bytes = decode_bytes_per_token(model)
    bound = bandwidth / weight_bytes
    print(f"   {name}: prefill {1e3 * prefill_s / 512:6.2f} ms/token (512 at once), decode {1e3 * per_token:6.2f} "
          f"ms/token ({per_token / (prefill_s / 512):.0f}x more); {weight_bytes / 1e6:.0f} MB of weights per step, "
          f"bound {bound:.0f} tokens/s, reached {1 / per_token:.0f} ({100 / per_token / bound:.0f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=512, help="tokens for the cache-vs-recompute part")
    parser.add_argument("--race-tokens", type=int, default=128, help="tokens per generation against transformers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-recompute", action="store_true", help="skip part 1 (recomputing is slow)")
    args = parser.parse_args()
    torch.manual_seed(0)
    gpt2 = GPTModel(GPT_CONFIGS["gpt2"]).eval()
    smollm = LlamaModel.from_gguf(fetch("smollm2-135m-instruct"))
    if not args.skip_recompute:
        cache_against_recompute(gpt2, args.new_tokens)
    print(f"\n2. Against transformers, {args.race_tokens} new tokens per prompt, {args.rounds} rounds, fp32")
    for name, model, hf_class, gguf_path in [("GPT-2 124M shape", gpt2, GPT2LMHeadModel, None),
                                             ("SmolLM2-135M-Instruct", smollm, LlamaForCausalLM,
                                              fetch("smollm2-135m-instruct"))]:
        for batch in (1, 8):
            race(name, model, hf_class, batch, args.race_tokens, args.rounds, gguf_path)
    bandwidth = measure_read_bandwidth()
    print(f"\n3. Prefill and decode, batch 1; this machine reads {bandwidth / 1e9:.1f} GB/s")
    for name, model in [("GPT-2 124M shape", gpt2), ("SmolLM2-135M", smollm)]:
        prefill_and_roofline(name, model, bandwidth)
        prefill_and_roofline(name + ", packed", pack_for_decoding(copy.deepcopy(model)), bandwidth)
        prefill_and_roofline(name + ", int8", quantize_for_decoding(copy.deepcopy(model)), bandwidth)
        if DecodeLinear.kernel() is not None:
            prefill_and_roofline(name + ", int8 compiled", quantize_for_decoding(copy.deepcopy(model), compiled=True),
                                 bandwidth)


if __name__ == "__main__":
    main()

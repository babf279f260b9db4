"""Training-step speed of chapter 6's LlamaModel against transformers' LlamaForCausalLM, in one run.

    python benchmarks/llama_train_step.py [--steps 5] [--rounds 4]

Both models get the same Llama config (default: 4 layers, 256 wide, 4 query heads in 2 key/value groups,
SwiGLU 704 wide, context 256, GPT-2's vocabulary size, fp32, CPU), the same weights and the same batches;
steps alternate round by round (train_step.py's `interleaved_seconds`) so the machine's noise hits both alike.
Prints tokens/s of each and their ratio, for training steps and for evaluation (the loss under no_grad).
"""

import tempfile
import warnings

import torch
from train_step import hf_step, interleaved_seconds, ours_step, print_evaluation_race, race_arguments

from ch04_pretraining.pretraining import configure_optimizer
from ch06_llama.layers import LlamaConfig, swiglu_hidden_size
from ch06_llama.llama import LlamaModel

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def main() -> None:
    args = race_arguments(__doc__.split("\n")[0])
    cfg = LlamaConfig(vocab_size=50257, context_length=args.context_length, n_layer=args.n_layer, n_head=4,
                      n_kv_head=2, n_embd=args.n_embd, ffn_hidden=swiglu_hidden_size(args.n_embd, 64),
                      rope_theta=10000.0, rope_scaling=None)
    torch.manual_seed(0)
    ours = LlamaModel(cfg).train()
    with tempfile.TemporaryDirectory() as folder:        # the same weights, through the Hugging Face format
        hf = LlamaForCausalLM.from_pretrained(ours.save_pretrained_hf(folder), attn_implementation="sdpa").train()
    contestants = {"ours (LlamaModel)": (ours, ours_step), "transformers LlamaForCausalLM": (hf, hf_step)}
    optimizers = {name: configure_optimizer(model, 1e-4, 0.1) for name, (model, _) in contestants.items()}
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_length))
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_length))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4), "the two models disagree: not a fair race"
    seconds = interleaved_seconds(contestants, optimizers, x, y, args.rounds, args.steps)
    tokens = args.rounds * args.steps * x.numel()
    print(f"config: {cfg}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    rates = {name: tokens / seconds[name] for name in contestants}
    for name, rate in rates.items():
        print(f"  {name:32s} {rate:8.0f} tokens/s")
    ours_name, hf_name = contestants
    print(f"training step, ratio ours / transformers: {rates[ours_name] / rates[hf_name]:.2f}x")
    print_evaluation_race(contestants, optimizers, x, y, args)


if __name__ == "__main__":
    main()

"""Training-step speed of GPTModel against transformers' GPT2LMHeadModel, and MFU, in one run.

    python benchmarks/train_step.py [--steps 8] [--rounds 3]

Both models get the same config (default: 4 layers, 256 wide, 4 heads, context 256, GPT-2's vocabulary,
fp32, CPU) and the same batches. Steps are interleaved round by round so that the machine's noise hits
both alike; the script prints tokens/s of each, their ratio, and each one's model-FLOPs utilisation
against the matmul peak measured on this machine in the same run. It then times an evaluation, the loss
under `torch.no_grad`, the same way.
"""

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from ch03_gpt_model.gpt import GPTConfig, GPTModel, flops_per_token, measure_peak_flops
from ch04_pretraining.pretraining import configure_optimizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()


def ours_step(model, optimizer, x, y):
    loss = model(x, y)                     # the chunked linear + cross-entropy of chapter 3
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def hf_step(model, optimizer, x, y):
    logits = model(x).logits
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ours_eval(model, optimizer, x, y):
    with torch.no_grad():
        model(x, y)


def hf_eval(model, optimizer, x, y):
    with torch.no_grad():
        F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())


def interleaved_seconds(contestants: dict, optimizers: dict, x, y, rounds: int, steps: int) -> dict:
    """Seconds each contestant's step took in all, run round by round so that noise hits all alike."""
    seconds = dict.fromkeys(contestants, 0.0)
    for name, (model, step) in contestants.items():      # warm-up
        step(model, optimizers[name], x, y)
    for _ in range(rounds):
        for name, (model, step) in contestants.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(model, optimizers[name], x, y)
            seconds[name] += time.perf_counter() - start
    return seconds


def race_arguments(description: str) -> argparse.Namespace:
    """The command line every race between our model and transformers' takes: its length and the model's shape."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=5, help="steps per model per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--context-length", type=int, default=256)
    return parser.parse_args()


def print_evaluation_race(contestants: dict, optimizers: dict, x, y, args) -> None:
    """Time the loss under no_grad for both contestants (ours first) and print tokens/s and the ratio."""
    (ours_name, (ours, _)), (hf_name, (hf, _)) = contestants.items()
    evaluation = interleaved_seconds({ours_name: (ours, ours_eval), hf_name: (hf, hf_eval)}, optimizers, x, y,
                                     args.rounds, args.steps)
    tokens = args.rounds * args.steps * x.numel()
    print(f"evaluation (loss under no_grad): ours {tokens / evaluation[ours_name]:,.0f} tokens/s, transformers "
          f"{tokens / evaluation[hf_name]:,.0f} tokens/s, ratio {evaluation[hf_name] / evaluation[ours_name]:.2f}x")


def main() -> None:
    args = race_arguments(__doc__.split("\n")[0])

    cfg = GPTConfig(vocab_size=50257, context_length=args.context_length, n_layer=args.n_layer, n_head=4,
                    n_embd=args.n_embd)
    torch.manual_seed(0)
    ours = GPTModel(cfg).train()
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_layer=cfg.n_layer,
                                    n_head=cfg.n_head, n_embd=cfg.n_embd, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0)).train()
    contestants = {"ours (GPTModel)": (ours, ours_step), "transformers GPT2LMHeadModel": (hf, hf_step)}
    optimizers = {name: configure_optimizer(model, 1e-4, 0.1) for name, (model, _) in contestants.items()}
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_length))
    y = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_length))
    seconds = interleaved_seconds(contestants, optimizers, x, y, args.rounds, args.steps)
    peak = measure_peak_flops("cpu", size=2048)
    tokens = args.rounds * args.steps * x.numel()
    flops = flops_per_token(cfg, n_params=ours.num_parameters(exclude_positions=True))
    print(f"config: {cfg}, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s (fp32, 2048x2048)")
    rates = {}
    for name in contestants:
        rates[name] = tokens / seconds[name]
        print(f"  {name:30s} {rates[name]:8.0f} tokens/s   MFU {rates[name] * flops / peak:6.1%}")
    ours_name, hf_name = contestants
    print(f"ratio ours / transformers: {rates[ours_name] / rates[hf_name]:.2f}x")
    print_evaluation_race(contestants, optimizers, x, y, args)


if __name__ == "__main__":
    main()

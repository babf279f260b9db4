"""What the gpu preset's settings are worth on this device, each measured against its absence in one run.

    python benchmarks/gpu_preset.py [--rounds 3] [--steps 3]

1. A vocabulary padded to a multiple of 64: training steps of GPT-2 124M with 50,257 and with 50,304
   output rows, the same batches, interleaved round by round.
2. `torch.compile`: training steps of the same model eager and compiled (compilation time reported apart).
3. TF32 (CUDA only): fp32 matrix products with and without TF32.

On a CPU the first two are measured as they are here (a CPU has no tensor-core tiles, so padding should
change little); the GPU figures need a GPU.
"""

import argparse
import time

import torch

from ch03_gpt_model.gpt import GPT_CONFIGS, GPTConfig, GPTModel
from ch04_pretraining.pretraining import configure_optimizer
from shared.device import get_device


def steps_per_second(step, rounds: int, steps: int, contestants: dict) -> dict[str, float]:
    """Interleaved timing: each round runs `steps` steps of every contestant in turn."""
    seconds = dict.fromkeys(contestants, 0.0)
    for name, model in contestants.items():          # warm-up (and, for a compiled model, compilation)
        start = time.perf_counter()
        step(model)
        print(f"  first step of {name}: {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(rounds):
        for name, model in contestants.items():
            start = time.perf_counter()
            for _ in range(steps):
                step(model)
            seconds[name] += time.perf_counter() - start
    return {name: rounds * steps / s for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--context-length", type=int, default=256)
    args = parser.parse_args()
    device = get_device()
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (args.batch_size, args.context_length), device=device)
    y = torch.randint(0, 50257, (args.batch_size, args.context_length), device=device)
    optimizers = {}

    def step(model):
        if id(model) not in optimizers:
            optimizers[id(model)] = configure_optimizer(model, 1e-4, 0.1)
        model(x, y).backward()
        optimizers[id(model)].step()
        optimizers[id(model)].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    base = GPT_CONFIGS["gpt2"]
    print(f"device {device}, GPT-2 124M, batch {args.batch_size} x {args.context_length} tokens")
    models = {f"vocabulary {v}": GPTModel(GPTConfig(**{**base.__dict__, "vocab_size": v})).to(device)
              for v in (50257, 50304)}
    rates = steps_per_second(step, args.rounds, args.steps, models)
    for name, rate in rates.items():
        print(f"  {name}: {rate:.3f} steps/s")
    print(f"padding to 50,304: {rates['vocabulary 50304'] / rates['vocabulary 50257']:.3f}x the steps per second")

    eager = models["vocabulary 50304"]
    rates = steps_per_second(step, args.rounds, args.steps, {"eager": eager, "compiled": torch.compile(eager)})
    print(f"torch.compile: {rates['compiled'] / rates['eager']:.3f}x the steps per second of eager "
          f"({rates['eager']:.3f} and {rates['compiled']:.3f} steps/s)")

    if device.type == "cuda":
        a, b = torch.randn(4096, 4096, device=device), torch.randn(4096, 4096, device=device)
        timings = {}
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            (a @ b).sum().item()
            start = time.perf_counter()
            for _ in range(20):
                a @ b
            torch.cuda.synchronize()
            timings[tf32] = time.perf_counter() - start
        print(f"TF32: fp32 matmuls {timings[False] / timings[True]:.2f}x faster")
    else:
        print("TF32: CUDA only, not measurable here")


if __name__ == "__main__":
    main()

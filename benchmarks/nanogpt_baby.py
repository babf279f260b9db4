"""nanoGPT's CPU "baby" Shakespeare run, through our CLI, with the same settings.

    python benchmarks/nanogpt_baby.py

nanoGPT's README: char-level Tiny Shakespeare, 4 layers, 4 heads, 128 wide, context 64, batch 12,
2,000 steps, lr 1e-3 decaying to 1e-4 after 100 warm-up steps, dropout 0, evaluation every 250 steps on
20 batches; it reports a validation loss of about 1.88 (1.8857 and about 107 s when run on these
machines). This script runs `python -m ch04_pretraining` with those flags, then prints the wall time,
tokens/s, the CLI's 20-batch validation estimate, and the loss on the *whole* validation split (every
non-overlapping window), which has no sampling noise.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ch03_gpt_model.gpt import GPTModel
from ch04_pretraining.pretraining import TrainConfig, load_checkpoint, load_data

FLAGS = ["--data", "tinyshakespeare", "--tokenizer", "char", "--n-layer", "4", "--n-head", "4", "--n-embd", "128",
         "--context-length", "64", "--batch-size", "12", "--max-steps", "2000", "--lr", "1e-3", "--min-lr", "1e-4",
         "--warmup-steps", "100", "--dropout", "0", "--eval-interval", "250", "--eval-iters", "20",
         "--device", "cpu"]


@torch.no_grad()
def full_validation_loss(out_dir: Path) -> float:
    weights, state = load_checkpoint(out_dir)
    cfg = TrainConfig(**state["config"])
    tokenizer, _, val_tokens = load_data(cfg)
    model = GPTModel(cfg.model_config(tokenizer.n_vocab))
    model.load_state_dict(weights, strict=False)
    ids = torch.from_numpy(val_tokens.astype("int64"))
    windows = (len(ids) - 1) // cfg.context_length
    x = ids[: windows * cfg.context_length].view(windows, -1)
    y = ids[1: windows * cfg.context_length + 1].view(windows, -1)
    return model.eval()(x, y).item()


def main() -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ch04_pretraining", *FLAGS, "--out-dir", out_dir], check=True)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
        full = full_validation_loss(Path(out_dir))
    tokens = 2000 * 12 * 64
    print(f"\nwall time {wall:.1f} s (nanoGPT: about 107 s here); {tokens / wall:,.0f} tokens/s overall, "
          f"{rows[-1]['tokens_per_s']:,.0f} tokens/s in the last interval")
    print(f"validation loss: {rows[-1]['val_loss']:.4f} (20-batch estimate, as nanoGPT reports: 1.88 / 1.8857), "
          f"{full:.4f} on the whole validation split")


if __name__ == "__main__":
    main()

"""nanoGPT's CPU "baby" Shakespeare run, through our CLI, with the same settings.

    python benchmarks/nanogpt_baby.py [--seeds 1337 1 2]

nanoGPT's README: char-level Tiny Shakespeare, 4 layers, 4 heads, 128 wide, context 64, batch 12,
2,000 steps, lr 1e-3 decaying to 1e-4 after 100 warm-up steps, dropout 0, evaluation every 250 steps on
20 batches; it reports a validation loss of about 1.88 (1.8857 and about 107 s when run on these
machines). This script runs `python -m ch04_pretraining` with those flags, twice per seed: with our
default initialisation (GPT-2's 0.02 scaled to the width: 0.049 at 128 wide, chapter 3) and with the
plain 0.02 that nanoGPT and GPT-2 use at every width. For each run it prints the wall time, tokens/s, the
CLI's 20-batch validation estimate, and the loss on the *whole* validation split (every non-overlapping
window), which has no sampling noise.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ch03_gpt_model.gpt import GPTModel
from ch04_pretraining.pretraining import TrainConfig, load_checkpoint, load_data, load_weights, read_metrics

FLAGS = ["--data", "tinyshakespeare", "--tokenizer", "char", "--n-layer", "4", "--n-head", "4", "--n-embd", "128",
         "--context-length", "64", "--batch-size", "12", "--max-steps", "2000", "--lr", "1e-3", "--min-lr", "1e-4",
         "--warmup-steps", "100", "--dropout", "0", "--eval-interval", "250", "--eval-iters", "20",
         "--device", "cpu"]
INITS = {"ours (width-scaled init)": [], "GPT-2's fixed 0.02 init": ["--init-std", "0.02"]}


@torch.no_grad()
def full_validation_loss(out_dir: Path) -> float:
    weights, state = load_checkpoint(out_dir)
    cfg = TrainConfig(**state["config"])
    tokenizer, _, val_tokens = load_data(cfg)
    model = GPTModel(cfg.model_config(tokenizer.n_vocab))
    load_weights(model, weights)
    ids = torch.from_numpy(val_tokens.astype("int64"))
    windows = (len(ids) - 1) // cfg.context_length
    x = ids[: windows * cfg.context_length].view(windows, -1)
    y = ids[1: windows * cfg.context_length + 1].view(windows, -1)
    return model.eval()(x, y).item()


def run(extra: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ch04_pretraining", *FLAGS, *extra, "--seed", str(seed),
                        "--out-dir", out_dir], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        rows = read_metrics(out_dir)
        return {"wall": wall, "tokens_per_s": 2000 * 12 * 64 / wall, "val20": rows[-1]["val_loss"],
                "full": full_validation_loss(Path(out_dir))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    seeds = parser.parse_args().seeds
    results = {name: [] for name in INITS}
    header = ["seed", "wall s", "tokens/s", "val, 20 batches", "val, whole split"]
    print(f"{'run':26s} " + " ".join(f"{h:>{w}s}" for h, w in zip(header, [5, 7, 9, 16, 17])))
    for seed in seeds:
        for name, extra in INITS.items():            # interleaved, so machine noise hits both alike
            r = run(extra, seed)
            results[name].append(r)
            print(f"{name:26s} {seed:5d} {r['wall']:7.1f} {r['tokens_per_s']:9,.0f} {r['val20']:16.4f} "
                  f"{r['full']:17.4f}", flush=True)
    print("\nmeans over seeds " + ", ".join(map(str, seeds)) + " (nanoGPT: about 107 s, val 1.8857 / README 1.88):")
    for name, rs in results.items():
        mean = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
        print(f"  {name:26s} wall {mean['wall']:.1f} s, {mean['tokens_per_s']:,.0f} tokens/s, "
              f"val {mean['val20']:.4f} (20 batches), {mean['full']:.4f} (whole split)")


if __name__ == "__main__":
    main()

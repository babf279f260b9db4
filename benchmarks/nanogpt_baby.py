"""nanoGPT's CPU "baby" Shakespeare run, through our CLI, with the same settings.

    python benchmarks/nanogpt_baby.py [--seeds 1337 1 2] [--lrs 5e-4 1e-3 2e-3] [--no-bias]
    python benchmarks/nanogpt_baby.py --nanogpt PATH     # also run nanoGPT itself, interleaved with ours

nanoGPT's README: char-level Tiny Shakespeare, 4 layers, 4 heads, 128 wide, context 64, batch 12,
2,000 steps, lr 1e-3 decaying to 1e-4 after 100 warm-up steps, dropout 0, evaluation every 250 steps on
20 batches; it reports a validation loss of about 1.88. This script runs `python -m ch04_pretraining` with
those flags, for each seed and peak learning rate twice: with our default initialisation (GPT-2's 0.02
scaled to the width: 0.049 at 128 wide, chapter 3) and with the plain 0.02 that nanoGPT and GPT-2 use at
every width. `--no-bias` adds both again without biases (nanoGPT's train.py turns them off by default;
our runs keep GPT-2's). For each run it prints the wall time, tokens/s, the CLI's 20-batch validation
estimate, and the loss on the *whole* validation split (every non-overlapping window), which has no
sampling noise.

`--nanogpt PATH` names a checkout of nanoGPT whose data/shakespeare_char has been prepared
(`python data/shakespeare_char/prepare.py`); its train.py then runs with the README's baby flags in the
same rounds, and the wall times are compared in this run.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ch04_pretraining.config import TrainConfig
from ch04_pretraining.data import load_data
from ch04_pretraining.runs import load_run, read_metrics

FLAGS = ["--data", "tinyshakespeare", "--tokenizer", "char", "--n-layer", "4", "--n-head", "4", "--n-embd", "128",
         "--context-length", "64", "--batch-size", "12", "--max-steps", "2000", "--min-lr", "1e-4",
         "--warmup-steps", "100", "--dropout", "0", "--eval-interval", "250", "--eval-iters", "20",
         "--device", "cpu"]
INITS = {"width-scaled init": [], "fixed 0.02 init": ["--init-std", "0.02"]}
NANOGPT_FLAGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                 "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                 "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


@torch.no_grad()
def full_validation_loss(out_dir: Path) -> float:
    model, _, state = load_run(out_dir)
    _, _, val_tokens = load_data(TrainConfig.from_dict(state["config"]))
    ids = torch.from_numpy(val_tokens.astype("int64"))
    context = model.cfg.context_length
    windows = (len(ids) - 1) // context
    x = ids[: windows * context].view(windows, -1)
    y = ids[1: windows * context + 1].view(windows, -1)
    return model(x, y).item()


def ours(extra: list[str], seed: int, lr: float) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ch04_pretraining", *FLAGS, *extra, "--lr", str(lr), "--seed", str(seed),
                        "--out-dir", out_dir], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        val20 = read_metrics(out_dir)[-1]["val_loss"]
        return {"wall": wall, "val20": val20, "full": full_validation_loss(Path(out_dir))}


def nanogpt(path: Path) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "train.py", *NANOGPT_FLAGS, f"--out_dir={out_dir}"], cwd=path,
                              check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
    val = re.findall(r"step \d+: train loss [\d.]+, val loss ([\d.]+)", done.stdout)
    return {"wall": wall, "val20": float(val[-1]), "full": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--no-bias", action="store_true", help="also run both inits without biases")
    parser.add_argument("--nanogpt", type=Path, default=None, help="a prepared nanoGPT checkout to run alongside")
    args = parser.parse_args()
    variants = {f"{name}, lr {lr:g}": (flags, lr) for lr in args.lrs for name, flags in INITS.items()}
    if args.no_bias:
        variants |= {f"{name}, lr {lr:g}, no bias": (flags + ["--no-bias"], lr)
                     for lr in args.lrs for name, flags in INITS.items()}
    results = {name: [] for name in variants} | ({"nanoGPT itself": []} if args.nanogpt else {})
    print(f"{'run':36s} {'seed':>5s} {'wall s':>7s} {'tokens/s':>9s} {'val, 20 batches':>16s} "
          f"{'val, whole split':>17s}")
    for seed in args.seeds:
        for name in results:                            # interleaved, so machine noise hits every variant alike
            r = nanogpt(args.nanogpt) if name == "nanoGPT itself" else ours(variants[name][0], seed, variants[name][1])
            results[name].append(r)
            print(f"{name:36s} {seed:5d} {r['wall']:7.1f} {2000 * 12 * 64 / r['wall']:9,.0f} {r['val20']:16.4f} "
                  f"{r['full']:17.4f}", flush=True)
    print(f"\nmeans over seeds {', '.join(map(str, args.seeds))}:")
    for name, rs in results.items():
        mean = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
        print(f"  {name:36s} wall {mean['wall']:6.1f} s, val {mean['val20']:.4f} (20 batches), "
              f"{mean['full']:.4f} (whole split)")
    if args.nanogpt:
        ratio = statistics.mean(r["wall"] for r in results["nanoGPT itself"]) / statistics.mean(
            r["wall"] for r in results[next(iter(variants))])
        print(f"\nend to end, ours is {ratio:.2f}x nanoGPT's speed (its wall time / ours, in this run)")


if __name__ == "__main__":
    main()

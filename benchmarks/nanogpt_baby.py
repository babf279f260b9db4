"""nanoGPT's CPU "baby" Shakespeare run, through our CLI, with the same settings.

    python benchmarks/nanogpt_baby.py [--seeds 1337 1 2] [--lrs 5e-4 1e-3 2e-3] [--no-bias]
    python benchmarks/nanogpt_baby.py --nanogpt PATH [--seeds 1337 1 2] [--target-steps 1500]

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
(`python data/shakespeare_char/prepare.py`); its train.py then runs with the README's baby flags, interleaved
with two runs of ours in each round, both without biases as nanoGPT's train.py: the same 2,000 steps (the
same work: one step costs the same in both, so this ratio says what the loop around the steps costs), and
`--target-steps` steps with the schedule fitted to them, which must reach nanoGPT's final validation loss
(its 20-batch estimate) in every round: the time to nanoGPT's loss, the speedrun's measure. The step count is
fixed before the run, not searched for in it; the script says whether it was reached.
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
    parser.add_argument("--nanogpt", type=Path, default=None,
                        help="a prepared nanoGPT checkout to run alongside, instead of the init study")
    parser.add_argument("--target-steps", type=int, default=1500,
                        help="with --nanogpt: the steps of our run that must reach nanoGPT's loss (default 1500)")
    args = parser.parse_args()
    if args.nanogpt:
        variants = {"ours, 2000 steps, no bias": (["--no-bias"], 1e-3),
                    f"ours, {args.target_steps} steps, no bias": (["--no-bias", "--max-steps",
                                                                   str(args.target_steps)], 1e-3)}
    else:
        variants = {f"{name}, lr {lr:g}": (flags, lr) for lr in args.lrs for name, flags in INITS.items()}
    if args.no_bias and not args.nanogpt:
        variants |= {f"{name}, lr {lr:g}, no bias": (flags + ["--no-bias"], lr)
                     for lr in args.lrs for name, flags in INITS.items()}
    results = {name: [] for name in variants} | ({"nanoGPT itself": []} if args.nanogpt else {})
    print(f"{'run':36s} {'seed':>5s} {'steps':>5s} {'wall s':>7s} {'tokens/s':>9s} {'val, 20 batches':>16s} "
          f"{'val, whole split':>17s}")
    for seed in args.seeds:
        for name in results:                            # interleaved, so machine noise hits every variant alike
            r = nanogpt(args.nanogpt) if name == "nanoGPT itself" else ours(variants[name][0], seed, variants[name][1])
            r["steps"] = steps_of(variants[name][0]) if name in variants else 2000
            results[name].append(r)
            print(f"{name:36s} {seed:5d} {r['steps']:5d} {r['wall']:7.1f} {r['steps'] * 12 * 64 / r['wall']:9,.0f} "
                  f"{r['val20']:16.4f} {r['full']:17.4f}", flush=True)
    print(f"\nmeans over seeds {', '.join(map(str, args.seeds))}:")
    for name, rs in results.items():
        mean = {k: statistics.mean(r[k] for r in rs) for k in ("wall", "val20", "full")}
        print(f"  {name:36s} wall {mean['wall']:6.1f} s, val {mean['val20']:.4f} (20 batches), "
              f"{mean['full']:.4f} (whole split)")
    if args.nanogpt:
        theirs = results["nanoGPT itself"]
        same, short = (results[name] for name in variants)
        reached = all(mine["val20"] <= their["val20"] for mine, their in zip(short, theirs))
        print(f"\nend to end, nanoGPT's wall time / ours, in this run:\n"
              f"  the same 2000 steps:         {ratio(theirs, same):.2f}x\n"
              f"  {args.target_steps} steps, to its loss:     {ratio(theirs, short):.2f}x "
              f"(nanoGPT's final validation loss reached in every round: {'yes' if reached else 'NO'})")


def steps_of(extra: list[str]) -> int:
    return int(extra[extra.index("--max-steps") + 1]) if "--max-steps" in extra else 2000


def ratio(theirs: list[dict], mine: list[dict]) -> float:
    return statistics.mean(r["wall"] for r in theirs) / statistics.mean(r["wall"] for r in mine)


if __name__ == "__main__":
    main()

"""Chapter 4's command line: train a GPT, or generate text from a trained run.

    python -m ch04_pretraining [--scale cpu] [--FIELD VALUE ...] [--resume | --overwrite]
    python -m ch04_pretraining sample --out-dir DIR [--prompt TEXT] [--max-new-tokens N] ...
    torchrun --nproc_per_node=N -m ch04_pretraining [...]

Training starts from a scale's preset (`--scale`, default cpu: nanoGPT's baby Shakespeare run) and takes
any TrainConfig field as a flag; `--resume` continues the run in --out-dir with the settings it started
with (flags given override them).
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from ch03_gpt_model.gpt import generate
from ch04_pretraining.pretraining import (
    CONFIG_FILE,
    CheckpointError,
    ConfigError,
    TrainConfig,
    TrainingDiverged,
    load_run,
    scale_preset,
    train,
)
from shared.device import get_device

PROG = "python -m ch04_pretraining"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def train_parser() -> argparse.ArgumentParser:
    defaults = scale_preset("cpu")
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0] + " Defaults shown are the "
                                     "cpu preset's; --scale picks another preset.")
    parser.add_argument("--scale", choices=["smoke", "cpu", "gpu"], default="cpu",
                        help="preset to start from: smoke (seconds), cpu (a minute or two), gpu (GPT-2 124M, "
                             "an hour) (default: cpu)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its newest checkpoint, with its own settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in --out-dir even though it holds one, deleting that run's files")
    for field in dataclasses.fields(TrainConfig):
        help_text = f"{field.metadata['help']} (default: {getattr(defaults, field.name)})"
        if field.type in (bool, "bool"):
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(field.type), field.type)
            parser.add_argument(flag(field.name), type=kind, default=None, metavar=field.name.upper(), help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool, bool]:
    """(config, resume, overwrite) from the command line; a bad value is a usage error naming its flag."""
    parser = train_parser()
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume continues a run and --overwrite replaces it: give one of them")
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    base = scale_preset(args.scale)
    saved = Path(overrides.get("out_dir", base.out_dir)) / CONFIG_FILE
    if args.resume and saved.is_file():
        base = TrainConfig.from_dict(json.loads(saved.read_text()))
    try:
        cfg = dataclasses.replace(base, **overrides)
    except ConfigError as err:
        parser.error(f"{flag(err.field)}: {err.message}")
    return cfg, args.resume, args.overwrite


def sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} sample",
                                     description="Generate text from the newest checkpoint of a training run.")
    parser.add_argument("--out-dir", required=True, help="the run's folder")
    parser.add_argument("--prompt", default="", help="text to continue; a prompt longer than the model's context "
                        "keeps its last tokens (default: the tokenizer's <|endoftext|>, or a newline)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default: 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: all)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample among the likeliest tokens that make up probability p (default: all)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples to draw (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling (default: 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    return parser


def sample_main(argv: list[str]) -> int:
    parser = sample_parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        parser.error("--max-new-tokens must be >= 0 and --num-samples >= 1")
    if not 0 <= args.temperature < math.inf:
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    try:
        device = get_device(args.device)
        model, tokenizer, state = load_run(args.out_dir, device)
        if args.prompt:
            ids = tokenizer.encode(args.prompt, allowed_special="all")
        else:
            ids = [tokenizer.eot_token] if tokenizer.eot_token is not None else tokenizer.encode("\n")
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    prompt = torch.tensor([ids] * args.num_samples, device=device)
    out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, generator=torch.Generator(device=device).manual_seed(args.seed),
                   vocab_size=tokenizer.n_vocab)
    print(f"# {args.out_dir}, step {state['step']}", file=sys.stderr)
    for k, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {k + 1}")
        print(tokenizer.decode(row))
    return 0


def train_main(argv: list[str]) -> int:
    cfg, resume, overwrite = parse_args(argv)
    try:
        result = train(cfg, resume=resume, overwrite=overwrite)
    except ConfigError as err:
        print(f"error: {flag(err.field)}: {err.message}", file=sys.stderr)
        return 1
    except (TrainingDiverged, FileNotFoundError, ValueError) as err:     # FileNotFoundError: offline data too
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 130 if result["interrupted"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sample"]:
        return sample_main(argv[1:])
    return train_main(argv[1:] if argv[:1] == ["train"] else argv)


if __name__ == "__main__":
    sys.exit(main())

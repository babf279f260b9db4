"""Chapter 4's command line: train a GPT or a Llama, or generate text from a trained run.

    python -m ch04_pretraining [--scale cpu] [--arch gpt|llama] [--FIELD VALUE ...] [--resume | --overwrite]
    python -m ch04_pretraining sample --out-dir DIR [--prompt TEXT] [--max-new-tokens N] ...
    torchrun --nproc_per_node=N -m ch04_pretraining [...]

Training starts from a scale's preset (`--scale`, default cpu: nanoGPT's baby Shakespeare run) for an
architecture (`--arch`: gpt, chapter 3, or llama, chapter 6), and takes any TrainConfig field and any field of
the architecture's config as a flag; `--resume` continues the run in --out-dir with the settings it started
with (flags given override them).
"""

import argparse
import dataclasses
import errno
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ch03_gpt_model.gpt import generate
from ch04_pretraining.config import ARCHITECTURES, TrainConfig, fitted_to_gpu, model_settings, scale_preset
from ch04_pretraining.pretraining import TrainingDiverged, train
from ch04_pretraining.runs import CheckpointError, load_run, read_run_config
from shared.config import BriefParser, ConfigError, add_flag, flag, flag_type
from shared.data import DataUnavailableError
from shared.device import get_device
from shared.files import DiskFullError

PROG = "python -m ch04_pretraining"


def model_flags(arch: str) -> list:
    """The model settings of `arch` that are flags: its config's fields, vocab_size and nested ones aside."""
    return [f for f in model_settings(arch) if flag_type(f.type) is not None]


def train_parser(arch: str = "gpt", scale: str = "cpu") -> argparse.ArgumentParser:
    """The training command's parser: --scale, --arch, --resume, --overwrite, the model's settings (the fields
    of `arch`'s config) and the training settings (TrainConfig's fields), each with its help and default."""
    defaults = scale_preset(scale, arch, gpu_memory_bytes=16e9)
    parser = BriefParser(prog=PROG, description=__doc__.split("\n")[0] + f" Defaults shown are the "
                                     f"{scale} preset's for {arch}; --scale and --arch pick another preset.")
    parser.add_argument("--scale", choices=["smoke", "cpu", "gpu"], default="cpu",
                        help="preset to start from: smoke (seconds), cpu (a minute or two), gpu (a ~124M model, "
                             "an hour) (default: cpu)")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default=None,
                        help="the model: gpt (chapter 3), llama (chapter 6) or hybrid (chapter 6's Llama with parts "
                             "of GPT-2); --help after it lists that model's settings (default: gpt, or the resumed "
                             "run's)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its newest checkpoint, with its own settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in --out-dir even though it holds one, deleting that run's files")
    model_defaults = dataclasses.asdict(defaults.model_config(1))
    group = parser.add_argument_group(f"the {arch} model (fields of its config)")
    for field in model_flags(arch):
        add_flag(group, field, model_defaults[field.name])
    group = parser.add_argument_group("training")
    for field in dataclasses.fields(TrainConfig):
        if field.name not in ("arch", "model"):
            add_flag(group, field, getattr(defaults, field.name))
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool, bool]:
    """(config, resume, overwrite) from the command line; a bad value is a usage error naming its flag.

    The run starts from the preset of --scale and --arch, or with --resume from the settings the run in
    --out-dir saved; flags override either. On the gpu scale the micro-batch is fitted after the overrides,
    to the model they describe, unless --batch-size or --grad-accum is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)           # what decides which flags exist
    for name in ("--scale", "--arch", "--out-dir"):
        first.add_argument(name)
    first.add_argument("--resume", action="store_true")
    known, _ = first.parse_known_args(argv)
    scale = known.scale if known.scale in ("smoke", "cpu", "gpu") else "cpu"
    out_dir = Path(known.out_dir or scale_preset(scale, gpu_memory_bytes=16e9).out_dir)
    saved, unreadable = None, None
    if known.resume and out_dir.is_dir():
        try:
            saved = read_run_config(out_dir)
        except ConfigError as err:
            unreadable = err
    arch = known.arch if known.arch in ARCHITECTURES else (saved or {}).get("arch", "gpt")
    parser = train_parser(arch if arch in ARCHITECTURES else "gpt", scale)
    args = parser.parse_args(argv)
    if unreadable is not None:
        parser.error(f"--resume: {unreadable.message}")
    base = None
    if saved is not None:
        if "task" in saved:
            parser.error(f"the run in {out_dir} is a chapter 5 {saved['task']} run: resume it with python -m "
                         f"ch05_finetuning {saved['task']} --out-dir {out_dir} --resume")
        try:
            base = TrainConfig.from_dict(saved)
        except ConfigError as err:
            parser.error(f"the settings saved in {out_dir} cannot be used: {flag(err.field)}: {err.message}")
    if args.resume and args.overwrite:
        parser.error("--resume continues a run and --overwrite replaces it: give one of them")
    if base is None or base.arch != arch:
        base = scale_preset(args.scale, arch, gpu_memory_bytes=16e9)       # (fitted again below, after the flags)
    training = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                if f.name not in ("arch", "model") and getattr(args, f.name) is not None}
    model = {f.name: getattr(args, f.name) for f in model_flags(arch) if getattr(args, f.name) is not None}
    try:
        cfg = dataclasses.replace(base, **training, arch=arch, model={**base.model, **model})
        if args.scale == "gpu" and not args.resume and not {"batch_size", "grad_accum"} & set(training):
            cfg = fitted_to_gpu(cfg)
    except ConfigError as err:
        parser.error(f"{flag(err.field)}: {err.message}")
    return cfg, args.resume, args.overwrite


def sample_parser() -> argparse.ArgumentParser:
    parser = BriefParser(prog=f"{PROG} sample",
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


def run_or_report(start: Callable[[], dict]) -> dict | None:
    """`start()`'s result; or None, once a mistake the reader can fix (a bad setting, data or a base model
    that cannot be found offline, no readable checkpoint, a diverged run, a full disk) is printed as one line
    naming it.
    Anything else is a bug, and keeps its traceback."""
    try:
        return start()
    except ConfigError as err:
        print(f"error: {flag(err.field)}: {err.message}", file=sys.stderr)
    except (TrainingDiverged, DataUnavailableError, CheckpointError, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        print(f"error: the disk is full ({err.filename or err}): free some space, then resume", file=sys.stderr)
    return None


def train_main(argv: list[str]) -> int:
    cfg, resume, overwrite = parse_args(argv)
    result = run_or_report(lambda: train(cfg, resume=resume, overwrite=overwrite))
    if result is None:
        return 1
    return 130 if result["interrupted"] else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sample"]:
        return sample_main(argv[1:])
    return train_main(argv[1:] if argv[:1] == ["train"] else argv)


if __name__ == "__main__":
    sys.exit(main())

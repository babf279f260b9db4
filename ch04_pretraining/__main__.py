"""The training CLI: `python -m ch04_pretraining [flags]`, or `torchrun --nproc_per_node=N -m ch04_pretraining`.

Trains a GPTModel with chapter 4's code and nothing else. Start from a scale preset (`--scale`,
default: the cpu run, a char-level GPT on Tiny Shakespeare) and override any field with its flag.
Writes OUT_DIR/metrics.jsonl and checkpoints; `--resume` continues from the latest checkpoint.
"""

import argparse
import dataclasses
import sys

from ch04_pretraining.pretraining import TrainConfig, TrainingDiverged, scale_preset, train


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m ch04_pretraining", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=["smoke", "cpu", "gpu"], default="cpu",
                        help="preset to start from (default: cpu)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(field.type), field.type)
            parser.add_argument(flag, type=kind, default=None, metavar=field.name.upper())
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name) is not None}
    try:
        cfg = dataclasses.replace(scale_preset(args.scale), **overrides)
    except ValueError as err:
        parser.error(str(err))
    return cfg, args.resume


def main(argv: list[str] | None = None) -> int:
    cfg, resume = parse_args(argv)
    try:
        result = train(cfg, resume=resume)
    except (TrainingDiverged, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Chapter 5's command line: finetune a model for a task, on preferences (DPO) or on rewards (GRPO, PPO).

    python -m ch05_finetuning classify [--base gpt2|PATH] [--lora-rank R] [--FIELD VALUE ...] [--resume | --overwrite]
    python -m ch05_finetuning instruct [--base gpt2-medium|PATH] [--mask-prompt] [--epochs E] ...
    python -m ch05_finetuning reward [--base INSTRUCT_RUN] ...
    python -m ch05_finetuning dpo [--base INSTRUCT_RUN] [--beta 0.1] ...
    python -m ch05_finetuning grpo|ppo [--base ARITHMETIC_RUN] [--group-size 8] [--kl-coef 0] ...
    python -m ch05_finetuning grpo --data instruction-preference --reward REWARD_RUN --base INSTRUCT_RUN ...
    python -m ch05_finetuning arithmetic-text FILE      (the sums a grpo base is first trained on, by chapter 4)
    python -m ch05_finetuning small-base DIR [--steps N] (pretrain the small base of the cpu and smoke scales)

A run starts from the task's preset at a scale (`--scale`, default gpu: OpenAI's GPT-2, which needs the
internet once), takes the settings of its task's config (FinetuneConfig's, and the task's own) as flags, and
is chapter 4's run: the same folder, checkpoints, metrics.jsonl, `--resume` and Ctrl-C (a checkpoint is
saved, and the run can be resumed).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from ch04_pretraining.__main__ import run_or_report
from ch04_pretraining.runs import read_run_config
from ch05_finetuning.finetuning import FinetuneConfig, finetune, finetune_preset, pretrain_small_base
from ch05_finetuning.rl import arithmetic_splits, arithmetic_text
from shared.config import BriefParser, ConfigError, add_flag, flag
from shared.files import atomic_write

PROG = "python -m ch05_finetuning"
# filled in from the base model, or fixed by the task: not flags
NOT_FLAGS = ("arch", "model", "tokenizer", "vocab_multiple", "task", "sample_tokens")


def finetune_parser(task: str, scale: str = "gpu") -> argparse.ArgumentParser:
    """The parser of one task: --scale, --resume, --overwrite and the fields of the task's config class, with the
    preset's values as defaults."""
    defaults = finetune_preset(task, scale)
    parser = BriefParser(prog=f"{PROG} {task}", description=__doc__.split("\n")[0] +
                                     f" Defaults shown are the {scale} preset's.")
    parser.add_argument("--scale", choices=["smoke", "cpu", "gpu"], default="gpu",
                        help="preset to start from (default: gpu, OpenAI's GPT-2)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its newest checkpoint, with its own settings")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in --out-dir even though it holds one, deleting that run's files")
    for field in dataclasses.fields(defaults):
        if field.name not in NOT_FLAGS:
            add_flag(parser, field, getattr(defaults, field.name))
    return parser


def scale_of(argv: list[str]) -> str:
    """The preset the flags `argv` start from: --scale's value if it names one, else gpu (a bad --scale is
    refused by the full parser)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--scale", default="gpu")
    known, _ = first.parse_known_args(argv)
    return known.scale if known.scale in ("smoke", "cpu", "gpu") else "gpu"


def resumed_config(parser: argparse.ArgumentParser, out_dir: Path, task: str) -> FinetuneConfig:
    """The config of the `task` run in `out_dir`, to resume; a usage error if it cannot be read or is another
    task's, or a chapter 4 run's."""
    try:
        saved = read_run_config(out_dir)
        if "task" not in saved:
            parser.error(f"the run in {out_dir} is a chapter 4 pretraining run, not a {task} run: finetune from it "
                         f"with --base {out_dir} and a new --out-dir")
        if saved["task"] != task:
            parser.error(f"the run in {out_dir} is a {saved['task']} run, not {task}")
        return FinetuneConfig.from_dict(saved)
    except ConfigError as err:
        parser.error(f"--resume: the run in {out_dir}: {flag(err.field)}: {err.message}")


def parse_args(argv: list[str]) -> tuple[FinetuneConfig, bool, bool]:
    """(config, resume, overwrite) for `TASK [flags]`; a bad value is a usage error naming its flag."""
    if not argv or argv[0] not in FinetuneConfig.TASKS:
        top = BriefParser(prog=PROG, description=__doc__.split("\n")[0])
        top.add_argument("task", choices=list(FinetuneConfig.TASKS),
                         help="classify (SMS spam), instruct (Alpaca instructions), reward (a reward model on "
                              "preference pairs), dpo (direct preference optimisation), grpo or ppo (reinforcement "
                              "learning)")
        top.parse_args(argv[:1])                            # prints the usage and exits
    task, argv = argv[0], argv[1:]
    scale = scale_of(argv)
    parser = finetune_parser(task, scale)
    args = parser.parse_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume continues a run and --overwrite replaces it: give one of them")
    base = finetune_preset(task, scale)
    out_dir = Path(args.out_dir or base.out_dir)
    if args.resume and out_dir.is_dir():
        base = resumed_config(parser, out_dir, task)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(base)
             if f.name not in NOT_FLAGS and getattr(args, f.name) is not None}
    try:
        cfg = dataclasses.replace(base, **given)
    except ConfigError as err:
        parser.error(f"{flag(err.field)}: {err.message}")
    return cfg, args.resume, args.overwrite


def write_arithmetic_text(argv: list[str]) -> int:
    """`arithmetic-text FILE`: the training sums, one per line, for chapter 4 to train a grpo base on."""
    parser = BriefParser(prog=f"{PROG} arithmetic-text",
                                     description="Write the arithmetic training problems as text, one sum per "
                                                 "line, for `python -m ch04_pretraining --data FILE --tokenizer "
                                                 "char` to teach a base the answer format.")
    parser.add_argument("file", type=Path)
    path = parser.parse_args(argv).file
    text = arithmetic_text(arithmetic_splits()["train"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    print(f"{text.count(chr(10)):,} sums in {path}")
    return 0


def write_small_base(argv: list[str]) -> int:
    """`small-base DIR [--steps N]`: pretrain the small base that the cpu and smoke presets start from."""
    parser = BriefParser(prog=f"{PROG} small-base",
                                     description="Pretrain the small base of the cpu and smoke scales (English and "
                                                 "skill sentences, a 4,096-token BPE, chapter 4's train) into DIR; "
                                                 "about 12 minutes on 2 CPU cores.")
    parser.add_argument("dir", type=Path)
    parser.add_argument("--steps", type=int, default=6000, help="pretraining steps (default 6000)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    out = run_or_report(lambda: pretrain_small_base(args.dir, args.steps, log=print))
    if out is None:
        return 1
    print(f"the small base is in {out}; finetune it with --base {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["arithmetic-text"]:
        return write_arithmetic_text(argv[1:])
    if argv[:1] == ["small-base"]:
        return write_small_base(argv[1:])
    cfg, resume, overwrite = parse_args(argv)
    result = run_or_report(lambda: finetune(cfg, resume=resume, overwrite=overwrite))
    if result is None:
        return 1
    if result["interrupted"] or result["stopped_by"]:
        return 130 if result["interrupted"] else 0
    report_test_set(cfg, result, SMOKE_TEST_EXAMPLES if scale_of(argv[1:]) == "smoke" else None)
    return 0


SMOKE_TEST_EXAMPLES = 8          # a smoke run is a check that everything runs: its report stays seconds long


def report_test_set(cfg: FinetuneConfig, result: dict, examples: int | None = None) -> None:
    """After a finished run, what its model does on the task's test examples (the task's `test_report`): the
    accuracy with its 95% interval (classify; reward: of the preference pairs; grpo, ppo with the exact-answer
    reward: exact match of the greedy answers), or the answers to the test instructions, saved as
    OUT_DIR/test-responses.json with their ROUGE-L and, for the checkable tasks, the share exactly right
    (instruct, dpo; grpo, ppo with a reward model, after the answers' mean reward). `examples`: only the first
    that many test examples (smoke scale), else all."""
    test = cfg.read_data()["test"]
    if examples is not None and examples < len(test):
        print(f"(the smoke scale reports on {examples} of the {len(test)} test examples)")
        test = test[:examples]
    print(cfg.test_report(result["model"].eval(), result["tokenizer"], test))


if __name__ == "__main__":
    sys.exit(main())

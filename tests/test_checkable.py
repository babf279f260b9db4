"""Chapter 5's checkable tasks and the small base that read their skills: the records, the skill sentences,
exact-match scoring, the shipped base, and the tasks' data in the instruct, reward, dpo and grpo runs."""
import dataclasses
import hashlib
import json
import math
import re
from collections import Counter

import pytest
import torch

from ch04_pretraining.runs import read_metrics
from ch05_finetuning.__main__ import main
from ch05_finetuning.checkable import (
    ANSWER_SENTENCES,
    CHECKABLE_TASKS,
    SKILL_SENTENCES,
    TASK_FAMILIES,
    checkable_records,
    exact_match,
    is_right,
    skill_text,
)
from ch05_finetuning.finetuning import (
    SMALL_BASE,
    FinetuneConfig,
    count_parameters,
    finetune,
    finetune_preset,
    load_base,
    pretrain_small_base,
    small_base_text,
    split_by_share,
)
from shared.config import ConfigError

QUIET = dict(log=lambda message: None, progress=False)


def right_answer(record: dict) -> str:
    """The answer worked out again from the record's instruction and input, independently of the generators."""
    text, task = record["subject"], record["task"]
    words = text.split()
    if task == "first word":
        return words[0]
    if task == "last word":
        return words[-1]
    if task == "even or odd":
        return "even" if int(text) % 2 == 0 else "odd"
    if task == "next number":
        return str(int(text) + 1)
    if task == "larger":
        return str(max(int(words[0]), int(words[2])))
    if task == "count":
        return str(len(words))
    raise AssertionError(task)


def test_checkable_records_are_distinct_right_and_paired_with_a_wrong_answer():
    records = checkable_records(600, seed=3)
    assert Counter(r["task"] for r in records) == {name: 100 for name in TASK_FAMILIES}
    assert len({r["instruction"] for r in records}) == 600
    for record in records:
        sentence = ANSWER_SENTENCES[record["task"]]
        assert record["answer"] == right_answer(record)
        assert record["output"] == record["chosen"] == sentence.format(answer=record["answer"])
        assert record["rejected"] != record["chosen"] and record["rejected"].startswith(sentence.split("{")[0])
        assert record["subject"] in record["instruction"] and record["input"] == ""
    assert checkable_records(600, seed=3) == records and checkable_records(600, seed=4) != records
    with pytest.raises(ValueError, match="ran out of distinct tasks"):
        checkable_records(60_000)                 # even or odd has fewer than 10,000 distinct numbers


def parsed(line: str) -> tuple[str, str, str]:
    """(family, input, output) of a skill sentence, read back through its family's template."""
    for family, template in SKILL_SENTENCES.items():
        pattern = re.escape(template).replace(re.escape("{subject}"), "(.+?)").replace(re.escape("{answer}"), "(.+)")
        found = re.fullmatch(pattern, line)
        if found:
            return family, found.group(1), found.group(2)
    raise AssertionError(f"not a skill sentence: {line!r}")


def test_skill_sentences_state_the_right_answer_and_leave_out_held_out_inputs():
    held_out = {r["subject"] for r in checkable_records(60)}
    lines = skill_text(3000, held_out, seed=5).split("\n")
    assert len(lines) == 3000
    families = Counter()
    for line in lines:
        family, text, output = parsed(line)
        assert text not in held_out and output == right_answer({"task": family, "subject": text})
        families[family] += 1
    assert families == {name: 500 for name in TASK_FAMILIES}


def test_exact_match_counts_only_the_exact_answer_per_family():
    answers = [{"task": "count", "output": "There are 3 words.", "response": " There are 3 words. "},
               {"task": "count", "output": "There are 3 words.", "response": "There are 3 words"},
               {"task": "larger", "output": "The larger is 81.", "response": "The larger is 81."},
               {"task": "larger", "output": "The larger is 81.", "response": ""}]
    assert is_right(" There are 3 words. ", answers[0]) and not is_right("There are 3 words", answers[1])
    assert exact_match(answers) == {"count": 0.5, "larger": 0.5, "all": 0.5}


def test_the_shipped_small_base_loads_and_is_what_the_cpu_presets_start_from():
    base = load_base(str(SMALL_BASE))
    assert count_parameters(base.model) == 1_350_400 and base.tokenizer.n_vocab == 4096
    assert base.tokenizer.eot_token is not None and base.model.cfg.context_length == 256
    rows = read_metrics(SMALL_BASE)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    for task in ("classify", "instruct"):
        assert finetune_preset(task, "cpu").base == str(SMALL_BASE) == finetune_preset(task, "smoke").base
    for task in ("instruct", "reward", "dpo"):
        assert finetune_preset(task, "cpu").data == CHECKABLE_TASKS
        assert finetune_preset(task, "gpu").data != CHECKABLE_TASKS


def test_the_shipped_small_base_matches_its_checksums():
    listed = dict(reversed(line.split("  ")) for line in (SMALL_BASE / "SHA256SUMS").read_text().splitlines())
    assert set(listed) == {path.name for path in SMALL_BASE.iterdir()} - {"SHA256SUMS"}
    for name, digest in listed.items():
        assert hashlib.sha256((SMALL_BASE / name).read_bytes()).hexdigest() == digest, name


def test_small_base_text_never_states_a_validation_or_test_input():
    splits = split_by_share(checkable_records())
    held_out = [r for name in ("val", "test") for r in splits[name]]
    text = small_base_text(statements=6000)
    lines = set(text.split("\n"))
    for record in held_out:
        assert not any(SKILL_SENTENCES[record["task"]].format(subject=record["subject"], answer=answer) in lines
                       for answer in (right_answer(record), "even", "odd"))
    assert "After " in text and "KING RICHARD" in text            # skill sentences among the English


def test_pretrain_small_base_writes_a_base_that_loads_without_optimizer_state(tmp_path):
    out = pretrain_small_base(tmp_path / "base", steps=2, vocab_size=300, statements=600)
    base = load_base(str(out))
    assert base.tokenizer.n_vocab == 300 and base.model.cfg.n_layer == 4
    state = torch.load(next(out.glob("ckpt-*.pt")), weights_only=True)
    assert set(state) == {"step", "config"}                        # no optimizer moments: not for resuming
    weights = next(out.glob("ckpt-*.safetensors")).stat().st_size
    assert weights < 2.2 * count_parameters(base.model)             # bfloat16: two bytes a weight, and a header


def test_instruct_reward_and_dpo_read_the_checkable_tasks(tmp_path):
    for task in ("instruct", "reward", "dpo"):
        splits = FinetuneConfig.for_task(task, data=CHECKABLE_TASKS).read_data()
        assert [len(splits[name]) for name in ("train", "val", "test")] == [2550, 150, 300]
        assert splits == split_by_share(checkable_records())
    cfg = dataclasses.replace(finetune_preset("instruct", "smoke"), out_dir=str(tmp_path / "sft"), max_steps=2)
    result = finetune(cfg, **QUIET)
    report = cfg.test_report(result["model"].eval(), result["tokenizer"], cfg.read_data()["test"][:12])
    assert "exactly right" in report
    saved = json.loads((tmp_path / "sft" / "test-responses.json").read_text())
    assert len(saved) == 12 and all("task" in answer for answer in saved)


def test_grpo_learns_from_the_checker_on_checkable_tasks_and_refuses_it_elsewhere(tmp_path, capsys):
    assert main(["grpo", "--scale", "smoke", "--base", str(SMALL_BASE), "--data", CHECKABLE_TASKS,
                 "--max-new-tokens", "4", "--out-dir", str(tmp_path / "grpo")]) == 0
    said, report = capsys.readouterr().out.strip().splitlines()[-2:]
    assert said == "(the smoke scale reports on 8 of the 300 test examples)"
    assert report.startswith("test exact-match accuracy") and "on 8 problems" in report
    accuracy = float(report.split()[3].rstrip("%")) / 100
    assert 0 <= accuracy <= 1 and not math.isnan(accuracy)
    cfg = FinetuneConfig.for_task("grpo", data="instruction-preference", reward="exact-answer")
    with pytest.raises(ConfigError, match="exact-answer scores the arithmetic and checkable-tasks data"):
        cfg.read_data()


def test_small_base_command_refuses_zero_steps(capsys):
    with pytest.raises(SystemExit):
        main(["small-base", "somewhere", "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err

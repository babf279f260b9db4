import json
import math
import re
import signal
import subprocess
import sys
import time
import urllib.error
from collections import Counter
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ch01_tokenization.tokenization import TiktokenTokenizer
from ch03_gpt_model.gpt import GPT_CONFIGS, GPTConfig, GPTModel
from ch04_pretraining.pretraining import train
from ch04_pretraining.runs import read_metrics
from ch05_finetuning.__main__ import parse_args
from ch05_finetuning.classification import (
    BagOfWords,
    SequenceClassifier,
    accuracy,
    balanced_split,
    classify,
    confusion_matrix,
    last_token_index,
    pad_batch,
    read_sms_spam,
    train_last_blocks,
    wilson_interval,
)
from ch05_finetuning.finetuning import (
    ExampleBatches,
    FinetuneConfig,
    bucketed_order,
    count_parameters,
    finetune,
    finetune_preset,
    load_base,
    load_finetuned,
    padded_tokens,
    split_records,
    training_memory_bytes,
    wrap_for_task,
)
from ch05_finetuning.instructions import (
    alpaca_prompt,
    instruction_batch,
    judge_scores,
    rouge_l,
    tokenize_instruction,
    truncated,
)
from ch05_finetuning.lora import (
    LoRALinear,
    apply_lora,
    load_peft_adapter,
    lora_layers,
    lora_targets,
    merge_lora,
    save_peft_adapter,
)
from ch05_finetuning.preferences import (
    RewardModel,
    bradley_terry_loss,
    dpo_loss,
    preference_accuracy,
    preference_batch,
    reward_batch,
    sequence_logprobs,
)
from shared.config import ConfigError
from shared.data import DataUnavailableError, fetch

ROOT = Path(__file__).resolve().parent.parent
QUIET = dict(log=lambda message: None, progress=False)
TINY = GPTConfig(vocab_size=50257, context_length=128, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(seed=0, **changes) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(replace(TINY, **changes))


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """A tiny GPT-2 with GPT-2's vocabulary, saved as a Hugging Face folder: a base `load_base` reads offline."""
    return tiny_gpt().save_pretrained_hf(tmp_path_factory.mktemp("base"))


# ---- the classifier ---------------------------------------------------------------------------------------

def test_last_token_index_finds_where_each_row_ends():
    idx = torch.tensor([[5, 6, 7, 9, 9], [5, 9, 9, 9, 9], [9, 9, 9, 9, 9], [1, 2, 3, 4, 5]])
    assert last_token_index(idx, pad_id=9).tolist() == [2, 0, 0, 4]


def test_prediction_does_not_change_with_padding():
    model = SequenceClassifier(tiny_gpt(), 2, pad_id=50256).eval()
    ids = [11, 22, 33, 44]
    alone = model(torch.tensor([ids]))
    for extra in (1, 7, 30):
        padded = model(torch.tensor([ids + [50256] * extra]))
        torch.testing.assert_close(padded, alone, rtol=0, atol=1e-6)
    # reading the last padded position instead would not be padding-invariant: the claim has teeth
    hidden = model.base.hidden_states(torch.tensor([ids + [50256] * 7]))
    assert not torch.allclose(model.score(hidden[:, -1]), alone, atol=1e-3)


def test_classifier_equals_transformers_sequence_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = SequenceClassifier(tiny_gpt(seed=3), 2, pad_id=50256).eval()
    base = tiny_gpt(seed=3)
    base.save_pretrained_hf(tmp_path)
    theirs = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path, num_labels=2,
                                                                         pad_token_id=50256).eval()
    with torch.no_grad():
        theirs.score.weight.copy_(ours.score.weight)
    ids = pad_batch([[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]], pad_id=50256)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=0, atol=1e-5)


def test_train_last_blocks_freezes_the_rest():
    model = SequenceClassifier(tiny_gpt(), 2, pad_id=50256)
    head = model.score.weight.numel()
    assert count_parameters(train_last_blocks(model, 0), trainable_only=True) == head
    block = sum(p.numel() for p in model.base.transformer.h[1].parameters())
    norm = sum(p.numel() for p in model.base.transformer.ln_f.parameters())
    assert count_parameters(train_last_blocks(model, 1), trainable_only=True) == head + block + norm
    assert not any(p.requires_grad for p in model.base.transformer.h[0].parameters())
    assert count_parameters(train_last_blocks(model, -1), trainable_only=True) == count_parameters(model)
    with pytest.raises(ConfigError, match="train_blocks"):
        train_last_blocks(model, 3)


def test_classify_and_accuracy_on_free_text():
    tokenizer = TiktokenTokenizer("gpt2")
    model = SequenceClassifier(tiny_gpt(), 2, pad_id=50256)
    texts = [("WIN a FREE prize now", 1), ("see you at lunch", 0), ("", 0), ("x " * 500, 1)]  # empty, too long
    score, predicted = accuracy(model, tokenizer, texts, batch_size=3)
    assert predicted.shape == (4,) and score == (predicted == torch.tensor([1, 0, 0, 1])).float().mean().item()
    assert classify(model, tokenizer, "hello") in ("ham", "spam")


def test_confusion_matrix_and_wilson_interval():
    assert confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, 1, 0]).tolist() == [[1, 1], [1, 2]]
    low, high = wilson_interval(285, 300)                     # 95% of 300: about +-2.4 points
    assert 0.917 < low < 0.920 and 0.967 < high < 0.970
    assert wilson_interval(300, 300)[1] == pytest.approx(1.0) and wilson_interval(300, 300)[0] < 1
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def test_bag_of_words_learns_words_that_mark_a_class():
    texts = [("free prize call now", 1), ("win cash free", 1), ("lunch at noon", 0), ("see you at home", 0)] * 5
    model = BagOfWords([t for t, _ in texts], min_count=1).fit([t for t, _ in texts], [y for _, y in texts])
    assert model.accuracy(texts) == 1.0
    assert model.accuracy([("free cash now", 1), ("home at noon", 0)]) == 1.0


# ---- data -------------------------------------------------------------------------------------------------

def test_spam_data_is_balanced_and_split_70_10_20():
    examples = read_sms_spam(fetch("sms-spam"))
    assert len(examples) == 5574 and sum(label for _, label in examples) == 747
    splits = balanced_split(examples)
    assert [len(splits[name]) for name in ("train", "val", "test")] == [1045, 149, 300]
    everything = Counter(e for split in splits.values() for e in split)
    assert sum(label * n for (_, label), n in everything.items()) == 747 and everything <= Counter(examples)
    assert balanced_split(examples) == splits and balanced_split(examples, seed=1) != splits


def test_read_sms_spam_names_a_bad_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("ham\thello\nmaybe spam\n")
    with pytest.raises(ValueError, match="line 2"):
        read_sms_spam(path)


def test_instruction_split_and_prompt():
    records = json.loads(fetch("instruction-data").read_text())
    splits = split_records(records)
    assert [len(splits[n]) for n in ("train", "val", "test")] == [935, 55, 110]
    with_input = next(r for r in records if r["input"])
    prompt = alpaca_prompt(with_input)
    assert prompt.endswith("### Response:\n") and "### Input:\n" + with_input["input"] in prompt
    assert "### Input" not in alpaca_prompt({**with_input, "input": ""})


def test_instruction_batch_pads_masks_and_learns_the_end_token():
    eot = 50256
    examples = [([1, 2, 3], [4, 5, eot]), ([1, 2], [6, eot])]
    x, y = instruction_batch(examples, pad_id=eot, max_length=100)
    assert x.tolist() == [[1, 2, 3, 4, 5], [1, 2, 6, eot, eot]]
    assert y.tolist() == [[2, 3, 4, 5, eot], [2, 6, eot, -100, -100]]      # first end token kept, padding ignored
    x, y = instruction_batch(examples, pad_id=eot, max_length=100, mask_prompt=True)
    assert y.tolist() == [[-100, -100, 4, 5, eot], [-100, 6, eot, -100, -100]]
    x, y = instruction_batch(examples, pad_id=eot, max_length=3)           # cropped to the context
    assert x.shape == (2, 3) and y.tolist()[0] == [2, 3, 4] and truncated(examples, 3) == 1


def test_bucketed_order_is_a_seeded_permutation_that_saves_padding():
    lengths = [int(x) for x in torch.randint(5, 200, (500,), generator=torch.Generator().manual_seed(0))]
    order = bucketed_order(lengths, batch_size=8, seed=1)
    assert sorted(order) == list(range(500)) and order == bucketed_order(lengths, 8, seed=1)
    assert order != bucketed_order(lengths, 8, seed=2)
    shuffled = list(range(500))
    import random
    random.Random(1).shuffle(shuffled)
    real, padding = padded_tokens(order, lengths, 8)
    real_plain, padding_plain = padded_tokens(shuffled, lengths, 8)
    assert real == real_plain == sum(lengths) and padding < padding_plain / 3


def test_rouge_l():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c", "d e f") == 0.0
    # LCS of "the cat was on the mat" and "the cat sat on the mat" is 5 words: P = R = 5/6
    assert rouge_l("The cat was on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert rouge_l("cat", "the cat sat") == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))
    assert rouge_l("", "") == 1.0 and rouge_l("", "x") == 0.0


class _Reply:
    def __init__(self, text):
        self.body = json.dumps({"choices": [{"message": {"content": text}}]}).encode()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self):
        return self.body


def test_judge_scores_reads_numbers_and_skips_without_a_server():
    items = [{"instruction": "Add 2 and 2.", "input": "", "output": "4", "response": "4"}] * 3
    replies = iter(["85", "Score: 120", "no idea"])
    seen = []

    def opener(request, timeout):
        seen.append(json.loads(request.data))
        return _Reply(next(replies))

    assert judge_scores(items, opener=opener) == [85, 100, None]
    assert "Add 2 and 2." in seen[0]["messages"][0]["content"] and seen[0]["temperature"] == 0

    def offline(request, timeout):
        raise urllib.error.URLError("connection refused")

    assert judge_scores(items, opener=offline) is None


# ---- LoRA ---------------------------------------------------------------------------------------------------

def test_lora_starts_equal_to_the_base_and_merges_exactly():
    model = tiny_gpt(seed=1).eval()
    ids = torch.randint(0, 50257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
        apply_lora(model, rank=4, alpha=8)
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)       # B = 0: exactly the base
        for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):
            layer.lora_B.weight.normal_(std=0.05)
        lora = model(ids)
        assert not torch.allclose(lora, before, atol=1e-3)
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        torch.testing.assert_close(model(ids), lora, rtol=0, atol=1e-5)


def test_lora_scaling_is_alpha_over_rank_and_only_adapters_train():
    linear = torch.nn.Linear(6, 5)
    layer = LoRALinear(linear, rank=2, alpha=6)
    with torch.no_grad():
        layer.lora_B.weight.fill_(1.0)
    x = torch.randn(3, 6)
    expected = linear(x) + 3.0 * (x @ layer.lora_A.weight.t() @ layer.lora_B.weight.t())
    torch.testing.assert_close(layer(x), expected)
    model = apply_lora(tiny_gpt(), rank=4, alpha=8)
    # every linear layer of the 2 blocks: c_attn 16->48, attn c_proj 16->16, c_fc 16->64, mlp c_proj 64->16
    per_block = 4 * (16 + 48) + 4 * (16 + 16) + 4 * (16 + 64) + 4 * (64 + 16)
    assert count_parameters(model, trainable_only=True) == 2 * per_block
    with pytest.raises(ValueError, match="already has a LoRA"):
        apply_lora(model, 4, 8)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(linear, rank=0, alpha=1)


def test_lora_targets_follow_peft_names():
    model = tiny_gpt()
    assert lora_targets(model, ["c_attn"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert len(lora_targets(model, ["c_proj"])) == 4                        # attention's and the MLP's
    with pytest.raises(ValueError, match="c_fc"):
        lora_targets(model, ["q_proj"])


def test_lora_on_a_classifier_keeps_the_head_trainable():
    model = apply_lora(SequenceClassifier(tiny_gpt(), 2, pad_id=50256), rank=2, alpha=4)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora_" in n or n == "score.weight" for n in trainable)


def _randomize_lora(model):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def test_our_adapter_loads_into_peft_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base = tiny_gpt(seed=2)
    base.save_pretrained_hf(tmp_path / "base")
    model = apply_lora(tiny_gpt(seed=2), rank=4, alpha=8, targets=["c_attn", "c_proj"]).eval()
    _randomize_lora(model)
    save_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "c_proj"] and config["r"] == 4 and config["fan_in_fan_out"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids).logits, model(ids), rtol=0, atol=1e-4)


def test_a_peft_adapter_loads_into_ours_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    tiny_gpt(seed=4).save_pretrained_hf(tmp_path / "base")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    wrapped = peft.get_peft_model(hf, config)
    _randomize_lora(wrapped)
    wrapped.save_pretrained(tmp_path / "adapter")
    ours = load_peft_adapter(tiny_gpt(seed=4), tmp_path / "adapter").eval()
    assert len([m for m in ours.modules() if isinstance(m, LoRALinear)]) == 4
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), wrapped.eval()(ids).logits, rtol=0, atol=1e-4)


def test_peft_adapter_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="apply_lora first"):
        save_peft_adapter(tiny_gpt(), tmp_path)
    with pytest.raises(ValueError, match="readable peft adapter"):
        load_peft_adapter(tiny_gpt(), tmp_path / "nothing")
    save_peft_adapter(apply_lora(tiny_gpt(), 2, 4), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_peft_adapter(tiny_gpt(), tmp_path / "a")


def test_a_peft_adapter_that_does_not_fit_leaves_the_model_as_it_was(tmp_path):
    save_peft_adapter(apply_lora(tiny_gpt(seed=1), 2, 4), tmp_path / "good")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    damages = {"rank": ({"r": 3}, "is (2, 16), but a rank-3 adapter of this model needs (3, 16)"),
               "targets": ({"target_modules": ["q_proj"]}, "target_modules do not fit the model"),
               "fewer": ({"target_modules": ["c_attn"]}, "the adapter's tensors do not fit the model: missing [], "
                                                         "unexpected ['transformer.h.0.attn.c_proj.lora_A.weight'"),
               "alpha": ({"lora_alpha": "big"}, "lora_alpha ('big') is not supported")}
    model = tiny_gpt()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for name, (change, message) in damages.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
        (tmp_path / name / "adapter_model.safetensors").write_bytes(
            (tmp_path / "good" / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=re.escape(message)):
            load_peft_adapter(model, tmp_path / name)
        assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())     # as it was
        assert all(torch.equal(tensor, before[key]) for key, tensor in model.state_dict().items())
    load_peft_adapter(model, tmp_path / "good")                          # and the right adapter still loads
    assert len(lora_layers(model)) == 2 * 4


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi.", "chosen": "Hi.", "rejected": "No."}


@pytest.mark.parametrize("task, content, message", [
    ("instruct", [], "must hold a non-empty JSON list of objects with instruction, output"),
    ("instruct", ["Say hi."], "record 0: expected an object with instruction, output, got \"Say hi.\""),
    ("instruct", [GOOD, {"instruction": None, "output": "x"}], "record 1: 'instruction' must be text, got null"),
    ("instruct", [{"instruction": "a", "output": 5}], "record 0: 'output' must be text, got 5"),
    ("instruct", [{"instruction": "a"}], "record 0: it has no 'output'"),
    ("instruct", [{"instruction": "a", "output": "b", "input": ["x"]}], "record 0: 'input' must be text"),
    ("instruct", [GOOD] * 10, "10 records cannot be split into 8 to train, 0 to validate"),
    ("dpo", [{**GOOD, "chosen": []}] * 40, "record 0: 'chosen' must be text, got []"),
    ("dpo", [{**GOOD, "rejected": "Hi."}] * 40, "every training pair has chosen == rejected"),
    ("classify", "ham\tHello\nham\tSee you\n", "has no 'spam' messages"),
    ("classify", "", "has no 'ham' and no 'spam' messages"),
    ("classify", b"ham\tCaf\xe9\nspam\tWin\n", "is not UTF-8 text (byte 7)"),
])
def test_bad_data_is_refused_naming_file_record_and_field_before_the_run_folder_exists(hf_base, tmp_path, task,
                                                                                       content, message):
    path = tmp_path / ("data.txt" if task == "classify" else "data.json")
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    cfg = FinetuneConfig.for_task(task, data=str(path), base=str(hf_base), max_steps=1, eval_interval=1,
                                  eval_iters=1, batch_size=2, out_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        finetune(cfg, **QUIET)
    assert str(path) in str(refused.value) or "records cannot be split" in message
    assert not (tmp_path / "run").exists()


# ---- base models ------------------------------------------------------------------------------------------

def test_load_base_reads_hf_folders_and_chapter_4_runs(hf_base, tmp_path):
    base = load_base(str(hf_base))
    assert base.arch == "gpt" and base.model.cfg.n_embd == 16 and isinstance(base.tokenizer, TiktokenTokenizer)
    from ch04_pretraining.config import TrainConfig
    cfg = TrainConfig(data="the-verdict", tokenizer="gpt2", model=dict(n_layer=1, n_head=2, n_embd=16,
                      context_length=32), vocab_multiple=64, max_steps=2, eval_interval=2, eval_iters=1,
                      batch_size=2, out_dir=str(tmp_path / "run"))
    train(cfg, **QUIET)
    base = load_base(str(tmp_path / "run"))
    assert base.vocab_multiple == 64 and base.model.cfg.vocab_size == 50304 and "step 2" in base.source
    with pytest.raises(ConfigError, match="base"):
        load_base(str(tmp_path / "nowhere"))


def test_load_base_offline_says_where_to_put_gpt2(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LLM_DATA_MIRROR", str(tmp_path / "empty"))

    def no_internet(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr("urllib.request.urlopen", no_internet)
    with pytest.raises(DataUnavailableError, match="hf-gpt2.safetensors"):
        load_base("gpt2")


# ---- finetuning with chapter 4's loop -----------------------------------------------------------------------

def spam_config(tmp_path, **changes) -> FinetuneConfig:
    settings = dict(task="classify", data="sms-spam", base="tiny", batch_size=8, max_steps=8, eval_interval=4,
                    eval_iters=2, log_interval=2, lr=1e-3, min_lr=1e-3, out_dir=str(tmp_path / "run"))
    return FinetuneConfig.for_task(**{**settings, **changes})


def test_finetune_config_refuses_bad_settings(tmp_path):
    for bad, field in [(dict(task="translate"), "task"), (dict(lora_rank=-1), "lora_rank"),
                       (dict(lora_alpha=0), "lora_alpha"), (dict(epochs=-1.0), "epochs"),
                       (dict(lora_rank=4, train_blocks=1), "train_blocks"), (dict(train_blocks=-2), "train_blocks")]:
        with pytest.raises(ConfigError) as err:
            spam_config(tmp_path, **bad)
        assert err.value.field == field


def test_a_lora_rank_as_wide_as_a_layer_and_a_gae_lambda_over_1_are_refused(hf_base, tmp_path):
    with pytest.raises(ConfigError, match="must be from 0 to 1") as err:
        FinetuneConfig.for_task("ppo", gae_lambda=5.0)
    assert err.value.field == "gae_lambda"
    cfg = spam_config(tmp_path, base=str(hf_base), max_steps=1, eval_interval=1, eval_iters=1, lora_rank=16)
    with pytest.raises(ConfigError, match="must be below 16, the smaller side of the narrowest layer") as err:
        finetune(cfg, **QUIET)                                 # the tiny base is 16 wide
    assert err.value.field == "lora_rank"
    assert finetune(replace(cfg, lora_rank=2), **QUIET)["step"] == 1        # and the same folder then runs


def test_arithmetic_text_makes_the_folder_it_writes_into(tmp_path, capsys):
    from ch05_finetuning.__main__ import main
    assert main(["arithmetic-text", str(tmp_path / "new" / "folder" / "sums.txt")]) == 0
    assert (tmp_path / "new" / "folder" / "sums.txt").read_text().count("\n") > 1000


def test_a_smoke_run_reports_on_a_few_test_examples_not_all(hf_base, tmp_path, capsys):
    from ch05_finetuning.__main__ import SMOKE_TEST_EXAMPLES, main
    assert main(["instruct", "--scale", "smoke", "--base", str(hf_base), "--data", "instruction-data",
                 "--out-dir", str(tmp_path), "--max-steps", "1", "--eval-interval", "1"]) == 0
    answers = json.loads((tmp_path / "test-responses.json").read_text())
    assert len(answers) == SMOKE_TEST_EXAMPLES < 110
    assert f"reports on {SMOKE_TEST_EXAMPLES} of the 110 test examples" in capsys.readouterr().out


def test_classifier_finetuning_learns_resumes_exactly_and_reloads(hf_base, tmp_path):
    base = load_base(str(hf_base))
    cfg = spam_config(tmp_path, base=str(hf_base), max_steps=16, epochs=0.0)
    whole = finetune(replace(cfg, out_dir=str(tmp_path / "whole")), base=base, **QUIET)
    rows = read_metrics(tmp_path / "whole")
    assert [r["step"] for r in rows] == [0, 4, 8, 12, 16] and all(0 <= r["val_accuracy"] <= 1 for r in rows)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert whole["model"].score.weight.requires_grad
    # stopped after 8 steps, then resumed: the same weights as the run that never stopped
    finetune(replace(cfg, max_steps=8), base=base, **QUIET)
    finetune(cfg, resume=True, base=base, **QUIET)
    final = load_file(tmp_path / "run" / "ckpt-0000016.safetensors")
    reference = load_file(tmp_path / "whole" / "ckpt-0000016.safetensors")
    assert final.keys() == reference.keys()
    for name in final:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=0)
    model, tokenizer, saved = load_finetuned(tmp_path / "run")
    assert saved.task == "classify" and saved.model["n_embd"] == 16
    texts = ["Call now to claim your prize", "ok see you"]
    torch.testing.assert_close(accuracy(model, tokenizer, [(t, 0) for t in texts])[1],
                               accuracy(whole["model"], tokenizer, [(t, 0) for t in texts])[1])
    with pytest.raises(ConfigError, match="lora_rank"):
        finetune(replace(cfg, lora_rank=2), resume=True, base=base, **QUIET)


def test_lora_instruction_finetuning_runs_by_epochs_and_masks(hf_base, tmp_path):
    base = load_base(str(hf_base))
    cfg = FinetuneConfig.for_task("instruct", data="instruction-data", base=str(hf_base), batch_size=8, epochs=0.05,
                         eval_interval=3, eval_iters=1, lora_rank=2, lora_alpha=4, mask_prompt=True, lr=1e-3,
                         min_lr=1e-3, out_dir=str(tmp_path / "instruct"))
    result = finetune(cfg, base=base, **QUIET)
    assert result["step"] == math.ceil(0.05 * 935 / 8)
    trainable = {n for n, p in result["model"].named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    model, tokenizer, saved = load_finetuned(tmp_path / "instruct")
    ids = torch.tensor([tokenizer.encode("Hello")])
    torch.testing.assert_close(model(ids), result["model"].eval()(ids))
    from ch04_pretraining.runs import load_run
    with pytest.raises(ValueError, match="is a chapter 5 instruct run, not a chapter 4 one"):
        load_run(tmp_path / "instruct")                         # (what `ch04_pretraining sample` reads)


def test_example_batches_walk_epochs_and_split_micro_batches(tmp_path):
    cfg = spam_config(tmp_path, batch_size=2, grad_accum=2, bucket=False)
    train_examples = [([i] * (i + 1), i % 2) for i in range(10)]

    def collate(examples):
        return pad_batch([ids for ids, _ in examples], 0), torch.tensor([y for _, y in examples])

    data = ExampleBatches(train_examples, train_examples[:2], collate, lambda e: len(e[0]), cfg)
    seen = []
    for _ in range(5):                                       # 5 steps of 4 examples = 2 epochs of 10
        for x, _ in data.next_micro_batches(0, 1, "cpu"):
            seen += [row[0].item() for row in x]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10)) and seen[:10] != seen[10:]
    again = ExampleBatches(train_examples, [], collate, lambda e: len(e[0]), cfg)
    again.load_state_dict({"position": 8})
    assert [row[0].item() for x, _ in again.next_micro_batches(0, 1, "cpu") for row in x] == seen[8:12]
    with pytest.raises(ConfigError, match="batch_size"):
        ExampleBatches(train_examples[:3], [], collate, len, cfg)


def test_training_memory_counts_what_each_variant_keeps():
    model = SequenceClassifier(tiny_gpt(), 2, pad_id=50256)
    x, y = pad_batch([[1, 2, 3, 4]] * 4, 50256), torch.tensor([0, 1, 0, 1])
    full = training_memory_bytes(train_last_blocks(model, -1), x, y)
    head = training_memory_bytes(train_last_blocks(model, 0), x, y)
    assert full["weights"] == head["weights"] == 4 * count_parameters(model)
    assert head["gradients"] == 4 * 2 * 16 and head["activations"] < full["activations"]
    assert full["total"] == full["weights"] + full["gradients"] + full["optimizer"] + full["activations"]


def test_tokenize_instruction_ends_with_the_end_token():
    tokenizer = TiktokenTokenizer("gpt2")
    prompt, response = tokenize_instruction(tokenizer, {"instruction": "Say hi.", "input": "", "output": "Hi."})
    assert tokenizer.decode(prompt).endswith("### Response:\n") and response[-1] == tokenizer.eot_token


# ---- the command line ---------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "ch05_finetuning", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_cli_parses_flags_over_the_preset(hf_base, tmp_path):
    cfg, resume, overwrite = parse_args(["classify", "--scale", "smoke", "--base", str(hf_base), "--lora-rank",
                                         "4", "--out-dir", str(tmp_path)])
    assert (cfg.task, cfg.lora_rank, cfg.max_steps, resume, overwrite) == ("classify", 4, 6, False, False)
    assert parse_args(["instruct", "--scale", "gpu"])[0].base == "gpt2-medium"
    assert parse_args(["reward"])[0].data == "instruction-preference"
    for bad in (["translate"], ["classify", "--lora-rank", "-1"], ["classify", "--resume", "--overwrite"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_cli_stops_on_ctrl_c_and_resumes_to_the_same_weights(hf_base, tmp_path):
    args = ["classify", "--scale", "smoke", "--base", str(hf_base), "--max-steps", "300", "--eval-interval", "20"]
    whole = run_cli(*args, "--out-dir", str(tmp_path / "a"))
    stopped = run_cli(*args, "--out-dir", str(tmp_path / "b"))
    deadline = time.monotonic() + 120
    while not (tmp_path / "b" / "steps.jsonl").is_file():            # training, past the first evaluation
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.05)
    stopped.send_signal(signal.SIGINT)
    out, err = stopped.communicate(timeout=60)
    assert stopped.returncode == 130, err
    assert "stopped at step" in out and "python -m ch05_finetuning classify --out-dir" in out and "--resume" in out
    resumed = run_cli("classify", "--out-dir", str(tmp_path / "b"), "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    assert read_metrics(tmp_path / "a")[-1] == {**read_metrics(tmp_path / "b")[-1],
                                                **{k: read_metrics(tmp_path / "a")[-1][k]
                                                   for k in ("tokens_per_s", "elapsed_s")}}


def test_cli_errors_name_the_problem_and_leave_no_folder(tmp_path):
    proc = run_cli("classify", "--lora-rank", "2", "--train-blocks", "1", "--out-dir", str(tmp_path / "x"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--train-blocks" in err and not (tmp_path / "x").exists()
    proc = run_cli("classify", "--base", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "y"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "error: --base:" in err


def test_gpu_presets_are_raschkas_recipes_on_openai_gpt2():
    spam, instruct = finetune_preset("classify", "gpu"), finetune_preset("instruct", "gpu")
    assert (spam.base, spam.epochs, spam.lr, spam.min_lr, spam.batch_size, spam.weight_decay) == \
        ("gpt2", 5.0, 5e-5, 5e-5, 8, 0.1)
    assert (instruct.base, instruct.epochs, instruct.mask_prompt, instruct.data) == \
        ("gpt2-medium", 2.0, False, "instruction-data")
    tokenizer = TiktokenTokenizer("gpt2")
    with torch.device("meta"):                     # GPT-2 124M's shapes, without its weights
        classifier = wrap_for_task(spam, GPTModel(GPT_CONFIGS["gpt2"]), tokenizer)
        lora = wrap_for_task(replace(spam, lora_rank=8, lora_alpha=16.0), GPTModel(GPT_CONFIGS["gpt2"]), tokenizer)
        medium = wrap_for_task(instruct, GPTModel(GPT_CONFIGS["gpt2-medium"]), tokenizer)
    head = 2 * 768
    assert count_parameters(classifier, trainable_only=True) == 124_439_808 + head   # the tied head was wte
    assert count_parameters(lora, trainable_only=True) == 1_179_648 + head
    assert count_parameters(medium, trainable_only=True) == 354_823_168
    with pytest.raises(ConfigError, match="scale"):
        finetune_preset("classify", "tpu")


def test_a_base_without_an_end_token_is_refused_for_either_task(tmp_path):
    from ch04_pretraining.config import TrainConfig
    char_run = TrainConfig(data="the-verdict", tokenizer="char", model=dict(n_layer=1, n_head=2, n_embd=16,
                           context_length=32), max_steps=1, eval_interval=1, eval_iters=1, batch_size=2,
                           out_dir=str(tmp_path / "char"))
    train(char_run, **QUIET)
    for task in ("classify", "instruct"):
        cfg = FinetuneConfig.for_task(task, data="sms-spam" if task == "classify" else "instruction-data",
                             base=char_run.out_dir, out_dir=str(tmp_path / task))
        with pytest.raises(ConfigError, match="end-of-text token"):
            finetune(cfg, **QUIET)


# ---- preferences: the losses part 2 builds on ---------------------------------------------------------------

def test_preference_data_split_like_the_instructions():
    records = json.loads(fetch("instruction-preference").read_text())
    assert len(records) == 1100 and all({"chosen", "rejected"} <= set(r) for r in records)
    plain = split_records(json.loads(fetch("instruction-data").read_text()))
    paired = split_records(records)
    for name in ("train", "val", "test"):
        assert [r["instruction"] for r in paired[name]] == [r["instruction"] for r in plain[name]]


def test_dpo_loss_on_a_hand_computed_case():
    policy = torch.tensor([-10.0, -12.0], requires_grad=True)
    loss, stats = dpo_loss(policy[:1], policy[1:], torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), rel=1e-6)      # 0.598139
    assert stats == pytest.approx({"reward_chosen": 0.1, "reward_rejected": -0.1, "margin": 0.2, "accuracy": 1.0})
    loss.backward()
    weight = 0.1 / (1 + math.exp(0.2))                                      # beta * sigmoid(-margin)
    assert policy.grad.tolist() == pytest.approx([-weight, weight], rel=1e-5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(policy[:1], policy[1:], policy[:1], policy[1:], beta=0)


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference_and_counts_ranked_pairs():
    logps = torch.randn(6)
    loss, stats = dpo_loss(logps[:3], logps[3:], logps[:3], logps[3:], beta=0.5)
    assert loss.item() == pytest.approx(math.log(2)) and stats["margin"] == 0
    assert stats["accuracy"] == 0.5                                   # every pair ties: half right, not none
    loss, stats = dpo_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0]), torch.zeros(2), torch.zeros(2), 1.0)
    assert stats["accuracy"] == 0.5


def test_bradley_terry_loss_is_binary_cross_entropy_of_the_difference():
    chosen, rejected = torch.randn(10), torch.randn(10)
    expected = F.binary_cross_entropy_with_logits(chosen - rejected, torch.ones(10))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), expected)


def test_preference_batch_and_sequence_logprobs_score_responses_only():
    eot = 50256
    x, y = preference_batch([([1, 2, 3], [4, eot], [5, 6, eot])], pad_id=eot, max_length=100)
    assert x.tolist() == [[1, 2, 3, 4, eot], [1, 2, 3, 5, 6]]
    assert y.tolist() == [[-100, -100, 4, eot, -100], [-100, -100, 5, 6, eot]]
    model = tiny_gpt(seed=6).eval()
    with torch.no_grad():
        logps = sequence_logprobs(model, x, y)
        expected = -F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view(2, -1).sum(dim=1)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-4)


def test_reward_model_scores_rows_and_its_loss_is_bradley_terry():
    model = RewardModel(tiny_gpt(seed=7), pad_id=50256).eval()
    ids, targets = reward_batch([([1, 2], [3, 50256], [4, 5, 50256]), ([6], [7, 50256], [8, 50256])], 50256, 100)
    assert ids.tolist() == [[1, 2, 3, 50256, 50256], [6, 7, 50256, 50256, 50256], [1, 2, 4, 5, 50256],
                            [6, 8, 50256, 50256, 50256]] and targets.tolist() == [1, 1, 0, 0]
    with torch.no_grad():
        rewards = model(ids)
        assert rewards.shape == (4,)
        torch.testing.assert_close(model(ids, targets), bradley_terry_loss(rewards[:2], rewards[2:]))
    examples = [([1, 2], [3, 50256], [4, 5, 50256]), ([6], [7, 50256], [8, 50256])]
    assert preference_accuracy(model, examples, 100) == ((rewards[:2] > rewards[2:]).float().mean().item())


def test_reward_model_trains_from_an_instruct_run_with_lora(hf_base, tmp_path):
    base = load_base(str(hf_base))
    sft = FinetuneConfig.for_task("instruct", data="instruction-data", base=str(hf_base), batch_size=8, max_steps=2,
                         eval_interval=2, eval_iters=1, lora_rank=2, lora_alpha=4, out_dir=str(tmp_path / "sft"))
    tuned = finetune(sft, base=base, **QUIET)["model"].eval()
    as_base = load_base(str(tmp_path / "sft"))                # LoRA merged: the same model, plain weights
    assert not lora_layers(as_base.model) and all(p.requires_grad for p in as_base.model.parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(as_base.model.eval()(ids), tuned(ids), rtol=0, atol=1e-5)
    cfg = FinetuneConfig.for_task("reward", data="instruction-preference", base=str(tmp_path / "sft"), batch_size=4,
                         max_steps=4, eval_interval=2, eval_iters=1, lr=1e-3, min_lr=1e-3,
                         out_dir=str(tmp_path / "reward"))
    result = finetune(cfg, **QUIET)
    rows = read_metrics(tmp_path / "reward")
    assert isinstance(result["model"], RewardModel) and [r["step"] for r in rows] == [0, 2, 4]
    assert all(0 <= r["val_preference_accuracy"] <= 1 for r in rows)
    with pytest.raises(ConfigError, match="language model"):
        load_base(str(tmp_path / "reward"))
    assert finetune_preset("reward", "gpu").base == "runs/instruct"


# ---- the tasks' configs ------------------------------------------------------------------------------------

def test_every_task_has_a_config_class_and_a_saved_config_comes_back_as_it():
    assert set(FinetuneConfig.TASKS) == {"classify", "instruct", "reward", "dpo", "grpo", "ppo"}
    for task, config_class in FinetuneConfig.TASKS.items():
        cfg = finetune_preset(task, "cpu")
        assert type(cfg) is config_class and cfg.task == task
        assert FinetuneConfig.from_dict(asdict(cfg)) == cfg
    assert "beta" not in {f.name for f in fields(finetune_preset("classify", "cpu"))}
    assert "train_blocks" in {f.name for f in fields(finetune_preset("reward", "cpu"))}


def test_a_config_of_the_wrong_class_or_an_unknown_task_is_refused():
    from ch05_finetuning.instructions import InstructConfig

    with pytest.raises(ConfigError, match="task: must be one of classify, instruct"):
        FinetuneConfig.for_task("summarise")
    with pytest.raises(ConfigError, match="task: a InstructConfig is not for dpo"):
        InstructConfig(task="dpo")
    with pytest.raises(ConfigError, match="the saved run's task 'summarise'"):
        FinetuneConfig.from_dict({"task": "summarise"})


def test_respond_all_gives_each_prompt_the_answer_it_gets_alone():
    from ch05_finetuning.instructions import respond, respond_all

    model, tokenizer = tiny_gpt(seed=4).eval(), TiktokenTokenizer("gpt2")
    prompts = ["Hello", "A much longer prompt, with several more words in it", "Why?", "One two three four"]
    together = respond_all(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert together == [respond(model, tokenizer, prompt, max_new_tokens=6) for prompt in prompts]
    assert all(isinstance(answer, str) for answer in together)

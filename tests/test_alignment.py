"""Chapter 5, part 2: DPO, and GRPO / PPO's policy-gradient core, checked by hand, against exact sums and
against trl."""
import dataclasses
import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ch03_gpt_model.gpt import GPTConfig, GPTModel
from ch04_pretraining.config import TrainConfig
from ch04_pretraining.pretraining import train
from ch04_pretraining.runs import read_metrics
from ch05_finetuning.finetuning import (
    FinetuneConfig,
    finetune,
    finetune_preset,
    load_base,
    load_finetuned,
    model_settings_of,
)
from ch05_finetuning.preferences import (
    DPOPolicy,
    chosen_nll,
    dpo_loss,
    kl_divergence,
    preference_batch,
    ranked_right,
    sequence_logprobs,
    token_logprobs,
    win_rate,
)
from ch05_finetuning.rl import (
    PolicyGradient,
    Rollouts,
    arithmetic_splits,
    arithmetic_text,
    clipped_policy_loss,
    cut_at,
    exact_answer_reward,
    gae_advantages,
    group_advantages,
    kl_estimate,
    pass_at_k,
    whiten,
)
from shared.config import ConfigError
from shared.data import fetch

QUIET = dict(log=lambda message: None, progress=False)
TINY = GPTConfig(vocab_size=50257, context_length=128, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(seed=0, **changes) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(dataclasses.replace(TINY, **changes))


# ---- DPO --------------------------------------------------------------------------------------------------

def test_token_logprobs_are_the_targets_log_softmax_and_zero_where_ignored():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 4, 10), torch.tensor([[1, 2, -100, 3], [-100, -100, 4, 5]])
    picked = token_logprobs(logits, y)
    manual = torch.log_softmax(logits, dim=-1)
    assert picked[0, 2] == 0 and picked[1, 0] == 0 and picked[1, 1] == 0
    assert torch.allclose(picked[0, 0], manual[0, 0, 1]) and torch.allclose(picked[1, 3], manual[1, 3, 5])


def test_kl_divergence_is_exact_over_the_vocabulary():
    torch.manual_seed(1)
    p, q = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    expected = F.kl_div(torch.log_softmax(q, -1), torch.log_softmax(p, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(p, q), expected)
    assert kl_divergence(p, p).abs().max() < 1e-6 and (kl_divergence(p, q) > 0).all()


def trl_dpo_loss(per_token: torch.Tensor, completion: torch.Tensor, reference: torch.Tensor, beta: float,
                 loss_types: list[str], loss_weights: list[float]) -> tuple[torch.Tensor, dict[str, float]]:
    """trl's DPOTrainer loss on the same per-token log-probabilities (2 · pairs, seq), completion mask
    (2 · pairs, seq + 1) and reference sequence log-probabilities, with what it logs."""
    trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    rows, seq = per_token.shape
    pairs = rows // 2

    def model(**kwargs):
        zeros = torch.zeros(rows, seq)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    fake = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
                           ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                           loss_types=loss_types, loss_weights=loss_weights, beta=beta, use_weighting=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(rows, seq + 1, dtype=torch.long),
              "attention_mask": torch.ones_like(completion), "completion_mask": completion,
              "ref_chosen_logps": reference[:pairs], "ref_rejected_logps": reference[pairs:]}
    loss = trainer.DPOTrainer._compute_loss(fake, model, inputs, False)
    return loss, {name: values[-1] for name, values in fake._metrics["train"].items()}


def random_preference_logprobs(pairs: int = 3, seq: int = 6, vocab: int = 11):
    """(per-token log-probs, targets, completion mask, reference log-probs) of a made-up preference batch."""
    torch.manual_seed(2)
    logits = torch.randn(2 * pairs, seq, vocab)
    completion = torch.zeros(2 * pairs, seq + 1, dtype=torch.long)
    for row, start in enumerate([2, 3, 1, 2, 4, 3]):               # prompt lengths differ; the rest is response
        completion[row, start:] = 1
    y = torch.randint(0, vocab, (2 * pairs, seq)).masked_fill(completion[:, 1:] == 0, -100)
    per_token = token_logprobs(logits, y)
    reference = per_token.sum(-1) + torch.randn(2 * pairs)          # some other model's log-probabilities
    return per_token, y, completion, reference


def test_dpo_loss_and_its_logged_rewards_equal_trls_on_the_same_log_probabilities():
    per_token, y, completion, reference = random_preference_logprobs()
    pairs, beta = len(y) // 2, 0.1
    ours, stats = dpo_loss(per_token.sum(-1)[:pairs], per_token.sum(-1)[pairs:], reference[:pairs],
                           reference[pairs:], beta)
    theirs, logged = trl_dpo_loss(per_token, completion, reference, beta, ["sigmoid"], [1.0])
    torch.testing.assert_close(ours, theirs)
    assert stats["reward_chosen"] == pytest.approx(logged["rewards/chosen"], abs=1e-6)
    assert stats["reward_rejected"] == pytest.approx(logged["rewards/rejected"], abs=1e-6)
    assert stats["margin"] == pytest.approx(logged["rewards/margins"], abs=1e-6)
    assert stats["accuracy"] == pytest.approx(logged["rewards/accuracies"])


def test_rpo_adds_the_chosen_responses_nll_as_trls_sft_loss_type_does():
    per_token, y, completion, reference = random_preference_logprobs()
    pairs, beta, weight = len(y) // 2, 0.1, 0.7
    logps = per_token.sum(-1)
    ours = dpo_loss(logps[:pairs], logps[pairs:], reference[:pairs], reference[pairs:], beta)[0] + \
        weight * chosen_nll(logps, y)
    theirs, _ = trl_dpo_loss(per_token, completion, reference, beta, ["sigmoid", "sft"], [1.0, weight])
    torch.testing.assert_close(ours, theirs)
    model = tiny_gpt(seed=3)
    examples = [([1, 2, 3], [4, 50256], [5, 6, 50256]), ([7], [8, 9, 50256], [10, 50256])]
    x, y = preference_batch(examples, 50256, 100)
    reference = torch.tensor([-20.0, -21.0, -19.0, -25.0])
    with torch.no_grad():
        plain = DPOPolicy(model, beta=0.5)(x, (y, reference))
        rpo = DPOPolicy(model, beta=0.5, sft_weight=weight)(x, (y, reference))
        torch.testing.assert_close(rpo - plain, weight * chosen_nll(sequence_logprobs(model, x, y), y))
    with pytest.raises(ConfigError, match="sft_weight"):
        FinetuneConfig.for_task("dpo", sft_weight=-1.0)


def test_a_tie_counts_half_in_the_accuracy_of_a_ranking():
    assert ranked_right(torch.tensor([1.0, -1.0, 0.0, 0.0])) == 0.5
    assert ranked_right(torch.tensor([2.0, 0.0])) == 0.75
    logps = torch.tensor([-3.0, -5.0])
    stats = dpo_loss(logps[:1], logps[1:], logps[:1], logps[1:], beta=0.1)[1]     # the policy is the reference
    assert stats["margin"] == 0.0 and stats["accuracy"] == 0.5                    # every pair ties: a coin, not 0%


def test_dpo_policy_is_the_language_model_and_its_loss_is_dpo_loss():
    model = tiny_gpt(seed=3)
    policy = DPOPolicy(model, beta=0.5).eval()
    examples = [([1, 2, 3], [4, 50256], [5, 6, 50256]), ([7], [8, 9, 50256], [10, 50256])]
    x, y = preference_batch(examples, 50256, 100)
    reference = torch.tensor([-20.0, -21.0, -19.0, -25.0])
    with torch.no_grad():
        assert torch.equal(policy(x), model(x))
        logps = sequence_logprobs(model, x, y)
        expected = dpo_loss(logps[:2], logps[2:], reference[:2], reference[2:], 0.5)[0]
        torch.testing.assert_close(policy(x, (y, reference)), expected)


@pytest.fixture(scope="module")
def gpt2_vocab_base(tmp_path_factory) -> Path:
    """A tiny GPT-2-vocabulary model saved as a Hugging Face folder: a base `load_base` reads offline."""
    folder = tmp_path_factory.mktemp("base")
    tiny_gpt(seed=4).save_pretrained_hf(folder)
    return folder


def test_dpo_starts_at_log_2_with_the_reference_and_moves_the_margin(gpt2_vocab_base, tmp_path):
    records = json.loads(fetch("instruction-preference").read_text(encoding="utf-8"))[:16]   # 14 / 1 / 1
    (tmp_path / "pairs.json").write_text(json.dumps(records), encoding="utf-8")
    cfg = FinetuneConfig.for_task("dpo", data=str(tmp_path / "pairs.json"), base=str(gpt2_vocab_base), batch_size=4,
                         max_steps=6, eval_interval=3, eval_iters=1, lr=1e-3, min_lr=1e-3, beta=0.5,
                         out_dir=str(tmp_path / "dpo"))
    result = finetune(cfg, **QUIET)
    rows = read_metrics(tmp_path / "dpo")
    first, last = rows[0], rows[-1]
    assert first["val_loss"] == pytest.approx(math.log(2), abs=1e-6) and first["val_kl"] == pytest.approx(0, abs=1e-6)
    assert first["val_reward_chosen"] == pytest.approx(0, abs=1e-6)
    assert first["val_margin"] == pytest.approx(0, abs=1e-6)
    assert last["train_loss"] < first["train_loss"] and last["val_kl"] > 0
    assert last["val_margin"] == pytest.approx(last["val_reward_chosen"] - last["val_reward_rejected"], abs=1e-5)
    assert isinstance(result["model"], DPOPolicy)
    reloaded, _, saved = load_finetuned(tmp_path / "dpo")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), result["model"].eval()(ids))
    assert saved.beta == 0.5 and load_base(str(tmp_path / "dpo")).model.cfg == result["model"].policy.cfg


def test_dpo_preset_and_config_checks():
    gpu = finetune_preset("dpo", "gpu")
    assert (gpu.base, gpu.lr, gpu.beta, gpu.epochs, gpu.data) == ("runs/instruct", 5e-6, 0.1, 1.0,
                                                                  "instruction-preference")
    for bad in (0, -0.1, float("nan"), True):
        with pytest.raises(ConfigError, match="beta"):
            FinetuneConfig.for_task("dpo", beta=bad)


# ---- GRPO and PPO -----------------------------------------------------------------------------------------

def test_group_advantages_centre_and_scale_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    scaled = group_advantages(rewards)
    std = torch.tensor([1, 0, 2.0]).div(3).sqrt()                       # unbiased: sum of squares / (n - 1)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (std.unsqueeze(1) + 1e-4)
    torch.testing.assert_close(scaled, expected)
    assert torch.equal(scaled[1], torch.zeros(4))                           # equal rewards: no signal
    assert torch.equal(group_advantages(rewards, scale=False)[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_kl_estimate_is_non_negative_zero_at_equality_and_unbiased():
    torch.manual_seed(5)
    p, q = torch.softmax(torch.randn(9), 0), torch.softmax(torch.randn(9), 0)
    estimate = kl_estimate(p.log(), q.log())                     # the estimate for each token, sampled from p
    assert (estimate >= 0).all() and kl_estimate(p.log(), p.log()).abs().max() == 0
    exact = (p * (p.log() - q.log())).sum()
    torch.testing.assert_close((p * estimate).sum(), exact)       # its expectation under p is the KL divergence


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.0, 1.5, 0.5, 1.1]])).requires_grad_(True)     # ratios 1, 1.5, 0.5, 1.1
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages = torch.tensor([2.0])
    loss, stats = clipped_policy_loss(logps, old, advantages, mask, epsilon=0.2)
    # per token: -min(ρA, clip(ρ)A) = -2, -2.4 (clipped at 1.2), -1.0; the fourth is masked out
    assert loss.item() == pytest.approx(-(2 + 2.4 + 1.0) / 3)
    assert stats["clip_fraction"] == pytest.approx(1 / 3) and stats["kl"] == 0
    loss.backward()
    assert logps.grad[0, 1] == 0 and logps.grad[0, 0] != 0 and logps.grad[0, 3] == 0   # clipped: no gradient
    negative, stats = clipped_policy_loss(logps.detach(), old, -advantages, mask, epsilon=0.2)
    assert negative.item() == pytest.approx((2 + 3.0 + 1.6) / 3)            # the pessimistic side: 1.5 · 2, 0.8 · 2
    assert stats["clip_fraction"] == pytest.approx(1 / 3)                  # the ratio 0.5 with A < 0 is clipped


def test_clipped_policy_loss_adds_the_kl_penalty_and_equals_reinforce_at_ratio_one():
    torch.manual_seed(6)
    logps, reference = -torch.rand(2, 5), -torch.rand(2, 5)
    mask = torch.ones(2, 5)
    advantages = torch.tensor([1.0, -0.5])
    plain, _ = clipped_policy_loss(logps, logps, advantages, mask)
    assert plain.item() == pytest.approx(-(5 * 1.0 - 5 * 0.5) / 10)         # ratio 1: minus the mean advantage
    penalised, stats = clipped_policy_loss(logps, logps, advantages, mask, reference_logps=reference, kl_coef=0.1)
    kl = kl_estimate(logps, reference).mean()
    assert penalised.item() == pytest.approx(plain.item() + 0.1 * kl.item()) and stats["kl"] == pytest.approx(kl.item())


def test_gae_by_hand_and_monte_carlo_at_lambda_one():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.4, 0.6, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    a2 = 1.0 - 0.6
    a1 = 0.9 * 0.6 - 0.4 + 0.45 * a2
    a0 = 0.9 * 0.4 - 0.5 + 0.45 * a1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.6, 0.0]]))
    monte_carlo, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(monte_carlo, torch.tensor([[0.5, 0.6, 0.4, 0.0]]))    # R - V_t


def test_whiten_over_the_mask():
    values, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    white = whiten(values, mask)
    assert white[0, 3] == 0 and white[0, :3].mean().abs() < 1e-6 and white[0, :3].std().item() == pytest.approx(1)


def test_arithmetic_problems_are_distinct_across_splits_and_rewarded_exactly():
    splits = arithmetic_splits((50, 10, 20))
    prompts = [p["prompt"] for split in splits.values() for p in split]
    assert len(set(prompts)) == 80 and [len(s) for s in splits.values()] == [50, 10, 20]
    assert all(int(p["prompt"].split("+")[0]) + int(p["prompt"][:-1].split("+")[1]) == int(p["answer"])
               for p in splits["train"])
    assert arithmetic_text(splits["train"][:1]) == splits["train"][0]["prompt"] + splits["train"][0]["answer"] + "\n"
    from ch01_tokenization.tokenization import CharTokenizer
    tokenizer = CharTokenizer("0123456789+=\n ")
    end = tokenizer.encode("\n")[0]
    reward = exact_answer_reward(tokenizer, end)
    examples = [([], "42"), ([], "42"), ([], "42"), ([], "7")]
    responses = [tokenizer.encode("42\n"), tokenizer.encode("420\n"), tokenizer.encode(" 42"), tokenizer.encode("\n")]
    assert reward(examples, responses).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert cut_at([1, 2, 9, 3, 9], 9) == [1, 2, 9] and cut_at([1, 2], 9) == [1, 2]


@pytest.fixture(scope="module")
def arithmetic_base(tmp_path_factory) -> Path:
    """A tiny character-level model trained a few steps on sums: a base for GRPO and PPO."""
    folder = tmp_path_factory.mktemp("arith")
    (folder / "sums.txt").write_text(arithmetic_text(arithmetic_splits()["train"][:2000]))
    cfg = TrainConfig(data=str(folder / "sums.txt"), tokenizer="char", batch_size=8, max_steps=4, eval_interval=4,
                      eval_iters=1, model=dict(n_layer=1, n_head=2, n_embd=16, context_length=24),
                      out_dir=str(folder / "sft"))
    train(cfg, **QUIET)
    return folder / "sft"


@pytest.mark.parametrize("task", ["grpo", "ppo"])
def test_rl_runs_log_their_rollouts_and_resume_exactly(arithmetic_base, tmp_path, task):
    cfg = dataclasses.replace(finetune_preset(task, "smoke", base=str(arithmetic_base)), max_steps=6,
                              eval_interval=2, max_new_tokens=5, kl_coef=0.05, out_dir=str(tmp_path / "whole"))
    whole = finetune(cfg, **QUIET)
    rows = read_metrics(tmp_path / "whole")
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    for row in rows[1:]:
        assert 0 <= row["reward"] <= 1 and 1 <= row["response_length"] <= 5 and 0 <= row["equal_groups"] <= 1
        assert 0 <= row["clip_fraction"] <= 1 and row["kl"] >= 0 and row["val_loss"] == -row["val_reward"]
        assert ("value_loss" in row) == (task == "ppo")
    assert isinstance(whole["model"], PolicyGradient) and (whole["model"].value_head is not None) == (task == "ppo")

    stop = dataclasses.replace(cfg, out_dir=str(tmp_path / "parts"), max_steps=3)
    finetune(stop, **QUIET)
    resumed = finetune(dataclasses.replace(stop, max_steps=6), resume=True, **QUIET)
    for (name, a), b in zip(whole["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name


def test_rl_refuses_a_prompt_that_leaves_no_room_and_a_reward_model_that_does_not_fit(arithmetic_base, tmp_path):
    cfg = dataclasses.replace(finetune_preset("grpo", "smoke", base=str(arithmetic_base)), max_new_tokens=20,
                              out_dir=str(tmp_path / "long"))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        finetune(cfg, **QUIET)
    with pytest.raises(ConfigError, match="exact-answer"):
        finetune(dataclasses.replace(cfg, max_new_tokens=5, reward=str(tmp_path)), **QUIET)
    for bad in (dict(group_size=1), dict(iterations=0), dict(temperature=0.0), dict(kl_coef=-1.0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            FinetuneConfig.for_task("grpo", **bad)


def test_rollouts_sample_groups_in_prompt_order(arithmetic_base):
    base = load_base(str(arithmetic_base))
    cfg = dataclasses.replace(finetune_preset("grpo", "smoke", base=str(arithmetic_base)), max_new_tokens=4,
                              model=model_settings_of(base.model), group_size=3)
    end = base.tokenizer.encode("\n")[0]
    prompts = [base.tokenizer.encode(p) for p in ["12+34=", "5+6=", "99+1="]]
    data = Rollouts([(p, "0") for p in prompts], [(prompts[0], "46")], PolicyGradient(base.model, 0.2, 0.0),
                    exact_answer_reward(base.tokenizer, end), end, cfg, vocab_size=base.tokenizer.n_vocab)
    greedy = data.sample(prompts, "cpu", 3, 0.0)
    assert len(greedy) == 9 and all(greedy[3 * i] == greedy[3 * i + 1] == greedy[3 * i + 2] for i in range(3))
    for i, prompt in enumerate(prompts):                                    # each group answers its own prompt
        alone = data.sample([prompt], "cpu", 1, 0.0)[0]
        assert greedy[3 * i] == alone and len(alone) <= 4


def test_command_line_writes_the_sums_and_runs_grpo_and_resumes(arithmetic_base, tmp_path, capsys):
    from ch05_finetuning.__main__ import main
    assert main(["arithmetic-text", str(tmp_path / "sums.txt")]) == 0
    lines = (tmp_path / "sums.txt").read_text().splitlines()
    train = arithmetic_splits()["train"]
    assert len(lines) == len(train) and lines[0] == train[0]["prompt"] + train[0]["answer"]
    out = str(tmp_path / "grpo")
    assert main(["grpo", "--scale", "smoke", "--base", str(arithmetic_base), "--max-new-tokens", "5",
                 "--max-steps", "2", "--out-dir", out]) == 0
    assert "test exact-match accuracy" in capsys.readouterr().out
    assert main(["grpo", "--scale", "smoke", "--max-steps", "4", "--out-dir", out, "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out)][-1] == 4
    with pytest.raises(SystemExit):
        main(["dpo", "--beta", "0", "--out-dir", str(tmp_path / "bad")])
    assert "--beta" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_win_rate_counts_ties_half_and_pass_at_k_by_hand():
    assert win_rate(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 0.0, 3.0, 1.0])) == pytest.approx(0.625)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10) and pass_at_k(8, 0, 8) == 0 and pass_at_k(8, 8, 1) == 1
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_sequence_logprobs_without_hidden_states_takes_the_full_logits():
    model = tiny_gpt(seed=8).eval()

    class LogitsOnly(torch.nn.Module):                       # a model that only returns logits
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, idx):
            return self.inner(idx)

    x, y = preference_batch([([1, 2, 3], [4, 5, 50256], [6, 50256])], 50256, 100)
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(LogitsOnly(), x, y), sequence_logprobs(model, x, y),
                                   rtol=1e-5, atol=1e-4)


def test_a_rollout_with_equal_rewards_teaches_nothing(arithmetic_base):
    base = load_base(str(arithmetic_base))
    cfg = dataclasses.replace(finetune_preset("grpo", "smoke", base=str(arithmetic_base)), max_new_tokens=4,
                              model=model_settings_of(base.model), group_size=4, batch_size=3)
    end = base.tokenizer.encode("\n")[0]
    prompts = [(base.tokenizer.encode(p), "0") for p in ["12+34=", "5+6=", "99+1="]]
    data = Rollouts(prompts, prompts[:1], PolicyGradient(base.model, 0.2, 0.0),
                    lambda examples, responses: torch.ones(len(responses)), end, cfg, vocab_size=base.tokenizer.n_vocab)
    x, (y, advantages, old_logps, reference_logps, returns) = data.rollout(prompts, "cpu")
    assert x.shape[0] == 12 and torch.equal(advantages, torch.zeros(12)) and reference_logps.numel() == 0
    assert data.rollout_stats[-1]["equal_groups"] == 1.0 and data.rollout_stats[-1]["reward"] == 1.0
    assert 1 <= data.rollout_stats[-1]["response_length"] <= 4
    assert bool((old_logps[y == -100] == 0).all()) and bool((old_logps[y != -100] < 0).all())


def test_grpo_learns_from_a_reward_model_run(gpt2_vocab_base, tmp_path):
    records = json.loads(fetch("instruction-preference").read_text(encoding="utf-8"))[:16]
    (tmp_path / "pairs.json").write_text(json.dumps(records), encoding="utf-8")
    reward = FinetuneConfig.for_task("reward", data=str(tmp_path / "pairs.json"), base=str(gpt2_vocab_base),
                            batch_size=4, max_steps=2, eval_interval=2, eval_iters=1, out_dir=str(tmp_path / "reward"))
    finetune(reward, **QUIET)
    cfg = FinetuneConfig.for_task("grpo", data=str(tmp_path / "pairs.json"), base=str(gpt2_vocab_base),
                         reward=str(tmp_path / "reward"), batch_size=2, group_size=2, max_new_tokens=3, max_steps=2,
                         eval_interval=2, eval_iters=1, kl_coef=0.1, out_dir=str(tmp_path / "grpo"))
    finetune(cfg, **QUIET)
    last = read_metrics(tmp_path / "grpo")[-1]
    assert math.isfinite(last["reward"]) and last["kl"] >= 0 and 1 <= last["response_length"] <= 3
    with pytest.raises(ConfigError, match="reward run"):
        finetune(dataclasses.replace(cfg, reward=str(tmp_path), out_dir=str(tmp_path / "bad")), **QUIET)

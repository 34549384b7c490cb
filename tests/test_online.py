"""Online training: objectives by hand, NFT ≡ GRPO on-policy, groups without signal, rewards (TRL signature, None,
failures), retry turns, self-aligned reward, prompt filtering, exact resume after SIGKILL, two processes."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model, make_tokenizer, write_jsonl
from thumbalign.cli import main
from thumbalign.errors import ThumbalignError
from thumbalign.methods.grpo import dr_grpo_token_losses, grpo_token_losses
from thumbalign.methods.nft import nft_token_losses
from thumbalign.methods.online_base import GroupBatch, k3_kl, kl_penalty, reduce_token_losses
from thumbalign.methods.rft import rft_token_losses
from thumbalign.trainers.config import OnlineConfig
from thumbalign.trainers.online import conversation_tokens, train_online

REWARDS = '''
import json

def low_first(text):
    """Half of the byte alphabet: a tiny random model starts near 50% and can learn it."""
    return bool(text) and ord(text[0]) < 128

def trl_reward(prompts, completions, target, completion_ids, **kwargs):
    """TRL's signature: a list of floats (or None) per answer; extra columns come as keyword lists."""
    assert len(prompts) == len(completions) == len(target) == len(completion_ids)
    with open(LOG, "a") as handle:
        handle.write(json.dumps({"prompts": prompts, "completions": completions, "target": target,
                                 "extra": sorted(kwargs)}) + "\\n")
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]  # conversations: message lists
    return [None if t == "skip" else float(bool(c) and ord(c[0]) < 128) for c, t in zip(texts, target)]

def graded(prompts, completions, **kwargs):
    """A graded reward below the pass threshold for every answer: every outcome is 👎, the rewards still differ."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [0.1 + 0.3 * float(bool(t) and ord(t[0]) < 128) for t in texts]

def flat(prompts, completions, **kwargs):
    """The same graded reward for every answer: no signal, though float32 gives its group a std of ~6e-8."""
    return [0.9] * len(completions)

def always(text):
    return True

def never(text):
    return False

def broken(text):
    if "x" in text or "y" in text or len(text) > 0:
        raise ValueError("checker crashed")
    return True
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    log = tmp_path / "reward_calls.jsonl"
    (tmp_path / "online_rewards.py").write_text(f"LOG = {str(log)!r}\n" + REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("online_rewards", None)
    return "online_rewards", log


def _prompts(tmp_path, n=8, **extra):
    return write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"q{i}?", "target": "go", **extra} for i in range(n)])


def _config(tmp_path, model, reward, **kw):
    values = dict(prompts=str(_prompts(tmp_path)), reward=[reward], model=str(model),
                  output_dir=str(tmp_path / "run"), max_steps=3, num_generations=4, per_device_train_batch_size=2,
                  max_new_tokens=5, bf16="false", learning_rate=1e-3, report=False)
    values.update(kw)
    config = OnlineConfig(**values)
    config.validate()
    return config


# --------------------------------------------------------------------------- objectives by hand

def _batch(rewards, outcomes=None, old_shift=0.0, tokens=2):
    """One group; every answer has `tokens` tokens with log-prob −1 (old: −1 − old_shift)."""
    n = len(rewards)
    logps = torch.full((n, tokens), -1.0, requires_grad=True)
    r = torch.tensor(rewards)
    o = torch.tensor(outcomes if outcomes is not None else rewards)
    mean, std, rate = r.mean().expand(n), r.std(unbiased=False).expand(n), o.mean().expand(n)
    x = GroupBatch(logps=logps, old_logps=torch.full((n, tokens), -1.0 - old_shift), mask=torch.ones(n, tokens,
                   dtype=torch.bool), rewards=r, outcomes=o, group_mean=mean, group_std=std, pass_rate=rate)
    return x, logps


def test_grpo_and_dr_grpo_by_hand():
    x, logps = _batch([1.0, 0.0, 0.0, 0.0])  # mean 0.25, population std √(0.25·0.75) = 0.4330
    std = math.sqrt(0.25 * 0.75)
    advantages = [(1 - 0.25) / (std + 1e-4), -0.25 / (std + 1e-4)]
    losses = grpo_token_losses(x)
    assert losses[0].tolist() == pytest.approx([-advantages[0]] * 2, abs=1e-5)  # −A·R with R = 1
    assert losses[1].tolist() == pytest.approx([-advantages[1]] * 2, abs=1e-5)
    losses.sum().backward()
    assert logps.grad[0, 0].item() == pytest.approx(-advantages[0], abs=1e-5)  # ∇ = −A ∇log π
    x, logps = _batch([1.0, 0.0, 0.0, 0.0])
    dr = dr_grpo_token_losses(x)
    assert dr[:, 0].tolist() == pytest.approx([-0.75, 0.25, 0.25, 0.25], abs=1e-6)


def test_grpo_clip_acts_off_policy():
    # R = e^0.5 ≈ 1.65 > 1.2: a positive advantage is clipped (no gradient), a negative one is not
    x, logps = _batch([1.0, 0.0], old_shift=0.5)
    losses = grpo_token_losses(x, epsilon=0.2)
    a = 0.5 / (0.5 + 1e-4)
    assert losses[0, 0].item() == pytest.approx(-1.2 * a, rel=1e-5)
    assert losses[1, 0].item() == pytest.approx(math.exp(0.5) * a, rel=1e-5)
    losses.sum().backward()
    assert logps.grad[0, 0].item() == 0.0 and logps.grad[1, 0].item() > 0


def test_nft_by_hand_on_and_off_policy():
    # on-policy: every term is 0 in value; gradients −ω on 👍 and +ω·r̂/(1 − r̂) on 👎 (ω = 1 − r̂ = 0.75)
    x, logps = _batch([1.0, 0.0, 0.0, 0.0])
    losses = nft_token_losses(x, weighting="dr_grpo")
    assert losses.abs().max().item() == 0.0
    losses.sum().backward()
    assert logps.grad[0, 0].item() == pytest.approx(-0.75)
    assert logps.grad[1, 0].item() == pytest.approx(0.75 * 0.25 / 0.75)
    # off-policy, R = 2: the 👎 term is −log((1 − r̂R)/(1 − r̂)) = −log(0.5/0.75), the 👍 term −log 2
    x, _ = _batch([1.0, 0.0, 0.0, 0.0], old_shift=math.log(2))
    losses = nft_token_losses(x, weighting="constant", negative_floor=0.05)
    assert losses[0, 0].item() == pytest.approx(-math.log(2), rel=1e-5)
    assert losses[1, 0].item() == pytest.approx(-math.log(0.5 / 0.75), rel=1e-5)
    # with the default floor 1.0 the value is clamped to −log 1 = 0, the gradient still flows (straight-through)
    x, logps = _batch([1.0, 0.0, 0.0, 0.0], old_shift=math.log(2))
    clamped = nft_token_losses(x, weighting="constant", negative_floor=1.0)
    assert clamped[1, 0].item() == 0.0
    clamped.sum().backward()
    assert logps.grad[1, 0].item() == pytest.approx(0.25 * 2 / 0.75, rel=1e-5)  # −∂/∂logp of log(1 − r̂e^logp)


def test_rft_trains_on_positives_only():
    x, logps = _batch([1.0, 0.0, 1.0, 0.0])
    rft_token_losses(x).sum().backward()
    assert logps.grad[0, 0].item() == pytest.approx(-1.0) and logps.grad[1].abs().max().item() == 0.0


def test_normalizations_and_kl_by_hand():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    weights = torch.tensor([1.0, 1.0])
    totals = dict(sequences=4.0, tokens=8.0, constant=20.0)
    assert reduce_token_losses(losses, mask, weights, "sequence", **totals).item() == pytest.approx((6 / 3 + 4) / 4)
    assert reduce_token_losses(losses, mask, weights, "token", **totals).item() == pytest.approx(10 / 8)
    assert reduce_token_losses(losses, mask, weights, "constant", **totals).item() == pytest.approx(10 / 20)
    assert reduce_token_losses(losses, mask, torch.tensor([0.0, 1.0]), "token", **totals).item() == pytest.approx(0.5)
    kl = k3_kl(torch.tensor([-1.0]), torch.tensor([-1.5]))
    assert kl.item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    # the loss's KL term: β·k3 on answer tokens only, and each answer's mean k3 for the log
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0], [-0.5, -1.0]])
    answer_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    terms, per_answer = kl_penalty(logps, ref, answer_mask, 0.5)
    k = math.exp(-0.5) + 0.5 - 1  # k3 of the one token whose log-prob differs, on the mask
    assert terms.flatten().tolist() == pytest.approx([0.5 * k, 0.0, 0.0, 0.0])
    assert per_answer.tolist() == pytest.approx([k / 2, 0.0]) and not per_answer.requires_grad
    terms.sum().backward()  # d k3 / d logp = 1 − exp(ref − logp) > 0 when ref < logp: the term pulls logp down
    assert logps.grad[0, 0].item() == pytest.approx(0.5 * (1 - math.exp(-0.5))) and logps.grad[1, 1].item() == 0.0


# --------------------------------------------------------------------------- NFT ≡ GRPO on-policy

def _gradients(model, tokens, mask, make_losses, normalization):
    from thumbalign.data.batching import collate_masked
    from thumbalign.engine.logprobs import completion_token_logps

    model.zero_grad()
    t = collate_masked(tokens, mask, 0)
    logps = completion_token_logps(model, t["input_ids"], t["attention_mask"], t["completion_mask"])
    m = t["completion_mask"][:, 1:]
    losses = make_losses(logps, m)
    reduce_token_losses(losses, m, torch.ones(len(tokens)), normalization, sequences=len(tokens),
                        tokens=float(m.sum()), constant=40.0).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("weighting,twin", [("dr_grpo", "dr_grpo"), ("grpo", "grpo")])
def test_nft_equals_grpo_on_policy(weighting, twin):
    """NFT's gradient on-policy is Dr. GRPO's with ω = 1 − r̂ and GRPO's with ω = √((1 − r̂)/r̂) (paper, §4)."""
    tokenizer = make_tokenizer()
    model = make_model("llama", len(tokenizer), seed=3)
    torch.manual_seed(0)
    prompt = tokenizer("q?")["input_ids"]
    answers = [torch.randint(0, 250, (n,)).tolist() for n in (3, 5, 4, 6, 2)]
    tokens = [prompt + a for a in answers]
    mask = [[False] * len(prompt) + [True] * len(a) for a in answers]
    outcomes = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    n = len(answers)
    stats = dict(rewards=outcomes, outcomes=outcomes, group_mean=outcomes.mean().expand(n),
                 group_std=outcomes.std(unbiased=False).expand(n), pass_rate=outcomes.mean().expand(n))

    def batch(logps, m):
        return GroupBatch(logps=logps, old_logps=logps.detach(), mask=m, **stats)

    nft = _gradients(model, tokens, mask, lambda lp, m: nft_token_losses(batch(lp, m), weighting=weighting),
                     "constant")
    if twin == "dr_grpo":
        other = _gradients(model, tokens, mask, lambda lp, m: dr_grpo_token_losses(batch(lp, m)), "constant")
    else:
        other = _gradients(model, tokens, mask, lambda lp, m: grpo_token_losses(batch(lp, m), std_epsilon=0.0),
                           "constant")
    assert nft.abs().max() > 1e-4  # a real gradient, not two zeros
    assert torch.allclose(nft, other, atol=1e-5), (nft - other).abs().max()


# --------------------------------------------------------------------------- the trainer

def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("verdict", ["always", "never"])
def test_groups_without_signal_change_nothing(tmp_path, tiny_llama, reward_module, verdict):
    module, _ = reward_module
    summary = train_online(_config(tmp_path, tiny_llama, f"{module}:{verdict}", objective="nft"), log=lambda *a: None)
    assert summary["final_metrics"]["frac_zero_std"] == 1.0
    assert all(m["frac_zero_std"] == 1.0 and m["loss"] is None for m in _metrics(tmp_path / "run"))
    before, after = _weights(tiny_llama), _weights(tmp_path / "run" / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)  # all-👍 or all-👎 groups: not one weight moved


@pytest.mark.parametrize("objective, learns", [("grpo", True), ("nft", False)])
def test_a_graded_reward_is_a_signal_for_grpo_even_when_every_outcome_is_thumbs_down(tmp_path, tiny_llama,
                                                                                   reward_module, objective, learns):
    """A reward model's P(👍) can rank answers that all fall short of the pass threshold: GRPO compares rewards within
    a group and learns from that; NFT learns from the binary outcome, and an all-👎 group carries nothing for it."""
    module, _ = reward_module
    train_online(_config(tmp_path, tiny_llama, f"{module}:graded", objective=objective), log=lambda *a: None)
    metrics = _metrics(tmp_path / "run")
    assert all(m["pass_rate"] == 0.0 for m in metrics)
    before, after = _weights(tiny_llama), _weights(tmp_path / "run" / "model")
    moved = not all(torch.equal(before[k], after[k]) for k in before)
    assert moved == learns
    assert all((m["frac_zero_std"] < 1.0) == learns for m in metrics)


def test_answers_trained_on_in_chunks_give_the_gradient_of_one_pass(tmp_path, tiny_llama, reward_module):
    """--answers-per-forward splits a micro-batch's answers into passes (memory: activations are kept per answer
    token); the loss's totals are the step's, so the passes' gradients sum to the one pass's: the same weights and
    losses, with 3 answers per pass (groups of 4 cut across passes) as with all 8 in one."""
    module, _ = reward_module
    for name, size in (("one", 100), ("chunks", 3)):
        train_online(_config(tmp_path, tiny_llama, f"{module}:low_first", output_dir=str(tmp_path / name),
                             answers_per_forward=size), log=lambda *a: None)
    one, chunks = _metrics(tmp_path / "one"), _metrics(tmp_path / "chunks")
    assert any(m["loss"] is not None for m in one)  # groups with signal were trained on
    for a, b in zip(one, chunks, strict=True):
        assert (a["loss"] is None) == (b["loss"] is None)
        assert a["loss"] is None or b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
    before, w1, w2 = _weights(tiny_llama), _weights(tmp_path / "one" / "model"), _weights(tmp_path / "chunks" / "model")
    assert not all(torch.equal(before[k], w1[k]) for k in before)
    _same(w1, w2, atol=1e-6)


def test_equal_graded_rewards_are_a_group_without_signal_for_grpo(tmp_path, tiny_llama, reward_module):
    module, _ = reward_module
    train_online(_config(tmp_path, tiny_llama, f"{module}:flat", num_generations=8), log=lambda *a: None)
    assert all(m["frac_zero_std"] == 1.0 and m["loss"] is None for m in _metrics(tmp_path / "run"))


def test_the_policy_learns_a_reward_it_can_reach(tmp_path, tiny_llama, reward_module):
    module, _ = reward_module
    config = _config(tmp_path, tiny_llama, f"{module}:low_first", max_steps=15, learning_rate=3e-2,
                     num_generations=8, per_device_train_batch_size=4, logging_steps=5, lr_scheduler_type="constant")
    train_online(config, log=lambda *a: None)
    rates = [m["pass_rate"] for m in _metrics(tmp_path / "run")]
    assert rates[-1] > rates[0] + 0.2, rates


def test_trl_reward_signature_gets_extra_columns_and_none_excludes(tmp_path, tiny_llama, reward_module):
    module, log = reward_module
    rows = [{"messages": [{"role": "user", "content": f"q{i}?"}], "target": "skip" if i == 0 else "go",
             "difficulty": i} for i in range(4)]
    prompts = write_jsonl(tmp_path / "chat.jsonl", rows)
    summary = train_online(_config(tmp_path, tiny_llama, f"{module}:trl_reward", prompts=str(prompts),
                                   max_steps=2, logging_steps=2), log=lambda *a: None)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls and all(c["extra"] == ["difficulty"] for c in calls)  # every other column, as a keyword
    first = calls[0]
    assert isinstance(first["prompts"][0], list) and first["completions"][0][0]["role"] == "assistant"
    # the prompt whose rows say "skip" had its answers left out, and counted
    skipped = sum(len(c["target"]) for c in calls if c["target"][0] == "skip")
    assert summary["final_metrics"]["excluded_answers"] == skipped > 0


def test_a_raising_reward_names_the_prompt_or_is_skipped(tmp_path, tiny_llama, reward_module):
    module, _ = reward_module
    with pytest.raises(ThumbalignError, match=r"p\.jsonl, line \d+: reward online_rewards:broken raised "
                                              r"ValueError: checker crashed"):
        train_online(_config(tmp_path, tiny_llama, f"{module}:broken"), log=lambda *a: None)
    summary = train_online(_config(tmp_path, tiny_llama, f"{module}:broken", skip_invalid=True, overwrite=True,
                                   max_steps=2, logging_steps=2), log=lambda *a: None)
    assert summary["final_metrics"]["skipped_invalid_prompts"] == 4  # 2 steps × 2 prompts, each counted


def test_retry_turns_continue_a_failed_conversation(tmp_path, tiny_llama, reward_module):
    from thumbalign.data.prompts import load_prompts
    from thumbalign.engine.loop import Engine
    from thumbalign.engine.models import load_causal_lm, load_tokenizer
    from thumbalign.analysis.rewards import RewardSet
    from thumbalign.methods.grpo import GRPO
    from thumbalign.trainers.online import OnlineTask, Sampler

    module, _ = reward_module
    config = _config(tmp_path, tiny_llama, f"{module}:low_first", retry_turns=2, retry_gamma=0.5,
                     retry_repetition_penalty=0.5, num_generations=8)
    engine = Engine(config, log=lambda *a: None)
    tokenizer, model = load_tokenizer(tiny_llama), load_causal_lm(tiny_llama)
    task = OnlineTask(config, engine, load_prompts(config.prompts), RewardSet(config.reward, None), GRPO(config),
                      model, Sampler(model, tokenizer, config, engine), tiny_llama)
    rollouts = task.rollouts(0, [0, 1])
    first_pass = [r for r in rollouts if len(r.answers) == 1]
    retried = [r for r in rollouts if len(r.answers) == 2]
    assert first_pass and retried
    assert all(r.reward == 1.0 and r.outcome == 1.0 for r in first_pass)
    for r in retried:
        penalty = 0.5 * (1 - len({a.strip() for a in r.answers}) / 2)
        assert r.reward == pytest.approx((0.5 if r.outcome else 0.0) - penalty)
        text = tokenizer.decode(r.tokens)
        assert "Incorrect. Please think again." in text
        marked = tokenizer.decode([t for t, m in zip(r.tokens, r.mask) if m])
        assert "Incorrect" not in marked and marked.count("<|im_end|>") == 2  # both answers, each with its end


def test_conversation_tokens_mark_every_assistant_turn(tokenizer):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
                    {"role": "user", "content": "again"}, {"role": "assistant", "content": "B2"}]
    tokens, mask = conversation_tokens(tokenizer, conversation, "test")
    marked = tokenizer.decode([t for t, m in zip(tokens, mask) if m])
    assert marked == "A1<|im_end|>\nB2<|im_end|>\n"


def test_self_aligned_reward_by_hand(tmp_path, tiny_llama, reward_module):
    from thumbalign.analysis.rewards import RewardSet
    from thumbalign.data.prompts import load_prompts
    from thumbalign.engine.loop import Engine
    from thumbalign.engine.models import load_causal_lm, load_tokenizer
    from thumbalign.engine.logprobs import naive_completion_logps
    from thumbalign.methods.grpo import GRPO
    from thumbalign.trainers.online import OnlineTask, Sampler

    module, _ = reward_module
    config = _config(tmp_path, tiny_llama, f"{module}:low_first", sar_weight=0.5)
    engine = Engine(config, log=lambda *a: None)
    tokenizer, model = load_tokenizer(tiny_llama), load_causal_lm(tiny_llama)
    task = OnlineTask(config, engine, load_prompts(config.prompts), RewardSet(config.reward, None), GRPO(config),
                      model, Sampler(model, tokenizer, config, engine), tiny_llama)
    r = task.rollouts(0, [0])[0]
    answer = r.stats["answer_ids"]

    def ppl(ids, start):  # exp(−mean log-prob of the answer tokens), the full-logits way
        mask = torch.zeros(1, len(ids), dtype=torch.bool)
        mask[0, start:] = True
        total = naive_completion_logps(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), mask)
        return math.exp(-total.item() / (len(ids) - start))

    with torch.no_grad():
        conditioned = ppl(r.tokens, len(r.tokens) - len(answer))
        alone = ppl([tokenizer.bos_token_id] + answer, 1)
    expected = max(-1.0, min(1.0, (alone - conditioned) / alone))
    assert r.stats["sar"] == pytest.approx(expected, abs=1e-4)
    assert r.reward == pytest.approx(r.outcome + 0.5 * expected, abs=1e-4)


def test_prompt_filter_keeps_the_band_and_caches_pass_rates(tmp_path, tiny_llama, reward_module):
    module, _ = reward_module
    logs = []
    config = _config(tmp_path, tiny_llama, f"{module}:low_first", filter_prompts="0.2,0.8", num_generations=8,
                     max_steps=1, cache_dir=str(tmp_path / "cache"))
    first = train_online(config, log=logs.append)
    cache = list((tmp_path / "cache" / "passrates").glob("*.json"))
    assert len(cache) == 1
    rates = json.loads(cache[0].read_text())
    inside = sum(0.2 <= r <= 0.8 for r in rates)
    assert first["prompts"] == inside and 0 < inside <= len(rates)
    logs.clear()
    train_online(_config(tmp_path, tiny_llama, f"{module}:low_first", filter_prompts="0.2,0.8", num_generations=8,
                         max_steps=1, cache_dir=str(tmp_path / "cache"), overwrite=True), log=logs.append)
    assert any("loaded from cache" in line for line in logs)


def test_held_out_pass_rate_before_and_after_and_report(tmp_path, tiny_llama, reward_module):
    module, _ = reward_module
    eval_prompts = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"new{i}?"} for i in range(5)])
    summary = train_online(_config(tmp_path, tiny_llama, f"{module}:low_first", eval_prompts=str(eval_prompts),
                                   report=True), log=lambda *a: None)
    judged = summary["judged"]
    assert judged["prompts"] == 5 and set(judged["models"]) == {"trained", "base"}
    lines = (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 10
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Pass rate of sampled answers" in page and "greedy answers before and after" in page


def test_online_command_with_yaml_and_repeated_rewards(tmp_path, tiny_llama, reward_module):
    module, _ = reward_module
    (tmp_path / "online.yaml").write_text(
        f"prompts: {_prompts(tmp_path)}\nmodel: {tiny_llama}\noutput_dir: {tmp_path / 'run'}\n"
        f"reward: [{module}:low_first]\nmax_steps: 2\nnum_generations: 4\nper_device_train_batch_size: 2\n"
        "max_new_tokens: 4\nbf16: false\nreport: false\n")
    assert main(["online", "--config", str(tmp_path / "online.yaml"), "--reward", f"{module}:low_first",
                 "--reward", f"{module}:always", "--reward-weights", "1", "0.25", "--objective", "dr_grpo"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["settings"]["reward"] == [f"{module}:low_first", f"{module}:always"]
    assert summary["method"] == "dr_grpo" and summary["steps"] == 2
    # totals are 0.25 (👎) or 1.25 (👍): the binary outcome still splits at 0.5
    assert {round(v, 2) for m in _metrics(tmp_path / "run") for v in [m["reward_mean"]]} <= {
        round(0.25 + p, 2) for p in [m2["pass_rate"] for m2 in _metrics(tmp_path / "run")]}


# --------------------------------------------------------------------------- processes and kills

def _online_args(prompts, model, out, reward, *extra):
    return ["online", "--prompts", str(prompts), "--model", str(model), "--output-dir", str(out), "--reward", reward,
            "--learning-rate", "1e-3", "--bf16", "false", "--num-generations", "4", "--max-new-tokens", "5",
            "--logging-steps", "1", "--no-report", *map(str, extra)]


def _popen(args, cache, pythonpath):
    env = {**os.environ, "THUMBALIGN_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "thumbalign", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _same(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), (key, (a[key] - b[key]).abs().max())


def test_two_processes_equal_one_process_with_retries_and_self_aligned_reward(tmp_path, tiny_llama, reward_module):
    """Two processes (DDP, FSDP2, DeepSpeed ZeRO-3) sample, reward and train as one does. Each prompt's group is
    sampled, rewarded and normalised on one process; split across processes its statistics would differ. With the
    weights sharded every layer's gather needs every process, so generation runs synced, and a process with fewer
    answers to sample (7 prompts, 4 a step: the last step splits 1 and 2), fewer retries or fewer SAR batches than
    the other runs stand-in batches. The KL term's frozen starting model (--beta, full fine-tuning) is sharded like
    the policy, and built empty on the second process. The pass rates that --filter-prompts estimates before
    training (on the shards, where the weights are sharded), the weights, losses, KL and pass rates equal the
    one-process run's."""
    from test_sharded import DEEPSPEED_SITE

    module, _ = reward_module
    prompts = _prompts(tmp_path, n=7)
    # --filter-prompts over the whole band: every prompt's pass rate is estimated (before training, on the shards
    # where the weights are sharded) and every prompt stays
    # and 3 held-out prompts answered by the trained and the starting model after training (on the shards too)
    held_out = write_jsonl(tmp_path / "held.jsonl", [{"prompt": p} for p in ("q0?", "what is 2+2", "hello there")])
    common = (f"{module}:low_first", "--max-steps", 3, "--retry-turns", 2, "--sar-weight", 0.5,
              "--generation-batch-size", 3, "--beta", 0.5, "--filter-prompts", "0,1", "--eval-prompts", held_out)
    one = _popen(_online_args(prompts, tiny_llama, tmp_path / "one", *common, "--per-device-train-batch-size", 4),
                 tmp_path / "c1", tmp_path)
    out1, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out1
    for engine in ("ddp", "fsdp", "zero3"):
        launch = ("--num-processes", 2) + (("--accelerate-config", engine) if engine != "ddp" else ())
        two = _popen(_online_args(prompts, tiny_llama, tmp_path / engine, *common, "--per-device-train-batch-size", 2,
                                  *launch), tmp_path / f"c-{engine}",
                     os.pathsep.join([str(tmp_path), str(DEEPSPEED_SITE)]))
        out2, _ = two.communicate(timeout=300)
        assert two.returncode == 0, out2[-4000:]
        assert json.loads((tmp_path / engine / "summary.json").read_text())["world_size"] == 2
        (rates,) = (tmp_path / f"c-{engine}" / "passrates").glob("*.json")  # estimated by this run, not reused
        assert json.loads(rates.read_text()) == json.loads(next((tmp_path / "c1" / "passrates").glob("*.json")).read_text())
        _same(_weights(tmp_path / "one" / "model"), _weights(tmp_path / engine / "model"), atol=1e-5)
        answers = [sorted((r["model"], r["i"], r["answer"], r["verdict"]) for r in map(json.loads, (
            run / "generations.jsonl").read_text().splitlines())) for run in (tmp_path / "one", tmp_path / engine)]
        assert len(answers[0]) == 6 and answers[1] == answers[0]
        for a, b in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / engine), strict=True):
            assert a["pass_rate"] == b["pass_rate"] and a["frac_zero_std"] == b["frac_zero_std"]
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert a["kl"] == pytest.approx(b["kl"], rel=1e-4, abs=1e-9)


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_llama, reward_module):
    module, _ = reward_module
    prompts = _prompts(tmp_path, n=8)
    common = ("--max-steps", 8, "--per-device-train-batch-size", 2, "--save-steps", 1, "--save-total-limit", 2,
              "--objective", "nft")
    straight = _popen(_online_args(prompts, tiny_llama, tmp_path / "straight", f"{module}:low_first", *common),
                      tmp_path / "cache", tmp_path)
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out
    run = tmp_path / "killed"
    proc = _popen(_online_args(prompts, tiny_llama, run, f"{module}:low_first", *common), tmp_path / "cache", tmp_path)
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").exists() and any(m["step"] >= 4 for m in _metrics(run))):  # a reported step
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "step 4 was never reported"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists()
    resumed = _popen(_online_args(prompts, tiny_llama, run, f"{module}:low_first", *common, "--resume"),
                     tmp_path / "cache", tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "Resumed from" in out, out
    _same(_weights(tmp_path / "straight" / "model"), _weights(run / "model"), atol=1e-6)
    a, b = tmp_path / "straight" / "checkpoints" / "step-000008", run / "checkpoints" / "step-000008"
    _same(load_file(str(a / "optimizer.safetensors")), load_file(str(b / "optimizer.safetensors")), atol=1e-6)
    ma, mb = _metrics(tmp_path / "straight"), _metrics(run)
    assert [m["step"] for m in mb] == list(range(1, 9))
    for x, y in zip(ma, mb):  # the resumed run sampled and rewarded exactly what the uninterrupted one did
        assert (x["reward_mean"], x["pass_rate"], x["answer_length"]) == (y["reward_mean"], y["pass_rate"],
                                                                          y["answer_length"])


def test_bad_prompt_row_is_one_line_naming_file_line_and_field(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine?"}\n{"prompt": [{"role": "robot", "content": "x"}]}\n')
    result = subprocess.run([sys.executable, "-m", "thumbalign", "online", "--prompts", str(bad), "--model",
                             str(tiny_llama), "--reward", "vader", "--output-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert str(bad) in line and "line 2" in line and "field 'prompt[0].role'" in line


def test_reward_model_reward_is_its_calibrated_probability(tmp_path, tiny_llama, tokenizer):
    from thumbalign.analysis.rewards import Answer, Reward
    from thumbalign.data.records import Record
    from thumbalign.engine.reward_model import RewardModel, load_reward_model

    model = load_reward_model(tiny_llama)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.thumbalign_temperature = 2.0
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    answers = [Answer("Is it good?", text, {}, [], "test") for text in ("Yes, very good.", "no")]
    values = Reward(f"rm:{tmp_path / 'rm'}")(answers)
    expected = RewardModel(tmp_path / "rm").probabilities([Record("Is it good?", a.text, False) for a in answers])
    assert values == pytest.approx(expected.tolist(), abs=1e-6) and len(set(values)) == 2
    assert all(0 < v < 1 for v in values)


def test_kl_to_the_start_is_zero_then_grows_with_lora(tmp_path, tiny_llama, reward_module):
    """With LoRA the reference is the model with its adapter disabled: identical at step 1 (the adapter starts at
    zero), apart once the adapter has learned."""
    module, _ = reward_module
    train_online(_config(tmp_path, tiny_llama, f"{module}:low_first", use_lora=True, lora_r=4, beta=0.1,
                         learning_rate=3e-2, max_steps=6, num_generations=8, per_device_train_batch_size=4),
                 log=lambda *a: None)
    kl = [m["kl"] for m in _metrics(tmp_path / "run")]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4, kl

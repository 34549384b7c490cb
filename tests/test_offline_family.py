"""The rest of the offline binary-feedback family: AFT (within-prompt ranking with a boundary), LeTI-style reward
tokens with textual feedback, and RLBFF principle-following reward models."""

import json
import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from conftest import write_jsonl
from thumbalign.cli import main
from thumbalign.data.prepare import prepare_data
from thumbalign.data.records import Record
from thumbalign.engine.inference import batched_logps
from thumbalign.engine.models import load_causal_lm, load_tokenizer
from thumbalign.engine.reward_model import RewardModel
from thumbalign.errors import ConfigError, DataError
from thumbalign.methods.aft import aft_group_loss, aft_loss
from thumbalign.methods.registry import get_method
from thumbalign.methods.reward_token import DOWN_TOKEN, UP_TOKEN, reward_token_loss
from thumbalign.trainers.config import RewardConfig, TrainConfig
from thumbalign.trainers.policy import train
from thumbalign.trainers.reward import train_reward_model
from thumbalign.data.tokens import Example

QUIET = dict(log=lambda *a: None)


# ------------------------------------------------------------------------------------------------------------ AFT

def test_aft_group_loss_by_hand():
    # scores s (length-normalised log-likelihoods): 👍 −1.0, −1.5; 👎 −2.0, −4.0; boundary b = 1
    s = torch.tensor([-1.0, -1.5, -2.0, -4.0])
    labels = torch.tensor([True, True, False, False])
    floor = -1.5 - 1.0                                      # B = min 👍 − b
    total = 1.0
    for sp in (-1.0, -1.5):
        t = 2 * floor - sp                                  # T_p = 2B − s_p
        for sn in (-2.0, -4.0):
            total += math.exp(sn - sp) + math.exp(t - sn)
    assert aft_group_loss(s, labels, None, boundary=1.0).item() == pytest.approx(math.log(total), rel=1e-6)
    # with the NLL of the 👍 answers alongside (λ = 0.5): + 0.5 · mean(1.0, 1.5)
    assert aft_group_loss(s, labels, None, 1.0, sft_weight=0.5).item() == pytest.approx(
        math.log(total) + 0.5 * 1.25, rel=1e-6)


def test_aft_lowers_a_thumbs_down_score_down_to_the_boundary_and_no_further():
    labels = torch.tensor([True, False])

    def grad_of_negative(sn):
        s = torch.tensor([-1.0, sn], requires_grad=True)
        aft_group_loss(s, labels, None, boundary=0.5).backward()
        return s.grad[1].item()

    assert grad_of_negative(-1.2) > 0       # above the boundary B = −1.5: gradient descent lowers it
    assert grad_of_negative(-2.5) < 0       # below it: pulled back up
    assert abs(grad_of_negative(-1.5)) < 1e-6  # balanced exactly at B
    s = torch.tensor([-1.0, -1.2], requires_grad=True)
    aft_group_loss(s, labels, None, boundary=0.5).backward()
    assert s.grad[0] < 0                    # the 👍 score is raised


def test_aft_ranks_order_answers_of_the_same_label():
    # three 👍 answers ranked 1, 2, 3: the ranking term alone (no 👎, so no boundary), pairs by rank
    s = torch.tensor([-2.0, -1.0, -3.0], requires_grad=True)
    ranks = torch.tensor([1.0, 2.0, 3.0])
    loss = aft_group_loss(s, torch.tensor([True, True, True]), ranks, boundary=10.0)
    expected = math.log(1 + math.exp(-1.0 + 2.0) + math.exp(-3.0 + 2.0) + math.exp(-3.0 + 1.0)
                        + sum(math.exp(2 * (-3.0 - 10.0) - sp - sn) for sp, sn in ((-2.0, -1.0), (-2.0, -3.0),
                                                                                     (-1.0, -3.0))))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert s.grad[0] < 0 < s.grad[2]        # the best is raised, the worst lowered


def test_aft_loss_keeps_prompts_apart():
    logps = torch.tensor([-2.0, -4.0, -3.0, -6.0])
    labels = torch.tensor([True, False, True, False])
    groups = torch.tensor([0, 0, 1, 1])
    out = aft_loss(logps, logps, labels, groups=groups, ranks=None, n_tokens=torch.tensor([2, 2, 3, 3]), beta=0.1,
                   boundary=1.0)
    first = aft_group_loss(torch.tensor([-1.0, -2.0]), labels[:2], None, 1.0)
    second = aft_group_loss(torch.tensor([-1.0, -2.0]), labels[2:], None, 1.0)
    assert out.losses.tolist() == pytest.approx([first.item()] * 2 + [second.item()] * 2)
    mixed = aft_loss(logps, logps, labels, groups=None, ranks=None, n_tokens=torch.tensor([2, 2, 3, 3]), beta=0.1,
                     boundary=1.0)
    assert mixed.losses[0].item() != pytest.approx(first.item())  # one group of four is another loss


def test_aft_trains_on_prompts_with_both_labels_and_counts_the_rest(tmp_path, tiny_llama):
    rows = [{"prompt": f"q{(i // 2) % 4}?", "completion": "yay!" if i % 2 == 0 else "no.", "label": i % 2 == 0}
            for i in range(16)]
    rows += [{"prompt": "lonely?", "completion": "only one", "label": True},
             {"prompt": "ranked?", "completion": "first", "label": True, "rank": 1},
             {"prompt": "ranked?", "completion": "second", "label": True, "rank": 2}]
    data = write_jsonl(tmp_path / "f.jsonl", rows)
    tokenizer = load_tokenizer(tiny_llama)
    config = TrainConfig(data=str(data), model=str(tiny_llama), method="aft")
    prepared = prepare_data(config, tokenizer, get_method("aft").needs, **QUIET)
    assert prepared.report["set_aside_unranked_prompts"] == 1   # "lonely?": one answer, nothing to rank
    assert sorted(len(u) for u in prepared.units) == [2, 4, 4, 4, 4]
    for unit in prepared.units:                                 # a unit is one prompt
        assert len({prepared.train_prompts[i] for i in unit}) == 1
    ranked = [u for u in prepared.units if prepared.train_prompts[u[0]] == "ranked?"][0]
    assert sorted(prepared.train_fields[i]["rank"] for i in ranked) == [1, 2]
    config = TrainConfig(data=str(data), eval_data=str(data), model=str(tiny_llama), method="aft",
                         output_dir=str(tmp_path / "run"), learning_rate=1e-3, max_steps=20, warmup_ratio=0.0,
                         per_device_train_batch_size=2, bf16="false", logging_steps=10, save_steps=100)
    summary = train(config, **QUIET)
    assert summary["eval_after"]["auc"] > summary["eval_before"]["auc"]


def test_aft_names_a_rank_that_is_not_a_number(tmp_path, tiny_llama):
    rows = [{"prompt": "q?", "completion": "a", "label": True, "rank": "first"},
            {"prompt": "q?", "completion": "b", "label": False, "rank": 2}]
    data = write_jsonl(tmp_path / "f.jsonl", rows)
    config = TrainConfig(data=str(data), model=str(tiny_llama), method="aft")
    with pytest.raises(DataError, match=r"line 1.*'rank'"):
        prepare_data(config, load_tokenizer(tiny_llama), get_method("aft").needs, **QUIET)


# ------------------------------------------------------------------------------------------------ reward tokens

def test_reward_token_loss_by_hand():
    policy, ref = torch.tensor([-6.0, -9.0]), torch.tensor([-7.0, -8.0])
    out = reward_token_loss(policy, ref, torch.tensor([True, False]), beta=0.5, n_tokens=torch.tensor([3, 4]))
    assert out.losses.tolist() == pytest.approx([6.0 / 3, 9.0 / 4])  # every answer, 👍 and 👎, is learnt
    assert out.rewards.tolist() == pytest.approx([0.5, -0.5])


def _feedback_with_comments(path, n=24):
    rows = []
    for i in range(n):
        good = i % 2 == 0
        row = {"prompt": f"q{i % 4}?", "completion": "yay!" if good else "no.", "label": good}
        if not good and i % 4 == 1:
            row["comment"] = "too short"
        rows.append(row)
    return write_jsonl(path, rows)


def test_reward_token_examples_put_the_label_token_after_the_prompt_and_feedback_after_the_answer(tmp_path,
                                                                                                  tiny_llama):
    data = _feedback_with_comments(tmp_path / "f.jsonl")
    tokenizer = load_tokenizer(tiny_llama)
    config = TrainConfig(data=str(data), eval_data=str(data), model=str(tiny_llama), method="reward-token")
    prepared = prepare_data(config, tokenizer, get_method("reward-token").needs, **QUIET)
    up, down = tokenizer.convert_tokens_to_ids([UP_TOKEN, DOWN_TOKEN])
    assert prepared.report["added_tokens"] == [UP_TOKEN, DOWN_TOKEN]
    assert prepared.report["thumbs_down_with_feedback"] == 6  # i = 1, 5, 9, 13, 17, 21
    for e in prepared.train:
        assert e.input_ids[e.prompt_len - 1] == (up if e.label else down)  # conditioned on, not trained
        completion = tokenizer.decode(e.input_ids[e.prompt_len:])
        assert UP_TOKEN not in completion and DOWN_TOKEN not in completion
    with_feedback = [tokenizer.decode(e.input_ids[e.prompt_len:]) for e in prepared.train if not e.label]
    assert sum("no.\n\nFeedback: too short" in text for text in with_feedback) == 6
    # held-out answers are all read after the 👍 token: how likely is this answer from a 👍 model
    assert {e.input_ids[e.prompt_len - 1] for e in prepared.eval} == {up}


def test_reward_token_run_learns_the_condition_and_serves_with_the_thumbs_up_token(tmp_path, tiny_llama):
    data = _feedback_with_comments(tmp_path / "f.jsonl")
    config = TrainConfig(data=str(data), model=str(tiny_llama), method="reward-token", output_dir=str(tmp_path / "r"),
                         learning_rate=5e-3, max_steps=80, warmup_ratio=0.0, per_device_train_batch_size=8,
                         bf16="false", logging_steps=10, save_steps=100)
    train(config, **QUIET)
    folder = tmp_path / "r" / "model"
    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder).eval()
    up, down = tokenizer.convert_tokens_to_ids([UP_TOKEN, DOWN_TOKEN])
    assert model.get_input_embeddings().num_embeddings >= len(tokenizer) and up != down
    assert model.config.thumbalign_reward_tokens == {"up": UP_TOKEN, "down": DOWN_TOKEN}
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "q1?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n" + UP_TOKEN)  # what a server renders: 👍-conditioned
    assert not tokenizer.apply_chat_template([{"role": "user", "content": "q1?"}], tokenize=False).endswith(UP_TOKEN)

    def logp(answer: str, token: int) -> float:
        prompt = tokenizer("q1?")["input_ids"] + [token]
        completion = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        example = Example(prompt + completion, len(prompt), True, -1)
        return float(batched_logps(model, [example], tokenizer.pad_token_id, 1, torch.device("cpu"))[0])

    # the condition carries the label: each answer is more likely after its own token than after the other
    assert logp("yay!", up) > logp("yay!", down) + 1.0
    assert logp("no.", down) > logp("no.", up) + 1.0


def test_eval_answers_after_the_token_asked_for(tmp_path, tiny_llama):
    data = _feedback_with_comments(tmp_path / "f.jsonl")
    assert main(["train", "--data", str(data), "--model", str(tiny_llama), "--method", "reward-token",
                 "--max-steps", "2", "--output-dir", str(tmp_path / "r"), "--bf16", "false"]) == 0
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "q1?"}]}])
    from thumbalign.engine.inference import with_reward_token
    model = load_causal_lm(tmp_path / "r" / "model")
    tokenizer = load_tokenizer(tmp_path / "r" / "model")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "q1?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert with_reward_token(model, rendered, "down").endswith("assistant\n" + DOWN_TOKEN)
    assert with_reward_token(model, rendered, "none").endswith("assistant\n")
    assert with_reward_token(model, rendered, None) == rendered
    for condition in ("up", "down"):
        assert main(["eval", "--model", str(tmp_path / "r" / "model"), "--baseline", str(tiny_llama), "--prompts",
                     str(prompts), "--judge", "vader", "--max-new-tokens", "4", "--reward-token", condition,
                     "--output-dir", str(tmp_path / condition)]) == 0
        assert (tmp_path / condition / "eval.json").exists()


# ------------------------------------------------------------------------------------------ principle reward models

PRINCIPLES = {"the answer says something good": "great", "the answer says something bad": "awful"}


def _principle_rows(items):
    """The same answers under two principles that disagree: 'great' satisfies the first, 'awful' the second."""
    rows = []
    for i in items:
        word = "great" if i % 2 else "awful"
        for principle, wanted in PRINCIPLES.items():
            rows.append({"prompt": f"Tell me about item {i}.", "completion": f"Item {i} is {word}",
                         "principle": principle, "label": word == wanted})
    return rows


@pytest.fixture(scope="module")
def principle_rm(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("principles")
    data = write_jsonl(tmp / "f.jsonl", _principle_rows(range(96)))
    config = RewardConfig(data=str(data), model=str(tiny_llama), output_dir=str(tmp / "run"), eval_split=0.1,
                          principle_field="principle", learning_rate=2e-3, max_steps=150,
                          per_device_train_batch_size=16, bf16="false", logging_steps=50, save_steps=1000,
                          warmup_ratio=0.0, cache_dir=str(tmp / "c"))
    train_reward_model(config, **QUIET)
    return tmp / "run" / "model"


def test_one_reward_model_learns_two_principles_that_disagree(principle_rm):
    rm = RewardModel(principle_rm)
    held = [r for r in _principle_rows(range(200, 264))]
    for principle, wanted in PRINCIPLES.items():
        rows = [r for r in held if r["principle"] == principle]
        records = [Record(r["prompt"], r["completion"], r["label"]) for r in rows]
        p = rm.probabilities(records, principle=principle)
        labels = [r["label"] for r in rows]
        assert roc_auc_score(labels, p) >= 0.9, principle
    # the same answer, judged by the two principles, gets opposite verdicts
    answer = [Record("Tell me about item 301.", "Item 301 is great", True)]
    p_good = rm.probabilities(answer, principle="the answer says something good")[0]
    p_bad = rm.probabilities(answer, principle="the answer says something bad")[0]
    assert p_good > 0.5 > p_bad


def test_a_principle_model_needs_a_principle_and_a_plain_one_refuses_it(principle_rm, tmp_path, capsys):
    with pytest.raises(ConfigError, match="trained with principles"):
        RewardModel(principle_rm).probabilities([Record("q", "a", True)])
    rows = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Tell me about item 5.", "completion": "Item 5 is awful"}])
    assert main(["reward", "score", "--model", str(principle_rm), "--data", str(rows), "-o", str(tmp_path / "o.jsonl"),
                 "--principle", "the answer says something bad"]) == 0
    p_up = json.loads((tmp_path / "o.jsonl").read_text())["p_up"]
    assert main(["reward", "score", "--model", str(principle_rm), "--data", str(rows), "-o",
                 str(tmp_path / "o2.jsonl"), "--principle", "the answer says something good"]) == 0
    assert p_up > json.loads((tmp_path / "o2.jsonl").read_text())["p_up"]
    assert main(["reward", "score", "--model", str(principle_rm), "--data", str(rows), "-o",
                 str(tmp_path / "o3.jsonl")]) == 2
    assert "--principle" in capsys.readouterr().err


def test_principle_judge_in_eval(principle_rm, tmp_path, tiny_llama):
    from thumbalign.analysis.judges import load_judge

    good = load_judge(f"rm:{principle_rm}@the answer says something good")
    bad = load_judge(f"rm:{principle_rm}@the answer says something bad")
    row = {"prompt": "Tell me about item 7."}
    assert good("Item 7 is great", row) and not bad("Item 7 is great", row)
    with pytest.raises(ConfigError, match="trained with principles"):
        load_judge(f"rm:{principle_rm}")


def test_a_row_without_its_principle_is_named(tmp_path, tiny_llama, capsys):
    rows = _principle_rows(range(8))
    del rows[5]["principle"]
    data = write_jsonl(tmp_path / "f.jsonl", rows)
    code = main(["reward", "train", "--data", str(data), "--model", str(tiny_llama), "--principle-field",
                 "principle", "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "line 6" in err and "'principle'" in err


# ------------------------------------------------------------------------ BCO: prompt-conditional δ(x), SFT anchor

def test_prompt_reward_shift_by_hand():
    from thumbalign.methods.bco import PromptRewardShift

    shift = PromptRewardShift(prior=2.0)
    shift.update(torch.tensor([1.0, 3.0, -2.0]), torch.tensor([True, True, False]), torch.tensor([0, 0, 1]))
    shift.update(torch.tensor([5.0]), torch.tensor([True]), torch.tensor([0]))
    overall = (1 + 3 - 2 + 5) / 4                             # the global running mean δ
    assert shift.value == pytest.approx(overall)
    expected = [(3 * 3.0 + 2 * overall) / (3 + 2),            # cluster 0: 3 rewards, mean 3
                (1 * -2.0 + 2 * overall) / (1 + 2),           # cluster 1: 1 reward, mean −2
                overall]                                      # cluster 2: never seen, the global δ
    assert shift.per_prompt(torch.tensor([0, 1, 2])).tolist() == pytest.approx(expected, rel=1e-6)
    again = PromptRewardShift(prior=2.0)                      # one batch or two: the same means
    again.update(torch.tensor([1.0, 3.0, -2.0, 5.0]), torch.tensor([True, True, False, True]),
                 torch.tensor([0, 0, 1, 0]))
    assert again.per_prompt(torch.tensor([0, 1])).tolist() == pytest.approx(expected[:2], rel=1e-9)
    restored = PromptRewardShift(prior=2.0)
    restored.load_state_dict(json.loads(json.dumps(shift.state_dict())))  # what a checkpoint holds
    assert restored.per_prompt(torch.tensor([0, 1, 2])).tolist() == pytest.approx(expected, rel=1e-9)


def _bco(**settings):
    config = TrainConfig(data="x", beta=0.5, **settings)
    return get_method("bco")(config, 2, 2, log=lambda *a: None)


def test_bco_with_a_prompt_conditional_shift_and_an_sft_anchor_by_hand():
    from thumbalign.methods.base import StepInputs

    policy = torch.tensor([-4.0, -6.0, -5.0, -9.0], requires_grad=True)
    ref = torch.tensor([-5.0, -5.0, -5.0, -8.0])              # r = βρ = 0.5, −0.5, 0, −0.5
    labels = torch.tensor([True, False, True, False])
    clusters = torch.tensor([0, 0, 1, 1])
    inputs = StepInputs(policy, ref, labels, None, torch.tensor([2, 2, 4, 4]), gather=lambda t: t,
                        clusters=clusters)
    out = _bco(delta="prompt", delta_prior=1.0, sft_weight=0.3).loss(inputs)
    overall = (0.5 - 0.5 + 0 - 0.5) / 4
    delta = [(2 * 0.0 + overall) / 3] * 2 + [(2 * -0.25 + overall) / 3] * 2   # cluster means 0 and −0.25
    r = [0.5, -0.5, 0.0, -0.5]
    nll = [4.0 / 2, 0.0, 5.0 / 4, 0.0]

    def log_sig(x):
        return math.log(1 / (1 + math.exp(-x)))

    expected = [-log_sig(r[i] - delta[i]) if labels[i] else -log_sig(-(r[i] - delta[i])) for i in range(4)]
    expected = [e + 0.3 * n for e, n in zip(expected, nll)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-5)


def test_sft_weight_and_prompt_delta_belong_to_bco():
    with pytest.raises(ConfigError, match="belong to BCO"):
        TrainConfig(data="x", method="kto", sft_weight=1.0).validate()
    with pytest.raises(ConfigError, match="belong to BCO"):
        TrainConfig(data="x", method="apo-zero", delta="prompt").validate()


def test_bco_with_prompt_delta_trains_and_keeps_cluster_means(tmp_path, tiny_llama):
    rows = [{"prompt": f"topic {'alpha' if i % 4 < 2 else 'omega'} {i % 5}?", "completion": "yay!" if i % 2 else "no.",
             "label": bool(i % 2)} for i in range(24)]
    data = write_jsonl(tmp_path / "f.jsonl", rows)
    config = TrainConfig(data=str(data), eval_data=str(data), model=str(tiny_llama), delta="prompt", delta_clusters=3,
                         udm_encoder="policy", sft_weight=0.5, output_dir=str(tmp_path / "run"), learning_rate=1e-3,
                         max_steps=12, warmup_ratio=0.0, per_device_train_batch_size=4, bf16="false",
                         logging_steps=4, save_steps=100)
    summary = train(config, **QUIET)
    state = summary["reward_shift"]["reward_shift"]
    assert state["mode"] == "prompt" and len(state["cluster_count"]) == 3
    assert sum(state["cluster_count"]) == pytest.approx(state["count"]["all"])  # every reward in one cluster
    assert summary["eval_after"]["accuracy"] > 0.5

"""`thumbalign online`: the policy learns from binary rewards on its own answers.

One optimizer step:
  the step's prompts (a pure function of the step, as in `train`) -> G answers to each, every one sampled with a
  seed of its own (the generation backend, engine/generation.py; seeds in rollouts.py) -> rewards
  (analysis/rewards.py) and their shaping (reward_shaping.py: retry turns, SAR) -> the binary outcome, each group's
  pass rate; groups without signal are dropped -> per-token log-probs (engine/logprobs.py) -> the objective's token
  losses and the KL term (methods/grpo.py, nft.py, rft.py, online_base.py) -> AdamW step on the shared engine
  (engine/loop.py), with its checkpoints, exact resume, non-finite handling and several processes.

Before training, --filter-prompts keeps the prompts inside a pass-rate band (prompt_filter.py); while training, a
reward model's score is watched for over-optimisation (reward_watch.py).

Each prompt's group stays on one process. Answers are trained on strictly on-policy (π_old is the policy being
trained, one optimizer step per batch of answers), so R_t = 1 in value and the clip of GRPO is inactive.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..analysis.report import write_report
from ..analysis.rewards import RewardFailure, RewardSet
from ..data.batching import collate_masked, micro_batches
from ..data.prompts import PromptRow, load_prompts
from ..engine.generation import Sampler, make_sampler
from ..engine.logprobs import CompletionLogps, completion_token_logps
from ..engine.loop import Engine, MicroStep
from ..engine.models import empty_model, load_causal_lm
from ..files import content_digest
from ..methods.online_base import (GroupBatch, OnlineObjective, group_statistics, kl_penalty, reduce_token_losses,
                                   truncated_importance_weights)
from ..methods.registry import get_online_objective
from .final_model import complete_model_folder, save_policy
from .judged import answers_on_shards, compare_with_base
from .model_setup import check_use_liger, load_policy, make_trainable
from .prompt_filter import keep_learnable_prompts
from .reward_shaping import (continue_after_failure, conversation_tokens, repetition_penalty, retry_reward,
                             self_aligned_reward)
from .reward_watch import RewardWatch
from .rollouts import Rollout, answer_seed, score_group
from .skeleton import Trainer, count_steps


def train_online(config, log=print) -> dict:
    return OnlineTrainer(config, log).run()


class OnlineTrainer(Trainer):
    """An online objective on the policy's own answers, rewarded by the run's reward functions."""

    def inputs(self) -> tuple:
        return self.config.prompts, self.config.eval_prompts

    def set_up(self) -> "OnlineTask":
        config, engine = self.config, self.engine
        self.prompts = prompts = load_prompts(config.prompts)
        self.rewards = rewards = RewardSet(config.reward, config.reward_weights, config.reference_field,
                                           config.pass_threshold)
        model = load_policy(self.model_dir, config, engine)
        sampler = make_sampler(model, self.tokenizer, config, engine, self.model_dir, prompts)
        self.model = model = trainable(model, config, engine, sampler, prompts)
        sampler.set_model(model)
        # prepared (sharded, wrapped) before --filter-prompts samples from it: the run's length is known only after
        # the filter, so the schedule follows
        engine.prepare(CompletionLogps(model, config.logps_chunk_size, config.use_liger), model, None)
        engine.settle_root(sampler.eos)  # sampling calls the model's layers directly
        if config.filter_prompts:
            self.prompts = prompts = keep_learnable_prompts(prompts, sampler, rewards, config, engine, self.model_dir)
        self.objective = get_online_objective(config.objective)(config)
        self.task = OnlineTask(config, engine, prompts, rewards, self.objective, model, sampler, self.model_dir)
        engine.schedule(self.task.total_steps)
        self.task.load_reference()
        return self.task

    def fingerprint(self) -> dict:
        # a reward model is part of the run's input: one trained again since (same path) must not be resumed against
        models = {spec: content_digest(str(Path(spec[3:]) / "config.json")) for spec in self.config.reward
                  if spec.startswith("rm:")}
        return {"prompts file": content_digest(self.config.prompts),
                "prompts": hashlib.sha256(json.dumps([p.prompt for p in self.prompts]).encode()).hexdigest(),
                **({"reward models": models} if models else {})}

    def before_training(self, resumed: bool) -> None:
        self.task.announce()

    def results(self, last_line: dict | None) -> dict:
        config, engine = self.config, self.engine
        self.task.sampler.close()
        summary = {"kind": "online", "method": self.objective.name, "model": config.model,
                   "model_dir": str(self.model_dir), "steps": self.task.total_steps, "world_size": engine.world,
                   "prompts": len(self.prompts), "final_metrics": last_line, "settings": config.to_dict()}
        # sharded, the held-out prompts are answered now, on the shards; otherwise from the saved folder in save()
        self.answers = (answers_on_shards(config, engine, self.model, self.tokenizer, self.model_dir,
                                          config.max_new_tokens, base=self.task.reference_model)
                        if config.eval_prompts and engine.sharded else None)
        return summary

    def save(self, final, summary: dict) -> None:
        config, engine, run = self.config, self.engine, self.run_dir
        engine.say(f"Saved the model to {save_policy(run, final, self.tokenizer, config, self.model_dir)}")
        if config.eval_prompts:
            judge = self.task.watch.check or self.rewards.judge  # the judge trusted more than the reward, if any
            summary["judged"] = compare_with_base(config, run, self.model_dir, config.eval_prompts, judge,
                                                  config.max_new_tokens, engine.say, self.answers)
        engine.say(f"Run summary: {run.write_summary(summary)}")
        complete_model_folder(run, summary, config, self.model_dir)
        if config.report:
            engine.say(f"Report: {write_report(run.path)}")


# a group's rewards are all equal below this std: float32 gives ~6e-8 for eight equal rewards of 0.9
EQUAL_REWARDS = 1e-6


def trainable(model, config, engine: Engine, sampler: Sampler, prompts: list[PromptRow]):
    """LoRA and gradient checkpointing as asked, and --use-liger checked on the first prompts (their second halves
    stand for completions)."""
    model = make_trainable(model, config)
    check_use_liger(config, engine, model, [(ids, [i >= len(ids) // 2 for i in range(len(ids))])
                                            for ids in (sampler.prompt_ids(row) for row in prompts[:4])],
                    sampler.tokenizer.pad_token_id)
    return model


# ------------------------------------------------------------------------------------------------- the task

@dataclass
class RolloutBatch:
    rollouts: list[Rollout]
    weights: list[float]          # 1 for rollouts trained on, 0 for a placeholder (keeps processes in step)
    totals: dict                  # sequences / tokens / constant of the whole step, for the loss normalisation


class OnlineTask:
    """A step of online training: sample, reward, group, then the objective's loss over the kept answers."""

    def __init__(self, config, engine: Engine, prompts: list[PromptRow], rewards: RewardSet,
                 objective: OnlineObjective, model, sampler: Sampler, model_dir: Path):
        self.config, self.engine, self.prompts, self.rewards = config, engine, prompts, rewards
        self.objective, self.model, self.sampler = objective, model, sampler
        self.micro, self.accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
        self.units = [[i] for i in range(len(prompts))]
        self.units_per_step = self.micro * self.accumulation * engine.world
        self.total_steps, self.steps_per_epoch = count_steps(config, len(prompts), self.units_per_step)
        self.normalization = (objective.normalization if config.loss_normalization == "auto"
                              else config.loss_normalization)
        self.pad = sampler.tokenizer.pad_token_id
        self.model_dir = model_dir
        self.reference = None  # load_reference(), once the engine has prepared the policy
        self.reference_model = None
        self.pending: list[dict] = []   # rollout statistics of the steps since the last log line (all processes)
        self.skipped_invalid = 0
        self.sampling_s = 0.0
        self.watch = RewardWatch(rewards.reward_model, config, engine.say)

    def announce(self) -> None:
        c, e = self.config, self.engine
        self.watch.announce()
        e.say(f"Online {self.objective.name} on {len(self.prompts)} prompts: {self.total_steps} steps of "
              f"{self.units_per_step} prompts × {c.num_generations} answers ({self.micro} × {self.accumulation} "
              f"accumulation × {e.world} processes), loss normalised per {self.normalization}, "
              f"{'LoRA' if c.use_lora else 'full fine-tune'}, {e.precision} on {e.device}")

    # -------------------------------------------------------------------------------------- rollouts

    def step_batches(self, step: int) -> list[RolloutBatch]:
        batches, _ = micro_batches(self.units, step, self.micro, self.accumulation, self.engine.world,
                                   self.engine.rank, self.config.seed)
        flat = [i for batch in batches for i in batch]
        rollouts = self.rollouts(step, flat)
        kept = [r for r in rollouts if r.stats["kept"]]
        totals = self._step_totals(kept)
        by_position = {}
        for r in kept:
            by_position.setdefault(r.group, []).append(r)
        out, position, size = [], 0, self.config.answers_per_forward
        for batch in batches:
            mine = [r for p in range(position, position + len(batch)) for r in by_position.get(p, [])]
            position += len(batch)
            # in chunks: activations are kept per answer token, and the loss's totals are the whole step's, so the
            # chunks' gradients sum to the micro-batch's
            out += [RolloutBatch(mine[k:k + size], [1.0] * len(mine[k:k + size]), totals)
                    for k in range(0, len(mine), size)]
        if self.engine.world > 1:  # every process runs as many passes as the others: the spare ones train on nothing
            out += [RolloutBatch([rollouts[0]], [0.0], totals)] * (max(self.engine.gather_objects(len(out))) - len(out))
        return out

    def rollouts(self, step: int, prompt_indices: list[int]) -> list[Rollout]:
        """G conversations per prompt, rewarded and grouped; `stats['kept']` says which are trained on."""
        c = self.config
        rollouts = [Rollout(i, position, k, [], [], [], False) for position, i in enumerate(prompt_indices)
                    for k in range(c.num_generations)]
        conversations = {id(r): None for r in rollouts}
        open_ = list(rollouts)
        started = time.perf_counter()
        self.sampler.sync(step)  # the weights of the last optimizer step answer
        self.sampling_s = 0.0
        for turn in range(c.retry_turns):
            ids = [self.sampler.prompt_ids(self.prompts[r.prompt_index], conversations[id(r)]) for r in open_]
            seeds = [answer_seed(c.seed, step, r.prompt_index, r.sample, turn) for r in open_]
            answers, sampler_logps = self.sampler.sample(ids, seeds, c.temperature)
            self.sampling_s = time.perf_counter() - started
            for k, r in enumerate(open_):
                if sampler_logps is not None:
                    r.stats["sampler_logps"] = sampler_logps[k]
            for r, prompt_ids, answer in zip(open_, ids, answers):
                r.answers.append(self.sampler.text(answer))
                r.tokens, r.mask = prompt_ids + answer, [False] * len(prompt_ids) + [True] * len(answer)
                r.truncated = not answer or answer[-1] != self.sampler.eos
                r.stats["answer_ids"] = answer
            self._reward_turn(open_, turn)
            if turn + 1 < c.retry_turns:
                open_ = [r for r in open_ if r.reward is not None and not r.outcome]
                for r in open_:
                    conversations[id(r)] = continue_after_failure(conversations[id(r)], self.prompts[r.prompt_index],
                                                                  r.answers[-1], c.retry_message)
                # sharded weights: a process with nothing left still samples along until no process has any
                if not self.engine.rounds(len(open_)):
                    break
        self.sampler.after_sampling()
        if c.retry_turns > 1:
            self._retokenize_conversations(rollouts, conversations)
        if c.sar_weight:
            self._add_self_aligned_reward(rollouts)
        self._group(rollouts)
        return rollouts

    def _reward_turn(self, open_: list[Rollout], turn: int) -> None:
        by_prompt: dict[int, list[Rollout]] = {}
        for r in open_:
            by_prompt.setdefault(r.group, []).append(r)
        for members in by_prompt.values():
            row = self.prompts[members[0].prompt_index]
            try:
                totals, rm_values = score_group(self.rewards, row, members, [r.stats["answer_ids"] for r in members])
            except RewardFailure:
                if not self.config.skip_invalid:
                    raise
                self.skipped_invalid += 1
                totals = rm_values = [None] * len(members)
            for r, total, rm_value in zip(members, totals, rm_values):
                if total is None:
                    r.reward, r.outcome = None, 0.0
                    continue
                if rm_value is not None:
                    r.stats["rm"] = rm_value
                passed = self.rewards.passed(total)
                r.outcome = float(passed)
                r.stats["turn"] = turn
                r.reward = retry_reward(total, passed, turn, self.config.retry_gamma)
        for r in open_:
            if r.reward is not None and self.config.retry_turns > 1:
                r.reward -= repetition_penalty(r.answers, self.config.retry_repetition_penalty)

    def _retokenize_conversations(self, rollouts: list[Rollout], conversations: dict) -> None:
        """A conversation of several turns is trained on as the chat template renders it, every answer's tokens
        (and the end of its turn) marked."""
        for r in rollouts:
            conversation = conversations[id(r)]
            if conversation is None:
                continue  # answered at the first turn: its sampled tokens stand
            r.stats.pop("sampler_logps", None)  # re-tokenised: the sampler's log-probs no longer line up
            row = self.prompts[r.prompt_index]
            full = conversation + [{"role": "assistant", "content": r.answers[-1]}]
            r.tokens, r.mask = conversation_tokens(self.sampler.tokenizer, full, row.source)

    def _add_self_aligned_reward(self, rollouts: list[Rollout]) -> None:
        """SAR (Han et al., arXiv 2509.05489): clip((ppl(a) − ppl(a|q)) / ppl(a), −1, 1) of each last answer, by the
        current policy; added to the shaped reward only, never to the binary outcome."""
        scored = [r for r in rollouts if r.reward is not None and r.stats["answer_ids"]]
        if not scored and not self.engine.sharded:  # sharded, the forward passes below are everyone's
            return
        bos = self.sampler.tokenizer.bos_token_id
        start = [bos if bos is not None else self.sampler.eos]
        conditioned = [(r.tokens, r.mask) for r in scored]
        alone = [(start + r.stats["answer_ids"], [False] + [True] * len(r.stats["answer_ids"])) for r in scored]
        sar = self_aligned_reward(self._perplexities(conditioned), self._perplexities(alone))
        for r, value in zip(scored, sar.tolist()):
            r.stats["sar"] = value
            r.reward += self.config.sar_weight * value

    @torch.no_grad()
    def _perplexities(self, sequences: list[tuple[list[int], list[bool]]]) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        out = [torch.zeros(0)]
        size = self.config.eval_batch_size
        chunks = [sequences[start:start + size] for start in range(0, len(sequences), size)]
        for chunk, own in self.engine.in_lockstep(chunks, stand_in=[([self.pad, self.pad], [False, True])]):
            t = collate_masked([s for s, _ in chunk], [m for _, m in chunk], self.pad)
            with self.engine.autocast():
                logps = self._token_logps(t)
            mask = t["completion_mask"][:, 1:].to(logps.device)
            if own:
                out.append(torch.exp(-(logps * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
        self.model.train(was_training)
        return torch.cat(out)

    def _group(self, rollouts: list[Rollout]) -> None:
        """Group statistics over each prompt's rewarded answers. A group without signal is not trained on: all 👍
        or all 👎 for an objective that learns from the outcome; rewards all equal for one that learns from the
        reward (the same, for a 0/1 reward; a reward model's P(👍) differs between answers that all fall short)."""
        scored = [r for r in rollouts if r.reward is not None]
        if scored:
            rewards = torch.tensor([r.reward for r in scored], dtype=torch.float32)
            outcomes = torch.tensor([r.outcome for r in scored], dtype=torch.float32)
            groups = torch.tensor([r.group for r in scored])
            mean, std, rate = group_statistics(rewards, outcomes, groups)
            for r, m, s, p in zip(scored, mean.tolist(), std.tolist(), rate.tolist()):
                r.stats.update(group_mean=m, group_std=s, pass_rate=p)
        by_reward = self.objective.learns_from == "reward"
        for r in rollouts:
            r.stats["kept"] = r.reward is not None and (r.stats["group_std"] > EQUAL_REWARDS if by_reward
                                                        else 0.0 < r.stats["pass_rate"] < 1.0)
        self._record(rollouts)

    def _record(self, rollouts: list[Rollout]) -> None:
        """This step's rollout statistics from every process, for the next log line."""
        groups: dict[int, list[Rollout]] = {}
        for r in rollouts:
            groups.setdefault(r.group, []).append(r)
        mine = {"rewards": [r.reward for r in rollouts if r.reward is not None],
                "outcomes": [r.outcome for r in rollouts if r.reward is not None],
                "lengths": [r.answer_tokens for r in rollouts], "truncated": [r.truncated for r in rollouts],
                "excluded": sum(r.reward is None for r in rollouts), "groups": len(groups),
                "zero_std": sum(not any(m.stats["kept"] for m in g) for g in groups.values()),
                "sar": [r.stats["sar"] for r in rollouts if "sar" in r.stats],
                "rm": [r.stats["rm"] for r in rollouts if "rm" in r.stats], "check": self._check(rollouts),
                "sampling_s": [self.sampling_s]}
        merged = {}
        for part in self.engine.gather_objects(mine):
            for key, value in part.items():
                merged[key] = merged.get(key, 0 if isinstance(value, int) else []) + value
        self.pending.append(merged)

    def _check(self, rollouts: list[Rollout]) -> list[tuple[bool, bool]]:
        """(the check judge's verdict, the reward's) of each rewarded last answer; empty without --check-judge."""
        if self.watch.check is None:
            return []
        out = []
        for r in rollouts:
            if r.reward is None:
                continue
            row = self.prompts[r.prompt_index]
            try:
                verdict = bool(self.watch.check(r.answers[-1], row.row))
            except Exception as err:  # a user's judge can raise anything: name the prompt it failed on
                raise RewardFailure(f"{row.source}: --check-judge {self.config.check_judge} raised "
                                    f"{type(err).__name__}: {err}") from None
            out.append((verdict, bool(r.outcome)))
        return out

    def _step_totals(self, kept: list[Rollout]) -> dict:
        counts = torch.tensor([[len(kept), sum(r.answer_tokens for r in kept)]], dtype=torch.float64,
                              device=self.engine.device)
        sequences, tokens = self.engine.gather(counts).sum(0).tolist()
        generated = self.units_per_step * self.config.num_generations
        return {"sequences": sequences, "tokens": tokens, "constant": generated * self.config.max_new_tokens}

    # -------------------------------------------------------------------------------------- the loss

    def micro_step(self, module, batch: RolloutBatch) -> MicroStep:
        device = self.engine.device
        rollouts = batch.rollouts
        t = collate_masked([r.tokens for r in rollouts], [r.mask for r in rollouts], self.pad)
        logps = module(t["input_ids"].to(device), t["attention_mask"].to(device), t["completion_mask"].to(device),
                       per_token=True)
        mask = t["completion_mask"][:, 1:].to(device)

        def column(key, default=0.0):
            return torch.tensor([r.stats.get(key, default) for r in rollouts], dtype=torch.float32, device=device)

        x = GroupBatch(logps=logps, old_logps=logps.detach(), mask=mask,
                       rewards=torch.tensor([r.reward or 0.0 for r in rollouts], device=device),
                       outcomes=torch.tensor([r.outcome for r in rollouts], device=device),
                       group_mean=column("group_mean"), group_std=column("group_std"), pass_rate=column("pass_rate"))
        token_losses = self.objective.token_losses(x)
        weights = torch.tensor(batch.weights, device=device)
        stats = {"weight": weights}
        if self.sampler.gives_logps:
            token_losses = token_losses * self._importance_weights(rollouts, logps, mask, stats)
        if self.config.beta > 0:
            penalty, stats["kl"] = kl_penalty(logps, self.reference_logps(t), mask, self.config.beta)
            token_losses = token_losses + penalty
        loss = reduce_token_losses(token_losses, mask, weights, self.normalization, **batch.totals)
        stats["neg_logp"] = (-(logps.detach() * mask).sum(1) / mask.sum(1).clamp(min=1))
        stats["loss_share"] = loss.detach().reshape(1)
        return MicroStep(loss, stats, tokens=int(t["attention_mask"].sum()), samples=int(sum(batch.weights)))

    def _importance_weights(self, rollouts: list[Rollout], logps: torch.Tensor, mask: torch.Tensor,
                            stats: dict) -> torch.Tensor:
        """Each answer token's truncated importance weight π_θ / π_vLLM (methods/online_base.py); the mean
        |log π_θ − log π_vLLM| and mean weight of each answer go to the log."""
        sampled = torch.zeros_like(logps, dtype=torch.float32)
        known = torch.zeros_like(mask, dtype=torch.bool)
        for row, r in enumerate(rollouts):
            values = r.stats.get("sampler_logps")
            if values:
                positions = mask[row].nonzero().flatten()[:len(values)]
                sampled[row, positions] = torch.tensor(values[:len(positions)], device=logps.device)
                known[row, positions] = True
        weights, difference = truncated_importance_weights(logps.float(), sampled, known,
                                                           self.config.vllm_importance_sampling_cap)
        counts = known.sum(1).clamp(min=1)
        stats["sampler_logp_diff"] = difference.sum(1) / counts
        stats["is_weight"] = (weights * known).sum(1) / counts
        return weights

    def load_reference(self) -> None:
        """What the KL term compares with: nothing when beta is 0; with LoRA the model itself, its adapter disabled;
        otherwise a frozen copy of the starting model (one more model in memory: with sharded weights, 1/N of it per
        process, read on the first process only)."""
        c, engine = self.config, self.engine
        if c.beta <= 0 or c.use_lora:
            return
        engine.say("KL to the starting model without LoRA: loading a frozen copy of it (one more model in memory)")
        if engine.sharded and not engine.is_main:
            reference = empty_model(self.model_dir, c.trust_remote_code)
        else:
            reference = load_causal_lm(self.model_dir, c.trust_remote_code)
        self.reference = engine.frozen(CompletionLogps(reference, c.logps_chunk_size), reference)
        self.reference_model = reference  # the starting model, sharded like the policy: --eval-prompts' base too

    @torch.no_grad()
    def reference_logps(self, t: dict) -> torch.Tensor:
        """log π_ref per token: the model with its LoRA adapter disabled, or the frozen starting model."""
        if self.reference is None:
            with self.model.disable_adapter():
                return self._token_logps(t)
        device = self.engine.device
        return self.reference(t["input_ids"].to(device), t["attention_mask"].to(device),
                              t["completion_mask"].to(device), per_token=True)

    def _token_logps(self, t: dict) -> torch.Tensor:
        """Per-token log-probs of the policy outside the training forward. With sharded weights (ZeRO-3) through the
        engine's own module: DeepSpeed gathers a weight used outside its layer (the output projection of the
        chunked path) only inside a module's forward."""
        device = self.engine.device
        args = (t["input_ids"].to(device), t["attention_mask"].to(device), t["completion_mask"].to(device))
        scorer = self.engine.scorer(self.model)
        if isinstance(scorer, CompletionLogps):
            return scorer(*args, per_token=True)
        return completion_token_logps(self.model, *args, self.config.logps_chunk_size)

    # -------------------------------------------------------------------------------------- logging and state

    def log_line(self, stats: dict[str, torch.Tensor]) -> dict:
        steps, self.pending = self.pending, []
        rewards = [v for s in steps for v in s["rewards"]]
        outcomes = [v for s in steps for v in s["outcomes"]]
        lengths = [v for s in steps for v in s["lengths"]]
        truncated = [v for s in steps for v in s["truncated"]]
        groups = sum(s["groups"] for s in steps)
        line = {"loss": None, "reward_mean": _mean(rewards), "reward_std": _std(rewards),
                "pass_rate": _mean(outcomes), "frac_zero_std": sum(s["zero_std"] for s in steps) / groups if groups
                else None, "answer_length": _mean(lengths), "clipped_ratio": _mean(truncated),
                "excluded_answers": sum(s["excluded"] for s in steps)}
        # how fast answers are written (weights pushed to vLLM included), apart from the step's training
        sampling = sum(max(s["sampling_s"]) for s in steps)  # the processes sample side by side
        line["sampling_s"] = sampling
        line["sampling_answers_per_s"] = (sum(len(s["lengths"]) for s in steps) / sampling) if sampling else None
        sar = [v for s in steps for v in s["sar"]]
        if sar:
            line["sar_mean"] = _mean(sar)
        line.update(self.watch.measure([v for s in steps for v in s["rm"]], [v for s in steps for v in s["check"]],
                                       line["answer_length"]))
        if stats:
            kept = stats["weight"] > 0
            line["loss"] = float(stats["loss_share"].sum()) / max(len(steps), 1)
            line["entropy"] = float(stats["neg_logp"][kept].mean()) if kept.any() else None
            if "kl" in stats:
                line["kl"] = float(stats["kl"][kept].mean()) if kept.any() else None
            for key in ("sampler_logp_diff", "is_weight"):
                if key in stats:
                    line[key] = float(stats[key][kept].mean()) if kept.any() else None
        if self.skipped_invalid:
            line["skipped_invalid_prompts"] = self.skipped_invalid
        self.watch.warn(line)
        return line

    def format_line(self, m: dict) -> str:
        def f(v, spec=".3f"):
            return "n/a" if v is None else format(v, spec)

        return (f"step {m['step']}: loss {f(m['loss'], '.4f')}  reward {f(m['reward_mean'])}  pass {f(m['pass_rate'])}"
                f"  zero-std groups {f(m['frac_zero_std'], '.2f')}  length {f(m['answer_length'], '.1f')}  "
                f"clipped {f(m['clipped_ratio'], '.2f')}  " + (f"kl {f(m.get('kl'), '.4f')}  " if "kl" in m else "")
                + (f"vllm Δlogp {f(m.get('sampler_logp_diff'), '.1e')}  " if "sampler_logp_diff" in m else "")
                + self.watch.format(m) + f"lr {m['lr']:.2e}  {m['samples_per_s']:.2f} answers/s" + self.watch.warning(m))

    def state_dict(self) -> dict:
        return {"skipped_invalid": self.skipped_invalid, "watch": self.watch.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_invalid = state.get("skipped_invalid", 0)
        self.watch.load_state_dict(state.get("watch", {}))


def _mean(values) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _std(values) -> float | None:
    if not values:
        return None
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))



"""--filter-prompts LOW,HIGH: before online training, keep the prompts whose pass rate under the starting model is
inside a band (a prompt the model always or never passes gives groups without signal)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..analysis.rewards import RewardSet
from ..data.prompts import PromptRow
from ..engine.generation import Sampler
from ..engine.loop import Engine
from ..engine.models import cache_root
from ..engine.reference import model_fingerprint
from ..errors import ConfigError
from ..files import write_text_atomically
from .config import filter_band
from .rollouts import Rollout, answer_seed, score_group


def keep_learnable_prompts(prompts: list[PromptRow], sampler: Sampler, rewards: RewardSet, config, engine: Engine,
                           model_dir: Path) -> list[PromptRow]:
    """--filter-prompts LOW,HIGH: each prompt's pass rate over G sampled answers of the starting model (cached on
    disk like the reference log-probs); the prompts inside the band stay. Decided on the binary outcome only."""
    low, high = filter_band(config.filter_prompts)
    rates = prompt_pass_rates(prompts, sampler, rewards, config, engine, model_dir)
    kept = [row for row, rate in zip(prompts, rates) if low <= rate <= high]
    engine.say(f"--filter-prompts {low},{high}: {len(kept)} of {len(prompts)} prompts kept "
               f"({sum(r < low for r in rates)} below, {sum(r > high for r in rates)} above the band)")
    if not kept:
        raise ConfigError(f"--filter-prompts {config.filter_prompts}: no prompt's pass rate is inside the band")
    return kept


def prompt_pass_rates(prompts: list[PromptRow], sampler: Sampler, rewards: RewardSet, config, engine: Engine,
                      model_dir: Path) -> list[float]:
    key = hashlib.sha256(json.dumps([model_fingerprint(model_dir), config.reward, config.reward_weights,
                                     config.pass_threshold, config.num_generations, config.temperature,
                                     config.max_new_tokens, config.seed, engine.precision,
                                     [row.prompt for row in prompts]], default=str).encode()).hexdigest()[:32]
    path = cache_root(config.cache_dir) / "passrates" / f"{key}.json"
    if engine.main_value(path.exists()):
        engine.say(f"Pass rates of {len(prompts)} prompts loaded from cache ({path.stem})")
        return json.loads(path.read_text())
    engine.say(f"Estimating the pass rate of {len(prompts)} prompts with the starting model "
               f"({config.num_generations} answers each; cached for later runs)")
    rates = {}
    for i, own in engine.in_lockstep(range(engine.rank, len(prompts), engine.world)):
        if not own:  # the sampler's own stand-in keeps this process in step with the busiest
            sampler.answers([], [], config.temperature)
            continue
        row, g = prompts[i], config.num_generations
        answers = sampler.answers([sampler.prompt_ids(row)] * g, [answer_seed(config.seed, -1, i, k) for k in range(g)],
                                  config.temperature)
        members = [Rollout(i, 0, 0, [], [], [sampler.text(a)], False) for a in answers]
        totals, _ = score_group(rewards, row, members, answers)
        scored = [t for t in totals if t is not None]
        rates[i] = sum(rewards.passed(t) for t in scored) / len(scored) if scored else 0.0
    for part in engine.gather_objects(rates):
        rates.update(part)
    ordered = [rates[i] for i in range(len(prompts))]
    if engine.is_main:
        write_text_atomically(path, json.dumps(ordered), "the pass-rate cache (--cache-dir chooses another place)")
    engine.wait()
    return ordered

"""`thumbalign online --feedback THUMBS`: logged thumbs → a binary reward model → the policy learning online.

    OUTPUT_DIR/reward/    stage 1: `thumbalign reward train` on the thumbs (its own run folder: model, report)
    OUTPUT_DIR/prompts/   the thumbs' distinct prompts: train.jsonl, and eval.jsonl (kept apart, seeded)
    OUTPUT_DIR/policy/    stage 2: `thumbalign online` against the reward model's calibrated P(👍) (model, report)
    OUTPUT_DIR/summary.json   both stages' closing numbers and the route's settings

Why a reward model and then online learning, rather than an offline method on the same thumbs: when 👍 and 👎 come
from different prompts, an offline classifier learns partly *which prompt* gets 👍. Online, each prompt's answers
are compared with each other (the group-relative advantage subtracts the prompt's mean reward), so what the reward
model learned about prompts cancels and only *which answer* is left.

Each stage is an ordinary run of its trainer, with its checkpoints: `--resume` continues the stage that was
interrupted and skips a finished one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from ..data.records import OTHER_FIELDS, load_records
from ..engine.rundir import RUN_FILES, is_first_process
from ..errors import ConfigError
from ..files import content_digest, write_text_atomically
from .config import ROUTE_STAGE, OnlineConfig, RewardConfig
from .online import train_online
from .reward import train_reward_model

# settings the reward-model stage takes from the route's, unchanged: where and how to run
SHARED = ("model", "revision", "trust_remote_code", "seed", "bf16", "cache_dir", "skip_invalid", "skip_nonfinite",
          "num_processes", "accelerate_config", "num_machines", "machine_rank", "main_process_ip",
          "main_process_port", "rendezvous_timeout", "save_total_limit", "eval_batch_size", "report_to",
          "save_dtype", "save_max_shard_size", "gradient_checkpointing", "logging_steps", "save_steps")
OWN_DEFAULTS = ("logging_steps", "save_steps")
ONLINE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OnlineConfig)}
REWARD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RewardConfig)}


def train_from_feedback(config, log=print) -> dict:
    out = Path(config.output_dir)
    # the stages' own lines come from their engines; the route's from the first process, and those of the prompts
    # and the reward model once per command (with several processes the policy's stage is a second launch)
    log = log if is_first_process() else (lambda *_: None)
    once = log if os.environ.get(ROUTE_STAGE) != "policy" else (lambda *_: None)
    check_route_folder(out)
    train_prompts, eval_prompts = prompt_files(config, out / "prompts", once)  # before any model: cheap to refuse
    reward_model = reward_stage(config, out, once)
    warn_if_weak(reward_model, once)
    if os.environ.get(ROUTE_STAGE) == "reward":  # launched processes: the policy's stage is the next launch
        return {}
    summary = finished_policy(out, reward_model) if config.resume else None
    policy = policy_stage_config(config, out / "policy", reward_model, train_prompts, eval_prompts, summary is not None,
                                 log)
    if summary is not None:
        log(f"The policy stage has finished already: {out / 'policy' / 'model'}")
    else:
        summary = train_online(policy, log)
    route = route_summary(config, out, reward_model, summary)
    if is_first_process():
        path = write_text_atomically(out / "summary.json", json.dumps(route, indent=1, ensure_ascii=False),
                                     "the route summary")
        log(f"Route summary: {path}")
    return route


def check_route_folder(out: Path) -> None:
    """The route writes summary.json and its stages' folders into OUTPUT_DIR: refuse a folder that holds another
    kind of run (`online` and the route share the default --output-dir), even with --overwrite, which replaces a
    stage's folder only."""
    summary = out / "summary.json"
    other = [name for name in RUN_FILES if name != "summary.json" and (out / name).exists()]
    try:
        kind = json.loads(summary.read_text(encoding="utf-8")).get("kind") if summary.is_file() else None
    except (OSError, ValueError, AttributeError):
        kind = "unreadable"
    if other or kind not in (None, "feedback_route"):
        raise ConfigError(f"{out} holds another run ({', '.join(other or ['summary.json'])}), not an `online "
                          "--feedback` route: give the route a folder of its own with --output-dir")


def finished_policy(out: Path, reward_model: Path) -> dict | None:
    """The policy stage's summary if it finished against this very reward model (the route's summary, written last,
    names the reward model's digest): a reward model trained again makes the old policy stale."""
    try:
        route = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if route.get("reward_model_digest") != reward_model_digest(reward_model):
        return None
    return finished_summary(out / "policy")


def reward_model_digest(reward_model: Path) -> str | None:
    """Its config.json's digest: it holds the calibration fitted after training, different for every training."""
    path = reward_model / "config.json"
    return content_digest(str(path)) if path.is_file() else None


# ------------------------------------------------------------------------------------------------- stage 1

def reward_stage(config, out: Path, log) -> Path:
    """The reward model's folder: the one given (--reward rm:PATH), the one this route trained earlier, or one
    trained now on the thumbs."""
    if config.reward:
        given = Path(config.reward[0][3:])
        log(f"Reward model: {given} (given with --reward; not trained again)")
        return given
    folder = out / "reward"
    # reused when continuing the route, or in the policy's launch (the previous launch trained it); a fresh route
    # into a folder that holds one is refused, or with --overwrite trains it again, as any run folder
    second_launch = os.environ.get(ROUTE_STAGE) == "policy"
    if (config.resume or second_launch) and finished_summary(folder) is not None:
        log(f"Reward model: {folder / 'model'} (trained by this route earlier; reused)")
        return folder / "model"
    if second_launch:  # the previous launch trained it, in a folder this machine does not see
        raise ConfigError(f"{folder / 'model'} is missing on this machine after the reward model's stage: a "
                          "route over several machines needs an --output-dir every machine sees")
    settings = {name: getattr(config, name) for name in SHARED}
    for name in OWN_DEFAULTS:  # left at online's defaults: the reward model's own (a checkpoint is a whole model)
        if getattr(config, name) == ONLINE_DEFAULTS[name]:
            settings[name] = REWARD_DEFAULTS[name]
    rm_config = RewardConfig(data=config.feedback, output_dir=str(folder), num_train_epochs=config.reward_model_epochs,
                             learning_rate=config.reward_model_learning_rate, **settings,
                             **stage_start(config, folder, "reward-model", log))
    rm_config.validate()
    log(f"Stage 1 of 2: a reward model on {config.feedback} ({config.reward_model_epochs:g} epochs, learning rate "
        f"{config.reward_model_learning_rate:g}) into {folder}")
    train_reward_model(rm_config, log)
    return folder / "model"


WEAK_AUC = 0.6  # below this held-out AUC the reward model barely tells 👍 answers from 👎 ones


def warn_if_weak(reward_model: Path, log) -> None:
    """A reward model that does not rank held-out thumbs is a noisy reward: online learning against it learns
    little, or the noise. Said before the policy's stage spends its time (read from the folder's config.json,
    where its training stored the held-out numbers)."""
    try:
        held_out = json.loads((reward_model / "config.json").read_text(encoding="utf-8")).get("thumbalign_held_out")
    except (OSError, ValueError):
        return
    auc = (held_out or {}).get("auc")
    if auc is not None and auc < WEAK_AUC:
        log(f"warning: the reward model ranks its held-out thumbs little better than chance (ROC AUC {auc:.3f}): the "
            "policy would learn from noise. More thumbs, more epochs (--reward-model-epochs) or another learning "
            "rate (--reward-model-learning-rate) give it more to learn; its report is in "
            f"{reward_model.parent / 'report.html'}")


def stage_start(config, folder: Path, name: str, log) -> dict:
    """resume / overwrite for one stage: --resume continues the stage from its latest checkpoint, or starts it
    afresh when it has none (it was interrupted before its first)."""
    if not config.resume:
        return {"resume": None, "overwrite": config.overwrite}
    if any((folder / "checkpoints").glob("step-*")):
        return {"resume": "latest", "overwrite": config.overwrite}
    if folder.exists():
        log(f"The {name} stage has no checkpoint to continue from: starting it again")
    return {"resume": None, "overwrite": True}


def finished_summary(folder: Path) -> dict | None:
    """The summary of a stage that ran to its end (summary.json is written once its model folder is in place)."""
    path = folder / "summary.json"
    if not ((folder / "model").is_dir() and path.is_file()):
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # half there: the stage runs (or resumes) again


# ------------------------------------------------------------------------------------------------- prompts

def prompt_files(config, folder: Path, log) -> tuple[Path, Path | None]:
    """The thumbs' distinct prompts, a seeded share of them kept apart for evaluation. Which prompt is held out
    depends on its text and the seed only, so a resumed route (and every process) makes the same files."""
    records, report = load_records(config.feedback, config.skip_invalid, keep=OTHER_FIELDS)
    distinct: dict[str, dict] = {}  # a prompt's row: the prompt and its first record's other columns (for rewards)
    for record in records:
        distinct.setdefault(json.dumps(record.prompt, sort_keys=True, ensure_ascii=False),
                            {**record.fields, "prompt": record.prompt})

    def rank(key: str) -> str:
        return hashlib.sha256(f"{config.seed}/{key}".encode()).hexdigest()

    ordered = sorted(distinct, key=rank)
    share = 0.0 if config.eval_prompts else config.feedback_eval_share  # --eval-prompts evaluates instead
    n_held = int(round(share * len(ordered)))
    if len(ordered) - n_held < 1:
        raise ConfigError(f"{config.feedback}: {len(ordered)} distinct prompt(s); none would be left to train on "
                          f"after keeping {config.feedback_eval_share:g} of them apart (--feedback-eval-share)")
    held, train = set(ordered[:n_held]), [k for k in distinct if k not in set(ordered[:n_held])]
    train_path = write_prompts(folder / "train.jsonl", [distinct[k] for k in train])
    eval_path = write_prompts(folder / "eval.jsonl", [distinct[k] for k in distinct if k in held]) if held else None
    log(f"Prompts: {len(distinct)} distinct in {report.records} thumbs; {len(train)} to train on, {len(held)} kept "
        f"apart for evaluation ({folder})")
    return train_path, eval_path


def write_prompts(path: Path, rows: list[dict]) -> Path:
    # every process writes the same bytes (atomically), so none reads a file another is still writing
    # a column read from Parquet or a dataset may hold a date or a number type JSON lacks: written as text
    text = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    return write_text_atomically(path, text, "the route's prompts")


# ------------------------------------------------------------------------------------------------- stage 2

def policy_stage_config(config, folder: Path, reward_model: Path, train_prompts: Path, eval_prompts: Path | None,
                        finished: bool, log):
    """The online run's settings: the route's, with the prompts and the reward the route made."""
    start = {} if finished else stage_start(config, folder, "policy", log)
    policy = dataclasses.replace(config, feedback=None, prompts=str(train_prompts), reward=[f"rm:{reward_model}"],
                                 reward_weights=None, output_dir=str(folder),
                                 eval_prompts=config.eval_prompts or (str(eval_prompts) if eval_prompts else None),
                                 **start)
    policy.validate()
    if start:
        log(f"Stage 2 of 2: the policy, online against rm:{reward_model}, into {folder}")
    return policy


def route_summary(config, out: Path, reward_model: Path, policy: dict) -> dict:
    reward = finished_summary(reward_model.parent) or {}
    judged = policy.get("judged") or {}
    held_out = {k: v for k, v in (reward.get("eval") or {}).items() if k in ("accuracy", "auc", "ece", "n")}
    return {"kind": "feedback_route", "feedback": config.feedback, "reward_model": str(reward_model),
            "reward_model_digest": reward_model_digest(reward_model),
            "reward_model_eval": held_out or None, "policy_model": str(out / "policy" / "model"),
            "policy_final_metrics": policy.get("final_metrics"), "judged": judged or None,
            "settings": config.to_dict()}

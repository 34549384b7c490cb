"""What online training watches so that a reward it cannot fully trust is not over-optimised.

A reward model is a classifier fitted to logged answers; the policy's answers drift away from those, and the policy
can find answers the model scores high for the wrong reasons (longer, repetitive, flattering). Logged at every line:

    rm_score             the reward model's mean P(👍) of the policy's answers
    rm_held_out_up/down  its mean P(👍) of held-out 👍 / 👎 thumbs, measured after its training (constants: the
                         scale the line above is read on)
    length_drift         the answers' mean length relative to the first logged step's (+0.5 = half again as long)
    check_pass_rate      with --check-judge: the share of answers that judge passes
    check_agreement      with --check-judge: the share of answers on which it and the reward's outcome agree
    kl                   with --beta > 0: KL to the starting model (logged by the trainer)

and a warning (also kept in metrics.jsonl as reward_warning) when the reward has risen since the first line while
the agreement with --check-judge has fallen: the policy is being paid for something the judge does not see.
"""

from __future__ import annotations

from ..analysis.judges import load_judge

REWARD_RISE = 0.05      # the reward has risen by this much since the first logged line …
AGREEMENT_FALL = 0.10   # … while the agreement with the check judge has fallen by this much


class RewardWatch:
    def __init__(self, reward_model, config, say):
        self.held_out = reward_model.held_out if reward_model is not None else None
        self.has_reward_model = reward_model is not None
        self.check_spec = config.check_judge
        self.check = (load_judge(config.check_judge, config.reference_field, config.pass_threshold)
                      if config.check_judge else None)
        self.say = say
        self.first: dict[str, float] = {}  # the first logged values: the baseline of drift and of the warning
        self.warned = False

    def announce(self) -> None:
        h = self.held_out
        if h and h.get("p_up_of_up") is not None and h.get("p_up_of_down") is not None:
            auc = "n/a" if h.get("auc") is None else f"{h['auc']:.3f}"
            self.say(f"The reward model on its held-out thumbs: mean P(👍) {h['p_up_of_up']:.3f} for 👍 answers, "
                     f"{h['p_up_of_down']:.3f} for 👎 ones (AUC {auc}); its P(👍) of the policy's answers is logged "
                     "as rm_score")
        if self.has_reward_model and self.check is None:
            self.say("No --check-judge: the reward model's agreement with a judge on the policy's answers is not "
                     "measured, so over-optimisation can only be seen in rm_score, length_drift and kl")

    def measure(self, rm_values: list[float], checks: list[tuple[bool, bool]], length: float | None) -> dict:
        """The watched numbers of one log line, from the answers of the steps since the last."""
        line = {}
        if self.has_reward_model:
            line["rm_score"] = sum(rm_values) / len(rm_values) if rm_values else None
            if self.held_out:
                line["rm_held_out_up"] = self.held_out.get("p_up_of_up")
                line["rm_held_out_down"] = self.held_out.get("p_up_of_down")
        if length:
            first = self.first.setdefault("length", length)
            line["length_drift"] = length / first - 1
        if checks:
            line["check_pass_rate"] = sum(v for v, _ in checks) / len(checks)
            line["check_agreement"] = sum(v == o for v, o in checks) / len(checks)
        return line

    def warn(self, line: dict) -> None:
        """Once per run: the reward rose while the check judge's agreement with it fell."""
        reward, agreement = line.get("rm_score", line.get("reward_mean")), line.get("check_agreement")
        if reward is None or agreement is None:
            return
        first_reward = self.first.setdefault("reward", reward)
        first_agreement = self.first.setdefault("agreement", agreement)
        if self.warned or reward < first_reward + REWARD_RISE or agreement > first_agreement - AGREEMENT_FALL:
            return
        self.warned = True
        line["reward_warning"] = (
            f"the reward rose from {first_reward:.3f} to {reward:.3f} while its agreement with --check-judge "
            f"{self.check_spec} fell from {first_agreement:.3f} to {agreement:.3f}: the policy is paid for something "
            "the judge does not see. Look at its answers (report.html); a KL term (--beta), fewer steps or a lower "
            "learning rate hold it back")

    def format(self, m: dict) -> str:
        def f(v):
            return "n/a" if v is None else f"{v:.3f}"

        out = ""
        if "rm_score" in m:
            out += f"rm {f(m['rm_score'])}"
            if m.get("rm_held_out_up") is not None:
                out += f" (held-out 👍 {f(m['rm_held_out_up'])} 👎 {f(m.get('rm_held_out_down'))})"
            out += "  "
        if "length_drift" in m:
            out += f"length drift {m['length_drift']:+.0%}  "
        if "check_agreement" in m:
            out += f"check {f(m['check_pass_rate'])} agree {f(m['check_agreement'])}  "
        return out

    def warning(self, m: dict) -> str:
        return f"\nwarning: step {m['step']}: {m['reward_warning']}" if m.get("reward_warning") else ""

    def state_dict(self) -> dict:
        return {"first": self.first, "warned": self.warned}

    def load_state_dict(self, state: dict) -> None:
        self.first, self.warned = dict(state.get("first", {})), bool(state.get("warned", False))

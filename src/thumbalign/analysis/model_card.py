"""The model folder's README.md: a Hugging Face model card (metadata the Hub reads, and what the run measured)."""

from __future__ import annotations

from .. import __version__

CITATIONS = {
    "bco": ("Jung et al., Binary Classifier Optimization for Large Language Model Alignment, arXiv 2404.04656",
            "@article{jung2024bco, title={Binary Classifier Optimization for Large Language Model Alignment}, "
            "author={Jung, Seungjae and Han, Gunsoo and Nam, Daniel Wontae and On, Kyoung-Woon}, "
            "journal={arXiv preprint arXiv:2404.04656}, year={2024}}"),
    "kto": ("Ethayarajh et al., KTO: Model Alignment as Prospect Theoretic Optimization, arXiv 2402.01306",
            "@article{ethayarajh2024kto, title={KTO: Model Alignment as Prospect Theoretic Optimization}, "
            "author={Ethayarajh, Kawin and Xu, Winnie and Muennighoff, Niklas and Jurafsky, Dan and Kiela, Douwe}, "
            "journal={arXiv preprint arXiv:2402.01306}, year={2024}}"),
    "dpo": ("Rafailov et al., Direct Preference Optimization, arXiv 2305.18290", None),
    "ipo": ("Azar et al., A General Theoretical Paradigm to Understand Learning from Human Preferences, "
            "arXiv 2310.12036", None),
    "apo-zero": ("D'Oosterlinck et al., Anchored Preference Optimization, arXiv 2408.06266", None),
    "una": ("Wang et al., UNA: Unifying Alignments of RLHF/PPO, DPO and KTO, arXiv 2408.15339", None),
    "grpo": ("Shao et al., DeepSeekMath, arXiv 2402.03300", None),
    "dr_grpo": ("Liu et al., Understanding R1-Zero-Like Training: A Critical Perspective, arXiv 2503.20783", None),
    "nft": ("Chen et al., Bridging Supervised Learning and Reinforcement Learning in Math Reasoning, "
            "arXiv 2505.18116", None),
}
CITATIONS["bco-pair"] = CITATIONS["bco"]


def model_card(summary: dict, base_model: str, adapter: bool, datasets: list[str] | None = None) -> str:
    """Card text for a run's summary.json content; `datasets`: the Hub datasets it was trained on, when known."""
    from huggingface_hub import ModelCard, ModelCardData

    method = summary.get("method") or ("reward-model" if summary.get("kind") == "reward_model" else "unknown")
    settings = summary.get("settings", {})
    data = ModelCardData(base_model=base_model, library_name="peft" if adapter else "transformers",
                         tags=["thumbalign", "binary-feedback", method], datasets=datasets or None)
    lines = [f"# {base_model}, trained with thumbalign ({method})", "",
             f"Trained from [{base_model}](https://huggingface.co/{base_model}) with thumbalign {__version__} on "
             f"binary feedback (thumbs-up / thumbs-down), method `{method}`.", "", "## Training", "",
             "| setting | value |", "| --- | --- |"]
    for key in ("beta", "learning_rate", "use_lora", "max_steps", "per_device_train_batch_size", "max_length",
                "objective", "num_generations", "reward"):
        if key in settings and settings[key] is not None:
            lines.append(f"| {key} | {settings[key]} |")
    if "threshold" in summary:
        lines.append(f"| reward shift δ / reference point at the end | {summary['threshold']:.4f} |")
    lines += _results(summary)
    title, bibtex = CITATIONS.get(method, (None, None))
    if title:
        lines += ["", "## Citation", "", f"{title}."] + (["", "```bibtex", bibtex, "```"] if bibtex else [])
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return str(ModelCard(content))


def _results(summary: dict) -> list[str]:
    lines = []
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before and after:
        lines += ["", "## Held-out feedback", "", "| model | accuracy | ROC AUC |", "| --- | --- | --- |",
                  f"| before training | {before['accuracy']:.3f} | {_num(before.get('auc'))} |",
                  f"| after training | {after['accuracy']:.3f} | {_num(after.get('auc'))} |"]
    held = summary.get("eval")
    if held:
        lines += ["", "## Held-out feedback (reward model)", "",
                  f"accuracy {held['accuracy']:.3f}, ROC AUC {_num(held.get('auc'))}, ECE {held['ece']:.3f} "
                  f"(temperature {held['temperature']:.3f})"]
    judged = summary.get("judged")
    if judged:
        lines += ["", f"## Judged answers to {judged['prompts']} held-out prompts", "",
                  "| model | 👍 rate | 95% interval |", "| --- | --- | --- |"]
        for name, m in judged["models"].items():
            lines.append(f"| {name} | {m['thumbs_up_rate']:.3f} | [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}] |")
    return lines


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"

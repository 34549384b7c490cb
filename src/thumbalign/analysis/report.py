"""`thumbalign report RUN_DIR`: one self-contained HTML page (plots embedded as PNG) to look at a run."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from ..errors import ConfigError
from ..files import write_text_atomically

CURVES = [  # (title, [(metrics key, label)])
    ("Loss", [("loss", "loss")]),
    ("Implicit reward by label", [("rewards_up", "thumbs-up"), ("rewards_down", "thumbs-down")]),
    ("Reward margin (up − down)", [("margin", "margin")]),
    ("Reference point", [("delta", "δ (BCO reward shift)"), ("z_ref", "z_ref (KTO)")]),
    ("Learning rate", [("lr", "learning rate")]),
    ("Implicit-classifier accuracy (training batches)", [("accuracy", "accuracy")]),
    ("Reward of sampled answers (online)", [("reward_mean", "mean reward")]),
    ("Pass rate of sampled answers (online)", [("pass_rate", "share of thumbs-up")]),
    ("Groups without signal (online)", [("frac_zero_std", "share of groups dropped")]),
    ("Answer length (online)", [("answer_length", "tokens")]),
    ("Reward model: the policy's answers against held-out thumbs (online)",
     [("rm_score", "P(up) of the policy's answers"), ("rm_held_out_up", "P(up) of held-out thumbs-up answers"),
      ("rm_held_out_down", "P(up) of held-out thumbs-down answers")]),
    ("Drift from the starting model (online)", [("length_drift", "answer length, relative change"),
                                                ("kl", "KL to the starting model")]),
    ("Check judge (online, --check-judge)", [("check_pass_rate", "its pass rate"),
                                             ("check_agreement", "its agreement with the reward")]),
]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>thumbalign run report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.5em; }} h2 {{ margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #ccc; padding: .3em .7em; }}
th {{ background: #f4f4f4; }} .plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.plots img {{ width: 520px; border: 1px solid #eee; }} .answer {{ white-space: pre-wrap; }}
</style></head>
<body data-images-loaded="pending">
<h1>thumbalign run report</h1>
<p>{intro}</p>
{body}
<script>
// Marks how many images decoded, so a headless browser (and a test) can check the page is complete.
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const ok = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesLoaded = ok + "/" + images.length;
}});
</script>
</body></html>
"""


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _img(data: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "n/a" if value is None else str(value)


def plot_curves(metrics: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = []
    steps = [m["step"] for m in metrics]
    for title, series in CURVES:
        present = [(k, label) for k, label in series if any(m.get(k) is not None for m in metrics)]
        if not present:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for key, label in present:
            xs = [s for s, m in zip(steps, metrics) if m.get(key) is not None]
            ax.plot(xs, [m[key] for m in metrics if m.get(key) is not None], marker=".", label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=.3)
        if len(present) > 1:
            ax.legend()
        images.append((title, _png(fig)))
        plt.close(fig)
    return images


def plot_histogram(hist: dict, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    edges, counts = hist["edges"], hist["counts"]
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
    ax.set_title(title)
    ax.set_xlabel("weight")
    ax.set_ylabel("thumbs-down examples")
    data = _png(fig)
    plt.close(fig)
    return data


def _classifier_table(summary: dict) -> str:
    rows = []
    for key, name in (("eval_before", "before training"), ("eval_after", "after training")):
        m = summary.get(key)
        if m:
            rows.append([name, m["n"], m["accuracy"], m.get("auc"), m["accuracy_up"], m["accuracy_down"],
                         m.get("ece"), m.get("pair_accuracy")])
    if not rows:
        return "<p>No held-out feedback in this run (use --eval-split or --eval-data).</p>"
    return _table(rows, ["model", "examples", "accuracy", "ROC AUC", "accuracy (up)", "accuracy (down)", "ECE",
                         "pair accuracy"])


def _judged_section(run: Path, summary: dict) -> str:
    judged = summary.get("judged")
    if not judged:
        return "<p>No generation eval in this run (use --eval-prompts with --judge).</p>"
    rows = [[name, m["thumbs_up_rate"], f"[{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"]
            for name, m in judged["models"].items()]
    settings = summary.get("settings", {})
    judge = settings.get("judge") if summary.get("kind") != "online" else " + ".join(settings.get("reward") or [])
    parts = [f"<p>Judge: {html.escape(str(judge))}; {judged['prompts']} prompts never trained on; 95% bootstrap "
             "intervals.</p>", _table(rows, ["model", "thumbs-up rate", "95% interval"])]
    if "difference" in judged:
        d = judged["difference"]
        parts.append(_table([[d["of"], d["mean"], f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]", d["wins"],
                              d["ties"], d["losses"]]], ["paired difference", "mean", "95% interval", "wins", "ties",
                                                         "losses"]))
    generations = run / "generations.jsonl"
    if generations.exists():
        by_prompt: dict[int, dict] = {}
        for line in generations.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            by_prompt.setdefault(row["i"], {})[row["model"]] = row
        samples = [v for _, v in sorted(by_prompt.items()) if len(v) == 2][:6]
        if samples:
            names = list(judged["models"])
            head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
            body = ""
            for pair in samples:
                prompt = pair[names[0]]["prompt"]
                text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
                cells = "".join(f"<td class='answer'>[{'up' if pair[n]['verdict'] else 'down'}] "
                                f"{html.escape(pair[n]['answer'])}</td>" for n in names)
                body += f"<tr><td class='answer'>{html.escape(text)}</td>{cells}</tr>"
            parts.append(f"<h3>Sampled answers</h3><table><tr><th>prompt</th>{head}</tr>{body}</table>")
    return "\n".join(parts)


def _reward_section(m: dict | None) -> str:
    if not m:
        return "<p>No held-out split in this run.</p>"
    table = _table([[m["n"], m["accuracy"], m.get("auc"), m["ece_before_calibration"], m["ece"], m["temperature"]]],
                   ["examples", "accuracy", "ROC AUC", "ECE before calibration", "ECE after", "temperature"])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rel = m["reliability"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    points = [(c, f) for c, f in zip(rel["confidence"], rel["frequency"]) if c is not None]
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    if points:
        ax.plot(*zip(*points), marker="o", label="reward model")
    ax.set_xlabel("predicted P(thumbs-up)")
    ax.set_ylabel("observed share of thumbs-up")
    ax.set_title("Reliability diagram (held-out)")
    ax.legend()
    image = _png(fig)
    plt.close(fig)
    return table + "<div class='plots'>" + _img(image, "reliability diagram") + "</div>"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run = Path(run_dir)
    if not (run / "summary.json").exists() and not (run / "metrics.jsonl").exists():
        raise ConfigError(f"{run}: not a thumbalign run folder (no summary.json or metrics.jsonl)")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    metrics_file = run / "metrics.jsonl"
    lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
    metrics = [json.loads(line) for line in lines if line.strip()]
    body = ["<h2>Training curves</h2>"]
    curves = plot_curves(metrics) if metrics else []
    body.append("<div class='plots'>" + "".join(_img(d, t) for t, d in curves) + "</div>" if curves
                else "<p>No metrics logged yet.</p>")
    udm = summary.get("udm")
    if udm and udm.get("histogram"):
        body.append("<h2>UDM weights</h2>")
        body.append(f"<p>Weights of the thumbs-down examples: min {udm['min']:.3f}, mean {udm['mean']:.3f}, max "
                    f"{udm['max']:.3f}, {udm['share_clipped']:.1%} clipped.</p>")
        body.append("<div class='plots'>" + _img(plot_histogram(udm["histogram"], "UDM weight of thumbs-down examples"),
                                                 "UDM weight histogram") + "</div>")
    if summary.get("kind") == "reward_model":
        body.append("<h2>Held-out reward model</h2>")
        body.append(_reward_section(summary.get("eval")))
    elif summary.get("kind") == "online":
        body.append("<h2>Held-out prompts, greedy answers before and after</h2>")
        body.append(_judged_section(run, summary))
    else:
        body.append("<h2>Held-out implicit-reward classifier</h2>")
        body.append(_classifier_table(summary))
        body.append("<h2>Generations judged</h2>")
        body.append(_judged_section(run, summary))
    settings = summary.get("settings", {})
    intro = (f"Run <code>{html.escape(str(run))}</code>: method <b>{html.escape(str(summary.get('method', '?')))}</b>"
             f", model {html.escape(str(settings.get('model', '?')))}, {summary.get('steps', len(metrics))} steps.")
    target = Path(out) if out else run / "report.html"
    page = PAGE.format(title=html.escape(run.name), intro=intro, body="\n".join(body))
    return write_text_atomically(target, page, "the report")

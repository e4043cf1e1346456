"""The figures a person looks at, drawn with matplotlib's object API (no global state) and written
atomically (`report.write_figure`):

- `headline_bars`: each arm's headline number, best first, with 95% intervals when there are
  several seeds;
- `loss_curves`: training loss by step of one or more runs (from their metrics.jsonl rows), and
  their held-out loss where it was evaluated; every training run draws its own;
- `domain_mix`: the domain shares of each pick against the candidates'.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jaxsel import report


def headline_bars(values: dict[str, dict], label: str, path: str) -> None:
    """Arm -> `{"mean", "low", "high"}` (`stats.mean_interval`; no interval: low None) as bars,
    lowest first, with the 95% interval as error bars where there is one."""
    arms = sorted(values, key=lambda a: values[a]["mean"])
    means = np.array([values[a]["mean"] for a in arms])
    fig = Figure(figsize=(max(4.0, 0.9 * len(arms) + 2), 4), layout="constrained")
    ax = fig.subplots()
    errors = None
    if all(values[a].get("low") is not None for a in arms):
        errors = np.abs(np.array([[values[a]["low"], values[a]["high"]] for a in arms]).T - means)
    ax.bar(np.arange(len(arms)), means, yerr=errors, capsize=3,
           color=["tab:gray" if a == "random" else "tab:blue" for a in arms])
    top = means + (0 if errors is None else errors[1])
    bottom = means - (0 if errors is None else errors[0])
    pad = max(float(top.max() - bottom.min()), 1e-3) * 0.3
    ax.set(xticks=np.arange(len(arms)), ylim=(float(bottom.min()) - pad, float(top.max()) + pad),
           ylabel=label, title=f"{label} per arm (lower is better"
           + ("; 95% intervals over seeds)" if errors is not None else ")"))
    ax.set_xticklabels(arms, rotation=30, ha="right")
    report.write_figure(path, fig)


def loss_curves(runs: dict[str, list[dict]], path: str, title: str = "loss") -> None:
    """Name -> metrics.jsonl rows of a run: its training loss by step (a line) and, where rows
    carry an `eval` ("all": held-out perplexity), its held-out loss (markers, log of it)."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab10"]
    for i, (name, rows) in enumerate(runs.items()):
        color = colors(i % 10)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, label=name)
        evals = [(r["step"], math.log(r["eval"]["all"])) for r in rows if "eval" in r]
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", color=color, markersize=4)
    ax.set(xlabel="step", ylabel="loss (nats)",
           title=f"{title}: training loss (lines), held-out loss (dots)")
    ax.legend(fontsize=7, ncol=2)
    report.write_figure(path, fig)


def domain_mix(counts: dict[str, dict[str, int]], path: str) -> None:
    """Pick name -> {domain: rows} as stacked bars of domain shares (the first pick, e.g. the
    candidates, first)."""
    picks = list(counts)
    domains = sorted({d for c in counts.values() for d in c})
    fig = Figure(figsize=(max(5.0, 0.8 * len(picks) + 3), 4), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(picks))
    colors = matplotlib.colormaps["tab20"]
    for i, domain in enumerate(domains):
        shares = np.array([counts[p].get(domain, 0) / max(sum(counts[p].values()), 1)
                           for p in picks])
        ax.bar(np.arange(len(picks)), shares, bottom=bottom, color=colors(i % 20), label=domain)
        bottom += shares
    ax.set(xticks=np.arange(len(picks)), ylim=(0, 1), ylabel="share of rows",
           title="domain mix of each pick")
    ax.set_xticklabels(picks, rotation=30, ha="right")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    report.write_figure(path, fig)

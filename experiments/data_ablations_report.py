"""The data-ablations experiment's report (`experiments.data_ablations`): report.md from its
report.json numbers (`to_markdown`) and the proxy-vs-gold figure (`plot_proxy_vs_gold`)."""

from __future__ import annotations

import matplotlib
from matplotlib.figure import Figure

from jaxsel import report

POOLED = "pooled_over_mixture_eval_set_pairs"  # report.json's key of the pooled correlation.
# The numbers of a (mixture, eval set) pair, in the order of the per-pair table.
_PAIR_NUMBERS = ("gold_ppl", "proxy_ppl", "proxy_macro_ppl", "gold_bpb", "proxy_bpb",
                 "proxy_macro_bpb")


def _columns(confidence: float) -> list[str]:
    return ["Pearson", f"{confidence:.0%} CI", "Spearman", f"{confidence:.0%} CI"]


def _numbers(c: dict) -> tuple:
    fmt_ci = lambda ci: "n/a" if None in ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"  # noqa: E731
    return c["pearson"], fmt_ci(c["pearson_ci"]), c["spearman"], fmt_ci(c["spearman_ci"])


def per_eval_set_table(corr: dict, confidence: float) -> str:
    """The headline: a row per eval set of `correlations(...)["per_eval_set"]`."""
    rows = [(e, c["n"], *_numbers(c)) for e, c in corr["per_eval_set"].items()]
    return report.markdown_table(["eval set", "n (mixtures)", *_columns(confidence)], rows)


def to_markdown(result: dict) -> str:
    proxies = [("flat average", result["correlation"])]
    if result["correlation_macro"] is not None:
        proxies.append(("macro average", result["correlation_macro"]))
    cost = result["cost"]
    models = result["models"]
    model_rows = [("seed", "seed", models["seed"])]
    model_rows += [("partition", n, m) for n, m in models["partitions"].items()]
    model_rows += [("gold", n, m) for n, m in models["gold"].items()]
    seed_data = (f"the domains {', '.join(result['seed_domains'])}, none of them a partition's"
                 if result["seed_domains"] else "a seeded share of every domain (a shared seed)")
    boot = result["bootstrap"]
    parts = [
        "# Data ablations: merged partition models (proxy) vs. models trained on the mixture "
        "(gold)\n",
        f"{len(result['partitions'])} partitions, {len(result['mixtures'])} mixtures, "
        f"{len(result['pairs'])} (mixture, eval set) pairs. The seed model saw "
        f"{result['seed_sequences']} sequences: {seed_data}. Eval sets: the held-out domains' "
        f"eval rows ({_eval_subset(result['eval_per_domain'])}). Model pool: "
        f"`{result['model_pool']}`.\n",
        f"Grouped merge: {result['macro']}.\n",
        "## Proxy vs. gold perplexity across mixtures, per eval set\n",
        "For each eval set, the correlation across the mixtures of the proxy's perplexity (the "
        "flat average of the mixture's partition models) with the gold model's. "
        f"{boot['confidence']:.0%} CIs: percentile bootstrap over the mixtures "
        f"({boot['resamples']} resamples).\n",
        per_eval_set_table(result["correlation"], boot["confidence"]),
        "\n## Pooled over (mixture, eval set) pairs\n",
        "All (mixture, eval set) pairs in one correlation. The pairs of a mixture share its "
        "models, so the bootstrap draws mixtures, each with all its eval sets. Pooling mixes "
        "the spread of perplexity between eval sets into that between mixtures, so it is high "
        "whenever proxies rank the eval sets right; the per-eval-set table is the test.\n",
        report.markdown_table(["proxy", "n (pairs)", "mixtures", "eval sets",
                               *_columns(boot["confidence"])],
                              [(name, c[POOLED]["n"], c[POOLED]["mixtures"],
                                c[POOLED]["eval_sets"], *_numbers(c[POOLED]))
                               for name, c in proxies]),
    ]
    if result["correlation_macro"] is not None:
        parts += ["\n## Per eval set, macro proxy (average of group averages)\n",
                  per_eval_set_table(result["correlation_macro"], boot["confidence"])]
    parts += [
        "\n## Training-token cost\n",
        report.markdown_table(["approach", "tokens", "x modular"], [
            ("modular: one model per partition", cost["modular_tokens"], 1.0),
            ("one model per evaluated mixture", cost["per_mixture_tokens"], cost["ratio"]),
            ("one model per union of >= 2 partitions", cost["all_unions_tokens"],
             cost["all_unions_ratio"]),
            ("seed model (shared by both)", cost["seed_tokens"], "")]),
        "\n## Partitions\n",
        report.markdown_table(["partition", "group", "sequences"],
                              [(n, p["group"], p["sequences"])
                               for n, p in result["partitions"].items()]),
        "\n## Perplexity and bits per byte per (mixture, eval set)\n",
        f"{report.BITS_PER_BYTE}\n",
        report.markdown_table(["mixture", "eval set", "gold ppl", "proxy ppl",
                               "proxy (macro) ppl", "gold bits/byte", "proxy bits/byte",
                               "proxy (macro) bits/byte"],
                              [(r["mixture"], r["eval_set"],
                                *(report.or_dash(r.get(k)) for k in _PAIR_NUMBERS))
                               for r in result["pairs"]]),
        "\n## Data\n", report.splits_markdown(result["splits"]),
        "\n## Models\n",
        report.markdown_table(["role", "name", "key", "status", "steps", "final loss",
                               "held-out ppl", "held-out bits/byte"],
                              [(role, name, m["key"], m["status"], m["steps"], m["final_loss"],
                                m["heldout_ppl"], report.or_dash(m.get("heldout_bpb")))
                               for role, name, m in model_rows]),
        "\n![proxy vs gold](proxy_vs_gold.png)\n",
    ]
    return "\n".join(parts)


def _eval_subset(per_domain: int) -> str:
    return "all sequences" if per_domain == 0 else f"the first {per_domain} sequences of each"


def plot_proxy_vs_gold(result: dict, path: str) -> None:
    """Scatter of proxy against gold perplexity (log axes, one colour per eval set, circles for
    unions of 2 and triangles for 3) with the line y = x; written atomically."""
    pairs = result["pairs"]
    fig = Figure(figsize=(7.5, 5.5), layout="constrained")
    ax = fig.subplots()
    eval_sets = sorted({r["eval_set"] for r in pairs})
    sizes = sorted({r["size"] for r in pairs})
    colors = [matplotlib.colormaps["tab20"](i % 20) for i in range(len(eval_sets))]
    for eval_set, color in zip(eval_sets, colors, strict=True):
        for size, marker in zip(sizes, "o^sD", strict=False):
            rows = [r for r in pairs if r["eval_set"] == eval_set and r["size"] == size]
            if rows:
                ax.scatter([r["gold_ppl"] for r in rows], [r["proxy_ppl"] for r in rows],
                           color=color, marker=marker, s=22,
                           label=eval_set if size == sizes[0] else None)
    values = [r[k] for r in pairs for k in ("gold_ppl", "proxy_ppl")]
    low, high = min(values) / 1.1, max(values) * 1.1
    ax.plot([low, high], [low, high], color="gray", linestyle="--", linewidth=1, label="y = x")
    ax.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high),
           xlabel="gold perplexity (trained on the mixture)",
           ylabel="proxy perplexity (merged partition models)",
           title="Proxy vs. gold perplexity (o: 2 partitions, ^: 3)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    report.write_figure(path, fig)

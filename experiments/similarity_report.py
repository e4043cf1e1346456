"""The similarity-metrics experiment's report (`experiments.similarity_metrics`): report.md from
its report.json numbers (`to_markdown`) and the variance-reduction figure
(`plot_variance_reduction`)."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from jaxsel import report

RANDOM, DOMAINS = "random", "domain labels"  # The reference rows of the clustering table.
# The clustering metrics, as report.json names them and as the report shows them.
METRIC_TITLES = {"variance_reduction_pooled": "variance reduction (pooled)",
                 "variance_reduction_unweighted": "variance reduction (unweighted)",
                 "purity": "purity"}


def _fmt_ci(ci) -> str:
    return "n/a" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _models_markdown(models: dict) -> str:
    rows = []
    for role, m in models.items():
        held_out = m["eval"]["all"] if "eval" in m else "-"
        share = (f"{m['train_sequences']} ({m['share_fraction']:.0%} of the pool)"
                 if m["trained_here"] else "its own run's")
        rows.append((role.replace("_", " "), f"`{m['dir']}`", m["seed"], m["steps"], share,
                     held_out, report.heldout_bpb(m)))
    if "embedding_model" not in models:
        relation = "No LM embedding is measured, so no embedding model is used."
    elif models["embedding_model"]["dir"] == models["loss_model"]["dir"]:
        relation = ("The embeddings and the losses come from the **same** model: the LM "
                    "embeddings' rows are circular.")
    else:
        relation = ("The LM embeddings and the losses come from different runs (seeds "
                    f"{models['embedding_model']['seed']} and {models['loss_model']['seed']}"
                    + (", disjoint rows" if all(m["trained_here"] for m in models.values())
                       else "") + "), so the comparison is not circular.")
    return (f"Per-sequence losses: the loss model; `lm_token_mean` / `lm_output_mean`: the "
            f"embedding model. {relation}\n\n"
            + report.markdown_table(["model", "folder", "seed", "steps", "train sequences",
                                     "held-out perplexity", "held-out bits per byte"], rows))


def _clustering_markdown(result: dict) -> str:
    rows = [(r["embedding"], r["k"], *(x for name in METRIC_TITLES
                                       for x in (r[name], _fmt_ci(r[f"{name}_ci"]))),
             f"{r['sizes'][0]}-{r['sizes'][1]}") for r in result["clustering"]]
    expected = "; ".join(f"K={k}: pooled {v['pooled']:.4f}, unweighted {v['unweighted']:.4f}"
                         for k, v in result["random_expected_variance_reduction"].items())
    header = ["embedding", "K"]
    for title in METRIC_TITLES.values():
        header += [title, "95% interval"]
    return (
        "Variance reduction of the loss model's per-sequence loss (higher: the embedding groups "
        "sequences of similar loss), two forms: **pooled** = 1 - sum over clusters of the "
        "within-cluster sum of squares / total sum of squares (clusters weighted by size); "
        "**unweighted** = 1 - (plain mean over clusters of the per-cluster variances, ddof 0, "
        "a singleton's being 0) / total variance (every cluster counts once). Purity = share "
        "of sequences in their cluster's majority domain. `random`: equal-sized random "
        f"clusters (expected variance reduction {expected}); its intervals are the 95% range "
        "over random permutations of its labels (the null). Other intervals: 95% percentile "
        f"bootstrap over the sample's sequences (seed {result['resample_seed']}), clusters "
        "fixed (for variance reduction it runs high by about (K-1)/(N-1)). `domain labels`: "
        "the domains as clusters.\n\n"
        + report.markdown_table([*header, "cluster sizes"], rows))


def _selection_markdown(sel: dict) -> str:
    arms = list(sel["arms"])
    records = sel["arms"]
    threshold = sel["threshold"]
    epsilon = "none (no merge)" if threshold["epsilon"] is None else f"{threshold['epsilon']:.4f}"
    summary = [(a, records[a]["method"], records[a]["clusters_covered"]["threshold"],
                records[a]["clusters_covered"]["kmeans"], len(records[a]["domains"]),
                records[a]["eval"]["all"], report.heldout_bpb(records[a]),
                sel["perplexity_gain"].get(a, "-"))
               for a in arms]
    mix = sorted({d for a in arms for d in records[a]["domains"]})
    composition = [(d, *(records[a]["domains"].get(d, 0) for a in arms)) for d in mix]
    return (
        f"{sel['size']} of {sel['candidates']} candidates, `{sel['embedding']}` embeddings. "
        f"`diverse` (Sam et al. 2025): one representative (nearest its centroid) of each of "
        f"the {threshold['num_clusters']} clusters of an average-linkage threshold clustering "
        f"over the {threshold['neighbors']}-nearest-neighbour graph ({threshold['edges']} "
        f"edges) of cosine distances, epsilon = {epsilon} (set so that the number of clusters "
        f"meets the budget). `cluster_stratified` (a stratified sample, not the paper's "
        f"method): spread as evenly as possible over {sel['kmeans_clusters']} balanced k-means "
        f"clusters, uniform within each. `random`: uniform. A fresh LM is trained "
        f"{sel['steps']} steps on each and evaluated on the held-out `eval` rows.\n\n"
        + report.markdown_table(["arm", "method", "threshold clusters covered",
                                 "k-means clusters covered", "domains covered",
                                 "held-out perplexity (all)", "held-out bits per byte (all)",
                                 "perplexity gain over random"], summary)
        + "\n### Held-out perplexity and bits per byte per domain\n\n"
        + report.heldout_tables(records)
        + "\n### Selected sequences per domain\n\n"
        + report.markdown_table(["domain", *arms], composition)
        + "\n### Zero-shot tasks (higher is better)\n\n"
        + report.downstream_table({a: records[a]["downstream"] for a in arms}))


def to_markdown(result: dict) -> str:
    sample = result["sample"]
    return (
        "# Similarity metrics for data selection\n\n## Models\n\n"
        + _models_markdown(result["models"])
        + f"\nAnalysis sample: {sample['size']} other train sequences, mean loss "
        f"{sample['loss_mean']:.4f} (std {sample['loss_std']:.4f}).\n\n"
        "## Clusters of each embedding: variance reduction of the loss, domain purity\n\n"
        + _clustering_markdown(result)
        + "\n![variance reduction](variance_reduction.png)\n\n"
        "## Diversity-based selection vs cluster-stratified vs random\n\n"
        + _selection_markdown(result["selection"])
        + "\n## Data\n\n" + report.splits_markdown(result["splits"]))


def plot_variance_reduction(result: dict, path: str) -> None:
    """Both variance reductions and the purity per embedding and K (one panel each), with their
    95% intervals, the random baseline among the bars and the domain labels' value as a line;
    written atomically."""
    ks = result["num_clusters"]
    names = [RANDOM, *result["embeddings"]]
    by = {(r["embedding"], r["k"]): r for r in result["clustering"]}
    domains = next(r for r in result["clustering"] if r["embedding"] == DOMAINS)
    fig = Figure(figsize=(17, 4.5), layout="constrained")
    axes = fig.subplots(1, len(METRIC_TITLES))
    width = 0.8 / len(names)
    colors = [matplotlib.colormaps["tab10"](i % 10) for i in range(len(names))]
    for ax, (metric, title) in zip(axes, METRIC_TITLES.items(), strict=True):
        for i, (name, color) in enumerate(zip(names, colors, strict=True)):
            values = [by[name, k][metric] for k in ks]
            cis = [by[name, k][f"{metric}_ci"] for k in ks]
            errors = None if None in cis else np.abs(np.array(cis).T - np.array(values))
            ax.bar(np.arange(len(ks)) + (i - (len(names) - 1) / 2) * width, values, width,
                   yerr=errors, color=color, label=name, capsize=2)
        if metric != "purity":  # The domains' purity is 1 by definition.
            ax.axhline(domains[metric], color="gray", linestyle="--", linewidth=1,
                       label=f"domain labels (K={domains['k']})")
        ax.set(xticks=np.arange(len(ks)), xticklabels=[f"K={k}" for k in ks], ylabel=title,
               title=f"{title} by clusters")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    report.write_figure(path, fig)

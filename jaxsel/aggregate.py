"""Aggregates finished runs of one experiment that differ only in `seed`: mean, std and the
Student-t 95% interval of every number their reports share, and paired differences to a baseline.

An experiment run with several seeds (`--config.seeds=0,1,2`, `jaxsel.launch`) aggregates its
own; `python -m experiments.aggregate` aggregates runs made one by one. Each run must be
finished (`report.json`) and its `config.json` equal the others' in every key but `seed`. A
number is a report leaf, named by its dotted path (`arms.mates.target_eval_loss`); those present
in every report are aggregated (`stats.mean_interval`). With a baseline NAME, each number whose
path has a component that, replaced by NAME, names another number (`arms.mates.target_eval_loss`
-> `arms.random.target_eval_loss`) also gets the interval of its per-seed difference to it
(`... - random`): paired by seed, so the variation seeds share cancels.
"""

from __future__ import annotations

import os

from jaxsel import files, report, stats


def numbers(tree, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a JSON tree by dotted path (booleans and nulls are not numbers)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(numbers(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, int | float) and not isinstance(tree, bool):
        return {prefix.rstrip("."): float(tree)}
    return {}


def load_runs(workdirs: list[str]) -> list[dict]:
    """The reports of `workdirs`, after checking each is finished and all share one config but
    for `seed`."""
    if len(workdirs) < 2:
        raise ValueError(f"workdirs: aggregating needs at least 2 runs, got {len(workdirs)}")
    configs, reports = [], []
    for workdir in workdirs:
        for name in ("config.json", "report.json"):
            if not files.path(os.path.join(workdir, name)).exists():
                raise ValueError(f"workdirs: {workdir} has no {name} (not a finished run)")
        configs.append(report.read_json(os.path.join(workdir, "config.json")))
        reports.append(report.read_json(os.path.join(workdir, "report.json")))
    for workdir, config in zip(workdirs[1:], configs[1:], strict=True):
        differ = [k for k in report.config_diff(configs[0], config) if k != "seed"]
        if differ:
            raise ValueError(f"workdirs: {workdir} differs from {workdirs[0]} in "
                             f"{', '.join(differ)}, not only in seed")
    seeds = [c.get("seed") for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"workdirs: seeds {seeds} repeat; each run must have its own seed")
    return reports


def aggregate(reports: list[dict], baseline: str = "", match: tuple[str, ...] = ()) -> dict:
    """`{path: mean_interval}` over the runs for every number all reports hold (and, with
    `baseline`, `{path} - {baseline}`: the interval of per-run differences)."""
    per_run = [numbers(r) for r in reports]
    shared = [p for p in per_run[0] if all(p in run for run in per_run[1:])]
    if match:
        shared = [p for p in shared if any(m in p for m in match)]
    out = {p: stats.mean_interval([run[p] for run in per_run]) for p in shared}
    if baseline:
        for path in shared:
            parts = path.split(".")
            for i, part in enumerate(parts):
                other = ".".join(parts[:i] + [baseline] + parts[i + 1:])
                if part != baseline and other in per_run[0] and all(other in r for r in per_run):
                    out[f"{path} - {baseline}"] = stats.mean_interval(
                        [run[path] - run[other] for run in per_run])
    return out


def to_markdown(result: dict, workdirs: list[str]) -> str:
    def cell(x):
        return "-" if x is None else x

    rows = [(path, r["mean"], cell(r["std"]), cell(r["low"]), cell(r["high"]))
            for path, r in result.items()]
    return (f"# Aggregate of {len(workdirs)} runs\n\n" + ", ".join(workdirs) + "\n\n"
            "Mean over runs (one per seed), sample std, Student-t 95% interval of the mean; "
            "`- baseline` rows are paired per-run differences.\n\n"
            + report.markdown_table(["number", "mean", "std", "95% low", "95% high"], rows))

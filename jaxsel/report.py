"""What every experiment writes into its workdir: config.json, report.json, report.md, figures.

Files are written atomically (`files.atomic_path`), so a killed run never leaves half a result;
the workdir may be local or remote (`gs://`, through `etils.epath`).
A workdir belongs to one config: running again with the same config resumes, with another config
it stops and names the keys that differ, and a finished run (report.json present) is not redone.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from jaxsel import config as config_lib
from jaxsel import files

# What a table of bits per byte says they are.
BITS_PER_BYTE = ("Bits per byte = total nats / total UTF-8 bytes of the scored text / ln 2: unlike "
                 "perplexity (per token of the pool's tokenizer), comparable across tokenizers. "
                 "Lower is better.")


def quiet_library_logs() -> None:
    """Keeps orbax's per-save INFO chatter out of the run log (its warnings still show)."""

    def keep(record) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname

    logging.get_absl_handler().addFilter(keep)


def write_text(path: str, text: str) -> None:
    with files.atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_npz(path: str, **arrays) -> None:
    """Saves `arrays` at `path` (an .npz), creating its folder."""
    with files.atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def cached_npz(path: str, compute: Callable[[], dict]) -> dict[str, np.ndarray]:
    """The arrays saved at `path`, or those of `compute()`, saved there first by process 0: an
    artifact of a resumable run, computed once."""
    if files.path(path).exists():
        with files.path(path).open("rb") as f, np.load(f) as saved:
            return dict(saved)
    arrays = compute()
    if jax.process_index() == 0:
        write_npz(path, **arrays)
    return arrays


def cached_json(path: str, compute: Callable[[], dict]) -> dict:
    """The JSON object saved at `path`, or `compute()`'s, saved there by process 0: a finished
    step of a resumable run, e.g. a trained model's record."""
    if files.path(path).exists():
        return read_json(path)
    obj = compute()
    if jax.process_index() == 0:
        write_json(path, obj)
    return obj


def write_figure(path: str, figure) -> None:
    """Saves a matplotlib figure (its format from `path`'s suffix) at 120 dpi."""
    with files.atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)


def read_json(path: str):
    return json.loads(files.path(path).read_text())


def read_jsonl(path: str) -> list:
    return [json.loads(line) for line in files.path(path).read_text().splitlines()
            if line.strip()]


def open_workdir(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
    """Claims `workdir` for `config`; returns the finished report if the run is already done.

    A ConfigError names `--workdir` if it is a file, or holds a run of another config (naming
    the differing keys).
    """
    folder = files.path(workdir)
    if folder.exists() and not folder.is_dir():
        raise config_lib.ConfigError(f"--workdir {workdir} is a file, not a folder; name a "
                                     "folder (it is created if missing)")
    folder.mkdir(parents=True, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    if files.path(path).exists():
        previous = read_json(path)
        diff = sorted(config_diff(previous, resolved))
        if diff:
            raise config_lib.ConfigError(
                f"--workdir {workdir} holds a run with another config (keys differ: "
                f"{', '.join(diff)}); use a new --workdir")
    else:
        write_json(path, resolved)
    report = os.path.join(workdir, "report.json")
    return read_json(report) if files.path(report).exists() else None


def config_diff(a, b, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two JSON trees (e.g. two config.json)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += config_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def finish(workdir: str, report: dict, markdown: str) -> None:
    """Writes report.md, then report.json last: its presence marks the run as finished."""
    write_text(os.path.join(workdir, "report.md"), markdown)
    write_json(os.path.join(workdir, "report.json"), report)


def downstream_table(by_model: dict[str, dict]) -> str:
    """One markdown table of `downstream` results (`jaxsel.downstream.run`): a row per task, a
    column per model (e.g. per arm)."""
    first = next(iter(by_model.values()))
    rows = [(f"average {kind}", *(r["average"].get(kind, float("nan")) for r in by_model.values()))
            for kind in first["average"]]
    for name, numbers in first["tasks"].items():
        field = "accuracy" if name.startswith("cloze/") else "acc"
        rows.append((f"{name} ({numbers['items']} items)",
                     *(r["tasks"][name][field] for r in by_model.values())))
    skipped = "".join(f"\n- {name}: {why}" for name, why in first["skipped"].items())
    return (markdown_table(["task (accuracy)", *by_model], rows)
            + (f"\nLeft out:{skipped}\n" if skipped else ""))


def heldout_tables(by_model: dict[str, dict]) -> str:
    """Held-out perplexity and bits per byte per domain (rows, those of the first model) of each
    model (columns), as two markdown tables: `by_model` maps a column name to a record of
    `runs.evaluate_model` (its `eval` and `eval_bpb`)."""
    domains = list(next(iter(by_model.values()))["eval"])

    def table(key: str) -> str:
        return markdown_table(["domain", *by_model], [
            (d, *(or_dash(r.get(key, {}).get(d)) for r in by_model.values())) for d in domains])

    return ("Perplexity (per token; lower is better):\n\n" + table("eval")
            + f"\n{BITS_PER_BYTE}\n\n" + table("eval_bpb"))


def heldout_bpb(record: dict, domain: str = "all") -> float | str:
    """The held-out bits per byte of `domain` in a `runs.evaluate_model` record, "-" where it has
    none (its tokenizer is not byte-level, or it was saved before bits per byte were)."""
    return or_dash(record.get("eval_bpb", {}).get(domain))


def or_dash(x):
    """`x`, or "-" (a table's empty cell) if it is None."""
    return "-" if x is None else x


def splits_markdown(splits: dict) -> str:
    """The data a run used (`jaxsel.roles.splits`): documents and rows per part and domain, and
    the documents found in two parts (must be 0)."""
    parts = ["train", "target", "target_eval", "eval"]
    domains = sorted({d for p in parts for d in splits[p]["domains"]})
    rows = [(d, *(_count(splits[p]["domains"].get(d)) for p in parts)) for d in domains]
    rows.append(("all", *(_count(splits[p]) for p in parts)))
    target = splits["target_domain"] or "none (every held-out row is eval)"
    items = ", ".join(f"{k} {v}" for k, v in splits.get("items", {}).items())
    return (f"Target domain: {target}. Documents / rows per part; a document is in one part "
            f"only (overlap: {splits['overlap_documents']} documents)."
            + (f" Cloze items: {items}." if items else "") + "\n\n"
            + markdown_table(["domain", *parts], rows))


def _count(part: dict | None) -> str:
    return "-" if part is None else f"{part['documents']} / {part['rows']}"


"""Python configs, big_vision style.

An experiment config file defines `get_config(arg=None)`. `arg` is a preset name optionally followed
by `key=value` options, e.g. `tiny` or `tiny,steps=50`. On the command line:

    python -m experiments.pretrain --config=experiments/configs/pretrain.py:tiny \
        --workdir=DIR --config.train.steps=200

Unknown keys and wrong types are refused by `ml_collections.config_flags` (the config is locked);
impossible values are refused by `validate`, which names the key. Both happen before any work.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from ml_collections.config_flags import tuple_parser

from jaxsel import files
from jaxsel.model import attention
from jaxsel.model.transformer import REMAT_POLICIES

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Runs every experiment on the embedded corpus on 2 CPU cores in minutes.
    # XLA:CPU's fast paths: row-major weight gradients (`jaxsel.model.cpu_matmul`), unrolled layers.
    "tiny": dict(d_model=128, num_layers=2, num_heads=4, mlp_dim=512, vocab_size=2048,
                 max_seq_len=256, matmul="row_major", scan_unroll=0),
    # Pythia-160M / 410M / 1B shapes (as in MATES); GELU MLP, untied embeddings like Pythia.
    # Mixed precision on accelerators: bfloat16 compute, float32 params and optimizer state;
    # the loss takes the logits to float32 inside its softmax (`jaxsel.loss.cross_entropy`).
    # Blocks keep their matmul outputs for the backward pass and recompute the rest (the fastest
    # on an H200).
    "small": dict(d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, vocab_size=50304,
                  max_seq_len=2048, mlp="gelu", tie_embeddings=False, dtype="bfloat16",
                  remat="dots_saveable"),
    "410m": dict(d_model=1024, num_layers=24, num_heads=16, mlp_dim=4096, vocab_size=50304,
                 max_seq_len=2048, mlp="gelu", tie_embeddings=False, dtype="bfloat16",
                 remat="dots_saveable"),
    "1b": dict(d_model=2048, num_layers=16, num_heads=8, mlp_dim=8192, vocab_size=50304,
               max_seq_len=2048, mlp="gelu", tie_embeddings=False, dtype="bfloat16",
               remat="dots_saveable"),
}

PRESET_SCALE: dict[str, dict[str, Any]] = {
    "tiny": dict(seq_len=128, batch_size=16, steps=300, lr=3e-3, warmup_steps=30,
                 eval_per_domain=64, max_docs=300, downstream_items=24, target_items=32, item_len=0,
                 heldout_fraction=0.1),
    # 1024 target items from `small` up, as MATES' LAMBADA reference set.
    "small": dict(seq_len=1024, batch_size=256, steps=20_000, lr=6e-4, warmup_steps=1000,
                  eval_per_domain=0, max_docs=0, downstream_items=1000, target_items=1024,
                  item_len=128, heldout_fraction=0.05),
    "410m": dict(seq_len=1024, batch_size=512, steps=50_000, lr=3e-4, warmup_steps=2000,
                 eval_per_domain=0, max_docs=0, downstream_items=1000, target_items=1024,
                 item_len=128, heldout_fraction=0.05),
    "1b": dict(seq_len=1024, batch_size=512, steps=100_000, lr=2e-4, warmup_steps=2000,
               eval_per_domain=0, max_docs=0, downstream_items=1000, target_items=1024,
               item_len=128, heldout_fraction=0.05),
}

SOURCES = ("jsonl", "parquet", "text", "tfds", "local", "synthetic")

# Logical axis name -> mesh axes. Parameters are FSDP-sharded on their largest axis and
# tensor-sharded on the head / MLP axis; activations are sharded on batch.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)


def stream_seed(seed: int, *streams: int) -> int:
    """A seed of its own (a 31-bit int) for each random stream (and index) of `config.seed`, for
    functions that take one int seed: `stream_seed(config.seed, PROBES, stage)`."""
    return int(np.random.SeedSequence([seed, *streams]).generate_state(1)[0] >> 1)


def check_names(names, choices, key: str, allow_empty: bool = False) -> tuple[str, ...]:
    """`names` (a config tuple) as a tuple of distinct names from `choices`; otherwise a
    ConfigError naming `key`. On the command line a tuple of strings is written as a Python
    literal, `--config.compare.selectors="('random', 'mates')"`, or by repeating the flag."""
    names = check_tuple(names, str, key)
    hint = (f"; on the command line write a tuple of strings, --config.{key}=\"('a', 'b')\", "
            "or repeat the flag")
    check(allow_empty or bool(names), key, f"names nothing; choose from {', '.join(choices)}")
    for name in names:
        check(name in choices, key, f"{name!r} is not one of {', '.join(choices)}"
              + (hint if "," in name else ""))
    check(len(set(names)) == len(names), key, f"{names} names one twice")
    return names


def check_tuple(values, kind: type, key: str) -> tuple:
    """`values` checked to be a tuple (or list) of `kind`; a ConfigError naming `key` if not."""
    check(isinstance(values, tuple | list) and all(isinstance(v, kind) for v in values), key,
          f"must be a tuple of {kind.__name__}, got {values!r}")
    return tuple(values)


def parse_arg(arg: str | None, default_preset: str = "tiny") -> tuple[str, dict[str, str]]:
    """`"tiny,steps=50"` -> `("tiny", {"steps": "50"})`."""
    parts = [p for p in (arg or "").split(",") if p]
    preset = default_preset
    options: dict[str, str] = {}
    for part in parts:
        if "=" in part:
            key, value = part.split("=", 1)
            options[key.strip()] = value.strip()
        else:
            preset = part.strip()
    if preset not in MODEL_PRESETS:
        raise ValueError(f"config arg: unknown preset {preset!r}; choose one of "
                         f"{sorted(MODEL_PRESETS)}")
    return preset, options


def base_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """The sections every experiment shares: data, model, mesh, optim, train."""
    scale = PRESET_SCALE[preset]
    c = ml_collections.ConfigDict()
    c.seed = 0
    # The content-keyed model pool (`jaxsel.runs.model`): every model an experiment trains is a
    # folder there, named by what it was trained from and how, so another run or experiment that
    # needs it finds it. Empty: `<workdir>/models`; name one folder to share it across runs.
    c.model_pool = ""
    # Several seeds in one command: one run per seed in `<workdir>/seed_<s>`, then their
    # aggregate (mean, 95% interval, paired differences to `random`) in the workdir.
    c.seeds = ()
    c.preset = preset
    c.init_from = ""  # Workdir of another run whose params start this one (fresh optimizer).
    # Workdir of another run whose latest params, optimizer state and step this one continues
    # (staged training: the schedule goes on; the data iterator is this run's own).
    c.continue_from = ""

    c.data = ml_collections.ConfigDict()
    c.data.source = "local"  # One of SOURCES.
    c.data.paths = ()  # jsonl / parquet: a tuple of files or globs; text: (the folder,).
    c.data.text_field = "text"
    c.data.domain_field = ""  # jsonl: field naming the domain; empty -> one domain.
    c.data.tfds_name = ""  # e.g. "wikipedia/20230601.en".
    c.data.tfds_split = "train"
    c.data.tfds_data_dir = ""
    c.data.max_docs = scale["max_docs"]  # Per domain; 0 = all.
    # tiny: 0.1, so the local corpus' small domains hold out documents for every role.
    c.data.heldout_fraction = scale["heldout_fraction"]
    # Held-out documents are dealt into this many groups, each packed on its own; the held-out
    # roles (`roles`) are unions of groups, so they never share a document.
    c.data.heldout_groups = 20
    c.data.seq_len = scale["seq_len"]
    # concat: documents back to back (no padding; a row may hold parts of several documents);
    # document: each document starts a row (its last row is padded), so a row holds one
    # document unless the document is longer than a row, as document-level methods
    # (near-duplicate removal) assume.
    c.data.packing = "concat"
    c.data.tokenizer = ""  # Path to a tokenizer.json; empty -> train a BPE on the train split.
    c.data.cache_dir = ""  # Empty -> $JAXSEL_CACHE or ~/.cache/jaxsel.
    c.data.synthetic_docs_per_domain = 200

    c.model = ml_collections.ConfigDict(dict(
        d_model=128, num_layers=2, num_heads=4, mlp_dim=512, vocab_size=2048, max_seq_len=256,
        mlp="gated", tie_embeddings=True, rope_theta=10_000.0, param_dtype="float32",
        dtype="float32", remat="none", attention="auto", max_segments=16, scan_unroll=1,
        matmul="xla"))
    c.model.update(MODEL_PRESETS[preset])

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all the rest.
    c.sharding_rules = DEFAULT_RULES

    c.optim = ml_collections.ConfigDict(dict(
        schedule="cosine", lr=scale["lr"], warmup_steps=scale["warmup_steps"],
        decay_steps=0,  # wsd: the last decay_steps of train.steps decay linearly to min_lr.
        min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip=1.0))

    c.train = ml_collections.ConfigDict(dict(
        steps=scale["steps"], batch_size=scale["batch_size"], log_every=10,
        checkpoint_every=100, keep_checkpoints=2, eval_every=0,
        stop_at=0,  # Stop after this step (0: train.steps); the schedule spans train.steps.
        profile_steps=(),  # (A, B): a jax.profiler trace of steps A..B in <workdir>/profile.
        eval_per_domain=scale["eval_per_domain"]))  # Held-out sequences per domain; 0 = all.

    # The held-out roles (`jaxsel.roles`): `target_domain` ("": none, every held-out row is
    # eval) is split by documents into `target` (what target-aware selectors may see; the
    # first `target_items` of its rows are the cloze items they aim at), `target_eval`
    # (`target_eval_items` cloze items that rank the arms out of sample) and `eval` (perplexity
    # and the zero-shot suite, with every row of the other domains), by `seed`. A cloze item is
    # the `item_len` tokens that end with its row's last word (0: the whole row; from `small`
    # up 128, about a LAMBADA passage, so that probing each candidate on 1024 items stays cheap).
    c.roles = ml_collections.ConfigDict(dict(
        target_domain="", target_fraction=0.4, target_eval_fraction=0.3, seed=0,
        target_items=scale["target_items"], target_eval_items=scale["target_items"],
        item_len=scale["item_len"]))

    # The zero-shot tasks every trained model is evaluated on (`jaxsel.downstream`): per held-out
    # domain (`domains`: a tuple of names; empty = all), on its `eval` rows, `num_items` cloze
    # items and a continuation task with `choices` choices of `continuation_len` tokens after
    # `context_len` (by default a quarter and an eighth of data.seq_len, following it); `files`:
    # a tuple of jsonl files of multiple-choice items. `num_items=0` turns the domain tasks off.
    c.downstream = ml_collections.ConfigDict(dict(
        domains=(), num_items=scale["downstream_items"], choices=4, files=(), batch_size=64))
    c.downstream.context_len = c.data.get_ref("seq_len") // 4
    c.downstream.continuation_len = c.data.get_ref("seq_len") // 8
    return c


def apply_options(config: ml_collections.ConfigDict, options: dict[str, str]) -> None:
    """Applies `key=value` options from the config arg; a short key matches a unique leaf."""
    leaves = _leaf_paths(config)
    for key, raw in options.items():
        matches = [p for p in leaves if p == key or p.endswith("." + key)]
        if len(matches) != 1:
            raise ValueError(f"config arg option {key!r}: matches {matches or 'no key'}; "
                             f"use a full dotted key")
        *parents, leaf = matches[0].split(".")
        node = config
        for p in parents:
            node = node[p]
        old = node[leaf]
        if isinstance(old, tuple):  # One element (the arg's commas separate options).
            node[leaf] = tuple_parser.TupleParser().parse(raw)
        else:
            node[leaf] = type(old)(raw) if not isinstance(old, bool) else raw.lower() in (
                "1", "true")


def _leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in config.items():
        path = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            out += _leaf_paths(v, path + ".")
        else:
            out.append(path)
    return out


class ConfigError(ValueError):
    """A config value (or flag) that cannot work; the message names the key. An experiment's
    command line reports it in one line, without a traceback (`jaxsel.launch.main`)."""


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key}: {message}")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves `mesh.data == -1` to the devices left over, and checks the product."""
    shape = {k: int(config.mesh[k]) for k in ("data", "fsdp", "tensor")}
    for k, v in shape.items():
        check(v == -1 or v >= 1, f"mesh.{k}", f"must be >= 1 or -1, got {v}")
    check(shape["fsdp"] != -1 and shape["tensor"] != -1, "mesh",
           "only mesh.data may be -1")
    if shape["data"] == -1:
        rest = shape["fsdp"] * shape["tensor"]
        check(num_devices % rest == 0, "mesh",
               f"fsdp*tensor={rest} does not divide the {num_devices} devices")
        shape["data"] = num_devices // rest
    total = shape["data"] * shape["fsdp"] * shape["tensor"]
    check(total == num_devices, "mesh",
           f"data*fsdp*tensor={total} but there are {num_devices} devices")
    return shape


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Refuses impossible values before any work; every message names the key."""
    m, t, o, d = config.model, config.train, config.optim, config.data
    check(not (config.init_from and config.continue_from), "continue_from",
          "set init_from (params, fresh optimizer) or continue_from (the whole state), not both")
    check(d.source in SOURCES, "data.source", f"{d.source!r} is not one of {', '.join(SOURCES)}")
    check_tuple(d.paths, str, "data.paths")
    check(d.source not in ("jsonl", "parquet", "text") or bool(d.paths), "data.paths",
           f"required for data.source={d.source!r}")
    check(d.source != "tfds" or bool(d.tfds_name), "data.tfds_name",
           "required for data.source='tfds'")
    check(0.0 < d.heldout_fraction < 1.0, "data.heldout_fraction",
           f"must be in (0, 1), got {d.heldout_fraction}")
    check(d.heldout_groups >= 3, "data.heldout_groups",
          f"must be >= 3 (one group per held-out role at least), got {d.heldout_groups}")
    check(d.seq_len >= 2, "data.seq_len", f"must be >= 2, got {d.seq_len}")
    check(d.packing in ("concat", "document"), "data.packing",
          f"{d.packing!r} is not one of concat, document")
    check(d.seq_len <= m.max_seq_len, "data.seq_len",
           f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    for key in ("d_model", "num_layers", "num_heads", "mlp_dim", "vocab_size"):
        check(m[key] >= 1, f"model.{key}", f"must be >= 1, got {m[key]}")
    check(m.d_model % m.num_heads == 0, "model.num_heads",
           f"{m.num_heads} does not divide model.d_model={m.d_model}")
    check((m.d_model // m.num_heads) % 2 == 0, "model.num_heads",
           "head dimension must be even for RoPE")
    check(m.mlp in ("gated", "gelu"), "model.mlp", f"{m.mlp!r} is not one of gated, gelu")
    check(m.max_segments >= 1, "model.max_segments", f"must be >= 1, got {m.max_segments}")
    check(m.scan_unroll >= 0, "model.scan_unroll", f"must be >= 0, got {m.scan_unroll}")
    check(m.remat in REMAT_POLICIES, "model.remat",
          f"{m.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    try:
        attention.resolve(m.attention, jax.default_backend(), m.dtype, m.d_model // m.num_heads,
                          d.seq_len)
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    check(m.matmul in ("xla", "row_major"), "model.matmul",
          f"{m.matmul!r} is not one of xla, row_major")
    for key in ("param_dtype", "dtype"):
        check(m[key] in ("float32", "bfloat16", "float16"), f"model.{key}",
               f"{m[key]!r} is not one of float32, bfloat16, float16")
    check(o.schedule in ("cosine", "wsd", "constant"), "optim.schedule",
           f"{o.schedule!r} is not one of cosine, wsd, constant")
    check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    check(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must be in [0, 1]")
    check(o.clip >= 0, "optim.clip", f"must be >= 0 (0 disables), got {o.clip}")
    check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    check(0 <= o.decay_steps <= t.steps, "optim.decay_steps",
          f"must be in [0, train.steps={t.steps}], got {o.decay_steps}")
    check(o.schedule != "wsd" or o.decay_steps >= 1, "optim.decay_steps",
          "must be >= 1 with optim.schedule='wsd' (its decay phase)")
    check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    check(0 <= t.stop_at <= t.steps, "train.stop_at",
          f"must be in [0, train.steps={t.steps}] (0: train.steps), got {t.stop_at}")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        check(t[key] >= 1, f"train.{key}", f"must be >= 1, got {t[key]}")
    check(t.eval_per_domain >= 0, "train.eval_per_domain", "must be >= 0 (0: all)")
    check(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: only at the end)")
    check(not t.profile_steps or (len(t.profile_steps) == 2
                                  and 1 <= t.profile_steps[0] <= t.profile_steps[1] <= t.steps),
          "train.profile_steps", f"must be () or (first, last) with 1 <= first <= last <= "
          f"train.steps={t.steps}, got {t.profile_steps}")
    _validate_roles(config.roles)
    _validate_downstream(config)
    shape = mesh_shape(config, num_devices)
    batch_shards = shape["data"] * shape["fsdp"]
    check(t.batch_size % batch_shards == 0, "train.batch_size",
           f"{t.batch_size} is not divisible by the batch-parallel size "
           f"mesh.data*mesh.fsdp={batch_shards}")
    check(m.num_heads % shape["tensor"] == 0, "mesh.tensor",
           f"{shape['tensor']} does not divide model.num_heads={m.num_heads}")


def _validate_roles(r: ml_collections.ConfigDict) -> None:
    for key in ("target_fraction", "target_eval_fraction"):
        check(0.0 < r[key] < 1.0, f"roles.{key}", f"must be in (0, 1), got {r[key]}")
    check(r.target_fraction + r.target_eval_fraction < 1.0, "roles.target_eval_fraction",
          f"roles.target_fraction + roles.target_eval_fraction = "
          f"{r.target_fraction + r.target_eval_fraction} leaves no eval documents; keep it < 1")
    for key in ("target_items", "target_eval_items"):
        check(r[key] >= 1, f"roles.{key}", f"must be >= 1, got {r[key]}")
    check(r.item_len == 0 or r.item_len >= 2, "roles.item_len",
          f"must be 0 (whole rows) or >= 2, got {r.item_len}")


def require_target(config: ml_collections.ConfigDict) -> None:
    """Refuses a run that aims at a target without naming its domain."""
    check(bool(config.roles.target_domain), "roles.target_domain",
          "names no domain; this experiment aims at a target: name a held-out domain (e.g. "
          "'reference' on the local corpus)")


def _validate_downstream(config: ml_collections.ConfigDict) -> None:
    d = config.downstream
    check(d.num_items >= 0, "downstream.num_items", f"must be >= 0, got {d.num_items}")
    check(d.choices >= 2, "downstream.choices", f"must be >= 2, got {d.choices}")
    check(d.num_items == 0 or d.num_items >= d.choices, "downstream.num_items",
          f"{d.num_items} is fewer than downstream.choices={d.choices} (distractors are other "
          "items' continuations); 0 turns the domain tasks off")
    for key in ("context_len", "continuation_len", "batch_size"):
        check(d[key] >= 1, f"downstream.{key}", f"must be >= 1, got {d[key]}")
    width = d.context_len + d.continuation_len
    check(width <= config.data.seq_len, "downstream.context_len",
          f"context_len + continuation_len = {width} exceeds data.seq_len={config.data.seq_len}")
    for path in check_tuple(d.files, str, "downstream.files"):
        check(files.path(path).is_file(), "downstream.files", f"{path} is not a file")
    check_tuple(d.domains, str, "downstream.domains")

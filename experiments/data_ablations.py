"""Data ablations by modular training and merging (Na et al., EMNLP 2024).

The perplexity of a parameter average of models, each continued-pretrained from one seed model on
one partition of a mixture, tracks the perplexity of a model continued-pretrained on the whole
mixture. So the data ablations of K partitions cost K trainings, not one per mixture. This
experiment measures how well that holds:

1. a seed model is pretrained on data of its own: the train-pool domains
   `ablation.seed_domains`, disjoint from the partitions' (as the paper's seed corpus is
   separate from the partitions), or, with `seed_domains` empty, a seeded share
   (`ablation.seed_fraction`) of every domain (a shared seed);
2. the partitions' domains (`ablation.domains`) are cut into equal partitions
   (`ablation.partitions`: domains or random splits), from the rows the seed did not see;
3. the seed is continued-pretrained on each partition (constant learning rate at
   `cpt_lr_ratio` x the seed's peak, no warmup, a fresh optimizer);
4. gold models are continued-pretrained the same way on unions of 2 and of 3 partitions, for the
   summed token count (m x `partition_steps` steps on a union of m);
5. each mixture's proxy is the average of its partition models (`merge.average_stream`, two models
   in memory), and, where a mixture holds several partitions of one group (`domains:K`), also the
   "macro" average of group averages (`merge.average_grouped`);
6. gold and proxy perplexities (and bits per byte, reported beside them) on every held-out
   domain (eval set, on its `eval` rows) and the headline: for each eval set, the Pearson and
   Spearman correlations of proxy and gold perplexity across the mixtures (n = mixtures), with
   percentile bootstrap 95% intervals over the mixtures; then the correlation pooled over
   (mixture, eval set) pairs, whose bootstrap draws mixtures, each with all its eval sets (the
   pairs of one mixture share its models, so they are not independent); and the
   training-token cost of both approaches.

Every model is a model of the model pool (`runs.model`: a folder named by a key that hashes
what and how it was trained; `config.model_pool`, default `<workdir>/models`); a finished one is
reused, one cut short resumes from its checkpoints. The pool may be shared by experiments run one
after another (not at the same time: two runs training the same model would write the same
folder). Writes config.json, report.json, report.md, proxy_vs_gold.png and each model's
evaluation (`evaluations/<key>/`) into --workdir.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import jax
import ml_collections
import numpy as np
from absl import app, logging

from experiments import data_ablations_report as report_lib
from jaxsel import checkpoint, evaluate, launch, merge, runs, stats, train
from jaxsel import config as config_lib

MIXTURE_SIZES = (2, 3)
MACRO_EQUALS_MICRO = ("macro == micro: in every mixture each group (e.g. each domain) holds as "
                      "many partitions, so the average of group averages is the flat average and "
                      "proxy_macro_ppl equals proxy_ppl")
SEED_OTHERS = "others"  # ablation.seed_domains: the train-pool domains not in ablation.domains.
POOLED = report_lib.POOLED
CONFIDENCE = 0.95  # Of every correlation's bootstrap interval.
# Separate random streams of config.seed.
_SEED_SPLIT, _PARTITIONS, _MIXTURES = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Partition:
    """A share of the train pool: `ids` (sorted row ids) and the `group` it is merged within."""

    name: str
    group: str
    ids: np.ndarray


# ------------------------------------------------------------------------------------------------
# Config.


def parse_partitions(spec: str) -> tuple[str, int]:
    """`"domains"` -> ("domains", 1); `"domains:K"` -> ("domains", K); `"split:K"` -> ("split", K).
    """
    kind, colon, count = spec.partition(":")
    well_formed = (spec == "domains" or kind in ("domains", "split") and colon
                   and count.isdigit() and int(count) >= 1)
    config_lib.check(well_formed, "ablation.partitions",
                      f"{spec!r} is not one of domains, domains:K, split:K (K >= 1)")
    return kind, int(count) if colon else 1


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """`config_lib.validate` and the ablation section; every message names the key."""
    config_lib.validate(config, num_devices)
    a, check = config.ablation, config_lib.check
    check(0.0 < a.seed_fraction < 1.0, "ablation.seed_fraction",
          f"must be in (0, 1), got {a.seed_fraction}")
    kind, count = parse_partitions(a.partitions)
    check(kind != "split" or count >= 3, "ablation.partitions",
          f"split:{count} gives no union of 3 partitions; use K >= 3")
    for key in ("seed_steps", "partition_steps", "eval_batch_size", "bootstrap"):
        check(a[key] >= 1, f"ablation.{key}", f"must be >= 1, got {a[key]}")
    check(a.cpt_lr_ratio > 0, "ablation.cpt_lr_ratio", f"must be > 0, got {a.cpt_lr_ratio}")
    check(a.max_mixtures >= 0, "ablation.max_mixtures",
          f"must be >= 0 (0: all mixtures), got {a.max_mixtures}")
    check(a.eval_batch_size % jax.process_count() == 0, "ablation.eval_batch_size",
          f"{a.eval_batch_size} is not divisible by the {jax.process_count()} processes")
    seed_names = list(config_lib.check_tuple(a.seed_domains, str, "ablation.seed_domains"))
    names = list(config_lib.check_tuple(a.domains, str, "ablation.domains"))
    if seed_names == [SEED_OTHERS]:
        check(bool(names), "ablation.domains",
              f"names no domain, so ablation.seed_domains={SEED_OTHERS!r} (the domains not in "
              "ablation.domains) leaves the seed model none; name the partitions' domains, or "
              "set ablation.seed_domains=() for a seed trained on a share of every domain")
    check(SEED_OTHERS not in seed_names or len(seed_names) == 1, "ablation.seed_domains",
          f"{SEED_OTHERS!r} stands alone (the domains not in ablation.domains), got "
          f"{tuple(a.seed_domains)}")
    overlap = [d for d in seed_names if d in names]
    check(not overlap, "ablation.seed_domains",
          f"{overlap} are in ablation.domains too; the seed model's domains and the "
          "partitions' must be disjoint")


def model_config(config: ml_collections.ConfigDict, steps: int,
                 parent_dir: str = "") -> ml_collections.ConfigDict:
    """The training config of one model: `steps` steps; with `parent_dir`, continued pretraining
    from that model's params at a constant `cpt_lr_ratio` x `optim.lr` without warmup."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train.steps = steps
    if parent_dir:
        c.init_from = parent_dir
        c.optim.schedule = "constant"
        c.optim.lr = config.ablation.cpt_lr_ratio * config.optim.lr
        c.optim.warmup_steps = 0
    return c


# ------------------------------------------------------------------------------------------------
# Data: the seed split, the partitions and the mixtures.


def domain_roles(a: ml_collections.ConfigDict,
                 domain_names: list[str]) -> tuple[list[str], list[str]]:
    """(the seed model's domains, the partitions' domains) of the train pool's `domain_names`
    under the ablation section `a`: the seed's are `a.seed_domains` ([]: a shared seed; `others`:
    those not in `a.domains`), the partitions' are `a.domains` (empty: all but the seed's)."""
    seed_names = list(config_lib.check_tuple(a.seed_domains, str, "ablation.seed_domains"))
    names = list(config_lib.check_tuple(a.domains, str, "ablation.domains"))
    if seed_names == [SEED_OTHERS]:
        seed_names = [d for d in domain_names if d not in names]
        config_lib.check(bool(seed_names), "ablation.seed_domains",
                         f"{SEED_OTHERS!r}: ablation.domains names every domain of the train "
                         f"pool {domain_names}, so the seed model has none")
    names = names or [d for d in domain_names if d not in seed_names]
    for key, chosen in (("ablation.seed_domains", seed_names), ("ablation.domains", names)):
        for d in chosen:
            config_lib.check(d in domain_names, key, f"{d!r} is not a domain of the train pool; "
                             f"domains: {domain_names}")
    config_lib.check(bool(names), "ablation.seed_domains",
                     f"{seed_names} are all the domains of the train pool; the partitions "
                     "have none")
    return seed_names, names


def seed_rows(domains_N: np.ndarray, domain_names: list[str], seed_names: list[str],
              fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the seed model's row ids, the rest), both sorted: every row of the domains `seed_names`
    or, with none, a seeded random `fraction` of all rows (`seed_split`)."""
    if not seed_names:
        return seed_split(len(domains_N), fraction, seed)
    in_seed_N = np.isin(domains_N, [domain_names.index(d) for d in seed_names])
    config_lib.check(bool(in_seed_N.any()), "ablation.seed_domains",
                     f"{seed_names} have no rows in the train pool")
    return np.flatnonzero(in_seed_N), np.flatnonzero(~in_seed_N)


def seed_split(num_rows: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(seed ids, the rest): a seeded random `fraction` of `range(num_rows)`, both sorted."""
    order = np.random.default_rng([seed, _SEED_SPLIT]).permutation(num_rows)
    cut = int(round(fraction * num_rows))
    if cut == 0 or cut == num_rows:
        raise config_lib.ConfigError(
            f"config.ablation.seed_fraction: {fraction} of {num_rows} train rows leaves the seed "
            f"model or the partitions no data")
    return np.sort(order[:cut]), np.sort(order[cut:])


def make_partitions(domains_N: np.ndarray, domain_names: list[str], rest_ids: np.ndarray,
                    spec: str, names: list[str], seed: int) -> list[Partition]:
    """Equal partitions of the rows of domains `names` among `rest_ids` (rows of the train pool,
    whose domain indices are `domains_N`).

    `domains`: one per domain, each a seeded random subset of the size of the smallest domain;
    `domains:K`: those cut into K equal parts, grouped by domain; `split:K`: all rows in K equal
    random parts, each its own group.
    """
    kind, count = parse_partitions(spec)
    rng = np.random.default_rng([seed, _PARTITIONS])
    by_domain = {d: rest_ids[domains_N[rest_ids] == domain_names.index(d)] for d in names}
    if kind == "split":
        shuffled = rng.permutation(np.concatenate(list(by_domain.values())))
        size = len(shuffled) // count
        parts = [(f"split{k}", f"split{k}", shuffled[k * size:(k + 1) * size])
                 for k in range(count)]
    else:
        size = min(len(ids) for ids in by_domain.values()) // count * count
        parts = []
        for domain, ids in by_domain.items():
            chosen = rng.permutation(ids)[:size].reshape(count, -1)
            parts += [(domain if count == 1 else f"{domain}-{k}", domain, chosen[k])
                      for k in range(count)]
    partitions = [Partition(name, group, np.sort(ids)) for name, group, ids in parts]
    if len(partitions) < max(MIXTURE_SIZES):
        raise config_lib.ConfigError(
            f"config.ablation.partitions: {spec!r} over domains {names} gives "
            f"{len(partitions)} partitions; unions of {max(MIXTURE_SIZES)} need at least that many")
    smallest = min(partitions, key=lambda p: len(p.ids))
    if len(smallest.ids) == 0:
        raise config_lib.ConfigError(
            f"config.ablation.partitions: partition {smallest.name!r} is empty ({spec!r} over "
            f"domains with {({d: len(i) for d, i in by_domain.items()})} rows after the seed "
            f"split)")
    return partitions


def choose_mixtures(num_partitions: int, max_mixtures: int, seed: int) -> list[tuple[int, ...]]:
    """Unions of 2 and of 3 partitions (index tuples): all, or a seeded choice of at most
    `max_mixtures` of each size, in lexicographic order within a size."""
    rng = np.random.default_rng([seed, _MIXTURES])
    mixtures = []
    for size in MIXTURE_SIZES:
        combos = list(itertools.combinations(range(num_partitions), size))
        if max_mixtures and len(combos) > max_mixtures:
            combos = [combos[i] for i in np.sort(rng.choice(len(combos), max_mixtures, False))]
        mixtures += combos
    return mixtures


def mixture_name(partitions: list[Partition], mixture: tuple[int, ...]) -> str:
    return "+".join(partitions[i].name for i in mixture)


# ------------------------------------------------------------------------------------------------
# The model pool.


def ensure_model(config: ml_collections.ConfigDict, data: runs.Data, ids: np.ndarray, *,
                 pool: str, workdir: str, name: str, parent: dict | None = None) -> dict:
    """The model trained from `parent` (None: from scratch) on `ids` with `config`, found in the
    model pool or trained there (`runs.model`), and its evaluation under this run's roles (once,
    in `<workdir>/evaluations/<key>`), with the `tokens` it trained on."""
    trained = runs.model(config, data, ids, pool=pool, name=name, parent=parent)
    if trained["status"] == "reused":
        logging.info("model %s: found %s", name, trained["dir"])
    return {**trained, **runs.evaluation(config, data, trained,
                                         os.path.join(workdir, "evaluations", trained["key"])),
            "tokens": config.train.steps * config.train.batch_size * config.data.seq_len}


# ------------------------------------------------------------------------------------------------
# Proxies and evaluation.


def load_each(model_dirs: list[str], abstract_params):
    """Yields each model's params in turn, so `merge.average_stream` holds two models at once."""
    for model_dir in model_dirs:
        yield checkpoint.load_params(model_dir, abstract_params)


def mixture_groups(partitions: list[Partition], mixture: tuple[int, ...]) -> dict[str, list[int]]:
    """The mixture's partition indices by group, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i in mixture:
        groups.setdefault(partitions[i].group, []).append(i)
    return groups


def macro_is_micro(groups: dict[str, list[int]]) -> bool:
    """Whether the macro average (uniform over groups) equals the flat one: when every group
    holds as many partitions, each partition gets weight 1 / (number of partitions) either way."""
    return len({len(members) for members in groups.values()}) == 1


def proxy_scores(trainer: train.Trainer, heldout, eval_ids: np.ndarray, batch_size: int,
                 partitions: list[Partition], partition_dirs: list[str],
                 mixture: tuple[int, ...]) -> tuple[dict, dict]:
    """(micro, macro) held-out perplexity and bits per byte per domain
    (`evaluate.scores_by_domain`) of a mixture's merged partition models, on the held-out rows
    `eval_ids`, as the gold models are evaluated.

    Micro: the flat average of the partition models, streamed (two models in memory). Macro: the
    average of per-group averages (`merge.average_grouped`, the mixture's models in memory); it is
    evaluated only where it is another model than micro (`macro_is_micro`).
    """
    abstract = trainer.abstract_params()
    scores = lambda params: evaluate.scores_by_domain(  # noqa: E731
        trainer, params, heldout, eval_ids, batch_size)
    micro = scores(merge.average_stream(
        load_each([partition_dirs[i] for i in mixture], abstract)))
    groups = mixture_groups(partitions, mixture)
    if macro_is_micro(groups):
        return micro, micro
    grouped = {group: list(load_each([partition_dirs[i] for i in members], abstract))
               for group, members in groups.items()}
    return micro, scores(merge.average_grouped(grouped, mode="macro"))


def correlation_summary(gold, proxy, num_resamples: int, seed: int, groups=None) -> dict:
    """`n`, Pearson and Spearman of gold vs proxy perplexity, each with a `CONFIDENCE`
    percentile bootstrap interval (`_ci`) over the points, or over `groups` of them
    (`stats.bootstrap_ci`)."""
    out = {"n": len(gold)}
    for name, fn in (("pearson", stats.pearson), ("spearman", stats.spearman)):
        out[name] = _finite_or_none(fn(gold, proxy))
        out[f"{name}_ci"] = [_finite_or_none(v) for v in stats.bootstrap_ci(
            fn, gold, proxy, num_resamples, seed, CONFIDENCE, groups)]
    return out


def correlations(pairs: list[dict], proxy_field: str, num_resamples: int, seed: int) -> dict:
    """Proxy (`proxy_field`) vs gold perplexity of the (mixture, eval set) `pairs`:

    - `per_eval_set` (the headline): for each eval set, `correlation_summary` across the
      mixtures (`n`: the number of mixtures; the bootstrap draws mixtures);
    - `POOLED`: over all pairs (`n` pairs of `mixtures` x `eval_sets`); its bootstrap draws
      mixtures and keeps all eval sets of each drawn mixture together, since the pairs of one
      mixture come from the same gold and proxy models.
    """
    def summary(rows, groups=None):
        return correlation_summary([r["gold_ppl"] for r in rows], [r[proxy_field] for r in rows],
                                   num_resamples, seed, groups)

    eval_sets = sorted({r["eval_set"] for r in pairs})
    mixtures = [r["mixture"] for r in pairs]
    return {"per_eval_set": {e: summary([r for r in pairs if r["eval_set"] == e])
                             for e in eval_sets},
            POOLED: {**summary(pairs, mixtures), "mixtures": len(set(mixtures)),
                     "eval_sets": len(eval_sets)}}


def token_cost(num_partitions: int, mixture_sizes: list[int], partition_steps: int,
               seed_steps: int, tokens_per_step: int) -> dict:
    """Training tokens of the modular approach (one model per partition) against one model per
    mixture, for the mixtures evaluated and for every union of 2 or more partitions. The seed
    model is shared by both and reported apart."""
    per_partition = partition_steps * tokens_per_step
    modular = num_partitions * per_partition
    per_mixture = sum(mixture_sizes) * per_partition
    # sum_{m>=2} C(K, m) * m = K * (2^(K-1) - 1).
    all_unions = num_partitions * (2 ** (num_partitions - 1) - 1) * per_partition
    return dict(modular_tokens=modular, per_mixture_tokens=per_mixture,
                ratio=per_mixture / modular, all_unions_tokens=all_unions,
                all_unions_ratio=all_unions / modular, seed_tokens=seed_steps * tokens_per_step,
                tokens_per_partition=per_partition)


def _finite_or_none(x: float) -> float | None:
    """JSON has no NaN: an undefined statistic is written as null."""
    return float(x) if math.isfinite(x) else None


# ------------------------------------------------------------------------------------------------
# The experiment.


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) the experiment in `workdir`; returns the report's numbers."""
    a = config.ablation
    model_pool = runs.model_pool(config, workdir)
    data = runs.load_data(config)
    domains_N, domain_names = np.asarray(data.train_pool.domains), data.train_pool.domain_names
    seed_names, partition_names = domain_roles(a, domain_names)
    seed_ids, rest_ids = seed_rows(domains_N, domain_names, seed_names, a.seed_fraction,
                                   config.seed)
    partitions = make_partitions(domains_N, domain_names, rest_ids, a.partitions,
                                 partition_names, config.seed)
    mixtures = choose_mixtures(len(partitions), a.max_mixtures, config.seed)

    models = dict(pool=model_pool, workdir=workdir)
    seed = ensure_model(model_config(config, a.seed_steps), data, seed_ids, name="seed", **models)
    cpt_config = model_config(config, a.partition_steps, seed["dir"])
    partition_models = [ensure_model(cpt_config, data, p.ids, name=f"partition {p.name}",
                                     parent=seed, **models) for p in partitions]
    gold_models = {}
    for mixture in mixtures:
        name = mixture_name(partitions, mixture)
        ids = np.sort(np.concatenate([partitions[i].ids for i in mixture]))
        gold_models[name] = ensure_model(
            model_config(config, len(mixture) * a.partition_steps, seed["dir"]), data, ids,
            name=f"gold {name}", parent=seed, **models)

    trainer = train.Trainer(cpt_config)
    partition_dirs = [m["dir"] for m in partition_models]
    eval_ids = data.roles.rows("eval", data.heldout, config.train.eval_per_domain)
    pairs = []
    for mixture in mixtures:
        name = mixture_name(partitions, mixture)
        micro, macro = proxy_scores(trainer, data.heldout, eval_ids, a.eval_batch_size,
                                    partitions, partition_dirs, mixture)
        gold = gold_models[name]
        pairs += [pair_record(name, len(mixture), e, gold, micro, macro)
                  for e in data.heldout.domain_names if e in gold["eval"]]
        logging.info("mixture %s: gold %.3f proxy %.3f (all held-out)", name,
                     gold["eval"]["all"], micro["perplexity"]["all"])

    macro_differs = not all(macro_is_micro(mixture_groups(partitions, m)) for m in mixtures)
    result = dict(
        pairs=pairs,
        correlation=correlations(pairs, "proxy_ppl", a.bootstrap, config.seed),
        correlation_macro=(correlations(pairs, "proxy_macro_ppl", a.bootstrap, config.seed)
                           if macro_differs else None),
        macro=("macro: the average of per-group (domain) averages of the partition models"
               if macro_differs else MACRO_EQUALS_MICRO),
        cost=token_cost(len(partitions), [len(m) for m in mixtures], a.partition_steps,
                        a.seed_steps, config.train.batch_size * config.data.seq_len),
        partitions={p.name: {"group": p.group, "sequences": int(p.ids.size)}
                    for p in partitions},
        mixtures=[mixture_name(partitions, m) for m in mixtures],
        seed_sequences=int(seed_ids.size),
        seed_domains=seed_names,
        bootstrap=dict(resamples=a.bootstrap, confidence=CONFIDENCE, unit="mixture"),
        eval_per_domain=config.train.eval_per_domain,
        splits=data.splits(),
        model_pool=model_pool,
        models=dict(seed=_model_summary(seed),
                    partitions={p.name: _model_summary(m)
                                for p, m in zip(partitions, partition_models, strict=True)},
                    gold={name: _model_summary(m) for name, m in gold_models.items()}))
    return result


def pair_record(mixture: str, size: int, eval_set: str, gold: dict, micro: dict,
                macro: dict) -> dict:
    """A (mixture, eval set) pair: the gold model's (an `ensure_model` record) and the proxies'
    (`proxy_scores`) perplexity (`*_ppl`) and bits per byte (`*_bpb`, None where not
    measured) on the eval set."""
    return dict(mixture=mixture, size=size, eval_set=eval_set, gold_ppl=gold["eval"][eval_set],
                proxy_ppl=micro["perplexity"][eval_set],
                proxy_macro_ppl=macro["perplexity"][eval_set],
                gold_bpb=gold["eval_bpb"].get(eval_set),
                proxy_bpb=micro["bits_per_byte"].get(eval_set),
                proxy_macro_bpb=macro["bits_per_byte"].get(eval_set))


def _model_summary(record: dict) -> dict:
    return {k: record[k] for k in ("key", "status", "steps", "tokens", "final_loss")} | {
        "heldout_ppl": record["eval"]["all"], "heldout_bpb": record["eval_bpb"].get("all")}


STUDY = launch.Study(validate, run, report_lib.to_markdown,
                     {"proxy_vs_gold.png": report_lib.plot_proxy_vs_gold})


def main(argv):
    del argv
    launch.main(STUDY)


if __name__ == "__main__":
    app.run(main)

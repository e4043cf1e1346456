"""The data-ablation experiment: its pieces against hand computations (the mixture bootstrap
against a hand-written resampling loop), then a shrunken run end to end (checked against scipy,
the train pool's rows and an independent numpy merge), then a second experiment that finds every
model in the shared model pool and trains none."""

import hashlib
import itertools
import json
import math
import os
import types

import jax
import numpy as np
import pytest
import scipy.stats as scipy_stats

from experiments import data_ablations as abl
from experiments.configs import data_ablations as abl_config
from jaxsel import checkpoint, evaluate, launch, roles, runs, stats, train
from jaxsel import config as config_lib
from jaxsel.data import pool as pool_lib
from tests import experiment_runs

# A shrunken tiny run: 2 synthetic domains in 2 parts each (4 partitions, grouped by domain), 2
# unions of 2 and 2 of 3, a few steps each, from a seed trained on the other domains (tiny's
# `seed_domains=others`: tables and junk); every model is evaluated on 2 eval rows per domain.
SHRUNK = {
    "data.source": "synthetic", "data.seq_len": 64, "model.vocab_size": 512,
    "data.synthetic_docs_per_domain": 60, "train.batch_size": 8, "train.eval_per_domain": 2,
    "ablation.domains": ("prose", "code"), "ablation.partitions": "domains:2",
    "ablation.seed_steps": 20, "ablation.partition_steps": 5, "ablation.max_mixtures": 2,
    "ablation.eval_batch_size": 32, "ablation.bootstrap": 200,
}


def _config(**overrides):
    return experiment_runs.config(abl_config, {**SHRUNK, **overrides})


# ------------------------------------------------------------------------------------------------
# Pieces.


@pytest.mark.parametrize("overrides, message", [
    ({"ablation.seed_fraction": 1.0}, "ablation.seed_fraction"),
    ({"ablation.partitions": "split:2"}, "ablation.partitions"),
    ({"ablation.partitions": "domains:x"}, "ablation.partitions"),
    ({"ablation.partitions": "halves"}, "ablation.partitions"),
    ({"ablation.partition_steps": 0}, "ablation.partition_steps"),
    ({"ablation.cpt_lr_ratio": 0.0}, "ablation.cpt_lr_ratio"),
    ({"ablation.max_mixtures": -1}, "ablation.max_mixtures"),
    ({"ablation.bootstrap": 0}, "ablation.bootstrap"),
    ({"train.batch_size": 0}, "train.batch_size"),
    # The seed's domains: disjoint from the partitions', `others` alone and with named domains.
    ({"ablation.seed_domains": ("tables", "code")}, r"ablation.seed_domains: \['code'\] are in "
                                               "ablation.domains too"),
    ({"ablation.seed_domains": ("others", "tables")},
     "ablation.seed_domains: 'others' stands alone"),
    ({"ablation.domains": ()}, "ablation.domains: names no domain, so ablation.seed_domains"),
])
def test_impossible_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        abl.validate(_config(**overrides), num_devices=1)


def test_config_arg_options_reach_the_ablation_section():
    config = abl_config.get_config("tiny,partitions=split:4,cpt_lr_ratio=0.2")
    assert config.ablation.partitions == "split:4" and config.ablation.cpt_lr_ratio == 0.2
    abl.validate(config, num_devices=1)
    assert abl.parse_partitions("domains") == ("domains", 1)
    assert abl.parse_partitions("domains:3") == ("domains", 3)
    assert abl.parse_partitions("split:5") == ("split", 5)


def test_tiny_has_ten_mixtures_and_larger_presets_a_separate_seed_once_domains_are_named():
    tiny = abl_config.get_config("tiny").ablation
    per_domain = abl.parse_partitions(tiny.partitions)[1]
    num_partitions = len(tiny.domains) * per_domain
    assert len(abl.choose_mixtures(num_partitions, tiny.max_mixtures, seed=0)) >= 10
    assert tiny.seed_domains == ("others",)
    for preset in ("small", "410m", "1b"):
        config = abl_config.get_config(preset)
        assert config.ablation.seed_domains == ("others",)
        with pytest.raises(config_lib.ConfigError, match="ablation.domains: names no domain"):
            abl.validate(config, num_devices=1)
        config.ablation.domains = ("wiki", "code")
        abl.validate(config, num_devices=1)
        config.ablation.seed_domains = config.ablation.domains = ()  # A shared seed.
        abl.validate(config, num_devices=1)


def test_seed_split_is_a_seeded_disjoint_cover():
    seed_ids, rest = abl.seed_split(1000, 0.3, seed=4)
    assert len(seed_ids) == 300 and len(rest) == 700
    np.testing.assert_array_equal(np.sort(np.concatenate([seed_ids, rest])), np.arange(1000))
    np.testing.assert_array_equal(seed_ids, abl.seed_split(1000, 0.3, seed=4)[0])
    assert not np.array_equal(seed_ids, abl.seed_split(1000, 0.3, seed=5)[0])
    with pytest.raises(config_lib.ConfigError, match="ablation.seed_fraction"):
        abl.seed_split(3, 0.01, seed=0)


# Train-pool rows: domain a has 40 rows, b 25, c 60, d 10, e none (interleaved).
DOMAIN_NAMES = ["a", "b", "c", "d", "e"]
DOMAINS_N = np.repeat(np.arange(4), [40, 25, 60, 10])[np.random.default_rng(0).permutation(135)]


def _rest():
    return abl.seed_split(len(DOMAINS_N), 0.2, seed=0)[1]


def _section(seed_domains, domains):
    section = abl_config.get_config("tiny").ablation
    section.seed_domains, section.domains = tuple(seed_domains), tuple(domains)
    return section


def test_seed_domains_are_separate_from_the_partitions_domains():
    assert abl.domain_roles(_section(["b"], ["a"]), DOMAIN_NAMES) == (["b"], ["a"])
    assert abl.domain_roles(_section(["b"], []), DOMAIN_NAMES) == (["b"], ["a", "c", "d", "e"])
    assert abl.domain_roles(_section(["others"], ["c"]), DOMAIN_NAMES) == (
        ["a", "b", "d", "e"], ["c"])
    assert abl.domain_roles(_section([], []), DOMAIN_NAMES) == ([], DOMAIN_NAMES)
    # The seed trains on every row of its domains, the partitions come from all the others.
    seed_ids, rest = abl.seed_rows(DOMAINS_N, DOMAIN_NAMES, ["b", "d"], 0.2, seed=0)
    np.testing.assert_array_equal(seed_ids, [i for i, d in enumerate(DOMAINS_N) if d in (1, 3)])
    np.testing.assert_array_equal(rest, [i for i, d in enumerate(DOMAINS_N) if d in (0, 2)])
    parts = abl.make_partitions(DOMAINS_N, DOMAIN_NAMES, rest, "domains:2", ["a", "c"], seed=0)
    partition_ids = np.concatenate([p.ids for p in parts])
    assert {len(p.ids) for p in parts} == {20} and not set(seed_ids) & set(partition_ids)
    # A shared seed: a seeded share of all rows.
    shared = abl.seed_rows(DOMAINS_N, DOMAIN_NAMES, [], 0.2, seed=3)
    for got, expected in zip(shared, abl.seed_split(len(DOMAINS_N), 0.2, seed=3), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed_domains, domains, message", [
    (["f"], ["a"], "ablation.seed_domains: 'f' is not a domain of the train pool"),
    (["b"], ["a", "f"], "ablation.domains: 'f' is not a domain of the train pool"),
    (["others"], list("abcde"), "ablation.seed_domains: 'others': ablation.domains names every"),
    (list("abcde"), [], "ablation.seed_domains: .* are all the domains of the train pool"),
])
def test_seed_domain_errors_name_the_key(seed_domains, domains, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        abl.domain_roles(_section(seed_domains, domains), DOMAIN_NAMES)


def test_a_seed_domain_without_train_rows_is_refused():
    with pytest.raises(config_lib.ConfigError, match=r"ablation.seed_domains: \['e'\] have no "):
        abl.seed_rows(DOMAINS_N, DOMAIN_NAMES, ["e"], 0.2, seed=0)


def test_domain_partitions_are_equal_random_subsets_of_their_domain():
    rest = _rest()
    parts = abl.make_partitions(DOMAINS_N, DOMAIN_NAMES, rest, "domains", ["a", "b", "c"], 0)
    assert [p.name for p in parts] == ["a", "b", "c"] == [p.group for p in parts]
    smallest = min(np.sum(DOMAINS_N[rest] == k) for k in range(3))
    for index, p in enumerate(parts):
        assert len(p.ids) == smallest and np.all(np.diff(p.ids) > 0)
        assert set(p.ids) <= set(rest) and np.all(DOMAINS_N[p.ids] == index)
    again = abl.make_partitions(DOMAINS_N, DOMAIN_NAMES, rest, "domains", ["a", "b", "c"], 0)
    assert all(np.array_equal(p.ids, q.ids) for p, q in zip(parts, again, strict=True))


def test_domains_k_partitions_are_grouped_by_domain():
    rest = _rest()
    parts = abl.make_partitions(DOMAINS_N, DOMAIN_NAMES, rest, "domains:2", DOMAIN_NAMES[:4], 1)
    assert [p.name for p in parts] == ["a-0", "a-1", "b-0", "b-1", "c-0", "c-1", "d-0", "d-1"]
    assert [p.group for p in parts] == ["a", "a", "b", "b", "c", "c", "d", "d"]
    size = min(np.sum(DOMAINS_N[rest] == k) for k in range(4)) // 2
    assert {len(p.ids) for p in parts} == {size}
    all_ids = np.concatenate([p.ids for p in parts])
    assert len(set(all_ids)) == len(all_ids) and set(all_ids) <= set(rest)


def test_split_partitions_cut_the_chosen_domains_into_equal_parts():
    rest = _rest()
    parts = abl.make_partitions(DOMAINS_N, DOMAIN_NAMES, rest, "split:3", ["a", "c"], seed=2)
    chosen = rest[np.isin(DOMAINS_N[rest], [0, 2])]
    assert [p.name for p in parts] == ["split0", "split1", "split2"]
    assert {len(p.ids) for p in parts} == {len(chosen) // 3}
    all_ids = np.concatenate([p.ids for p in parts])
    assert len(set(all_ids)) == len(all_ids) and set(all_ids) <= set(chosen)


def test_partition_errors_name_the_key():
    rest = _rest()
    with pytest.raises(config_lib.ConfigError, match="ablation.partitions.*gives 2 partitions"):
        abl.make_partitions(DOMAINS_N, DOMAIN_NAMES, rest, "domains", ["a", "b"], seed=0)
    with pytest.raises(config_lib.ConfigError, match="ablation.partitions.*is empty"):
        abl.make_partitions(DOMAINS_N, DOMAIN_NAMES, rest, "domains:20", ["a", "d"], seed=0)


def test_mixtures_are_all_unions_or_a_seeded_capped_choice():
    everything = abl.choose_mixtures(5, 0, seed=0)
    expected = list(itertools.combinations(range(5), 2)) + list(itertools.combinations(range(5), 3))
    assert everything == expected
    capped = abl.choose_mixtures(5, 3, seed=0)
    assert [len(m) for m in capped] == [2, 2, 2, 3, 3, 3]
    assert len(set(capped)) == 6 and set(capped) <= set(expected)
    assert capped == abl.choose_mixtures(5, 3, seed=0)
    assert capped != abl.choose_mixtures(5, 3, seed=1)
    # 2 of the 3 pairs; the single triple is under the cap.
    three = abl.choose_mixtures(3, 2, seed=0)
    assert len(three) == 3 and set(three[:2]) < {(0, 1), (0, 2), (1, 2)} and three[2] == (0, 1, 2)


def test_macro_equals_micro_only_for_equal_group_sizes():
    parts = [abl.Partition(n, g, np.arange(1)) for n, g in
             [("a-0", "a"), ("a-1", "a"), ("b-0", "b"), ("b-1", "b")]]
    assert abl.mixture_groups(parts, (0, 1, 2)) == {"a": [0, 1], "b": [2]}
    assert not abl.macro_is_micro(abl.mixture_groups(parts, (0, 1, 2)))
    assert abl.macro_is_micro(abl.mixture_groups(parts, (0, 2)))  # One of each.
    assert abl.macro_is_micro(abl.mixture_groups(parts, (0, 1)))  # One group.
    assert abl.macro_is_micro(abl.mixture_groups(parts, (0, 1, 2, 3)))  # Two of each.


def test_model_identity_follows_what_and_how_a_model_is_trained():
    config, ids = _config(), np.arange(10)
    data = types.SimpleNamespace(train_pool=types.SimpleNamespace(report={"key": "pool"}))
    seed = {"key": "seedkey", "dir": "/seed/dir"}

    def identity(c, ids=ids, parent=seed, steps=5):
        return runs.model_identity(abl.model_config(c, steps, "/seed/dir"), data, ids, parent,
                                   None)

    base = identity(config)
    assert base["start"] == "init" and base["parent"] == "seedkey"
    # What it is trained on and from.
    assert identity(config, ids=np.arange(1, 11)) != base
    assert identity(config, parent={**seed, "key": "otherseed"}) != base
    # How: steps, the continued-pretraining learning rate, the model.
    assert identity(config, steps=6) != base
    assert identity(_config(**{"ablation.cpt_lr_ratio": 0.2})) != base
    assert identity(_config(**{"model.num_layers": 3})) != base
    # Not: logging, checkpointing, the mesh, the experiment's other choices, the pool's folder.
    for unrelated in ({"train.log_every": 3}, {"train.checkpoint_every": 7},
                      {"mesh.data": 1}, {"ablation.bootstrap": 9},
                      {"ablation.max_mixtures": 7}, {"model_pool": "/elsewhere"},
                      {"train.eval_per_domain": 3}):
        assert identity(_config(**unrelated)) == base, unrelated
    # The continued-pretraining ratio does not change the seed model.
    seed_identity = lambda c: runs.model_identity(  # noqa: E731
        abl.model_config(c, 20), data, ids, None, None)
    assert seed_identity(_config(**{"ablation.cpt_lr_ratio": 0.2})) == seed_identity(config)
    with pytest.raises(ValueError, match="must continue_from or init_from it"):
        runs.model_identity(abl.model_config(config, 5, "/elsewhere"), data, ids, seed, None)


def test_continued_pretraining_config_is_a_constant_tenth_of_the_peak_without_warmup():
    config = _config()
    cpt = abl.model_config(config, 15, "/seed")
    assert (cpt.optim.schedule, cpt.optim.warmup_steps, cpt.init_from) == ("constant", 0, "/seed")
    assert cpt.optim.lr == pytest.approx(0.1 * config.optim.lr) and cpt.train.steps == 15
    schedule = train.make_schedule(cpt.optim, 15)
    assert [float(schedule(s)) for s in (0, 7, 14)] == pytest.approx([0.1 * config.optim.lr] * 3)
    seed = abl.model_config(config, 20)
    assert seed.optim.to_dict() == config.optim.to_dict() and seed.init_from == ""


def test_token_cost_against_enumerated_unions():
    cost = abl.token_cost(4, [2, 2, 3], partition_steps=5, seed_steps=20, tokens_per_step=100)
    per_partition = 5 * 100
    every_union = [m for size in range(2, 5) for m in itertools.combinations(range(4), size)]
    assert cost["modular_tokens"] == 4 * per_partition
    assert cost["per_mixture_tokens"] == 7 * per_partition
    assert cost["ratio"] == pytest.approx(7 / 4)
    assert cost["all_unions_tokens"] == sum(len(m) for m in every_union) * per_partition
    assert cost["seed_tokens"] == 20 * 100


def _pairs(seed, num_mixtures=8, eval_sets=("e0", "e1", "e2", "e3", "e4")):
    """(mixture, eval set) pairs whose perplexities share a per-mixture effect across eval sets,
    as pairs from one mixture's models do."""
    rng = np.random.default_rng(seed)
    effect_M, proxy_error_M = rng.standard_normal(num_mixtures), rng.standard_normal(num_mixtures)
    return [dict(mixture=f"m{m}", eval_set=e, gold_ppl=10 + effect_M[m] + 0.3 * rng.normal(),
                 proxy_ppl=10 + effect_M[m] + 0.8 * proxy_error_M[m] + 0.3 * rng.normal())
            for m in range(num_mixtures) for e in eval_sets]


def _mixture_bootstrap_by_hand(pairs, fn, num_resamples, seed):
    """The pooled interval by hand: draw mixtures with replacement (the same seeded draws as
    `stats.bootstrap_ci`: indices into the sorted mixture names), take all pairs of each."""
    names = sorted({r["mixture"] for r in pairs})
    draws = np.random.default_rng(seed).integers(0, len(names), size=(num_resamples, len(names)))
    values = []
    for draw in draws:
        rows = [r for m in draw for r in pairs if r["mixture"] == names[m]]
        values.append(fn([r["gold_ppl"] for r in rows], [r["proxy_ppl"] for r in rows]))
    values = [v for v in values if not math.isnan(v)]
    return list(np.quantile(values, [0.025, 0.975]))


def _scipy_pearson(x, y):
    return scipy_stats.pearsonr(x, y).statistic if len(set(x)) > 1 else math.nan


def _scipy_spearman(x, y):
    return scipy_stats.spearmanr(x, y).statistic if len(set(x)) > 1 else math.nan


def test_correlations_per_eval_set_across_mixtures_and_pooled_by_mixture():
    pairs = _pairs(0)
    corr = abl.correlations(pairs, "proxy_ppl", num_resamples=300, seed=5)
    assert list(corr) == ["per_eval_set", abl.POOLED]
    for eval_set, c in corr["per_eval_set"].items():
        rows = [r for r in pairs if r["eval_set"] == eval_set]
        gold, proxy = [r["gold_ppl"] for r in rows], [r["proxy_ppl"] for r in rows]
        assert c["n"] == 8  # Mixtures.
        assert c["pearson"] == pytest.approx(scipy_stats.pearsonr(gold, proxy).statistic)
        assert c["spearman"] == pytest.approx(scipy_stats.spearmanr(gold, proxy).statistic)
    pooled = corr[abl.POOLED]
    assert (pooled["n"], pooled["mixtures"], pooled["eval_sets"]) == (40, 8, 5)
    gold, proxy = [r["gold_ppl"] for r in pairs], [r["proxy_ppl"] for r in pairs]
    assert pooled["pearson"] == pytest.approx(scipy_stats.pearsonr(gold, proxy).statistic)
    for name, fn in (("pearson", _scipy_pearson), ("spearman", _scipy_spearman)):
        assert pooled[f"{name}_ci"] == pytest.approx(
            _mixture_bootstrap_by_hand(pairs, fn, 300, seed=5), abs=1e-9)


def test_mixture_bootstrap_is_wider_than_resampling_pairs_as_if_independent():
    """Each mixture's 5 pairs share its models' error: resampling the 40 pairs overstates the
    sample size and gives an interval that is too narrow."""
    pairs = _pairs(1)
    pooled = abl.correlations(pairs, "proxy_ppl", num_resamples=2000, seed=0)[abl.POOLED]
    pair_ci = stats.bootstrap_ci(stats.pearson, [r["gold_ppl"] for r in pairs],
                                 [r["proxy_ppl"] for r in pairs], 2000, seed=0)
    mixture_ci = pooled["pearson_ci"]
    assert mixture_ci[1] - mixture_ci[0] > 1.5 * (pair_ci[1] - pair_ci[0])
    assert mixture_ci[0] < pair_ci[0]


# ------------------------------------------------------------------------------------------------
# End to end.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Runs the shrunken tiny experiment once through the command line."""
    tmp = tmp_path_factory.mktemp("ablations")
    overrides = {**SHRUNK, "data.cache_dir": str(tmp / "cache"),
                 "model_pool": str(tmp / "model_pool")}
    experiment_runs.run("data_ablations", tmp / "first", overrides)
    report = json.loads((tmp / "first" / "report.json").read_text())
    return tmp, overrides, report


def test_tiny_experiment_writes_the_full_report(tiny_run):
    tmp, overrides, report = tiny_run
    config = _config(**overrides)
    pools = pool_lib.build_pools(config)
    eval_sets = pools["heldout"].domain_names
    assert [len(m.split("+")) for m in report["mixtures"]] == [2, 2, 3, 3]
    assert {p for m in report["mixtures"] for p in m.split("+")} <= set(report["partitions"])

    # Pairs: every (mixture, held-out domain), with finite perplexities (not bounded by the
    # vocabulary: a model that never saw a domain, e.g. code for a seed on tables and junk
    # continued on prose, can do worse than uniform on it).
    pairs = report["pairs"]
    assert {(r["mixture"], r["eval_set"]) for r in pairs} == set(
        itertools.product(report["mixtures"], eval_sets))
    assert len(pairs) == 4 * len(eval_sets)
    for r in pairs:
        for k in ("gold_ppl", "proxy_ppl", "proxy_macro_ppl"):
            assert 1.0 < r[k] < math.inf, r
            assert 0.0 < r[k.replace("ppl", "bpb")] < math.inf, r
        groups = [p.split("-")[0] for p in r["mixture"].split("+")]
        counts = {g: groups.count(g) for g in groups}
        # Macro differs from micro exactly where the groups hold unequal numbers of partitions.
        assert (r["proxy_macro_ppl"] == r["proxy_ppl"]) == (len(set(counts.values())) == 1), r

    # Correlations: per eval set across the 4 mixtures, and pooled over all pairs, are scipy's;
    # the pooled interval is the hand-written mixture bootstrap's.
    for field, corr in (("proxy_ppl", report["correlation"]),
                        ("proxy_macro_ppl", report["correlation_macro"])):
        assert sorted(corr["per_eval_set"]) == sorted(eval_sets)
        for name, rows in [(abl.POOLED, pairs), *[(e, [r for r in pairs if r["eval_set"] == e])
                                                  for e in eval_sets]]:
            c = corr[abl.POOLED] if name == abl.POOLED else corr["per_eval_set"][name]
            gold, proxy = [r["gold_ppl"] for r in rows], [r[field] for r in rows]
            assert c["n"] == (len(pairs) if name == abl.POOLED else 4)
            assert c["pearson"] == pytest.approx(scipy_stats.pearsonr(gold, proxy).statistic)
            assert c["spearman"] == pytest.approx(scipy_stats.spearmanr(gold, proxy).statistic)
            for ci in (c["pearson_ci"], c["spearman_ci"]):
                assert ci == [None, None] or -1.0 <= ci[0] <= ci[1] <= 1.0
        assert (corr[abl.POOLED]["mixtures"], corr[abl.POOLED]["eval_sets"]) == (
            4, len(eval_sets))
    assert report["correlation"][abl.POOLED]["pearson_ci"] == pytest.approx(
        _mixture_bootstrap_by_hand(pairs, _scipy_pearson, 200, config.seed), abs=1e-9)
    assert report["bootstrap"] == {"resamples": 200, "confidence": 0.95, "unit": "mixture"}
    assert "macro: the average of per-group" in report["macro"]

    # Cost: 4 partitions x 5 steps against (2 + 2 + 3 + 3) x 5 steps, of 8 x 64 tokens.
    step_tokens = 8 * 64
    assert report["cost"]["modular_tokens"] == 4 * 5 * step_tokens
    assert report["cost"]["per_mixture_tokens"] == 10 * 5 * step_tokens
    assert report["cost"]["ratio"] == pytest.approx(2.5)

    # The seed: every train row of the domains that are not the partitions'.
    train_pool = pools["train"]
    assert report["seed_domains"] == ["tables", "junk"]
    seed_rows = np.flatnonzero(np.isin(train_pool.domains, [
        train_pool.domain_names.index(d) for d in ("tables", "junk")]))
    assert report["seed_sequences"] == len(seed_rows)

    # Models: all trained; golds on the union for the summed steps, everything from the seed.
    models = report["models"]
    assert set(models["partitions"]) == {"prose-0", "prose-1", "code-0", "code-1"}
    assert set(models["gold"]) == set(report["mixtures"])
    every = [models["seed"], *models["partitions"].values(), *models["gold"].values()]
    assert {m["status"] for m in every} == {"trained"}
    assert len({m["key"] for m in every}) == len(every)
    pool_dir = tmp / "model_pool"
    seed_record = json.loads((pool_dir / models["seed"]["key"] / "model.json").read_text())
    assert seed_record["identity"]["steps"] == 20
    assert seed_record["identity"]["ids_sha256"] == hashlib.sha256(
        seed_rows.astype(np.int64).tobytes()).hexdigest()
    for name, m in models["gold"].items():
        record = json.loads((pool_dir / m["key"] / "model.json").read_text())
        size = len(name.split("+"))
        assert m["steps"] == 5 * size and m["tokens"] == 5 * size * step_tokens
        assert record["identity"]["num_ids"] == sum(
            report["partitions"][p]["sequences"] for p in name.split("+"))
        assert record["identity"]["parent"] == models["seed"]["key"]
    for m in models["partitions"].values():
        assert json.loads((pool_dir / m["key"] / "model.json").read_text())["identity"][
            "parent"] == models["seed"]["key"]
        metrics = (pool_dir / m["key"] / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in metrics]
        assert rows and all(r["lr"] == pytest.approx(0.1 * config.optim.lr) for r in rows)

    first = tmp / "first"
    assert (first / "proxy_vs_gold.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (first / "proxy_vs_gold.png").stat().st_size > 10_000
    markdown = (first / "report.md").read_text()
    # The first table is the per-eval-set headline, one row per eval set.
    headline = markdown.index("| eval set | n (mixtures) | Pearson |")
    assert markdown.index("\n|") + 1 == headline
    for e in eval_sets:
        assert f"| {e} | 4 | " in markdown[headline:]
    for text in ["## Pooled over (mixture, eval set) pairs", "bootstrap draws mixtures",
                 "Training-token cost", "macro proxy", "## Data", "tables, junk",
                 "| gold bits/byte |", "| held-out bits/byte |", *report["mixtures"], *eval_sets]:
        assert text in markdown


def test_proxies_are_the_averages_of_the_partition_models(tiny_run):
    """An independent merge (numpy, weights by hand) gives the proxy perplexities and bits per
    byte reported."""
    tmp, overrides, report = tiny_run
    config = _config(**overrides)
    pools = pool_lib.build_pools(config)
    pool_dir = tmp / "model_pool"
    trainer = train.Trainer(abl.model_config(config, 5, str(pool_dir / "seed")))
    triple = next(m for m in report["mixtures"] if m.count("+") == 2)
    eval_ids = roles.assign(pools["heldout"], config.roles).rows("eval", pools["heldout"], 2)
    names = triple.split("+")
    params = [checkpoint.load_params(str(pool_dir / report["models"]["partitions"][n]["key"]),
                                     trainer.abstract_params()) for n in names]
    groups = [n.split("-")[0] for n in names]
    macro_weights = [1 / (len(set(groups)) * groups.count(g)) for g in groups]
    for weights, field in (([1 / 3] * 3, "proxy"), (macro_weights, "proxy_macro")):
        merged = jax.tree.map(lambda *xs, w=weights: sum(
            wk * np.asarray(x, np.float64) for wk, x in zip(w, xs, strict=True)).astype(
                np.float32), *params)
        scores = evaluate.scores_by_domain(trainer, merged, pools["heldout"], eval_ids, 32)
        for r in report["pairs"]:
            if r["mixture"] == triple:
                e = r["eval_set"]
                assert r[f"{field}_ppl"] == pytest.approx(scores["perplexity"][e], rel=1e-4), r
                assert r[f"{field}_bpb"] == pytest.approx(scores["bits_per_byte"][e],
                                                          rel=1e-4), r


def test_second_experiment_finds_every_model_in_the_pool(tiny_run, tmp_path, monkeypatch):
    tmp, overrides, report = tiny_run
    pool_dir = tmp / "model_pool"
    before = {p: os.stat(p).st_mtime_ns for p in pool_dir.rglob("*")}

    def no_training(*args, **kwargs):
        raise AssertionError(f"trained a model that is in the pool: {args[1]}")

    monkeypatch.setattr(runs, "train_model", no_training)
    # Another experiment (other bootstrap) over the same seed, partitions and mixtures.
    config = _config(**{**overrides, "ablation.bootstrap": 100})
    second = launch.run_experiment(config, str(tmp_path / "second"), abl.STUDY)

    models = second["models"]
    every = [models["seed"], *models["partitions"].values(), *models["gold"].values()]
    assert {m["status"] for m in every} == {"reused"}
    assert {m["key"] for m in every} == {m["key"] for m in [
        report["models"]["seed"], *report["models"]["partitions"].values(),
        *report["models"]["gold"].values()]}
    assert {p: os.stat(p).st_mtime_ns for p in pool_dir.rglob("*")} == before
    # The same models give the same perplexities.
    for a, b in zip(report["pairs"], second["pairs"], strict=True):
        assert a["mixture"] == b["mixture"] and a["eval_set"] == b["eval_set"]
        assert a["gold_ppl"] == b["gold_ppl"]
        assert math.isclose(a["proxy_ppl"], b["proxy_ppl"], rel_tol=1e-6)
    assert (tmp_path / "second" / "report.json").exists()

"""Held-out roles: disjoint by documents, seeded and stable, the target's shares, the report of
what a run used, and the refusals (a document in two roles, an unknown or too small target)."""

import json

import ml_collections
import numpy as np
import pytest

from jaxsel import config as config_lib
from jaxsel import roles as roles_lib
from jaxsel.data import pool as pool_lib


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    config = config_lib.base_config("tiny")
    config.model.vocab_size = 512
    config.data.update(source="synthetic", seq_len=32, synthetic_docs_per_domain=150,
                       heldout_fraction=0.3, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return pool_lib.build_pools(config)


def _section(**overrides):
    section = config_lib.base_config("tiny").roles
    section.update({"target_domain": "prose", **overrides})
    return section


def _docs(pool, ids) -> set:
    return {d for i in ids for d in pool.doc_ids_of(i).tolist()}


def test_roles_split_the_target_domain_by_document(pools):
    heldout = pools["heldout"]
    roles = roles_lib.assign(heldout, _section())
    prose = set(heldout.ids_of_domain("prose").tolist())
    ids = roles.ids
    assert set(ids["target"].tolist()) | set(ids["target_eval"].tolist()) <= prose
    assert set(ids["target"].tolist()) and set(ids["target_eval"].tolist())
    assert prose & set(ids["eval"].tolist())  # The target domain keeps eval documents too.
    # Every row has exactly one role, and every other domain is eval.
    every = np.sort(np.concatenate(list(ids.values())))
    np.testing.assert_array_equal(every, np.arange(len(heldout)))
    assert set(range(len(heldout))) - prose <= set(ids["eval"].tolist())
    docs = {role: _docs(heldout, rows) for role, rows in ids.items()}
    for a in docs:
        for b in docs:
            assert a == b or not docs[a] & docs[b], (a, b)
    # Shares of the target domain's documents: at least the fraction, group by group.
    total = len(_docs(heldout, sorted(prose)))
    assert 0.4 <= len(docs["target"]) / total < 0.9
    assert len(docs["target_eval"]) >= 1


def test_roles_are_seeded_and_stable(pools):
    heldout = pools["heldout"]
    first, again = (roles_lib.assign(heldout, _section(seed=3)) for _ in range(2))
    other = roles_lib.assign(heldout, _section(seed=4))
    assert all(np.array_equal(first.ids[r], again.ids[r]) for r in roles_lib.ROLES)
    assert not all(np.array_equal(first.ids[r], other.ids[r]) for r in roles_lib.ROLES)


def test_no_target_makes_every_row_eval(pools):
    heldout = pools["heldout"]
    roles = roles_lib.assign(heldout, _section(target_domain=""))
    np.testing.assert_array_equal(roles.ids["eval"], np.arange(len(heldout)))
    assert roles.ids["target"].size == roles.ids["target_eval"].size == 0


def test_rows_caps_each_domain(pools):
    heldout = pools["heldout"]
    roles = roles_lib.assign(heldout, _section())
    capped = roles.rows("eval", heldout, 2)
    domains = np.asarray(heldout.domains)
    for index in np.unique(domains[roles.ids["eval"]]):
        mine = roles.ids["eval"][domains[roles.ids["eval"]] == index]
        np.testing.assert_array_equal(capped[domains[capped] == index], mine[:2])


def test_a_document_in_two_roles_fails(pools):
    heldout = pools["heldout"]
    roles = roles_lib.assign(heldout, _section())
    target = roles.ids["target"]
    with pytest.raises(ValueError, match="held-out row .* is in roles target and eval"):
        roles_lib.check(heldout, {"target": target, "eval": target[:1]})
    # Rows apart, one document: a row holding the end of a document in the other role.
    spans = [i for i in range(len(heldout) - 1)
             if set(heldout.doc_ids_of(i).tolist()) & set(heldout.doc_ids_of(i + 1).tolist())]
    assert spans, "the fixture needs a document spanning two rows"
    with pytest.raises(ValueError, match="document .* is in roles target and eval"):
        roles_lib.check(heldout, {"target": np.array([spans[0]]),
                                  "eval": np.array([spans[0] + 1])})


def test_unknown_or_too_small_targets_name_the_key(pools, tmp_path):
    with pytest.raises(config_lib.ConfigError, match="config.roles.target_domain: 'poetry'"):
        roles_lib.assign(pools["heldout"], _section(target_domain="poetry"))
    # A domain of two documents cannot give three roles a document each.
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"text number {i} " * 9, "d": d}) + "\n"
                            for i, d in enumerate(["big"] * 30 + ["small"] * 2)))
    config = config_lib.base_config("tiny")
    config.model.vocab_size = 300
    config.data.update(source="jsonl", paths=(str(path),), domain_field="d", seq_len=16,
                       heldout_fraction=0.9, cache_dir=str(tmp_path / "cache"))
    heldout = pool_lib.build_pools(config)["heldout"]
    assert roles_lib.assign(heldout, _section(target_domain="big")).ids["target"].size
    with pytest.raises(config_lib.ConfigError, match="'small' has 2 held-out documents in 2 "
                       "document group.*need one each"):
        roles_lib.assign(heldout, _section(target_domain="small"))


def test_splits_count_documents_and_rows_independently(pools):
    heldout, train = pools["heldout"], pools["train"]
    roles = roles_lib.assign(heldout, _section())
    splits = roles_lib.splits(pools, roles)
    assert splits["overlap_documents"] == 0 and splits["target_domain"] == "prose"
    for role in roles_lib.ROLES:
        rows = roles.ids[role]
        assert splits[role]["rows"] == len(rows)
        assert splits[role]["documents"] == len(_docs(heldout, rows))
        for name, counts in splits[role]["domains"].items():
            mine = [i for i in rows if heldout.domain_names[heldout.domains[i]] == name]
            assert counts == {"rows": len(mine), "documents": len(_docs(heldout, mine))}
    assert splits["train"]["rows"] == len(train)
    assert splits["train"]["documents"] == len(_docs(train, range(len(train))))
    # An assignment that shares a document is counted, not hidden.
    shared = roles_lib.Roles("prose", {**roles.ids, "eval": np.union1d(roles.ids["eval"],
                                                                       roles.ids["target"][:1])})
    assert roles_lib.splits(pools, shared)["overlap_documents"] >= 1


def test_config_section_is_the_base_configs():
    section = config_lib.base_config("small").roles
    assert isinstance(section, ml_collections.ConfigDict)
    assert section.target_items == 1024  # MATES' LAMBADA set size from `small` up.
    assert config_lib.base_config("tiny").roles.target_items == 32

"""Held-out roles: which held-out rows a run may aim at, which rank its arms, which evaluate it.

A pool's held-out documents are dealt into document groups when it is built, and each
(domain, group) is packed on its own, so a held-out row never holds documents of two groups
(`jaxsel.data.pool`). A run gives each held-out row one role, group by group:

- `target`: rows of the target domain that target-aware selectors, MATES' probing and its
  influence model may see (the reference set they aim at);
- `target_eval`: other documents of the target domain, on which arms are ranked (out of sample:
  no selector saw them);
- `eval`: everything else, for per-domain perplexity and the zero-shot suite. Every row of the
  other domains is `eval`.

The target domain's groups are shuffled with `config.roles.seed` and taken in that order until
`target_fraction` of its documents are `target`, then `target_eval_fraction` more are
`target_eval`; the rest are `eval` (each role gets at least one group). The seed is the roles'
own, not `config.seed`, so runs of several seeds rank their arms on the same items. With no
target domain (`roles.target_domain = ""`) every held-out row is `eval`.

`check` refuses any assignment in which a document has two roles, and `splits` reports documents
and rows per role and domain with the overlap recomputed from the rows' document ids.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from jaxsel import config as config_lib

ROLES = ("target", "target_eval", "eval")


@dataclasses.dataclass(frozen=True)
class Roles:
    """Held-out row ids (sorted) by role, and the target domain they were drawn for ("": none)."""

    target_domain: str
    ids: dict[str, np.ndarray]

    def rows(self, role: str, heldout, max_per_domain: int = 0) -> np.ndarray:
        """The rows of `role`, at most the first `max_per_domain` of each domain (0: all)."""
        ids = self.ids[role]
        if max_per_domain <= 0:
            return ids
        domains = np.asarray(heldout.domains)[ids]
        keep = [ids[domains == d][:max_per_domain] for d in np.unique(domains)]
        return np.sort(np.concatenate(keep)) if keep else ids


def assign(heldout, section: ml_collections.ConfigDict) -> Roles:
    """The roles of the held-out pool `heldout` under `config.roles` (`section`): see the module
    docstring. A ConfigError names the key when the target domain is unknown or too small to
    give every role a group of documents."""
    target_domain = section.target_domain
    every = np.arange(len(heldout))
    if not target_domain:
        return _checked(heldout, Roles("", {"target": every[:0], "target_eval": every[:0],
                                            "eval": every}))
    config_lib.check(target_domain in heldout.domain_names, "roles.target_domain",
                     f"{target_domain!r} is not a domain of the held-out pool; domains: "
                     f"{heldout.domain_names}")
    rows = heldout.ids_of_domain(target_domain)
    groups_of_rows = np.asarray(heldout.groups)[rows]
    groups = np.unique(groups_of_rows)
    config_lib.check(len(groups) >= len(ROLES), "roles.target_domain",
                     f"{target_domain!r} has {len(heldout.doc_ids(rows))} held-out documents in "
                     f"{len(groups)} document group(s); the roles target, target_eval and eval "
                     "need one each: raise data.heldout_fraction or data.heldout_groups, or name "
                     "a larger domain")
    order = np.random.default_rng(section.seed).permutation(groups)
    docs = np.array([len(heldout.doc_ids(rows[groups_of_rows == g])) for g in order])
    share = np.cumsum(docs) / docs.sum()
    cuts = np.searchsorted(share, [section.target_fraction,
                                   section.target_fraction + section.target_eval_fraction])
    n_target = int(np.clip(cuts[0] + 1, 1, len(order) - 2))
    n_eval = int(np.clip(cuts[1] + 1, n_target + 1, len(order) - 1))
    role_of = {g: role for role, part in zip(
        ROLES, np.split(order, [n_target, n_eval]), strict=True) for g in part}
    row_roles = np.array([role_of[g] for g in groups_of_rows])
    ids = {role: rows[row_roles == role] for role in ("target", "target_eval")}
    ids["eval"] = np.setdiff1d(every, np.concatenate(list(ids.values())))
    return _checked(heldout, Roles(target_domain, ids))


def _checked(heldout, roles: Roles) -> Roles:
    check(heldout, roles.ids)
    return roles


def check(heldout, ids_by_role: dict[str, np.ndarray]) -> None:
    """Raises a ValueError naming the document and the roles if a document of `heldout` is in
    rows of two roles, or a row has two roles."""
    names = list(ids_by_role)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            rows = np.intersect1d(ids_by_role[a], ids_by_role[b])
            if rows.size:
                raise ValueError(f"held-out row {rows[0]} is in roles {a} and {b}")
            docs = np.intersect1d(heldout.doc_ids(ids_by_role[a]),
                                  heldout.doc_ids(ids_by_role[b]))
            if docs.size:
                raise ValueError(f"document {docs[0]} is in roles {a} and {b} ({docs.size} "
                                 "documents in both)")


def splits(pools: dict, roles: Roles) -> dict:
    """What report.json says of the data a run used: documents and rows of the train pool and of
    each held-out role, in all and per domain, and `overlap_documents`: the documents found in
    more than one of them (recomputed from the rows' document ids; 0 unless something is
    wrong)."""
    parts = {"train": (pools["train"], np.arange(len(pools["train"])))}
    parts.update({role: (pools["heldout"], roles.ids[role]) for role in ROLES})
    out, docs_by_part = {"target_domain": roles.target_domain}, []
    for name, (pool, ids) in parts.items():
        domains = np.asarray(pool.domains)[ids]
        per_domain = {}
        for index in np.unique(domains):
            mine = ids[domains == index]
            per_domain[pool.domain_names[index]] = {"documents": int(len(pool.doc_ids(mine))),
                                                    "rows": int(len(mine))}
        docs = pool.doc_ids(ids)
        docs_by_part.append(docs)
        out[name] = {"documents": int(len(docs)), "rows": int(len(ids)), "domains": per_domain}
    _, counts = np.unique(np.concatenate(docs_by_part), return_counts=True)
    out["overlap_documents"] = int((counts > 1).sum())
    return out

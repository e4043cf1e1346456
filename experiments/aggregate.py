"""Aggregates runs of one experiment made one seed at a time (`jaxsel.aggregate`):

    python -m experiments.aggregate --workdirs=runs/compare_s0,runs/compare_s1,runs/compare_s2 \
        --out=runs/compare_seeds --baseline=random --match=target_eval_loss,downstream.average

`--match` keeps the paths containing one of the comma-separated substrings. Writes
`aggregate.json` and `aggregate.md` into `--out`. (An experiment run with `--config.seeds`
aggregates its seeds itself.)
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from jaxsel import aggregate, report

WORKDIRS = flags.DEFINE_list("workdirs", None, "Finished runs of one experiment.", required=True)
OUT = flags.DEFINE_string("out", None, "Where aggregate.json / aggregate.md go.", required=True)
BASELINE = flags.DEFINE_string("baseline", "", "An arm name to take paired differences to.")
MATCH = flags.DEFINE_list("match", [], "Keep the paths containing one of these substrings.")


def main(argv):
    del argv
    workdirs = WORKDIRS.value
    result = aggregate.aggregate(aggregate.load_runs(workdirs), BASELINE.value,
                                 tuple(MATCH.value))
    report.write_json(os.path.join(OUT.value, "aggregate.json"),
                      {"workdirs": workdirs, "numbers": result})
    report.write_text(os.path.join(OUT.value, "aggregate.md"),
                      aggregate.to_markdown(result, workdirs))
    logging.info("aggregated %d numbers over %d runs: %s/aggregate.md", len(result),
                 len(workdirs), OUT.value)


if __name__ == "__main__":
    app.run(main)

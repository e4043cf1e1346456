"""Per-example probing, vmapped chunks against the one-candidate-at-a-time loop, in one run.

    python -m benchmarks.probe [--candidates 64] [--loop_candidates 16] [--rounds 4]
                               [--chunk_size 16] [--eval_batch_size 1] [--reference_items 32]
                               [--reference_batch_size 8] [--k 256] [--max_docs 200]

The tiny preset on the local corpus (`--max_docs` documents per domain): a model trained
`--warm_steps` steps (so AdamW has real moments and a step count), candidates drawn from the train
pool, and a reference set of `--reference_items` cloze items (last word only) from the held-out
prose of `--reference_domain`. Prints one JSON line per measurement, then a summary object with:

- `oracle_probes_per_s`: exact one-step influences per second, `Prober.oracle_influence`;
- `oracle_probes_per_s_loop`: the original MATES method (`probe_oracle_data_influence.py`), one
  candidate at a time: restore the pristine state from its checkpoint on disk (orbax, as their
  `fabric.load`), one jitted `Trainer.train_step` on that candidate, one jitted reference eval with
  logits at every position (as their cross-entropy over whole sequences with ignored labels);
  `oracle_speedup` is their ratio, `oracle_loop_time_fraction` splits the loop's time into those
  three phases, `oracle_speedup_without_restore` compares against the loop's step and eval time
  alone (a loop that never restores, which no exact loop can beat), and
  `oracle_max_abs_diff_loop` checks that both compute the same;
- `grad_features_per_s` / `grad_features_per_s_loop` / `grad_speedup`: projected per-example
  gradients (`--k` dims), `Prober.grad_features` against the same jitted function on one example
  at a time (whose projection is generated again for every example);
- `first_order_probes_per_s` and `first_order_spearman`: the first-order approximation's speed and
  how well it ranks the candidates like the exact oracle;
- the ceiling: `oracle_matmul_flops_per_probe` (one train step on the candidate, 3x the forward
  matmuls of its `seq_len` tokens, plus the reference forward: every reference token through the
  blocks, the LM head at the target positions only; the chunk's shared "before" eval left out),
  `matmul_peak_flops_per_s` (the best sample of a jitted 2048^3 float32 matmul, interleaved with
  the rounds), `oracle_matmul_utilisation` (the oracle's FLOP rate over that peak) and
  `oracle_speedup_bound`: the speedup over the loop if the oracle's matmuls ran at that peak and
  nothing else cost time, the most this exact computation can reach on the machine.

Everything is compiled before timing; the measurements are interleaved in `--rounds` rounds on
fresh candidates, so a change in machine load hits all of them. All run on the default devices.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import tempfile
import time

import jax
import numpy as np

from benchmarks.common import MatmulPeak, emit
from jaxsel import checkpoint, probe, references, sharding, train
from jaxsel import config as config_lib
from jaxsel.data import pool as pool_lib


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--loop_candidates", type=int, default=16)
    p.add_argument("--chunk_size", type=int, default=16)
    p.add_argument("--reference_items", type=int, default=32)
    p.add_argument("--reference_batch_size", type=int, default=8)
    p.add_argument("--eval_batch_size", type=int, default=1)  # 1: fastest on a CPU.
    p.add_argument("--reference_domain", default="reference")
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--max_docs", type=int, default=200)
    p.add_argument("--warm_steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def head(candidates: dict, n: int) -> dict:
    return {k: v[:n] for k, v in candidates.items()}


def timed(fn) -> tuple[float, object]:
    """Wall seconds of `fn()` (until its result is ready) and the result."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def setup(args):
    """(trainer, warm state, candidate rows, cloze reference) on the tiny preset."""
    config = config_lib.base_config("tiny")
    config.data.max_docs = args.max_docs
    config.seed = args.seed
    pools = pool_lib.build_pools(config)
    trainer = train.Trainer(config)
    state = trainer.new_state(trainer.init_params(config.seed))
    rng = np.random.default_rng(args.seed)
    train_pool = pools["train"]
    for _ in range(args.warm_steps):
        rows = train_pool.rows(rng.choice(len(train_pool), config.train.batch_size))
        state, _ = trainer.train_step(state, sharding.global_batch(rows, trainer.mesh))
    ids = rng.choice(len(train_pool), args.candidates, replace=False)
    reference = references.cloze_from_pool(
        pools["heldout"], pools["heldout"].ids_of_domain(args.reference_domain),
        args.reference_items)
    emit({"preset": "tiny", "params": sum(x.size for x in jax.tree.leaves(state.params)),
          "seq_len": config.data.seq_len, "candidates": args.candidates,
          "loop_candidates": args.loop_candidates, "chunk_size": args.chunk_size,
          "reference_batch_size": args.reference_batch_size,
          "eval_batch_size": args.eval_batch_size,
          "reference_items": int(reference.tokens_RxL.shape[0]),
          "reference_targets": int(reference.weights_RxK.sum()), "k": args.k,
          "step": int(state.step), "device": str(jax.devices()[0]),
          "devices": jax.device_count(), "cpu_count": os.cpu_count()})
    return trainer, state, train_pool.rows(ids), reference


def dense(reference: references.Reference) -> references.Reference:
    """The same reference set with every position's logits computed (weight 0 where not read)."""
    tokens, positions, weights = (np.asarray(x) for x in (
        reference.tokens_RxL, reference.positions_RxK, reference.weights_RxK))
    weights_RxL = np.zeros(tokens.shape, np.float32)
    np.add.at(weights_RxL, (np.arange(len(tokens))[:, None], positions), weights)
    everywhere = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return references.Reference(tokens, np.asarray(reference.segments_RxL), everywhere, weights_RxL)


def make_oracle_loop(trainer, state, reference, batch_size: int, workdir: str):
    """The original method as `loop(candidates) -> (influences, seconds by phase)`: `state` is
    saved once as a checkpoint in `workdir`; per candidate, it is restored from disk, one jitted
    train step runs on that candidate alone, and one jitted eval of the dense reference."""
    mngr = checkpoint.manager(workdir, keep=1)
    checkpoint.save(mngr, int(state.step), state.params, state.opt_state,
                    {"step": int(state.step)})
    mngr.wait_until_finished()
    abstract = trainer.abstract_state
    put = functools.partial(jax.make_array_from_process_local_data,
                            sharding.replicated(trainer.mesh))
    ref = references.Reference(*(put(x) for x in jax.tree.leaves(dense(reference))))
    ref_loss = jax.jit(functools.partial(probe.reference_loss, trainer.model,
                                         batch_size=batch_size))
    before = float(ref_loss(state.params, ref))

    def loop(candidates) -> tuple[np.ndarray, dict[str, float]]:
        out, phases = [], collections.Counter()
        for i in range(len(candidates["tokens"])):
            clock = time.perf_counter()
            params, opt_state, meta = checkpoint.restore(mngr, abstract.params,
                                                         abstract.opt_state)
            pristine = jax.block_until_ready(train.TrainState(
                jax.device_put(np.int32(meta["step"]), trainer.state_shardings.step), params,
                opt_state))
            phases["restore"] += time.perf_counter() - clock
            clock = time.perf_counter()
            one = sharding.global_batch({k: v[i:i + 1] for k, v in candidates.items()},
                                        trainer.mesh)
            stepped, _ = jax.block_until_ready(trainer.train_step(pristine, one))
            phases["step"] += time.perf_counter() - clock
            clock = time.perf_counter()
            out.append(float(ref_loss(stepped.params, ref)) - before)
            phases["eval"] += time.perf_counter() - clock
        return np.asarray(out, np.float32), dict(phases)

    return loop


def make_features_loop(trainer, projection):
    """`loop(params, candidates) -> [N, k]`: the chunks' jitted function on one example at a
    time (so the projection is generated again for every example)."""
    one = jax.jit(functools.partial(probe.chunk_grad_features, model=trainer.model),
                  static_argnums=2)

    def loop(params, candidates) -> np.ndarray:
        return np.concatenate([
            np.asarray(one(params, {k: v[i:i + 1] for k, v in candidates.items()}, projection))
            for i in range(len(candidates["tokens"]))])

    return loop


def measure(args: argparse.Namespace, workdir: str) -> None:
    """Every measurement and the summary; the loop's checkpoint lives in `workdir`."""
    rounds = args.rounds
    if args.candidates % rounds or args.loop_candidates % rounds:
        raise ValueError(f"--candidates and --loop_candidates must be multiples of --rounds "
                         f"{rounds}")
    n, n_loop = args.candidates // rounds, args.loop_candidates // rounds
    if n_loop > n:
        raise ValueError("--loop_candidates must be <= --candidates")
    trainer, state, candidates, reference = setup(args)
    prober = probe.Prober(trainer, chunk_size=args.chunk_size,
                          reference_batch_size=args.reference_batch_size,
                          eval_batch_size=args.eval_batch_size)
    projection = probe.GradProjection(k=args.k, seed=args.seed)
    oracle_loop = make_oracle_loop(trainer, state, reference, args.reference_batch_size, workdir)
    features_loop = make_features_loop(trainer, projection)
    measures = {
        "oracle": lambda c: prober.oracle_influence(state, c, reference, progress=False),
        "oracle_loop": lambda c: oracle_loop(head(c, n_loop)),
        "first_order": lambda c: prober.first_order_influence(state, c, reference,
                                                              progress=False),
        "grad_features": lambda c: prober.grad_features(state.params, c, projection,
                                                        progress=False),
        "grad_features_loop": lambda c: features_loop(state.params, head(c, n_loop)),
    }
    peak = MatmulPeak(2048, 2048, 2048, reps=2, mesh=trainer.mesh)
    for name, fn in measures.items():  # Compile everything before any timing.
        fn(head(candidates, 1 if name.endswith("_loop") else args.chunk_size))
    # Rounds interleave the measurements, so that a change in machine load hits all of them.
    seconds, outputs = collections.Counter(), collections.defaultdict(list)
    peak_samples = []
    for r in range(rounds):
        peak_samples.append(peak.sample()[0])
        emit({"round": r, "measure": "matmul_2048", "flops_per_s": peak_samples[-1]})
        chunk = {k: v[r * n:(r + 1) * n] for k, v in candidates.items()}  # Fresh candidates.
        for name, fn in measures.items():
            took, out = timed(lambda fn=fn, chunk=chunk: fn(chunk))
            seconds[name] += took
            outputs[name].append(out)
            count = n_loop if name.endswith("_loop") else n
            emit({"round": r, "measure": name, "probes": count, "seconds": took})
    exact, exact_loop = np.concatenate(outputs["oracle"]), np.concatenate(
        [influences for influences, _ in outputs["oracle_loop"]])
    phases = collections.Counter()
    for _, by_phase in outputs["oracle_loop"]:
        phases.update(by_phase)
    features = np.concatenate(outputs["grad_features"])
    features_one = np.concatenate(outputs["grad_features_loop"])

    def firsts(x):
        """The rows of `x` (all candidates) that the loops probed: the first of each round."""
        return np.concatenate([x[r * n:r * n + n_loop] for r in range(rounds)])

    total, total_loop = n * rounds, n_loop * rounds
    summary = {
        "oracle_probes_per_s": total / seconds["oracle"],
        "oracle_probes_per_s_loop": total_loop / seconds["oracle_loop"],
        "oracle_loop_time_fraction": {k: v / sum(phases.values()) for k, v in phases.items()},
        "oracle_max_abs_diff_loop": float(np.abs(firsts(exact) - exact_loop).max()),
        "first_order_probes_per_s": total / seconds["first_order"],
        "first_order_spearman": probe.first_order_spearman(exact, np.concatenate(
            outputs["first_order"])),
        "grad_features_per_s": total / seconds["grad_features"],
        "grad_features_per_s_loop": total_loop / seconds["grad_features_loop"],
        "grad_features_max_rel_diff_loop": float(
            np.abs(firsts(features) - features_one).max() / np.abs(features_one).max()),
    }
    summary["oracle_speedup"] = summary["oracle_probes_per_s"] / summary[
        "oracle_probes_per_s_loop"]
    summary["oracle_speedup_without_restore"] = summary["oracle_speedup"] * (
        1 - summary["oracle_loop_time_fraction"]["restore"])
    flops = probe.oracle_matmul_flops(trainer.model.cfg, candidates["tokens"].shape[1], reference)
    summary.update(
        oracle_matmul_flops_per_probe=flops, matmul_peak_flops_per_s=max(peak_samples),
        oracle_matmul_utilisation=flops * summary["oracle_probes_per_s"] / max(peak_samples),
        oracle_speedup_bound=max(peak_samples) / flops / summary["oracle_probes_per_s_loop"])
    summary["grad_speedup"] = summary["grad_features_per_s"] / summary[
        "grad_features_per_s_loop"]
    emit(summary)


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="probe_benchmark_") as workdir:
        measure(args, workdir)


if __name__ == "__main__":
    main()

"""Training throughput and MFU against a float32 matmul peak measured in the same run, and the input
pipeline's tokens/s beside the train step's.

    python -m benchmarks.train_throughput [--d-model 512 --layers 6 --seq-len 256 --batch 8]
                                          [--rounds 7 --steps 1]
    python -m benchmarks.train_throughput --preset 410m --seq-len 2048 --batch 16 \
        [--dtype bfloat16 --attention auto --remat none]

Without `--preset` the model is the CPU shape above, on the `tiny` preset's CPU settings (float32,
row-major projections, unrolled layers). `--preset` takes a preset's model shape and settings;
`--dtype`, `--attention` and `--remat` override the model's, and shape flags given explicitly
override the preset's.

Prints one JSON line per measurement as it is made (each with `cpu_util`, process CPU seconds per
wall second: about the core count when the machine is not shared), then a summary object with:

- `tokens_per_s`: tokens (batch x seq_len) per second through `Trainer.train_step` (the jitted,
  donating AdamW step the training loop runs), on batches from the pipeline already on the devices;
- `model_flops_per_s`: `3 * matmul_flops_per_token(cfg, seq_len)` FLOPs per token (every matmul:
  q/k/v/out projections, the full L x L attention scores and values, the MLP, the LM head;
  backward = 2x forward) times `tokens_per_s`;
- `matmul_peak_flops_per_s`: the rate (2*M*N*K FLOPs per second) of jitted float32 matmuls on the
  same devices, in the same process, interleaved with the train steps: the highest per-shape median
  of a square 2048 matmul and the model's own MLP shapes ([B*L, d] x [d, mlp] and
  [B*L, mlp] x [mlp, d]), in the model's compute dtype;
- `mfu`: `model_flops_per_s / matmul_peak_flops_per_s`; `mfu_vs_spec`: against the devices'
  datasheet peak for the compute dtype (`benchmarks.common.PEAK_FLOPS`: H100/H200, A100, TPU v4,
  v5e, v5p; null for other kinds). Beside them, for a machine shared with other
  work: `mfu_vs_best_sample` (against the fastest single matmul sample of the run: a lower bound),
  `mfu_paired` (median over rounds of the train rate over the best matmul rate of the same round)
  and the median `cpu_util` of the train steps and the matmuls;
- `pipeline_tokens_per_s`: tokens per second `jaxsel.data.pipeline.make_batches` delivers (one
  process, the same batch size and seed) from a synthetic pool of the same seq_len built through
  `jaxsel.data.pool.build_pools` in a temporary cache, and `pipeline_to_train_ratio`.

`compile_s` is the seconds to lower and compile the train step. Train-step times exclude
compilation (the step is compiled ahead of time and run once before timing) and block on the
final state of each timed run; the train figures are medians over
`--rounds` rounds. On a 2-core CPU the default run takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np

from benchmarks.common import MatmulPeak, emit, peak_flops
from jaxsel import config as config_lib
from jaxsel import sharding, train
from jaxsel.data import pipeline
from jaxsel.data import pool as pool_lib
from jaxsel.model import attention
from jaxsel.model.transformer import (
    REMAT_POLICIES,
    ModelConfig,
    count_params,
    matmul_flops_per_token,
)

CPU_SHAPE = dict(d_model=512, num_layers=6, num_heads=8, mlp_dim=2048, vocab_size=2048)
SHAPE_FLAGS = {"d_model": "d_model", "layers": "num_layers", "heads": "num_heads",
               "mlp_dim": "mlp_dim", "vocab": "vocab_size"}


def make_config(args) -> ml_collections.ConfigDict:
    c = config_lib.base_config(args.preset or "tiny")
    if not args.preset:
        c.model.update(CPU_SHAPE)
    c.model.update({key: getattr(args, flag) for flag, key in SHAPE_FLAGS.items()
                    if getattr(args, flag) is not None})
    c.model.update({key: getattr(args, key) for key in ("dtype", "attention", "remat")
                    if getattr(args, key) is not None})
    seq_len = args.seq_len or (c.data.seq_len if args.preset else 256)
    c.model.max_seq_len = max(c.model.max_seq_len, seq_len)
    c.data.update(source="synthetic", seq_len=seq_len)
    c.train.update(batch_size=args.batch, steps=1_000_000)
    config_lib.validate(c, jax.device_count())
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(config_lib.MODEL_PRESETS), default=None,
                        help="a preset's model shape and settings (default: the CPU shape)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    parser.add_argument("--attention", choices=attention.IMPLEMENTATIONS, default=None)
    parser.add_argument("--remat", choices=sorted(REMAT_POLICIES), default=None)
    for flag in SHAPE_FLAGS:
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="default: 256, or the preset's data.seq_len")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved measurement rounds")
    parser.add_argument("--steps", type=int, default=1, help="train steps timed per round")
    parser.add_argument("--matmul-reps", type=int, default=2, help="matmuls timed per sample")
    parser.add_argument("--pipeline-batches", type=int, default=200)
    args = parser.parse_args()

    config = make_config(args)
    cfg = ModelConfig.from_config(config.model)
    seq_len = config.data.seq_len
    implementation = attention.resolve(cfg.attention, jax.default_backend(), cfg.dtype,
                                       cfg.head_dim, seq_len)
    device_kind = jax.devices()[0].device_kind
    spec = peak_flops(device_kind, cfg.dtype)
    tokens_per_step = args.batch * seq_len
    flops_per_step = 3 * matmul_flops_per_token(cfg, seq_len) * tokens_per_step
    emit({"measure": "setup", "devices": jax.device_count(), "device": str(jax.devices()[0]),
          "device_kind": device_kind, "platform": jax.default_backend(),
          "cpu_count": os.cpu_count(),
          "loadavg_1m": round(os.getloadavg()[0], 2), "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", "")})

    with tempfile.TemporaryDirectory(prefix="jaxsel-bench-") as cache_dir:
        # The data: a synthetic pool through the real data layer (pool -> grain pipeline).
        config.data.cache_dir = cache_dir
        start = time.perf_counter()
        pool = pool_lib.build_pools(config)["train"]
        ids = np.arange(len(pool))
        emit({"measure": "pool_build", "rows": len(pool), "seq_len": pool.seq_len,
              "seconds": round(time.perf_counter() - start, 2)})
        batches = iter(pipeline.make_batches(pool, ids, args.batch, config.seed,
                                             jax.process_index(), jax.process_count()))

        # The model and its compiled step.
        trainer = train.Trainer(config)
        state = trainer.new_state(trainer.init_params(config.seed))
        device_batches, documents_per_row = [], 0
        for _ in range(4):
            rows = next(batches)
            documents_per_row = max(documents_per_row, attention.most_runs(rows["segments"]))
            if implementation == "cudnn":
                attention.check_runs(rows["segments"], cfg.max_segments)
            device_batches.append(sharding.global_batch(
                {"tokens": rows["tokens"], "segments": rows["segments"]}, trainer.mesh))
        start = time.perf_counter()
        step_fn = trainer.train_step.lower(state, device_batches[0]).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        state, metrics = step_fn(state, device_batches[0])
        jax.block_until_ready((state, metrics))
        emit({"measure": "model", "d_model": cfg.d_model, "layers": cfg.num_layers,
              "heads": cfg.num_heads, "mlp_dim": cfg.mlp_dim, "mlp": cfg.mlp,
              "vocab": cfg.vocab_size, "seq_len": seq_len, "batch": args.batch,
              "dtype": cfg.dtype, "attention": implementation, "remat": cfg.remat,
              "max_documents_per_row": documents_per_row, "params": count_params(state.params),
              "matmul_flops_per_token": matmul_flops_per_token(cfg, seq_len),
              "model_flops_per_step": flops_per_step, "compile_s": round(compile_s, 2),
              "first_step_s": round(time.perf_counter() - start, 3),
              "loss": float(metrics["loss"])})

        # The peak: a square matmul and the model's own largest matmuls, compiled and warmed up.
        peaks = [MatmulPeak(m, k, n, args.matmul_reps, trainer.mesh, cfg.dtype)
                 for m, k, n in ((2048, 2048, 2048), (tokens_per_step, cfg.d_model, cfg.mlp_dim),
                                 (tokens_per_step, cfg.mlp_dim, cfg.d_model))]

        # Interleaved rounds: every matmul shape, then `steps` train steps.
        peak_rates = {p.shape: [] for p in peaks}
        train_rates, paired, train_utils, matmul_utils = [], [], [], []
        step_index = 1
        for r in range(args.rounds):
            round_peak = 0.0
            for p in peaks:
                rate, util = p.sample()
                peak_rates[p.shape].append(rate)
                matmul_utils.append(util)
                round_peak = max(round_peak, rate)
                emit({"measure": "matmul", "round": r, "mkn": list(p.shape),
                      "flops_per_s": round(rate), "cpu_util": round(util, 2)})
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                state, metrics = step_fn(state, device_batches[step_index % len(device_batches)])
                step_index += 1
            jax.block_until_ready((state, metrics))
            wall = time.perf_counter() - start
            step_s = wall / args.steps
            train_rates.append(flops_per_step / step_s)
            paired.append(train_rates[-1] / round_peak)
            train_utils.append((time.process_time() - cpu) / wall)
            emit({"measure": "train_step", "round": r, "step_s": round(step_s, 4),
                  "tokens_per_s": round(tokens_per_step / step_s, 1),
                  "model_flops_per_s": round(train_rates[-1]),
                  "cpu_util": round(train_utils[-1], 2), "loss": float(metrics["loss"])})

        # The input pipeline, alone: the same pool, batch size and seed the steps above read.
        pipeline_rates = []
        for r in range(3):
            rate = pipeline.pipeline_tokens_per_s(pool, ids, args.batch, config.seed,
                                                  args.pipeline_batches)
            pipeline_rates.append(rate)
            emit({"measure": "pipeline", "round": r, "batches": args.pipeline_batches,
                  "tokens_per_s": round(rate)})

    # The peak: the highest per-shape median. Beside it, the MFU against the fastest single sample:
    # load from other processes only slows samples down, so that one is a lower bound.
    medians = {shape: statistics.median(v) for shape, v in peak_rates.items()}
    peak_shape = max(medians, key=medians.get)
    peak, best = medians[peak_shape], max(max(v) for v in peak_rates.values())
    model_flops_per_s = statistics.median(train_rates)
    tokens_per_s = model_flops_per_s / flops_per_step * tokens_per_step
    pipeline_tokens_per_s = statistics.median(pipeline_rates)
    emit({"summary": "train_throughput", "preset": args.preset, "d_model": cfg.d_model,
          "layers": cfg.num_layers, "seq_len": seq_len, "batch": args.batch,
          "dtype": cfg.dtype, "attention": implementation, "remat": cfg.remat,
          "devices": jax.device_count(), "device_kind": device_kind,
          "compile_s": round(compile_s, 2),
          "tokens_per_s": round(tokens_per_s, 1),
          "model_flops_per_s": round(model_flops_per_s),
          "matmul_peak_flops_per_s": round(peak), "matmul_peak_mkn": list(peak_shape),
          "mfu": round(model_flops_per_s / peak, 4),
          "mfu_vs_spec": (None if spec is None
                          else round(model_flops_per_s / (spec * jax.device_count()), 4)),
          "matmul_best_sample_flops_per_s": round(best),
          "mfu_vs_best_sample": round(model_flops_per_s / best, 4),
          "mfu_paired": round(statistics.median(paired), 4),
          "train_cpu_util": round(statistics.median(train_utils), 2),
          "matmul_cpu_util": round(statistics.median(matmul_utils), 2),
          "pipeline_tokens_per_s": round(pipeline_tokens_per_s),
          "pipeline_to_train_ratio": round(pipeline_tokens_per_s / tokens_per_s, 1),
          "loadavg_1m": round(os.getloadavg()[0], 2)})


if __name__ == "__main__":
    main()

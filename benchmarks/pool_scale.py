"""Per-row computations over a pool at scale, through the streaming path (`jaxsel.stream`).

    python -m benchmarks.pool_scale [--sizes 100000 1000000] [--seq_len 64] [--chunk 65536]

A synthetic pool (`make_pool`): seeded random tokens of the tiny LM's 2048-token vocabulary,
`seq_len` per row, each row two or three packed documents, written as memory-mapped `.npy`
files. Then, each in its own process (so that its peak resident memory is its own), at every
size:

- `token_mean`: the mean of a tiny LM's input token embeddings (`embed.lm_token_mean`);
- `ngram_hash`: 512 hashed unigram and bigram buckets (`embed.ngram_hash`);
- `lm_loss`: the tiny LM's per-sequence losses (`probe.pool_losses`);

each streamed to disk in chunks of `--chunk` rows. For each: rows/s at each size, `time_ratio`
(seconds at the largest size over the smallest: linear is the size ratio) and `rss_ratio` (peak
resident memory at the largest size over the smallest: flat is 1).

`resume_equal`: a `token_mean` run killed (SIGKILL) once some chunks are done, then resumed,
against an uninterrupted run: true when the arrays are equal.

The encoder: the Flax all-MiniLM-L6-v2 (`embed.encoder_embed`) on `--encoder_rows` sequences of
128 tokens (`encoder_seqs_per_s`), and on mixed lengths (uniform in 8 ... 128) visited shortest
first in length buckets (`encoder_mixed_seqs_per_s`) against the same rows padded to 128
(`encoder_mixed_padded_seqs_per_s`).

Prints one JSON line per measurement, then the summary object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import emit

VOCAB, BUCKETS, COMPUTATIONS = 2048, 512, ("token_mean", "ngram_hash", "lm_loss")


def make_pool(folder: str, rows: int, seq_len: int, seed: int = 0, chunk: int = 65536) -> None:
    """`tokens.npy` and `segments.npy` `[rows, seq_len]` int32 in `folder`, chunk by chunk."""
    os.makedirs(folder, exist_ok=True)
    tokens = np.lib.format.open_memmap(os.path.join(folder, "tokens.npy"), "w+", np.int32,
                                       (rows, seq_len))
    segments = np.lib.format.open_memmap(os.path.join(folder, "segments.npy"), "w+", np.int32,
                                         (rows, seq_len))
    rng = np.random.default_rng(seed)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        tokens[start:start + n] = rng.integers(0, VOCAB, (n, seq_len), dtype=np.int32)
        cuts = np.sort(rng.integers(1, seq_len, (n, 2)), axis=1)
        position = np.arange(seq_len)[None, :]
        segments[start:start + n] = 1 + (position >= cuts[:, :1]) + (position >= cuts[:, 1:])
    tokens.flush()
    segments.flush()


def _config(seq_len: int):
    from jaxsel import config as config_lib
    config = config_lib.base_config("tiny")
    config.data.seq_len = seq_len
    return config


def run_one(name: str, pool_folder: str, out_folder: str, chunk: int) -> dict:
    """One computation over the pool in `pool_folder`, streamed into `out_folder`."""
    from jaxsel import embed, probe, stream, train
    tokens = np.load(os.path.join(pool_folder, "tokens.npy"), mmap_mode="r")
    segments = np.load(os.path.join(pool_folder, "segments.npy"), mmap_mode="r")
    trainer = train.Trainer(_config(tokens.shape[1]))
    params = trainer.init_params(0)
    target = stream.Target(out_folder, name, {"pool": pool_folder, "rows": len(tokens)}, chunk)
    start = time.perf_counter()
    if name == "token_mean":
        embed.lm_token_mean(params, tokens, segments, batch_size=4096, progress=False, to=target)
    elif name == "ngram_hash":
        embed.ngram_hash(tokens, segments, BUCKETS, batch_size=4096, progress=False, to=target)
    else:
        pool = _ArrayPool(tokens, segments)
        probe.pool_losses(trainer, params, pool, 256, progress=False, to=target)
    return {"seconds": time.perf_counter() - start}


class _ArrayPool:
    """What `probe.pool_losses` reads of a pool: its length and `rows(ids)`."""

    def __init__(self, tokens, segments):
        self.tokens, self.segments = tokens, segments

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, ids):
        from jaxsel import files
        return {"tokens": files.read_rows(self.tokens, ids),
                "segments": files.read_rows(self.segments, ids)}


def _worker(args) -> None:
    result = run_one(args.worker, args.pool, args.out, args.chunk)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result), flush=True)


def _spawn(name: str, pool: str, out: str, chunk: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.pool_scale", "--worker", name, "--pool", pool,
         "--out", out, "--chunk", str(chunk)], stdout=subprocess.PIPE, text=True)


def measure(name: str, pool: str, out: str, chunk: int, rows: int) -> dict:
    proc = _spawn(name, pool, out, chunk)
    stdout, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{name} on {rows} rows failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    return emit({"method": name, "rows": rows, "seconds": round(result["seconds"], 2),
                 "rows_per_s": round(rows / result["seconds"], 1),
                 "peak_rss_mb": round(result["peak_rss_mb"], 1)})


def resume_equal(pool: str, work: str, chunk: int) -> bool:
    """Kills a streamed `token_mean` once two chunks are done, resumes it, compares."""
    from jaxsel import stream
    killed, whole = os.path.join(work, "killed"), os.path.join(work, "whole")
    proc = _spawn("token_mean", pool, killed, chunk)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [os.path.join(r, stream.DONE) for r in _subfolders(killed)]
        if done and os.path.isdir(done[0]) and len(os.listdir(done[0])) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for folder in (killed, whole):
        out = _spawn("token_mean", pool, folder, chunk)
        out.communicate()
    a, b = (np.load(os.path.join(_subfolders(f)[0], "result.npy"), mmap_mode="r")
            for f in (killed, whole))
    equal = all(np.array_equal(a[s:s + chunk], b[s:s + chunk]) for s in range(0, len(a), chunk))
    return emit({"method": "resume", "equal": bool(equal)})["equal"]


def _subfolders(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))]


def bench_encoder(rows: int, batch_size: int = 32) -> dict:
    from jaxsel import embed
    from jaxsel.model import encoder as encoder_lib
    encoder = encoder_lib.load_encoder(max_length=128)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, encoder.config.vocab_size, (rows, 128)).astype(np.int32)
    mixed = rng.integers(8, 129, rows).astype(np.int32)
    speeds = {}
    for label, lengths, multiple in (("full", np.full(rows, 128, np.int32), 32),
                                     ("mixed", mixed, 16), ("mixed_padded", mixed, 128)):
        embed.encoder_embed(encoder, ids, lengths, batch_size, multiple,
                            progress=False)  # Compile every bucket's shape first.
        start = time.perf_counter()
        embed.encoder_embed(encoder, ids, lengths, batch_size, multiple, progress=False)
        speeds[label] = rows / (time.perf_counter() - start)
        emit({"method": "encoder", "lengths": label, "length_multiple": multiple,
              "seqs_per_s": round(speeds[label], 1)})
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--encoder_rows", type=int, default=1024)
    parser.add_argument("--worker", default="")
    parser.add_argument("--pool", default="")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    work = tempfile.mkdtemp(prefix="pool_scale_")
    try:
        results = {}
        for rows in args.sizes:
            pool = os.path.join(work, f"pool_{rows}")
            make_pool(pool, rows, args.seq_len)
            for name in COMPUTATIONS:
                results[name, rows] = measure(name, pool, os.path.join(work, f"out_{rows}"),
                                              args.chunk, rows)
        small, large = min(args.sizes), max(args.sizes)
        resumed = resume_equal(os.path.join(work, f"pool_{small}"), work, args.chunk // 4)
        encoder = bench_encoder(args.encoder_rows)
        summary = {"sizes": args.sizes, "seq_len": args.seq_len, "chunk": args.chunk}
        for name in COMPUTATIONS:
            a, b = results[name, small], results[name, large]
            summary[name] = {
                "rows_per_s": {str(r): results[name, r]["rows_per_s"] for r in args.sizes},
                "time_ratio": round(b["seconds"] / a["seconds"], 2),
                "rss_ratio": round(b["peak_rss_mb"] / a["peak_rss_mb"], 3)}
        summary.update(resume_equal=resumed,
                       encoder_seqs_per_s=round(encoder["full"], 1),
                       encoder_mixed_seqs_per_s=round(encoder["mixed"], 1),
                       encoder_mixed_padded_seqs_per_s=round(encoder["mixed_padded"], 1))
        emit({"summary": summary})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

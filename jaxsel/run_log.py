"""What a training run records besides metrics.jsonl: TensorBoard event files, a profiler trace
of chosen steps, the parameter count and each device's peak memory.

- `Events(workdir, start)`: TensorBoard scalars in `<workdir>/tensorboard` (tensorboardX's
  `SummaryWriter`, process 0 only): each metrics row's training scalars under `train/` (loss,
  grad_norm, lr, steps/s, tokens/s) and its eval numbers under `eval/` (nested keys joined by
  `/`). A resumed run purges the events logged after its start step, as metrics.jsonl drops
  its rows.
- `Profile(workdir, steps)`: with `train.profile_steps = (A, B)`, a `jax.profiler` trace of
  steps A..B in `<workdir>/profile`.
- A remote workdir (`gs://`): both are written into its local `files.scratch` and uploaded, the
  events after every row, the trace when it ends.
- `log_model_and_memory(params)`: the parameter count and every local device's peak memory
  (where the backend reports it), logged once.
"""

from __future__ import annotations

import os

import jax
from absl import logging
from tensorboardX import SummaryWriter

from jaxsel import files
from jaxsel.model import transformer

TRAIN_KEYS = ("loss", "grad_norm", "lr", "steps_per_s", "tokens_per_s")


class Events:
    """TensorBoard event files of one run (a no-op on processes other than 0)."""

    def __init__(self, workdir: str, start_step: int):
        self.writer = None
        self.folder = os.path.join(workdir, "tensorboard")
        if jax.process_index() == 0:  # A new event file; its purge step hides later steps' events.
            self.writer = SummaryWriter(files.scratch(self.folder),
                                        purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        """One metrics row (`step`, the training scalars, optionally `eval`)."""
        if self.writer is None:
            return
        for key in TRAIN_KEYS:
            if key in row:
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])
        for key, value in _flat(row.get("eval") or {}).items():
            self.writer.add_scalar(f"eval/{key}", value, row["step"])
        self.writer.flush()
        if files.is_remote(self.folder):
            files.upload(files.scratch(self.folder), self.folder)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            if files.is_remote(self.folder):
                files.upload(files.scratch(self.folder), self.folder)


def _flat(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


class Profile:
    """Traces steps `steps[0]..steps[1]` (inclusive) into `<workdir>/profile`; `steps` empty:
    nothing."""

    def __init__(self, workdir: str, steps: tuple[int, ...]):
        self.folder = os.path.join(workdir, "profile")
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first:
            jax.profiler.start_trace(files.scratch(self.folder))
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(state)
            self.close()
            logging.info("profile of steps %d-%d in %s", self.first, self.last, self.folder)

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if files.is_remote(self.folder):
                files.upload(files.scratch(self.folder), self.folder)


def log_model_and_memory(params) -> dict:
    """Logs (and returns) the parameter count and each local device's peak memory in bytes
    (None where the backend keeps no memory statistics, as on CPU)."""
    peaks = {}
    for device in jax.local_devices():
        stats = device.memory_stats() or {}
        peaks[str(device)] = stats.get("peak_bytes_in_use")
    count = transformer.count_params(params)
    logging.info("parameters: %s; peak memory per device: %s", f"{count:,}",
                 {d: "n/a" if p is None else f"{p / 2**30:.2f} GiB" for d, p in peaks.items()})
    return {"params": count, "peak_bytes": peaks}

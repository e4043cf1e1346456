"""Bad configs fail before any work, with a message that names the key."""

import os
import subprocess
import sys

import pytest

from experiments.configs import pretrain
from jaxsel import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_presets_and_options():
    config = pretrain.get_config("small,steps=7,seq_len=64")
    assert config.model.d_model == 768 and config.train.steps == 7 and config.data.seq_len == 64
    config_lib.validate(config, num_devices=1)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        pretrain.get_config("huge")
    with pytest.raises(ValueError, match="stepz"):
        pretrain.get_config("tiny,stepz=3")


@pytest.mark.parametrize("key,value,devices,message", [
    ("train.steps", -1, 1, "config.train.steps: must be >= 1"),
    ("train.stop_at", 301, 1, "config.train.stop_at: must be in \\[0, train.steps=300\\]"),
    ("train.batch_size", 6, 4, "config.train.batch_size: 6 is not divisible"),
    ("data.seq_len", 512, 1, "config.data.seq_len: 512 exceeds model.max_seq_len=256"),
    ("model.num_heads", 3, 1, "config.model.num_heads: 3 does not divide"),
    ("optim.schedule", "linear", 1, "config.optim.schedule: 'linear' is not one of"),
    ("data.source", "s3", 1, "config.data.source: 's3' is not one of"),
    ("mesh.fsdp", 3, 4, "config.mesh: fsdp\\*tensor=3 does not divide the 4 devices"),
    ("data.heldout_groups", 2, 1, "config.data.heldout_groups: must be >= 3"),
    ("data.packing", "rows", 1, "config.data.packing: 'rows' is not one of"),
    ("optim.decay_steps", 301, 1, "config.optim.decay_steps: must be in \\[0, train.steps"),
    ("roles.target_fraction", 1.0, 1, "config.roles.target_fraction: must be in"),
    ("roles.target_eval_fraction", 0.6, 1,
     "config.roles.target_eval_fraction: .* leaves no eval documents"),
    ("roles.target_items", 0, 1, "config.roles.target_items: must be >= 1"),
])
def test_impossible_values_name_the_key(key, value, devices, message):
    config = pretrain.get_config("tiny")
    section, leaf = key.split(".")
    config[section][leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(config, num_devices=devices)


@pytest.mark.parametrize("override,message", [
    ("--config.train.stepz=3", "stepz"),
    ("--config.train.steps=many", "steps"),
    ("--config.train.steps=-5", "config.train.steps: must be >= 1"),
])
def test_command_line_refuses_bad_override_before_work(tmp_path, override, message):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.pretrain",
         "--config=experiments/configs/pretrain.py:tiny", f"--workdir={workdir}", override],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not workdir.exists()  # Nothing was written: it failed before any work.


def test_stream_seeds_are_fixed_distinct_31_bit_ints():
    seeds = {config_lib.stream_seed(s, stream, i)
             for s in range(3) for stream in range(4) for i in range(5)}
    assert len(seeds) == 60 and all(0 <= x < 2**31 for x in seeds)
    assert config_lib.stream_seed(7, 1, 2) == config_lib.stream_seed(7, 1, 2)

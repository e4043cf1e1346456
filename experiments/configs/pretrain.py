"""Pretrain an LM on a pool (all of it, or a saved selection).

    python -m experiments.pretrain --config=experiments/configs/pretrain.py:tiny --workdir=DIR
    python -m experiments.pretrain --config=experiments/configs/pretrain.py:small,steps=5000 ...
"""

from jaxsel import config as config_lib


def get_config(arg=None):
    preset, options = config_lib.parse_arg(arg)
    config = config_lib.base_config(preset)
    config.selection = ""  # Path to a saved selection (selection.json); empty -> the whole pool.
    config_lib.apply_options(config, options)
    return config

"""Fits the influence model of a synthetic task (a tiny random encoder) and saves its predictions.

`tests/test_influence_model.py` runs `run()` on one device and this worker on 8 CPU devices
(`JAX_NUM_CPU_DEVICES=8`, a data-parallel mesh), so only the mesh differs between the two.
Usage: python -m tests.workers.influence_worker OUT.npz
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tokenizers

from jaxsel import influence_model, sharding
from jaxsel.model import encoder as encoder_lib

MAX_LENGTH = 32
TINY = encoder_lib.EncoderConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2,
                                 intermediate_size=64, max_position_embeddings=MAX_LENGTH,
                                 type_vocab_size=2)
# Dropout on: the 8-device run must draw the same masks.
FIT = influence_model.FitConfig(learning_rate=3e-3, epochs=6, batch_size=32,
                                warmup_fraction=0.1, length_multiple=32, seed=0)
FILLER = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by",
          "at", "from", "it", "his", "an", "were", "are", "which", "this", "be", "or"]
MARKER = "zebra"
NUM_FIT, NUM_HELDOUT = 400, 80


def tiny_encoder() -> encoder_lib.Encoder:
    """A randomly initialised 2-layer BERT (hidden 32) with MiniLM's tokenizer, mean pooling."""
    folder = encoder_lib.default_encoder_dir()
    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_LENGTH)
    ids = np.zeros((1, 4), np.int32)
    abstract = jax.eval_shape(encoder_lib.BertEncoder(TINY).init, jax.random.key(0), ids,
                              ids == 0)
    rng = np.random.default_rng(0)  # BERT's init, drawn by numpy: faster than compiling one.

    def init(path, leaf):
        name = path[-1].key
        if name in ("scale", "bias"):
            return jnp.full(leaf.shape, 1.0 if name == "scale" else 0.0, jnp.float32)
        return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), jnp.float32)

    params = jax.tree_util.tree_map_with_path(init, abstract)
    return encoder_lib.Encoder(TINY, params, tokenizer, encoder_lib.Pooling("mean"), MAX_LENGTH,
                               pad_id=0, folder=folder)


def synthetic_task(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """Texts of 4..23 filler words, 0..3 of them replaced by the marker; the label is minus the
    marker's share of the words plus N(0, 0.01^2) noise (more markers: lower, i.e. better)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], np.empty(n)
    for i in range(n):
        words = list(rng.choice(FILLER, rng.integers(4, 24)))
        count = rng.integers(0, 4)
        for position in rng.choice(len(words), count, replace=False):
            words[position] = MARKER
        texts.append(" ".join(words))
        labels[i] = -count / len(words)
    return texts, labels + 0.01 * rng.standard_normal(n)


def task_inputs(encoder) -> dict[str, np.ndarray]:
    """Token ids, lengths and labels of the fitting examples and of held-out ones."""
    texts, labels = synthetic_task(NUM_FIT + NUM_HELDOUT, seed=1)
    ids, lengths = encoder_lib.tokenize(encoder, texts)
    return dict(ids=ids, lengths=lengths, labels=labels)


def run(mesh=None):
    """(fit result, held-out predictions) of the synthetic task."""
    encoder = tiny_encoder()
    data = task_inputs(encoder)
    fit_rows, held = slice(0, NUM_FIT), slice(NUM_FIT, None)
    result = influence_model.fit(encoder, data["ids"][fit_rows], data["lengths"][fit_rows],
                                 data["labels"][fit_rows], FIT, mesh=mesh, progress=False)
    preds = influence_model.predict(encoder, result.params, result.label_mean, result.label_std,
                                    data["ids"][held], data["lengths"][held], batch_size=32,
                                    length_multiple=32, mesh=mesh, progress=False)
    return result, preds


def main():
    config = ml_collections.ConfigDict({"mesh": {"data": -1, "fsdp": 1, "tensor": 1}})
    mesh = sharding.make_mesh(config)
    assert mesh.shape["data"] == 8, mesh.shape
    encoder = tiny_encoder()
    data = task_inputs(encoder)
    try:  # A batch that cannot be split over 8 devices is refused before any work.
        influence_model.fit(encoder, data["ids"], data["lengths"], data["labels"],
                            dataclasses.replace(FIT, batch_size=12), mesh=mesh, progress=False)
        refused = ""
    except ValueError as error:
        refused = str(error)
    result, preds = run(mesh)
    np.savez(sys.argv[1], preds=preds, best_epoch=result.best_epoch, refused=refused,
             val_spearman=[h["val_spearman"] for h in result.history],
             train_loss=[h["train_loss"] for h in result.history])


if __name__ == "__main__":
    main()

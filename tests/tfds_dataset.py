"""A tiny TFDS text dataset in array_record, for the reader and source tests.

It holds one bad record of each kind TFDS can hold, and is written and read by tfds itself in this
venv, which has no TensorFlow."""

import tensorflow_datasets as tfds

NAME = "jaxsel_test_text"
# (content, topic) of the records, in order: three good ones, then invalid UTF-8 and a blank text.
RECORDS = [("first document", "even"), ("second document", "odd"), ("third one", "even"),
           (b"bad \xff bytes", "odd"), ("  ", "even")]
GOOD = RECORDS[:3]


class JaxselTestText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"content": tfds.features.Text(), "topic": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (content, topic) in enumerate(RECORDS):
            yield i, {"content": content, "topic": topic}


def prepare(data_dir) -> str:
    """Writes the dataset under `data_dir`; returns it as a string for data.tfds_data_dir."""
    JaxselTestText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)

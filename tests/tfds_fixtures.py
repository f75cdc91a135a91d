"""tests/data/tfds-cifar10-{array_record,tfrecord}.tar.gz, CIFAR-10 as tensorflow-datasets prepares it, and
the arrays they hold. The archives are tfds' own `cifar10` builder run on a 13-image binary archive written
here, so that the tests read what tfds writes. Preparing needs TensorFlow, which the tests' environment
lacks, hence archives made once (with tensorflow-cpu 2.21.0, tensorflow-datasets 4.9.10, array_record 0.8.6):

    python -m venv /tmp/tfv && /tmp/tfv/bin/pip install tensorflow-cpu tensorflow-datasets==4.9.10 array_record
    /tmp/tfv/bin/python tests/tfds_fixtures.py

Image i of the archive is flat (value 37 i + 11 in channels 0 and 2, that XOR 0x55 in channel 1), so that
PNG keeps it small and every image differs.
"""

import tarfile
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
FILES = {**{f"data_batch_{i}.bin": 2 for i in range(1, 6)}, "test_batch.bin": 3}
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def numbers(name: str) -> np.ndarray:
    """The images' numbers in the whole archive: consecutive over FILES."""
    start = sum(list(FILES.values())[:list(FILES).index(name)])
    return np.arange(start, start + FILES[name])


def images(name: str) -> np.ndarray:
    """(n, 32, 32, 3) uint8."""
    value = (numbers(name) * 37 + 11) % 256
    x = np.broadcast_to(value[:, None, None, None], (len(value), 32, 32, 3)).astype(np.uint8)
    return x ^ np.array([0, 0x55, 0], np.uint8)


def labels(name: str) -> np.ndarray:
    return (numbers(name) * 3 + 1) % 10


def expected() -> dict:
    """{"train"|"test": {"image", "label"}} in the order of the binary archive (tfds stores a shuffled order)."""
    splits = {"train": [n for n in FILES if n.startswith("data_batch")], "test": ["test_batch.bin"]}
    return {split: {"image": np.concatenate([images(n) for n in names]),
                    "label": np.concatenate([labels(n) for n in names]).astype(np.int32)}
            for split, names in splits.items()}


def write_binary(raw: Path) -> None:
    batches = raw / "cifar-10-batches-bin"
    batches.mkdir(parents=True)
    for name in FILES:
        rows = [bytes([label]) + image.transpose(2, 0, 1).tobytes()  # CHW, as the binary format stores it
                for label, image in zip(labels(name), images(name))]
        (batches / name).write_bytes(b"".join(rows))
    (batches / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n")


def main() -> None:
    import tensorflow_datasets as tfds

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        write_binary(raw)
        for file_format in ("array_record", "tfrecord"):
            data_dir = Path(tmp) / file_format
            builder = tfds.builder("cifar10", data_dir=str(data_dir))
            with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", lambda self, url: raw):
                builder.download_and_prepare(file_format=file_format)
            with tarfile.open(DATA / f"tfds-cifar10-{file_format}.tar.gz", "w:gz") as tar:
                tar.add(data_dir / "cifar10", arcname="cifar10")


if __name__ == "__main__":
    main()

"""CIFAR-10 that arrives by itself: the official archive's format served on 127.0.0.1 by a server the test
starts (never the network), downloaded, verified, kept, and every way it can fail — one line, no file left."""

import hashlib
import http.server
import importlib.util
import json
import logging.handlers
import os
import re
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tfds_fixtures
from fixtures import synthetic, tar_gz, write_pickles

from jaxnet import data

ROOT = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """(bytes, arrays) of a small archive in the official layout: cifar-10-batches-py/ in a .tar.gz."""
    root = tmp_path_factory.mktemp("archive")
    arrays = synthetic(n_train=100, n_test=50)
    path = tar_gz(write_pickles(root / "src", arrays), root / "cifar-10-python.tar.gz")
    return path.read_bytes(), arrays


@pytest.fixture(scope="module")
def server(archive):
    """A loopback HTTP server: /ok the archive, /truncated half of it under the full Content-Length, /corrupt
    the archive with one byte changed, anything else 404. Yields its base URL and the requests it served."""
    blob = archive[0]
    served = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            served.append(self.path)
            name = self.path.strip("/").split("/")[0]
            body = {"ok": blob, "truncated": blob, "corrupt": blob[:-100] + bytes([blob[-100] ^ 1]) + blob[-99:]}
            if name not in body:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(body[name][: len(blob) // 2] if name == "truncated" else body[name])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()


def _url(server, archive, name="ok", sha256=None):
    return f"{server[0]}/{name}/cifar-10-python.tar.gz#sha256={sha256 or hashlib.sha256(archive[0]).hexdigest()}"


@pytest.fixture
def no_local_copy(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)


def test_the_archive_is_downloaded_verified_kept_and_read(tmp_path, monkeypatch, server, archive, no_local_copy):
    monkeypatch.setenv(data.URL_ENV_VAR, _url(server, archive))
    cache = tmp_path / "cache"
    before = len(server[1])
    got = data.load_cifar10(cache_dir=cache, tfds_data_dir=str(tmp_path / "tfds"), show_progress=False)
    for split in data.SPLITS:
        np.testing.assert_array_equal(got[split]["image"], archive[1][split]["image"])
        np.testing.assert_array_equal(got[split]["label"], archive[1][split]["label"])
    kept = cache / "downloads" / "cifar-10-python.tar.gz"
    assert kept.read_bytes() == archive[0] and len(server[1]) == before + 1
    assert [p.name for p in kept.parent.iterdir()] == ["cifar-10-python.tar.gz"]  # no temporary file left
    again = data.load_cifar10(cache_dir=cache, tfds_data_dir=str(tmp_path / "tfds"), show_progress=False)
    np.testing.assert_array_equal(again["train"]["image"], got["train"]["image"])
    assert len(server[1]) == before + 1  # the second load reads the kept archive (and its decoded cache)


def test_an_empty_environment_variable_counts_as_unset(tmp_path, monkeypatch, server, archive):
    """JAXNET_CIFAR10= was read as the working directory, all of it, before an error about its folders."""
    monkeypatch.setenv(data.ENV_VAR, "")
    monkeypatch.setenv(data.URL_ENV_VAR, _url(server, archive))
    got = data.load_cifar10(cache_dir=tmp_path / "cache", tfds_data_dir=str(tmp_path / "tfds"), show_progress=False)
    np.testing.assert_array_equal(got["test"]["image"], archive[1]["test"]["image"])


@pytest.mark.parametrize("name,sha256,message", [
    ("truncated", None, r"cut short|IncompleteRead"),
    ("corrupt", None, r"has SHA-256 [0-9a-f]{64}, expected [0-9a-f]{64}: not the CIFAR-10 archive"),
    ("ok", "ab" * 32, r"has SHA-256 [0-9a-f]{64}, expected (ab){32}"),
    ("missing", None, r"cannot download CIFAR-10 from .* \(HTTPError: Not Found\)"),
])
def test_a_failed_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, server, archive, no_local_copy,
                                                          name, sha256, message):
    monkeypatch.setenv(data.URL_ENV_VAR, _url(server, archive, name, sha256))
    with pytest.raises(data.DataError, match=message) as raised:
        data.load_cifar10(cache_dir=tmp_path / "cache", tfds_data_dir=str(tmp_path / "tfds"), show_progress=False)
    assert "\n" not in str(raised.value) and "--data-dir" in str(raised.value)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_no_source_and_no_network_names_the_options_quickly(tmp_path, monkeypatch, no_local_copy):
    monkeypatch.setenv(data.URL_ENV_VAR, f"http://127.0.0.1:{_closed_port()}/cifar.tar.gz#sha256={'0' * 64}")
    start = time.monotonic()
    with pytest.raises(data.DataError, match=r"cannot download CIFAR-10 .*--data-dir.*JAXNET_CIFAR10"):
        data.load_cifar10(tfds_data_dir=str(tmp_path / "tfds"), cache_dir=tmp_path / "cache", show_progress=False)
    assert time.monotonic() - start < 10
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def _tfds_copy(tmp_path: Path, file_format: str) -> str:
    """A data_dir of tensorflow-datasets holding cifar10 prepared by tfds itself in `file_format`."""
    with tarfile.open(tfds_fixtures.DATA / f"tfds-cifar10-{file_format}.tar.gz") as tar:
        tar.extractall(tmp_path / "tfds", filter="data")
    return str(tmp_path / "tfds")


def _assert_holds_the_fixture(got: dict) -> None:
    """tfds stores the examples shuffled: compare in the order of the images' values (each its own)."""
    for split, want in tfds_fixtures.expected().items():
        for key in ("image", "label"):
            in_order = [a[key][np.argsort(a["image"][:, 0, 0, 0])] for a in (got[split], want)]
            assert in_order[0].dtype == in_order[1].dtype
            np.testing.assert_array_equal(*in_order)


def test_a_prepared_tfds_copy_in_a_random_access_format_is_read_without_downloading(tmp_path, monkeypatch,
                                                                                   no_local_copy):
    monkeypatch.setenv(data.URL_ENV_VAR, f"http://127.0.0.1:{_closed_port()}/cifar.tar.gz#sha256={'0' * 64}")
    got = data.load_cifar10(cache_dir=tmp_path / "cache", tfds_data_dir=_tfds_copy(tmp_path, "array_record"),
                            show_progress=False)
    _assert_holds_the_fixture(got)


def test_a_tfrecord_tfds_copy_without_tensorflow_is_passed_over_with_a_warning_that_says_why(
        tmp_path, monkeypatch, server, archive, no_local_copy):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here: it reads the tfrecord copy (test_..._read_through_tensorflow)")
    monkeypatch.setenv(data.URL_ENV_VAR, _url(server, archive))
    captured = logging.handlers.BufferingHandler(capacity=100)
    data.log.addHandler(captured)  # on the module's logger itself: the CLI stops propagation above "jaxnet"
    try:
        got = data.load_cifar10(cache_dir=tmp_path / "cache", tfds_data_dir=_tfds_copy(tmp_path, "tfrecord"),
                                show_progress=False)
    finally:
        data.log.removeHandler(captured)
    np.testing.assert_array_equal(got["test"]["image"], archive[1]["test"]["image"])  # the download instead
    [record] = captured.buffer
    assert record.levelname == "WARNING" and "\n" not in record.getMessage()
    assert re.fullmatch(r"tensorflow-datasets' cifar10 in .*tfds/cifar10/3\.0\.2 is in tfrecord format, which only "
                        r"TensorFlow reads \(install tensorflow, or prepare it again with file_format='array_record'\)"
                        r": passed over", record.getMessage())


def test_a_tfrecord_tfds_copy_is_read_through_tensorflow(tmp_path, monkeypatch, no_local_copy):
    pytest.importorskip("tensorflow", reason="TensorFlow reads tfds' tfrecord format; not installed here")
    monkeypatch.setenv(data.URL_ENV_VAR, f"http://127.0.0.1:{_closed_port()}/cifar.tar.gz#sha256={'0' * 64}")
    folder = _tfds_copy(tmp_path, "tfrecord")
    _assert_holds_the_fixture(data.load_cifar10(cache_dir=tmp_path / "cache", tfds_data_dir=folder,
                                                show_progress=False))
    _assert_holds_the_fixture(data.load_cifar10(folder, cache_dir=tmp_path / "cache2", show_progress=False))


def test_a_tfds_folder_given_as_the_data_dir_is_read_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "elsewhere"))  # the folder given is the one read
    folder = _tfds_copy(tmp_path, "array_record")
    _assert_holds_the_fixture(data.load_cifar10(folder, cache_dir=tmp_path / "cache", show_progress=False))
    [cached] = (tmp_path / "cache").glob("cifar10-*.npz")
    _assert_holds_the_fixture(data.load_cifar10(folder, cache_dir=tmp_path / "cache", show_progress=False))
    assert list((tmp_path / "cache").glob("cifar10-*.npz")) == [cached]


def test_a_tfrecord_tfds_folder_given_as_the_data_dir_without_tensorflow_is_one_line(tmp_path):
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed here: it reads the tfrecord copy (test_..._read_through_tensorflow)")
    result = subprocess.run([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "--workdir",
                             str(tmp_path / "run"), "--data-dir", _tfds_copy(tmp_path, "tfrecord")], cwd=ROOT,
                            env=os.environ | {"XDG_CACHE_HOME": str(tmp_path / "cache")}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert re.fullmatch(r"error: tensorflow-datasets' cifar10 in .*/tfds/cifar10/3\.0\.2 is in tfrecord format, "
                        r"which only TensorFlow reads \(install tensorflow, or prepare it again with "
                        r"file_format='array_record'\)\n", result.stderr)
    assert not (tmp_path / "run").exists()


def test_looking_for_a_tfds_copy_leaves_no_temporary_folder(tmp_path, monkeypatch, no_local_copy):
    """tfds.builder on a data_dir without the dataset makes a temporary folder it never removes."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv(data.URL_ENV_VAR, f"http://127.0.0.1:{_closed_port()}/cifar.tar.gz#sha256={'0' * 64}")
    with pytest.raises(data.DataError, match="cannot download CIFAR-10"):
        data.load_cifar10(tfds_data_dir=str(tmp_path / "tfds"), cache_dir=tmp_path / "cache", show_progress=False)
    assert not list((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("value", ["http://127.0.0.1/x.tar.gz", "http://127.0.0.1/x.tar.gz#sha256=xyz"])
def test_a_url_without_its_checksum_is_refused(tmp_path, monkeypatch, no_local_copy, value):
    monkeypatch.setenv(data.URL_ENV_VAR, value)
    with pytest.raises(data.DataError, match=r"JAXNET_CIFAR10_URL must be URL#sha256=<64 hex digits>"):
        data.load_cifar10(cache_dir=tmp_path / "cache", show_progress=False)


def test_the_experiment_with_no_local_copy_downloads_and_trains(tmp_path, server, archive):
    """The real entry point as a new user with a network runs it: no --data-dir, no JAXNET_CIFAR10, and a
    tfds copy in tfds' default format that an environment without TensorFlow cannot read."""
    unreadable_tfds = importlib.util.find_spec("tensorflow") is None
    env = {k: v for k, v in os.environ.items() if k != data.ENV_VAR} | {
        "XDG_CACHE_HOME": str(tmp_path / "cache"), data.URL_ENV_VAR: _url(server, archive),
        "TFDS_DATA_DIR": _tfds_copy(tmp_path, "tfrecord") if unreadable_tfds else str(tmp_path / "tfds")}
    result = subprocess.run([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "--workdir",
                             str(tmp_path / "run"), "train_subset=80", "val_size=16", "test_subset=32",
                             "epochs=1.0", "batch_size=16"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cache" / "jaxnet" / "downloads" / "cifar-10-python.tar.gz").read_bytes() == archive[0]
    if unreadable_tfds:
        assert result.stderr.count("is in tfrecord format, which only TensorFlow reads (") == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4

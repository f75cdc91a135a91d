"""CIFAR-10 that arrives by itself: the official archive's format served on 127.0.0.1 by a server the test
starts (never the network), downloaded, verified, kept, and every way it can fail — one line, no file left."""

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
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


@pytest.mark.parametrize("value", ["http://127.0.0.1/x.tar.gz", "http://127.0.0.1/x.tar.gz#sha256=xyz"])
def test_a_url_without_its_checksum_is_refused(tmp_path, monkeypatch, no_local_copy, value):
    monkeypatch.setenv(data.URL_ENV_VAR, value)
    with pytest.raises(data.DataError, match=r"JAXNET_CIFAR10_URL must be URL#sha256=<64 hex digits>"):
        data.load_cifar10(cache_dir=tmp_path / "cache", show_progress=False)


def test_the_experiment_with_no_local_copy_downloads_and_trains(tmp_path, server, archive):
    """The real entry point as a new user with a network runs it: no --data-dir, no JAXNET_CIFAR10."""
    env = {k: v for k, v in os.environ.items() if k != data.ENV_VAR} | {
        "XDG_CACHE_HOME": str(tmp_path / "cache"), data.URL_ENV_VAR: _url(server, archive),
        "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    result = subprocess.run([sys.executable, "-m", "experiments.cifar10", "--config", "smoke", "--workdir",
                             str(tmp_path / "run"), "train_subset=80", "val_size=16", "test_subset=32",
                             "epochs=1.0", "batch_size=16"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cache" / "jaxnet" / "downloads" / "cifar-10-python.tar.gz").read_bytes() == archive[0]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 4

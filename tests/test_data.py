"""batchnorm.data: IDX parsing, checks, the data directory, downloads (faked: no network)."""

import gzip
import hashlib
import io
import os
import struct
import tracemalloc
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest

from batchnorm import data
from batchnorm.data import MnistError, MnistFile, MnistNotFoundError

SHARED_5K = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist-5k"
NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file of uint8 ``array``, written from the format's definition."""
    magic = 2051 if array.ndim == 3 else 2049
    return struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_mnist(directory: Path, n_train: int = 200, n_test: int = 100, *, gz: bool = True,
                seed: int = 0) -> dict:
    """Write four random MNIST-format files; return the arrays by key of ``data.FILES``."""
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8)}
    directory.mkdir(parents=True, exist_ok=True)
    for key, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (directory / (NAMES[key] + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (directory / NAMES[key]).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_load_returns_the_written_arrays(tmp_path, gz):
    arrays = write_mnist(tmp_path, 7, 5, gz=gz)
    mnist = data.load_mnist(tmp_path, download=False)
    for key, array in arrays.items():
        np.testing.assert_array_equal(getattr(mnist, key), array)
    assert mnist.note == ("training set: 7 images (full MNIST has 60,000); "
                          "test set: 5 images (full MNIST has 10,000)")
    described = mnist.describe()
    assert (described["n_train"], described["n_test"], described["full_train"]) == (7, 5, False)
    assert described["md5_verified"] == []  # no file has an original's size


def _labels(values) -> bytes:
    return idx_bytes(np.array(values, dtype=np.uint8))


IMAGES = idx_bytes(np.zeros((2, 28, 28), np.uint8))
# name -> (file kind, file bytes, words the error must contain)
CORRUPT_CASES = {
    "bad magic": ("images", struct.pack(">i", 2049) + IMAGES[4:], ["magic number 2049",
                                                                    "expected 2051"]),
    "wrong image size": ("images", struct.pack(">4i", 2051, 2, 27, 28) + bytes(2 * 27 * 28),
                         ["27x28", "expected 28x28"]),
    "truncated data": ("images", IMAGES[:-1], ["truncated", "2 images"]),
    "extra bytes": ("images", IMAGES + b"\0", ["longer than its header says"]),
    "truncated header": ("labels", struct.pack(">i", 2049), ["shorter than", "header"]),
    "label out of range": ("labels", _labels([3, 10]), ["label 10", "0..9"]),
}


@pytest.mark.parametrize("case", CORRUPT_CASES, ids=list(CORRUPT_CASES))
def test_corrupt_idx_is_named_in_the_error(tmp_path, case):
    kind, content, words = CORRUPT_CASES[case]
    path = tmp_path / "file-idx"
    path.write_bytes(content)
    with pytest.raises(MnistError) as error:
        data.read_idx(path, kind)
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_truncated_gzip_and_fake_gzip(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_labels(range(10)))[:-6])
    with pytest.raises(MnistError, match="not a complete gzip file"):
        data.read_idx(path, "labels")
    path.write_bytes(_labels(range(10)))
    with pytest.raises(MnistError, match="not gzip-compressed"):
        data.read_idx(path, "labels")


def test_gzip_bomb_is_rejected_without_inflating_it(tmp_path):
    """10 promised labels, then 64 MiB of zeros: rejected, and the zeros are never held."""
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    block = bytes(1 << 20)
    with gzip.open(path, "wb", compresslevel=1) as stream:
        stream.write(_labels(range(10)))
        for _ in range(64):
            stream.write(block)
    assert path.stat().st_size < 1 << 20  # about 1/200 of what it inflates to
    tracemalloc.start()
    try:
        with pytest.raises(MnistError) as error:
            data.read_idx(path, "labels")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(error.value) and "extra data" in str(error.value)
    assert "10 labels" in str(error.value)
    assert peak < 4 << 20, f"peak {peak:,} bytes while reading a 10-label file"


def test_header_promising_too_many_items_is_rejected(tmp_path):
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">ii", 2049, 2**31 - 1) + bytes(10))
    with pytest.raises(MnistError, match="promises 2,147,483,647 labels, expected 0 to"):
        data.read_idx(path, "labels")


def test_dangling_symlink_is_named_as_a_broken_link(tmp_path):
    write_mnist(tmp_path, 6, 4)
    link = tmp_path / "t10k-images-idx3-ubyte.gz"
    link.unlink()
    target = tmp_path / "elsewhere" / "t10k-images-idx3-ubyte.gz"
    link.symlink_to(target)
    with pytest.raises(MnistError) as error:
        data.load_mnist(tmp_path, download=False)
    message = str(error.value)
    assert "broken symbolic link" in message and str(link) in message and str(target) in message
    assert "missing" not in message


def test_inconsistent_counts_name_both_files(tmp_path):
    write_mnist(tmp_path, 6, 4)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_labels([1] * 5)))
    with pytest.raises(MnistError, match="6 images but .*5 labels"):
        data.load_mnist(tmp_path, download=False)


def test_file_with_the_original_size_must_have_its_md5(tmp_path):
    write_mnist(tmp_path, 6, 4)
    spec = data.FILES["test_labels"]
    (tmp_path / spec.name).write_bytes(bytes(spec.size))  # the published size, other bytes
    with pytest.raises(MnistError) as error:
        data.load_mnist(tmp_path, download=False)
    assert spec.md5 in str(error.value) and "corrupt" in str(error.value)


def test_directory_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHNORM_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert data.resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("BATCHNORM_DATA")
    assert data.resolve_data_dir() == tmp_path / "cache" / "batchnorm" / "mnist"


def test_a_file_is_not_a_data_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(MnistError, match="is a file, expected a directory"):
        data.load_mnist(tmp_path / "f", download=False)


class FakeResponse(io.BytesIO):
    """What urlopen returns, for a fixed body."""

    def __init__(self, body: bytes):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))}


def fake_opener(bodies: dict):
    """An opener serving ``bodies[url]``, raising URLError for any other URL."""
    calls = []

    def opener(url, timeout=None):
        calls.append(url)
        if url not in bodies:
            raise URLError("unreachable in tests")
        return FakeResponse(bodies[url])

    opener.calls = calls
    return opener


def test_download_tries_mirrors_in_order_and_checks_md5(tmp_path):
    body = gzip.compress(_labels([1, 2, 3]))
    spec = MnistFile("t10k-labels-idx1-ubyte.gz", "labels", 3, len(body),
                     hashlib.md5(body).hexdigest())
    opener = fake_opener({"https://second.example/mnist/" + spec.name: body})
    path = data.download_file(spec, tmp_path / "new", opener=opener, progress=False,
                              mirrors=["https://first.example/", "https://second.example/mnist"])
    assert path.read_bytes() == body
    assert opener.calls == ["https://first.example/" + spec.name,
                            "https://second.example/mnist/" + spec.name]
    assert sorted(os.listdir(tmp_path / "new")) == [spec.name]  # no .part left


def test_download_with_wrong_checksum_leaves_nothing(tmp_path):
    spec = data.FILES["test_labels"]
    opener = fake_opener({"https://m.example/" + spec.name: b"not mnist"})
    with pytest.raises(MnistNotFoundError) as error:
        data.download_file(spec, tmp_path, mirrors=["https://m.example/"], opener=opener,
                           progress=False)
    assert spec.md5 in str(error.value) and "Put the four files" in str(error.value)
    assert os.listdir(tmp_path) == []


def test_offline_error_says_where_to_put_the_files(tmp_path):
    with pytest.raises(MnistNotFoundError) as error:
        data.load_mnist(tmp_path / "empty", opener=fake_opener({}), progress=False)
    message = str(error.value)
    assert str(tmp_path / "empty") in message and "--data-dir" in message
    for spec in data.FILES.values():
        assert spec.name in message


@pytest.mark.skipif(not SHARED_5K.is_dir(), reason=f"{SHARED_5K} is not on this machine")
def test_shared_5k_directory():
    mnist = data.load_mnist(SHARED_5K, download=False)
    # The test files are the originals: their published MD5s (from the MNIST site) match.
    published = {"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                 "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
    for name, md5 in published.items():
        assert hashlib.md5((SHARED_5K / name).read_bytes()).hexdigest() == md5
    assert sorted(mnist.verified) == sorted(published)
    assert mnist.note.startswith("training set: 5,000 images (full MNIST has 60,000)")
    assert np.bincount(mnist.train_labels).tolist() == [500] * 10
    assert mnist.test_images.shape == (10_000, 28, 28)

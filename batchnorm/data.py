"""MNIST from its original IDX files: find, download, verify and parse them (no pickle).

The directory comes from the caller, else ``$BATCHNORM_DATA``, else a cache directory
(``$XDG_CACHE_HOME/batchnorm/mnist`` or ``~/.cache/batchnorm/mnist``). Each of the four files may
be gzip-compressed (``*.gz``, the published form) or raw.

Checks, and why:

- A ``.gz`` file with the published byte size must have the published MD5: that is the original
  file, so any other digest means it is corrupt. Downloads are checked the same way before they
  are moved into place, so an interrupted download never looks finished.
- Every file is parsed from its header: magic number (2051 images, 2049 labels), 28x28 images, and
  a length exactly equal to the header plus the data it promises, so truncated or padded files are
  caught even when no checksum applies (raw files, or a smaller training set).
- Files are read as a stream, header first, and never past the data the header promises (plus one
  byte, to tell a padded file from a complete one); the promise itself is capped at
  :data:`MAX_ITEMS`. So memory is bounded by what a plausible header promises, whatever the file
  inflates to: a gzip bomb is rejected after reading a few bytes past its header's promise.
- A name in the directory that is a broken symbolic link, or not a regular file, is an error that
  says so (and where the link points) instead of passing for a missing file.
- Labels lie in 0..9 and each image file has as many items as its label file.

A training set smaller than the original 60,000 images is accepted; :attr:`Mnist.note` says so,
and every experiment output repeats it.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

import numpy as np

__all__ = [
    "FILES",
    "MAX_ITEMS",
    "MIRRORS",
    "Mnist",
    "MnistError",
    "MnistFile",
    "MnistNotFoundError",
    "download_file",
    "load_mnist",
    "read_idx",
    "resolve_data_dir",
]


@dataclass(frozen=True)
class MnistFile:
    """One of the four published MNIST files.

    Args:
        name: file name of the gzip original, e.g. ``"t10k-labels-idx1-ubyte.gz"``.
        kind: ``"images"`` or ``"labels"``.
        count: number of items in the original.
        size: byte size of the gzip original.
        md5: published MD5 of the gzip original.
    """

    name: str
    kind: str
    count: int
    size: int
    md5: str


FILES = {
    "train_images": MnistFile(
        "train-images-idx3-ubyte.gz", "images", 60_000, 9_912_422,
        "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train_labels": MnistFile(
        "train-labels-idx1-ubyte.gz", "labels", 60_000, 28_881,
        "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": MnistFile(
        "t10k-images-idx3-ubyte.gz", "images", 10_000, 1_648_877,
        "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": MnistFile(
        "t10k-labels-idx1-ubyte.gz", "labels", 10_000, 4_542,
        "ec29112dd5afa0611ce80d1b7f02629c"),
}

# Public mirrors of the original files, tried in order (the original site throttles downloads).
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# IDX header: magic number and number of dimensions for each kind of file.
_MAGIC = {"images": (2051, 3), "labels": (2049, 1)}
_GZIP_MAGIC = b"\x1f\x8b"

# The most items an IDX header may promise: far above MNIST's 60,000, so only a corrupt or hostile
# header reaches it. It bounds what a header can make the reader hold (784 MB of images), since
# the data is read up to the header's promise before its true length is known.
MAX_ITEMS = 1_000_000
_CHUNK = 1 << 20  # bytes read (and, for gzip, inflated) at a time


class MnistError(ValueError):
    """A data file exists but is corrupt, truncated or inconsistent."""


class MnistNotFoundError(FileNotFoundError):
    """The files are not in the directory and could not be downloaded."""


@dataclass(frozen=True)
class Mnist:
    """The four MNIST arrays and where they came from.

    Shape:
        ``train_images``: (N, 28, 28) uint8; ``train_labels``: (N,) uint8; likewise ``test_*``.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    directory: Path
    files: dict  # key in FILES -> path of the file read
    verified: tuple  # names of the files whose published MD5 was checked

    @property
    def n_train(self) -> int:
        return len(self.train_labels)

    @property
    def n_test(self) -> int:
        return len(self.test_labels)

    @property
    def note(self) -> str:
        """One line on the data's size, for every report: smaller sets are named as such."""
        parts = []
        for split, n in (("training", self.n_train), ("test", self.n_test)):
            full = FILES["train_images" if split == "training" else "test_images"].count
            if n < full:
                parts.append(f"{split} set: {n:,} images (full MNIST has {full:,})")
            else:
                parts.append(f"{split} set: {n:,} images (full MNIST)")
        return "; ".join(parts)

    def describe(self) -> dict:
        """The dataset's identity for results.json: path, sizes, checks and a content digest."""
        digest = hashlib.sha256()
        for array in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            digest.update(np.ascontiguousarray(array).tobytes())
        return {
            "path": str(self.directory),
            "files": {key: str(path) for key, path in self.files.items()},
            "n_train": self.n_train,
            "n_test": self.n_test,
            "full_train": self.n_train >= FILES["train_images"].count,
            "note": self.note,
            "md5_verified": list(self.verified),
            "sha256": digest.hexdigest(),
        }


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The MNIST directory: ``data_dir``, else ``$BATCHNORM_DATA``, else the cache directory.

    Args:
        data_dir: an explicit directory (default None: look further).

    Returns:
        The directory as a Path (not created here).

    >>> str(resolve_data_dir("/tmp/mnist"))
    '/tmp/mnist'
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("BATCHNORM_DATA"):
        return Path(os.environ["BATCHNORM_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache, "batchnorm", "mnist").expanduser()


def _header(data: bytes, kind: str, name: str) -> tuple[int, tuple[int, ...]]:
    """Check the IDX header at the start of ``data``; return its length and the dimensions.

    Raises:
        MnistError: the header is cut short, has the wrong magic number, image size or a count
            outside 0..MAX_ITEMS; the message names the file.
    """
    magic, ndim = _MAGIC[kind]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MnistError(f"{name}: {len(data)} bytes, shorter than the {header}-byte IDX header "
                         f"of a {kind} file: the file is truncated; replace it with the original.")
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        raise MnistError(f"{name}: IDX magic number {found}, expected {magic} for MNIST {kind}: "
                         "this is not the right file (or it is corrupt); replace it.")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if kind == "images" and dims[1:] != (28, 28):
        raise MnistError(f"{name}: images of {dims[1]}x{dims[2]} pixels, expected 28x28: "
                         "this is not an MNIST image file; replace it.")
    if not 0 <= dims[0] <= MAX_ITEMS:
        raise MnistError(f"{name}: its IDX header promises {dims[0]:,} {kind}, expected 0 to "
                         f"{MAX_ITEMS:,} (MNIST has 60,000 at most): the file is corrupt; "
                         "replace it with the original.")
    return header, dims


def parse_idx(data: bytes, kind: str, name: str) -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file of uint8 ``kind`` ("images" or "labels").

    Returns:
        (count, 28, 28) uint8 images or (count,) uint8 labels.

    >>> import struct
    >>> parse_idx(struct.pack(">ii", 2049, 3) + bytes([7, 0, 9]), "labels", "x").tolist()
    [7, 0, 9]
    """
    header, dims = _header(data, kind, name)
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise MnistError(f"{name}: {len(data):,} bytes of IDX data, but its header promises "
                         f"{dims[0]:,} {kind} ({expected:,} bytes): the file is {what}; "
                         "replace it with the original.")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()
    if kind == "labels" and array.size and int(array.max()) > 9:
        raise MnistError(f"{name}: label {int(array.max())} found, expected digits 0..9: "
                         "the file is corrupt; replace it.")
    return array


def _read_promised(stream, kind: str, name: str) -> bytearray:
    """The IDX bytes of ``stream``: the header, then at most the data it promises.

    One byte more than the promise is asked for, so a file that goes on is caught without
    reading (or inflating) the rest of it. A shorter file is returned whole, for
    :func:`parse_idx` to call truncated.
    """
    data = bytearray(stream.read(4 + 4 * _MAGIC[kind][1]))
    header, dims = _header(data, kind, name)
    expected = header + int(np.prod(dims))
    while len(data) <= expected:
        block = stream.read(min(_CHUNK, expected + 1 - len(data)))
        if not block:
            return data
        data += block
    raise MnistError(f"{name}: extra data after the {dims[0]:,} {kind} ({expected:,} bytes of "
                     "IDX data) that its header promises: the file is longer than its header "
                     "says; replace it with the original.")


def read_idx(path: str | os.PathLike, kind: str) -> np.ndarray:
    """Read an MNIST IDX file, gzip-compressed or raw (detected from its first bytes).

    The file is streamed (and inflated) only as far as its header's promise, so an oversized
    file, or a gzip bomb, costs no more memory than the data it claims to hold.

    Args:
        path: the file.
        kind: ``"images"`` or ``"labels"``.

    Returns:
        (count, 28, 28) uint8 images or (count,) uint8 labels.

    Raises:
        MnistError: the file is not valid gzip, holds more or less data than its header promises,
            or its IDX content is invalid (see :func:`parse_idx`); the message names the file.
    """
    if kind not in _MAGIC:
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}")
    path = Path(path)
    with open(path, "rb") as handle:
        compressed = handle.read(2) == _GZIP_MAGIC
        handle.seek(0)
        if not compressed:
            if path.suffix == ".gz":
                raise MnistError(f"{path}: named .gz but not gzip-compressed; replace it with the "
                                 "original (or drop the .gz suffix if it is a raw IDX file).")
            return parse_idx(_read_promised(handle, kind, str(path)), kind, str(path))
        try:
            with gzip.GzipFile(fileobj=handle) as stream:
                data = _read_promised(stream, kind, str(path))
        except (EOFError, OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
            raise MnistError(f"{path}: not a complete gzip file ({error}): the file is truncated "
                             "or corrupt; delete it and put the original there.") from None
    return parse_idx(data, kind, str(path))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find(directory: Path, spec: MnistFile) -> Path | None:
    """The gzip file if present, else the raw one, else None.

    A name that is there but unusable (a broken symbolic link, a directory) is an error rather
    than a missing file: the user put something there, and downloading over it, or calling it
    missing, would hide what is wrong.
    """
    for name in (spec.name, spec.name[: -len(".gz")]):
        path = directory / name
        if path.is_file():
            return path
        if path.is_symlink() and not path.exists():  # target missing, or a loop of links
            raise MnistError(f"{path} is a broken symbolic link: it points to "
                             f"{os.readlink(path)}, which does not exist; fix the link or "
                             "replace it with the file.")
        if path.exists():
            raise MnistError(f"{path} is not a regular file (a directory?); replace it with "
                             f"the MNIST file {name}.")
    return None


def _check_md5(path: Path, spec: MnistFile) -> bool:
    """Check the MD5 of a file with the original's name and size; True when it was checked."""
    if path.name != spec.name or path.stat().st_size != spec.size:
        return False
    found = _md5(path)
    if found != spec.md5:
        raise MnistError(f"{path}: has the size of the original ({spec.size:,} bytes) but MD5 "
                         f"{found}, expected {spec.md5}: the file is corrupt; delete it "
                         "(it is downloaded again) or replace it with the original.")
    return True


class _Progress:
    """A download progress bar: rich when installed, else a line per quarter."""

    def __init__(self, name: str, total: int | None, enabled: bool):
        self.name, self.total, self.done, self._shown = name, total, 0, 0
        self._bar = None
        if not enabled:
            self._bar = False
            return
        try:
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn
        except ImportError:
            return
        self._bar = Progress(*Progress.get_default_columns(), DownloadColumn(),
                             TransferSpeedColumn(), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(f"download {name}", total=total)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar:
            self._bar.update(self._task, advance=n)
        elif self._bar is None and self.total and self.done * 4 >= (self._shown + 1) * self.total:
            self._shown = 4 * self.done // self.total
            print(f"download {self.name}: {self.done:,}/{self.total:,} bytes", file=sys.stderr)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()


def _fetch(url: str, target: Path, spec: MnistFile, opener: Callable, progress: bool) -> None:
    """Stream ``url`` into ``target`` and check it; raises OSError/ValueError on failure."""
    with opener(url, timeout=30) as response:
        length = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        bar = _Progress(spec.name, int(length) if length else spec.size, progress)
        try:
            with open(target, "wb") as handle:
                for block in iter(lambda: response.read(1 << 16), b""):
                    handle.write(block)
                    bar.update(len(block))
        finally:
            bar.close()
    size, digest = target.stat().st_size, _md5(target)
    if (size, digest) != (spec.size, spec.md5):
        raise ValueError(f"got {size:,} bytes with MD5 {digest}, expected {spec.size:,} bytes "
                         f"with MD5 {spec.md5}")


def download_file(spec: MnistFile, directory: str | os.PathLike, *,
                  mirrors: Sequence[str] = MIRRORS, opener: Callable | None = None,
                  progress: bool = True) -> Path:
    """Download one original file into ``directory``, checking its size and MD5.

    The mirrors are tried in order. The data goes to ``NAME.part`` and is renamed only after it
    passed the checks, so an interrupted or corrupt download never looks like a finished file.

    Args:
        spec: the file (one of :data:`FILES`).
        directory: where to put it (created if needed).
        mirrors: base URLs (default :data:`MIRRORS`).
        opener: ``urlopen``-like callable ``opener(url, timeout=...)`` (default None:
            ``urllib.request.urlopen``); tests pass a fake.
        progress: show a progress bar (default True).

    Returns:
        The path of the downloaded file.

    Raises:
        MnistNotFoundError: no mirror gave a file with the published size and MD5; the message
            lists each mirror's failure and where to put the files by hand.
    """
    directory, opener = Path(directory), opener or urlopen
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = f"cannot create {directory}: {error}"
        raise MnistNotFoundError(_where_to_put(directory, reason)) from None
    target, part = directory / spec.name, directory / (spec.name + ".part")
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + spec.name
        try:
            _fetch(url, part, spec, opener, progress)
        except (OSError, URLError, ValueError) as error:
            failures.append(f"{url}: {error}")
            part.unlink(missing_ok=True)
            continue
        os.replace(part, target)
        return target
    reason = f"could not download {spec.name}:\n  " + "\n  ".join(failures or ["no mirrors"])
    raise MnistNotFoundError(_where_to_put(directory, reason))


def _where_to_put(directory: Path, reason: str) -> str:
    names = ", ".join(spec.name for spec in FILES.values())
    return (f"{reason}\nMNIST is not available offline. Put the four files ({names}; gzip or "
            f"raw IDX) into {directory}, or pass --data-dir DIR (or set BATCHNORM_DATA) to a "
            "directory that holds them.")


def load_mnist(data_dir: str | os.PathLike | None = None, *, download: bool = True,
               mirrors: Sequence[str] = MIRRORS, opener: Callable | None = None,
               progress: bool = True) -> Mnist:
    """Load MNIST, downloading the missing original files first.

    Args:
        data_dir: the directory (default None: ``$BATCHNORM_DATA``, else the cache directory).
        download: fetch missing files from ``mirrors`` (default True); if False, a missing file
            raises :class:`MnistNotFoundError`.
        mirrors, opener, progress: passed to :func:`download_file`.

    Returns:
        :class:`Mnist` with uint8 arrays. A training set smaller than 60,000 images is accepted
        and described by :attr:`Mnist.note`.

    Raises:
        MnistNotFoundError: files missing and not downloadable (the message says where to put
            them). MnistError: a corrupt, truncated or inconsistent file (the message names it).
    """
    directory = resolve_data_dir(data_dir)
    if directory.exists() and not directory.is_dir():
        raise MnistError(f"{directory} is a file, expected a directory holding the MNIST files; "
                         "pass --data-dir DIR naming a directory.")
    files, verified, arrays = {}, [], {}
    for key, spec in FILES.items():
        path = _find(directory, spec)
        if path is None:
            if not download:
                raise MnistNotFoundError(_where_to_put(directory, f"{spec.name} is missing."))
            path = download_file(spec, directory, mirrors=mirrors, opener=opener,
                                 progress=progress)
        if _check_md5(path, spec):
            verified.append(spec.name)
        files[key], arrays[key] = path, read_idx(path, spec.kind)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise MnistError(f"{files[split + '_images']} holds {len(images):,} images but "
                             f"{files[split + '_labels']} holds {len(labels):,} labels: the "
                             "files do not belong together; replace them with matching ones.")
        if len(images) == 0:
            raise MnistError(f"{files[split + '_images']} holds no images; replace it.")
    return Mnist(arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                 arrays["test_labels"], directory, files, tuple(verified))

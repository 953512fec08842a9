"""MNIST for the sequential pixel tasks (smnist, psmnist): the four IDX files, read here.

Called by fptt_fast.train (and cli's --download). The standard files (raw or gzipped) are
found in a folder DIR or in DIR/MNIST/raw (torchvision's layout); `--download` fetches them
through torchvision when it is installed. Every check that fails raises MNISTError with a
one-line message naming the file.
Design: docs/KERNELS.md#fptt_fastmnistpy
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np
import torch

ROWS = COLS = 28
PIXELS = ROWS * COLS        # 784: one pixel per time step
N_CLASSES = 10
FILES = {  # role: file name as published
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801
GZIP_MAGIC = b"\x1f\x8b"
TORCHVISION_SUBDIR = os.path.join("MNIST", "raw")


class MNISTError(ValueError):
    """Missing, unreadable or corrupt MNIST files; the message is one line."""


def _all_names() -> str:
    return ", ".join(FILES.values())


def candidates(data_dir: str, name: str) -> list:
    """Where `name` may be, in the order looked at: DIR, then DIR/MNIST/raw; raw before .gz."""
    return [os.path.join(folder, name + ext)
            for folder in (data_dir, os.path.join(data_dir, TORCHVISION_SUBDIR)) for ext in ("", ".gz")]


def find_files(data_dir: str, download_hint: bool = True) -> dict:
    """{role: path} of the four files under data_dir; MNISTError naming the missing ones
    and where to put them."""
    if os.path.lexists(data_dir) and not os.path.isdir(data_dir):
        raise MNISTError(f"--data-dir {data_dir} is not a folder")
    found, missing = {}, []
    for role, name in FILES.items():
        path = next((p for p in candidates(data_dir, name) if os.path.isfile(p)), None)
        if path is None:
            missing.append(name)
        else:
            found[role] = path
    if missing:
        where = f"{data_dir} (nor in {os.path.join(data_dir, TORCHVISION_SUBDIR)})"
        hint = ", or pass --download to fetch them (needs torchvision and a network)" if download_hint else ""
        if len(missing) == len(FILES):
            what = f"no MNIST files in {where}: the task needs the four standard files {_all_names()}"
        else:
            what = (f"MNIST files missing in {where}: {', '.join(missing)} (the task needs all four: "
                    f"{_all_names()})")
        raise MNISTError(f"{what}, raw or .gz. Put them in {data_dir}, give --data-dir DIR where they "
                         f"are{hint}")
    return found


def _read_bytes(path: str) -> bytes:
    """The file's bytes, gunzipped if it is a gzip file (by its content, not its name)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise MNISTError(f"cannot read {path} ({e.strerror})") from None
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise MNISTError(f"{path} is a corrupt or truncated gzip file ({e})") from None
    return data


def parse_idx(data: bytes, path: str, kind: str) -> np.ndarray:
    """The uint8 array of an IDX file's bytes. kind 'images': [N, 28, 28] (magic
    0x00000803); 'labels': [N] (magic 0x00000801), every label in 0..9."""
    magic, ndim = (IMAGES_MAGIC, 3) if kind == "images" else (LABELS_MAGIC, 1)
    what = f"MNIST {kind} file (IDX, magic 0x{magic:08x})"
    if len(data) < 4:
        raise MNISTError(f"{path} is not an {what}: only {len(data)} bytes")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise MNISTError(f"{path} is not an {what}: its magic number is 0x{found:08x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MNISTError(f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if kind == "images" and dims[1:] != (ROWS, COLS):
        raise MNISTError(f"{path}: images of {dims[1]}x{dims[2]} pixels, MNIST's are {ROWS}x{COLS}")
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) != header + size:
        shape = "x".join(map(str, dims))
        state = "truncated" if len(data) < header + size else "damaged (bytes after the data)"
        raise MNISTError(f"{path} is {state}: its header says {shape} = {size} bytes of data, "
                         f"the file holds {len(data) - header}")
    array = np.frombuffer(data, dtype=np.uint8, count=size, offset=header).reshape(dims)
    if kind == "labels" and size and int(array.max()) >= N_CLASSES:
        raise MNISTError(f"{path}: label {int(array.max())} is out of range 0..{N_CLASSES - 1}")
    return array


def read_idx(path: str, kind: str) -> np.ndarray:
    """parse_idx of the file at `path` (raw or gzipped)."""
    return parse_idx(_read_bytes(path), path, kind)


class MNIST:
    """The four files, as tensors: images uint8 [N, 784] (row-major pixels), labels
    int64 [N]. x() scales a selection to [0, 1] and lays it out time-major."""

    def __init__(self, paths: dict):
        arrays = {role: read_idx(path, role.split("_")[1]) for role, path in paths.items()}
        for part in ("train", "test"):
            n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
            if n_img != n_lab:
                raise MNISTError(f"{paths[part + '_images']} holds {n_img} images but "
                                 f"{paths[part + '_labels']} {n_lab} labels")
            if n_img == 0:
                raise MNISTError(f"{paths[part + '_images']} holds no images")
        self.paths = dict(paths)
        self.train_images = torch.from_numpy(arrays["train_images"].reshape(-1, PIXELS).copy())
        self.train_labels = torch.from_numpy(arrays["train_labels"].astype(np.int64))
        self.test_images = torch.from_numpy(arrays["test_images"].reshape(-1, PIXELS).copy())
        self.test_labels = torch.from_numpy(arrays["test_labels"].astype(np.int64))

    @property
    def n_train(self) -> int:
        return len(self.train_labels)

    @property
    def n_test(self) -> int:
        return len(self.test_labels)


def sequences(images: torch.Tensor, permutation: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 images [B, 784] -> float32 time-major sequences [784, B, 1] in [0, 1], pixel
    permutation[t] read at step t (row-major order when None)."""
    x = images.to(torch.float32).div_(255.0)
    if permutation is not None:
        x = x[:, permutation.to(x.device)]
    return x.t().unsqueeze(-1).contiguous()


def permutation(seed: int) -> torch.Tensor:
    """The fixed pixel order of psmnist: a permutation of 0..783 drawn from `seed`."""
    return torch.randperm(PIXELS, generator=torch.Generator().manual_seed(seed))


def check_permutation(perm) -> torch.Tensor:
    """perm as an int64 tensor if it is a permutation of 0..783; MNISTError otherwise."""
    if (not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.shape != (PIXELS,)
            or not torch.equal(perm.sort().values, torch.arange(PIXELS))):
        raise MNISTError(f"not a permutation of the {PIXELS} pixels")
    return perm


def download(data_dir: str) -> None:
    """Fetch the four files into data_dir/MNIST/raw through torchvision; MNISTError if
    torchvision is missing or the download fails."""
    try:
        from torchvision.datasets import MNIST as TorchvisionMNIST
    except ImportError:
        raise MNISTError(f"--download needs torchvision, which is not installed here (pip install "
                         f"torchvision); or put the four MNIST files ({_all_names()}; raw or .gz) "
                         f"in {data_dir} yourself") from None
    try:
        TorchvisionMNIST(root=data_dir, train=True, download=True)  # fetches all four files
    except Exception as e:  # no network (URLError), a bad mirror (RuntimeError), a full disk...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MNISTError(f"--download: torchvision could not fetch MNIST into {data_dir} ({first}); "
                         f"without a network, copy the four files ({_all_names()}; raw or .gz) "
                         f"there yourself") from None


_cache: dict = {}


def load(data_dir: str, download_missing: bool = False) -> MNIST:
    """The data under data_dir (fetched first with download_missing, if files are
    missing). The last set read is kept: a compare builds two runs on it."""
    try:
        paths = find_files(data_dir, download_hint=not download_missing)
    except MNISTError:
        if not download_missing or (os.path.lexists(data_dir) and not os.path.isdir(data_dir)):
            raise
        download(data_dir)
        paths = find_files(data_dir, download_hint=False)
    key = tuple(sorted((role, os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                       for role, p in paths.items()))
    if key not in _cache:
        _cache.clear()
        _cache[key] = MNIST(paths)
    return _cache[key]

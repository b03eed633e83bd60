"""MNIST and Fashion-MNIST from the standard IDX files: download with MD5 checks, strict parsing, the
reference's preprocessing and split."""
import functools
import gzip
import hashlib
import math
import os
import tempfile
import urllib.request

import numpy as np
from sklearn.model_selection import train_test_split

DATASETS = {  # folder, mirrors, {file: MD5 of the .gz, MD5 of the decompressed IDX} (published checksums)
    "MNIST": ("mnist", ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"], {
        "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637")}),
    "fMNIST": ("fashion-mnist", ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"], {
        "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965")}),
}


class DataError(RuntimeError):
    """A data file is missing, truncated, corrupt or not the expected one."""


def parse_idx(raw: bytes, name: str, ndim: int) -> np.ndarray:
    """Decode an unsigned-byte IDX array of `ndim` dimensions, checking magic number and exact length."""
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 8, ndim]):
        raise DataError(f"{name} is not an IDX file of {ndim}-D unsigned bytes (wrong header)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    if len(raw) != expected:
        raise DataError(f"{name} holds {len(raw)} bytes but its header {dims} announces {expected}: truncated or corrupt")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_idx(folder: str, stem: str, ndim: int, md5: str | None) -> np.ndarray:
    """Read `stem.gz` (or uncompressed `stem`) from folder; md5 is that of the decompressed bytes."""
    path = os.path.join(folder, stem + ".gz")
    try:
        if os.path.exists(path):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            path = os.path.join(folder, stem)
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError) as e:   # gzip's CRC and length checks land here
        raise DataError(f"cannot read {path}: {e}. Delete it and fetch the file again.") from e
    if md5 is not None and hashlib.md5(raw).hexdigest() != md5:
        raise DataError(f"{path} is not the canonical file (MD5 of its content {hashlib.md5(raw).hexdigest()}, "
                        f"expected {md5}). Delete it and fetch the file again.")
    return parse_idx(raw, path, ndim)


def download(data_set: str, folder: str) -> None:
    """Fetch the missing .gz files of data_set into folder, verifying each MD5 before it lands."""
    _, mirrors, files = DATASETS[data_set]
    missing = [s for s in files if not (os.path.exists(os.path.join(folder, s + ".gz"))
                                        or os.path.exists(os.path.join(folder, s)))]
    if not missing:
        return
    how = (f"Put {', '.join(s + '.gz' for s in missing)} into {os.path.abspath(folder)} "
           f"(or set data_dir to a folder holding {DATASETS[data_set][0]}/ with them, or to that folder itself).")
    existing = folder                              # nothing is created unless a file arrives
    while not os.path.exists(existing):
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise DataError(f"missing {data_set} files and cannot write to {folder} ({existing} is not a writable "
                        f"folder). {how}")
    for stem in missing:
        errors = []
        for mirror in mirrors:
            try:
                with urllib.request.urlopen(mirror + stem + ".gz", timeout=30) as r:
                    blob = r.read()
            except OSError as e:
                errors.append(f"{mirror}: {e}")
                continue
            if hashlib.md5(blob).hexdigest() != files[stem][0]:
                errors.append(f"{mirror}: MD5 mismatch")
                continue
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, delete=False) as tmp:
                tmp.write(blob)
            os.replace(tmp.name, os.path.join(folder, stem + ".gz"))
            break
        else:
            raise DataError(f"cannot download {stem}.gz ({'; '.join(errors)}). {how}")


def idx_folder(data_set: str, data_dir: str) -> str:
    """data_dir/mnist (or fashion-mnist), or data_dir itself when it already holds the four files."""
    holds = lambda stem: any(os.path.exists(os.path.join(data_dir, stem + ext)) for ext in (".gz", ""))
    return data_dir if all(map(holds, DATASETS[data_set][2])) else os.path.join(data_dir, DATASETS[data_set][0])


@functools.lru_cache(maxsize=2)   # repeated runs in one process (more_runs, tests) read the files once
def read_dataset(data_set: str, data_dir: str) -> dict[str, np.ndarray]:
    """The 4 IDX arrays of data_set, downloaded first where missing, each checked against its MD5."""
    folder = idx_folder(data_set, data_dir)
    files = DATASETS[data_set][2]
    download(data_set, folder)
    return {s: read_idx(folder, s, 3 if "images" in s else 1, files[s][1]) for s in files}


def load_data(data_set: str, data_dir: str, validation: bool, max_train_samples: int | None = None,
              max_eval_samples: int | None = None) -> dict[str, np.ndarray]:
    """Train split (51,000), and the evaluation set: validation split (9,000) or official test set (10,000).

    Each image is divided by its own maximum pixel; the split is the reference's
    train_test_split(test_size=0.15, random_state=42) of the 60,000 official training images.
    """
    folder = idx_folder(data_set, data_dir)
    arrays = read_dataset(data_set, data_dir)
    for part in ("train", "t10k"):
        images, labels = arrays[f"{part}-images-idx3-ubyte"], arrays[f"{part}-labels-idx1-ubyte"]
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise DataError(f"{folder}: {part} images {images.shape} do not match labels {labels.shape}")

    def normalise(images):   # float32 division rounds exactly as float64 division then rounding would
        x = images.reshape(len(images), -1).astype(np.float32)
        x /= np.maximum(x.max(axis=1, keepdims=True), 1.0)             # guard blank images
        return x

    x_train, x_val, y_train, y_val = train_test_split(   # split the bytes, then normalise: one float copy
        arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"].astype(np.int64),
        test_size=0.15, random_state=42)
    x_train, x_val = normalise(x_train), normalise(x_val)
    if max_train_samples is not None:
        x_train, y_train = x_train[:max_train_samples], y_train[:max_train_samples]
    if validation:
        x_eval, y_eval = x_val, y_val
    else:
        x_eval, y_eval = normalise(arrays["t10k-images-idx3-ubyte"]), arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    return {"x_train": x_train, "y_train": y_train, "x_eval": x_eval[:max_eval_samples], "y_eval": y_eval[:max_eval_samples]}

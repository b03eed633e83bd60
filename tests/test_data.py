"""The IDX loader on small files written here, including truncated, corrupt, wrong and missing ones."""
import gzip
import hashlib
import os

import numpy as np
import pytest

import mnist_data
from mnist_data import DataError, parse_idx, read_idx


def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.astype(np.uint8).tobytes()


def write_set(folder, n_train=40, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 200, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    arrays["train-images-idx3-ubyte"][0] = 0                       # one blank image
    for stem, a in arrays.items():
        with gzip.open(os.path.join(folder, stem + ".gz"), "wb") as f:
            f.write(idx_bytes(a))
    return arrays


@pytest.fixture
def small(tmp_path, monkeypatch):
    """A data_dir with small MNIST-format files whose MD5s are registered as the canonical ones."""
    arrays = write_set(tmp_path / "mnist")
    sums = {s: ("-", hashlib.md5(idx_bytes(a)).hexdigest()) for s, a in arrays.items()}
    monkeypatch.setitem(mnist_data.DATASETS, "MNIST", ("mnist", [], sums))
    mnist_data.read_dataset.cache_clear()
    yield tmp_path, arrays
    mnist_data.read_dataset.cache_clear()


def test_parse_round_trip_and_normalisation(small):
    folder, arrays = small
    d = mnist_data.load_data("MNIST", str(folder), validation=True, max_train_samples=None)
    assert d["x_train"].shape == (34, 784) and d["x_eval"].shape == (6, 784)      # 85/15 of 40
    assert d["x_train"].dtype == np.float32
    x = np.concatenate([d["x_train"], d["x_eval"]])
    maxima = x.max(1)
    assert np.all((maxima == 1.0) | (maxima == 0.0)) and (maxima == 0.0).sum() == 1  # per-image max, blank kept
    t = mnist_data.load_data("MNIST", str(folder), validation=False, max_train_samples=5)
    assert t["x_train"].shape == (5, 784)
    raw = arrays["t10k-images-idx3-ubyte"].reshape(10, -1).astype(np.float64)
    np.testing.assert_allclose(t["x_eval"], raw / raw.max(1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(t["y_eval"], arrays["t10k-labels-idx1-ubyte"])


def test_split_is_the_references(data_dir):
    from sklearn.model_selection import train_test_split
    d = mnist_data.load_data("MNIST", data_dir, validation=True, max_train_samples=None)
    assert d["x_train"].shape == (51000, 784) and d["x_eval"].shape == (9000, 784)
    raw = read_idx(os.path.join(data_dir, "mnist"), "train-labels-idx1-ubyte", 1, None)
    _, _, y_train, y_val = train_test_split(np.zeros(60000), raw, test_size=0.15, random_state=42)
    np.testing.assert_array_equal(d["y_train"], y_train)
    np.testing.assert_array_equal(d["y_eval"], y_val)
    t = mnist_data.load_data("MNIST", data_dir, validation=False, max_train_samples=None)
    assert t["x_eval"].shape == (10000, 784)


def test_truncated_file_is_rejected(small):
    folder, arrays = small
    path = folder / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])                     # cut the gzip stream
    with pytest.raises(DataError, match="train-images"):
        mnist_data.load_data("MNIST", str(folder), True, None)


def test_short_idx_payload_is_rejected():
    a = np.zeros((3, 28, 28))
    with pytest.raises(DataError, match="truncated"):
        parse_idx(idx_bytes(a)[:-1], "x", 3)
    with pytest.raises(DataError, match="header"):
        parse_idx(idx_bytes(np.zeros(3)), "labels-as-images", 3)   # a labels file where images belong


def test_corrupt_content_fails_the_checksum(small):
    folder, arrays = small
    bad = arrays["train-labels-idx1-ubyte"].copy()
    bad[0] = (bad[0] + 1) % 10                                    # well-formed but not the canonical content
    with gzip.open(folder / "mnist" / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(idx_bytes(bad))
    with pytest.raises(DataError, match="not the canonical file"):
        mnist_data.load_data("MNIST", str(folder), True, None)


def test_garbage_gzip_is_rejected(small):
    folder, _ = small
    (folder / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match="t10k-labels"):
        mnist_data.load_data("MNIST", str(folder), False, None)


def test_missing_files_offline_name_files_and_folder(small, monkeypatch):
    folder, _ = small
    os.remove(folder / "mnist" / "t10k-images-idx3-ubyte.gz")
    monkeypatch.setitem(mnist_data.DATASETS, "MNIST", ("mnist", ["http://127.0.0.1:9/"], mnist_data.DATASETS["MNIST"][2]))
    with pytest.raises(DataError) as e:
        mnist_data.load_data("MNIST", str(folder), True, None)
    assert "t10k-images-idx3-ubyte.gz" in str(e.value) and str(folder / "mnist") in str(e.value)


def test_data_dir_may_be_the_folder_of_the_files(small, monkeypatch):
    folder, arrays = small
    d = mnist_data.load_data("MNIST", str(folder / "mnist"), True, None)      # the folder itself, not its parent
    assert len(d["x_train"]) + len(d["x_eval"]) == len(arrays["train-labels-idx1-ubyte"])
    empty = folder / "elsewhere"
    empty.mkdir()
    monkeypatch.setitem(mnist_data.DATASETS, "MNIST", ("mnist", ["http://127.0.0.1:9/"], mnist_data.DATASETS["MNIST"][2]))
    mnist_data.read_dataset.cache_clear()
    with pytest.raises(DataError, match="cannot download"):
        mnist_data.load_data("MNIST", str(empty), True, None)
    assert os.listdir(empty) == []                                           # a failed look-up creates nothing


def test_data_tests_find_the_quick_starts_folder(tmp_path):
    from conftest import find_data_dir
    (tmp_path / "repo" / "data" / "mnist").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    assert find_data_dir({}, str(tmp_path / "repo"))[0] == str(tmp_path / "repo" / "data")
    assert find_data_dir({"DPSOM_DATA_DIR": str(tmp_path / "repo" / "data")}, str(tmp_path / "other"))[0] \
        == str(tmp_path / "repo" / "data")
    path, places = find_data_dir({}, str(tmp_path / "other"))
    assert path is None and places[0] == str(tmp_path / "other" / "data")

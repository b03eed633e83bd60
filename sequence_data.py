"""Time series for T-DPSOM: read stays (N, T, D) from the reference's HDF5, a .npz or a .npy, check every value,
split them as TempDPSOM.py's get_data does and normalise with statistics of the training stays only.

A stay is one sequence of T steps of D features; labels are per step, K columns (N, T, K). The file type is told
by its first bytes, not its name: the reference's HDF5 is called `eICU_data.csv`. Each refused file raises a
SetupError naming what is wrong and the fix. Normalisation is user_data's `Preprocessing` over the training
stays' N_train*T steps, kept in a checkpoint so that evaluation and `assign` transform new files the same way.
"""
import contextlib
import os
import zipfile
from typing import Iterator, Optional

import h5py
import numpy as np
from sklearn.model_selection import train_test_split

from config_checks import SetupError
from user_data import Preprocessing, apply_preprocessing, block_rows, fit_preprocessing

# The columns of y as eicu_preproc/save_model_inputs.py writes them; evaluate_model's NMI_1/6/12/24 are 0-3.
EICU_LABEL_NAMES = tuple(f"{kind}_{h}" for kind in ("full_score", "hospital_discharge_expired",
                                                    "unit_discharge_expired") for h in (1, 6, 12, 24))
MAGIC = {b"\x89HDF\r\n\x1a\n": "hdf5", b"\x93NUMPY": "npy", b"PK\x03\x04": "npz", b"PK\x05\x06": "npz"}
NORMALIZATIONS = ("none", "standard", "minmax")   # "max" (each row by its own maximum) is an image setting
DEV_FRACTION = 0.85        # TempDPSOM.py get_data: the first 85 % of stays are training and validation
VAL_FRACTION = 0.20        # ... of which train_test_split(test_size=0.2, random_state=42) holds out validation
SPLIT_SEED = 42
NUMERIC = "biuf"           # dtype kinds a model can take: bool, signed and unsigned integers, floats
FORMATS = ("give an HDF5 file with datasets x (N, T, D) and optional y (N, T, K), a .npz with arrays x, optional y "
           "and label_names, or a .npy holding x")


def fail(path: str, what: str) -> SetupError:
    return SetupError(f"data_path={path!r}: {what}")


# ---- reading -------------------------------------------------------------------------------------------
def file_kind(path: str) -> str:
    """'hdf5', 'npz' or 'npy', from the file's first bytes."""
    if not os.path.isfile(path):
        raise fail(path, "no such file")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise fail(path, f"the file is empty (0 bytes); {FORMATS}")
    for magic, kind in MAGIC.items():
        if head.startswith(magic):
            return kind
    raise fail(path, f"unknown file type (first bytes {head!r} are not HDF5, .npz or .npy); {FORMATS}")


@contextlib.contextmanager
def open_sequences(path: str) -> Iterator[dict]:
    """The file's arrays, not yet converted: x (an h5py dataset, a memory-mapped .npy or an array), and where
    present y, label_names and feature_names (lists of str). HDF5 datasets are readable inside the `with` only."""
    kind = file_kind(path)
    with contextlib.ExitStack() as stack:
        try:
            if kind == "hdf5":
                arrays = read_hdf5(stack.enter_context(h5py.File(path, "r")), path)
            elif kind == "npy":
                arrays = {"x": np.load(path, mmap_mode="r", allow_pickle=False)}
            else:
                arrays = read_npz(path)
        except SetupError:
            raise
        except ValueError as e:
            if "allow_pickle" in str(e) or "Python objects" in str(e):   # np.save of a ragged list stores objects
                raise fail(path, "holds an object array (stays of different lengths or mixed types); give "
                                 "equal-length stays as one numeric (N, T, D) array: cut or pad them to a common "
                                 "T") from None
            raise fail(path, f"cannot read it (ValueError: {e})") from None
        except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:   # truncated zip or HDF5
            raise fail(path, f"cannot read it ({type(e).__name__}: {e})") from None
        yield arrays


def read_npz(path: str) -> dict:
    with np.load(path, allow_pickle=False) as f:
        if "x" not in f.files:
            raise fail(path, f"the .npz holds {sorted(f.files)} but no array 'x' (the stays); save it with "
                             f"np.savez(path, x=stays, y=labels)")
        out = {k: f[k] for k in ("x", "y") if k in f.files}
        out.update({k: names(f[k], k, path) for k in ("label_names", "feature_names") if k in f.files})
    return out


def read_hdf5(f: h5py.File, path: str) -> dict:
    """Datasets x and y as save_model_inputs.py writes them; label_names, feature_names if the file has them. A
    y of 12 columns without names is the eICU file's."""
    datasets = {k: v for k, v in f.items() if isinstance(v, h5py.Dataset)}
    if "x" not in datasets:
        raise fail(path, f"the HDF5 file holds {sorted(f.keys())} but no dataset 'x' (the stays)")
    out = {k: datasets[k] for k in ("x",)}
    if "y" in datasets:
        out["y"] = datasets["y"][()]                     # labels are small: read them whole
    for k in ("label_names", "feature_names"):
        if k in datasets:
            out[k] = names(datasets[k][()], k, path)
    if "y" in out and "label_names" not in out and out["y"].ndim == 3 and out["y"].shape[2] == len(EICU_LABEL_NAMES):
        out["label_names"] = list(EICU_LABEL_NAMES)
    return out


def names(a: np.ndarray, key: str, path: str) -> list:
    if a.ndim != 1:
        raise fail(path, f"{key} has shape {a.shape}; give one name per column, a 1-D array of strings")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in a]


# ---- checks ------------------------------------------------------------------------------------------------
def check_arrays(arrays: dict, path: str) -> Optional[np.ndarray]:
    """Ranks, dtypes and shapes of x, y and the names; returns y as (N, T, K) (or None)."""
    x = arrays["x"]
    if x.dtype.kind == "O":                               # an HDF5 dataset of variable-length rows
        raise fail(path, "x holds an object array (stays of different lengths or mixed types); give equal-length "
                         "stays as one numeric (N, T, D) array: cut or pad them to a common T")
    if x.dtype.kind not in NUMERIC:
        raise fail(path, f"x holds values of type {x.dtype}; give numbers (float32 or float64)")
    if x.ndim != 3:
        fix = " (one feature per step: x[..., None])" if x.ndim == 2 else ""
        raise fail(path, f"x has shape {x.shape}; give stays as (N, T, D): N stays, T steps, D features{fix}")
    if 0 in x.shape:
        raise fail(path, f"x has shape {x.shape}: no stays, steps or features to train on")
    N, T, D = x.shape
    if "feature_names" in arrays and len(arrays["feature_names"]) != D:
        raise fail(path, f"{len(arrays['feature_names'])} feature_names for stays of {D} features")
    y = arrays.get("y")
    if y is None:
        if "label_names" in arrays:
            raise fail(path, "label_names without labels; add y (N, T) or (N, T, K), or leave label_names out")
        return None
    if y.dtype.kind not in NUMERIC:
        raise fail(path, f"labels y of type {y.dtype}; give numbers (classes as integers: "
                         f"np.unique(y, return_inverse=True))")
    if y.ndim not in (2, 3) or y.shape[:2] != (N, T):
        raise fail(path, f"{N} stays of {T} steps but labels of shape {y.shape}; give y as (N, T) or (N, T, K): "
                         f"one value per step and label column")
    y = y.reshape(N, T, -1)
    if "label_names" in arrays and len(arrays["label_names"]) != y.shape[2]:
        raise fail(path, f"{len(arrays['label_names'])} label_names for {y.shape[2]} label columns in y")
    if not np.isfinite(y).all():
        stay, step, col = np.argwhere(~np.isfinite(y))[0]
        raise fail(path, f"labels y hold NaN or inf, the first at stay {stay}, step {step}, column {col} (counted "
                         f"from 0); a label must be a number at every step")
    return y


def check_finite(parts: list, path: str) -> None:
    """parts: (stays (n, T, D), their indices in the file). NaN or inf anywhere: how many stays, and the first
    place in file order."""
    bad = [np.zeros((0, 2), dtype=np.int64)]                 # (file stay, step) of each stay's first bad step
    for x, rows in parts:
        step = block_rows(x[0].size)                         # a block at a time: no full-size boolean copy
        for i in range(0, len(x), step):
            finite = np.isfinite(x[i:i + step]).all(axis=2)  # (block, T)
            stays = np.flatnonzero(~finite.all(axis=1))
            bad.append(np.stack([rows[i + stays], (~finite[stays]).argmax(axis=1)], axis=1))
    bad = np.concatenate(bad)
    if len(bad):
        stay, t = bad[bad[:, 0].argmin()]
        raise fail(path, f"x: {len(bad)} stays hold NaN or inf, the first at stay {stay}, step {t} (counted from 0); "
                         f"remove or impute them (the eICU preprocessing writes 0 for a missing value)")


# ---- split and conversion ----------------------------------------------------------------------------------
def split_rows(n: int, validation: bool) -> tuple[np.ndarray, np.ndarray]:
    """Stay indices of the training and evaluation stays, as TempDPSOM.py's get_data splits its arrays.

    train_test_split shuffles the first int(0.85 n) stays; its permutation depends only on their count and the
    seed, so splitting their indices gives the stays it gives from the arrays. validation=False evaluates on the
    last 15 % in file order."""
    n_dev = int(n * DEV_FRACTION)
    train, val = train_test_split(np.arange(n_dev), test_size=VAL_FRACTION, random_state=SPLIT_SEED)
    return train, (val if validation else np.arange(n_dev, n))


def gather(x, rows: np.ndarray, path: str) -> np.ndarray:
    """float32 (len(rows), T, D) of the given stays, in the order of rows: the one copy loading makes. The file's
    array (an HDF5 dataset included) is read once, a block of consecutive stays at a time."""
    out = np.empty((len(rows),) + tuple(x.shape[1:]), dtype=np.float32)
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    step = block_rows(int(np.prod(x.shape[1:])) * max(x.dtype.itemsize, 4))
    for a in range(0, len(x), step):
        lo, hi = np.searchsorted(wanted, [a, a + step])
        if lo < hi:
            try:
                block = np.asarray(x[a:a + step])
            except OSError as e:   # an HDF5 file cut short opens, and fails here
                raise fail(path, f"cannot read stays {a} to {a + step - 1} ({e})") from None
            out[order[lo:hi]] = block[wanted[lo:hi] - a]
    return out


# ---- the data set -----------------------------------------------------------------------------------------
def load_sequences(path: str, validation: bool, normalize: str, batch_size: int, forecast_steps: int,
                   pre: Optional[Preprocessing] = None, train_ratio: float = 1.0,
                   max_train_stays: Optional[int] = None, max_eval_stays: Optional[int] = None) -> dict:
    """x_train, y_train, x_eval, y_eval ((n, T, D) float32 and (n, T, K) or None), label_names (None without
    labels), train_rows and eval_rows (their stays in the file) and the Preprocessing.

    validation: evaluate on the held-out 20 % of the first 85 % of stays, else on the last 15 %. train_ratio keeps
    the first fraction of the training stays, as the reference's option does. `pre` (a checkpoint's) replaces the
    statistics of this split. Nothing here trains: every check runs before the first step."""
    if normalize not in NORMALIZATIONS:
        raise SetupError(f"config normalize={normalize!r}: must be one of {NORMALIZATIONS} for time series (the eICU "
                         f"file is normalised already: 'none')")
    with open_sequences(path) as arrays:
        y = check_arrays(arrays, path)
        x = arrays["x"]
        N, T, D = x.shape
        if T < max(2, forecast_steps + 1):
            raise fail(path, f"stays of {T} steps; forecast_steps={forecast_steps} needs at least "
                             f"{max(2, forecast_steps + 1)} (steps to predict from and the steps predicted): lower "
                             f"forecast_steps or give longer stays")
        if int(N * DEV_FRACTION) < 2:
            raise fail(path, f"{N} stay(s); the reference's split needs at least 3 (a training, a validation and a "
                             f"test stay)")
        train_rows, eval_rows = split_rows(N, validation)
        train_rows = train_rows[:int(len(train_rows) * train_ratio)][:max_train_stays]
        eval_rows = eval_rows[:max_eval_stays]
        if batch_size > len(train_rows):
            raise SetupError(f"config batch_size={batch_size}: is larger than the {len(train_rows)} training stays "
                             f"of {path!r}; use at most {len(train_rows)}")
        x_train, x_eval = gather(x, train_rows, path), gather(x, eval_rows, path)
        label_names = arrays.get("label_names")
        feature_names = arrays.get("feature_names")
    check_finite([(x_train, train_rows), (x_eval, eval_rows)], path)
    if y is not None and label_names is None:
        label_names = [f"label_{k}" for k in range(y.shape[2])]
    if pre is None:
        pre = fit_preprocessing(x_train.reshape(-1, D), (D,), normalize, feature_names)   # over N_train*T steps
    elif tuple(pre.shape) != (D,):
        raise fail(path, f"stays of {D} features; the checkpoint's model takes {pre.shape[0]}")
    apply_preprocessing(x_train.reshape(-1, D), pre)   # in place: the reshapes are views
    apply_preprocessing(x_eval.reshape(-1, D), pre)
    return {"x_train": x_train, "y_train": None if y is None else y[train_rows],
            "x_eval": x_eval, "y_eval": None if y is None else y[eval_rows], "label_names": label_names,
            "train_rows": train_rows, "eval_rows": eval_rows, "preprocessing": pre}


def load_all_sequences(path: str, pre: Preprocessing) -> tuple[np.ndarray, Optional[np.ndarray], Optional[list]]:
    """Every stay of a file (N, T, D), transformed with a checkpoint's preprocessing, its labels (N, T, K) and
    their names (or None): what `assign` places on the map."""
    with open_sequences(path) as arrays:
        y = check_arrays(arrays, path)
        x = arrays["x"]
        if x.shape[2] != pre.shape[0]:
            raise fail(path, f"stays of {x.shape[2]} features; the checkpoint's model takes {pre.shape[0]}")
        rows = np.arange(len(x))
        x = gather(x, rows, path)
        label_names = arrays.get("label_names")
    check_finite([(x, rows)], path)
    if y is not None and label_names is None:
        label_names = [f"label_{k}" for k in range(y.shape[2])]
    apply_preprocessing(x.reshape(-1, x.shape[2]), pre)
    return x, y, label_names

"""Your own data from a file: read a .npz, .npy or numeric .csv, tell vectors from images, check every value,
split 85/15 as for MNIST and normalise with statistics of the training split only.

Samples are stored as one float32 array (N, F): vectors as they are (F = D), images flattened in channels-first
order (F = C*H*W). `Preprocessing` holds the sample shape and the normalisation; a checkpoint keeps it, so that
evaluation and `assign` transform new files exactly as training did.
"""
import csv
import os
import zipfile
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
from sklearn.model_selection import train_test_split

from mnist_data import DataError

NORMALIZATIONS = ("max", "minmax", "standard", "none")
LIKELIHOODS = ("bernoulli", "gaussian")
CHANNELS = ("auto", "first", "last")
SUFFIXES = (".npz", ".npy", ".csv")


@dataclass
class Preprocessing:
    """What turns a file's samples into the model's input: shape (D,) or (C, H, W), and the normalisation.

    shift and scale (F,) are per-feature statistics of the training split ("minmax", "standard"); x' = (x - shift)
    / scale. "max" divides each sample by its own maximum (MNIST's); "none" leaves the values as they are.
    """
    shape: tuple
    normalize: str
    shift: Optional[np.ndarray] = None
    scale: Optional[np.ndarray] = None
    feature_names: Optional[list] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{**d, "shape": tuple(d["shape"])})

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def describe(self) -> str:
        if self.is_image:
            C = self.shape[0]
            return "images " + "x".join(map(str, self.shape[1:])) + f", {C} channel{'s' if C > 1 else ''}"
        return f"vectors of {self.shape[0]} features"


# ---- reading -------------------------------------------------------------------------------------------
def read_file(path: str, label_column: Optional[str] = None, label_optional: bool = False) -> dict:
    """The arrays of a data file: x, and where present y, x_test, y_test, feature_names. Nothing is converted yet.

    label_optional: a CSV without the label_column has no labels (instead of being an error)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise DataError(f"data_path={path!r}: unknown file type {suffix!r}; give a .npz (arrays x, optional y, "
                        f"x_test, y_test), a .npy (the samples) or a numeric .csv with a header row")
    if not os.path.isfile(path):
        raise DataError(f"data_path={path!r}: no such file")
    if label_column is not None and suffix != ".csv" and not label_optional:
        raise DataError(f"label_column={label_column!r} names a column of a .csv; a {suffix} file gives its labels "
                        f"as array y (.npz) or has none (.npy): leave label_column out")
    try:
        if suffix == ".csv":
            return read_csv(path, label_column, label_optional)
        if suffix == ".npy":
            return {"x": np.load(path, mmap_mode="r", allow_pickle=False)}
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files:
                raise DataError(f"data_path={path!r}: the .npz holds {sorted(f.files)} but no array 'x' (the samples); "
                                f"save it with np.savez(path, x=samples, y=labels)")
            out = {k: f[k] for k in ("x", "y", "x_test", "y_test") if k in f.files}
            if "feature_names" in f.files:
                out["feature_names"] = [str(n) for n in f["feature_names"]]
            return out
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # truncated zip, pickled objects, not an array
        raise DataError(f"data_path={path!r}: cannot read it ({type(e).__name__}: {e})") from None


def read_csv(path: str, label_column: Optional[str], label_optional: bool = False) -> dict:
    """A numeric CSV with a header row; label_column (by name) becomes y, every other column a feature."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if not header:
        raise DataError(f"data_path={path!r}: the file is empty; a .csv needs a header row and one row per sample")
    header = [h.strip() for h in header]
    if label_optional and label_column not in header:
        label_column = None
    if label_column is not None and label_column not in header:
        raise DataError(f"data_path={path!r}: no column {label_column!r} for label_column; the header has "
                        f"{', '.join(header[:20])}{' ...' if len(header) > 20 else ''}")
    features = [i for i, h in enumerate(header) if h != label_column]
    if not features:
        raise DataError(f"data_path={path!r}: no feature columns besides the label column")
    try:
        x = np.loadtxt(path, delimiter=",", skiprows=1, usecols=features, dtype=np.float32, ndmin=2)
        y = None if label_column is None else np.loadtxt(path, delimiter=",", skiprows=1, dtype=str, ndmin=1,
                                                         usecols=[header.index(label_column)])
    except ValueError:
        raise DataError(first_bad_csv_line(path, len(header), features)) from None
    if len(x) == 0:
        raise DataError(f"data_path={path!r}: a header row but no samples")
    out = {"x": x, "feature_names": [header[i] for i in features]}
    if y is not None:
        y = np.char.strip(y)
        try:
            out["y"] = y.astype(np.int64)      # integer labels stay integers; any other labels stay strings
        except ValueError:
            out["y"] = y
    return out


def first_bad_csv_line(path: str, width: int, features: list) -> str:
    """The message for a CSV numpy could not read: the first ragged or non-numeric line, counted from 1."""
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if line == 1 or not row:
                continue
            if len(row) != width:
                return f"data_path={path!r}: line {line} has {len(row)} fields, the header has {width} (ragged CSV)"
            for i in features:
                try:
                    float(row[i])
                except ValueError:
                    return (f"data_path={path!r}: line {line}, column {i + 1}: {row[i]!r} is not a number "
                            f"(a label column must be named with label_column=<name>)")
    return f"data_path={path!r}: not a numeric CSV with a header row"


# ---- shape -----------------------------------------------------------------------------------------------
def sample_shape(x: np.ndarray, channels: str, path: str) -> tuple[tuple, Optional[tuple]]:
    """(D,) or (C, H, W) of the samples, and the axes that bring a sample into channels-first order (or None)."""
    if x.ndim == 2:
        return (x.shape[1],), None
    if x.ndim == 3:
        return (1,) + x.shape[1:], None
    if x.ndim == 4:
        if channels == "auto":
            if x.shape[1] == x.shape[3]:
                raise DataError(f"data_path={path!r}: samples of shape {x.shape[1:]} could be channels first or last; "
                                f"say which with channels=first or channels=last")
            channels = "first" if x.shape[1] < x.shape[3] else "last"
        if channels == "first":
            return x.shape[1:], None
        return (x.shape[3], x.shape[1], x.shape[2]), (0, 3, 1, 2)
    raise DataError(f"data_path={path!r}: x has shape {x.shape}; give vectors (N, D) or images (N, H, W), "
                    f"(N, H, W, C) or (N, C, H, W)")


def as_samples(x: np.ndarray, channels: str, path: str) -> tuple[np.ndarray, tuple]:
    """float32 (N, F) rows in channels-first order, and the sample shape. Copies only where the type or layout
    needs it."""
    shape, axes = sample_shape(x, channels, path)
    if axes is not None:
        x = x.transpose(axes)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
    return x, shape


# ---- checks ------------------------------------------------------------------------------------------------
def check_finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(f"{what}: {int(bad.sum())} samples hold NaN or inf, the first at row {int(np.argmax(bad))} "
                        f"(counted from 0); remove or impute them")


def check_labels(x: np.ndarray, y: Optional[np.ndarray], what: str) -> None:
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DataError(f"{what}: {len(x)} samples but labels of shape {y.shape}; give one label per sample")


def check_unit_range(x: np.ndarray, what: str, normalize: str) -> None:
    """Bernoulli targets must lie in [0, 1]."""
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(f"{what}: values from {lo:.4g} to {hi:.4g} after normalize={normalize!r}, outside [0, 1] "
                        f"that likelihood='bernoulli' needs; use normalize='minmax', or likelihood='gaussian' "
                        f"(with normalize='standard' for real-valued features)")


# ---- normalisation ---------------------------------------------------------------------------------------
def fit_preprocessing(x_train: np.ndarray, shape: tuple, normalize: str, feature_names=None) -> Preprocessing:
    """The normalisation's statistics from the training split; constant features get scale 1."""
    shift = scale = None
    if normalize == "minmax":
        shift = x_train.min(axis=0)
        scale = x_train.max(axis=0) - shift
    elif normalize == "standard":
        shift, scale = column_mean_std(x_train)
    if scale is not None:
        scale[scale == 0] = 1
    return Preprocessing(tuple(shape), normalize, shift, scale, feature_names)


def column_mean_std(x: np.ndarray, rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation in float64, two passes over blocks of rows, so that no
    float64 copy of x is made; returned as float32."""
    total = np.zeros(x.shape[1])
    for i in range(0, len(x), rows):
        total += x[i:i + rows].sum(axis=0, dtype=np.float64)
    mean = total / len(x)
    squares = np.zeros(x.shape[1])
    for i in range(0, len(x), rows):
        squares += ((x[i:i + rows] - mean) ** 2).sum(axis=0)
    return mean.astype(np.float32), np.sqrt(squares / len(x)).astype(np.float32)


def apply_preprocessing(x: np.ndarray, pre: Preprocessing, clip: bool = False) -> np.ndarray:
    """Normalise x (N, F) float32 in place and return it. clip: bring values into [0, 1] (minmax on data beyond
    the training split's range, under a Bernoulli likelihood)."""
    if pre.normalize == "max":
        top = x.max(axis=1, keepdims=True)
        x /= np.where(top > 0, top, 1)                         # all-zero or non-positive samples stay as they are
    elif pre.shift is not None:
        x -= pre.shift
        x /= pre.scale
    if clip:
        np.clip(x, 0, 1, out=x)
    return x


# ---- the data set -----------------------------------------------------------------------------------------
def load_user_data(path: str, validation: bool, likelihood: str, normalize: str, channels: str = "auto",
                   label_column: Optional[str] = None, pre: Optional[Preprocessing] = None,
                   max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None) -> dict:
    """x_train, y_train, x_eval, y_eval (labels None when the file has none) and the Preprocessing.

    The 85/15 split is MNIST's, train_test_split(test_size=0.15, random_state=42) of the file's x; validation=False
    evaluates on the file's x_test. `pre` (a checkpoint's) replaces the statistics this split would give.
    """
    arrays = read_file(path, label_column)
    x, shape = as_samples(arrays.pop("x"), channels, path)
    y = arrays.get("y")
    check_labels(x, y, f"data_path={path!r}")
    check_finite(x, f"data_path={path!r}, x")
    if len(x) < 2:
        raise DataError(f"data_path={path!r}: {len(x)} sample(s); a run needs enough for a training and a "
                        f"validation split and at least one batch")
    train_idx, val_idx = train_test_split(np.arange(len(x)), test_size=0.15, random_state=42)
    if validation:
        x_eval, y_eval = x[val_idx], None if y is None else y[val_idx]
    elif "x_test" in arrays:
        x_eval, test_shape = as_samples(arrays["x_test"], channels, path)
        if test_shape != shape:
            raise DataError(f"data_path={path!r}: x_test samples have shape {test_shape}, x has {shape}")
        y_eval = arrays.get("y_test")
        check_labels(x_eval, y_eval, f"data_path={path!r}, x_test")
        if (y_eval is None) != (y is None):
            raise DataError(f"data_path={path!r}: labels for {'x' if y is not None else 'x_test'} only; give y and "
                            f"y_test both or neither")
        check_finite(x_eval, f"data_path={path!r}, x_test")
    else:
        raise DataError(f"data_path={path!r} has no test set (arrays x_test, y_test in a .npz): use validation=True "
                        f"to evaluate on the 15 % validation split")
    x_train, y_train = x[train_idx], None if y is None else y[train_idx]
    del x   # the split is the one copy: the file's array goes
    if max_train_samples is not None:
        x_train, y_train = x_train[:max_train_samples], None if y_train is None else y_train[:max_train_samples]
    if max_eval_samples is not None:
        x_eval, y_eval = x_eval[:max_eval_samples], None if y_eval is None else y_eval[:max_eval_samples]
    if pre is None:
        pre = fit_preprocessing(x_train, shape, normalize, arrays.get("feature_names"))
    elif pre.shape != shape:
        raise DataError(f"data_path={path!r}: samples of shape {shape}, the checkpoint's model takes {pre.shape}")
    bernoulli = likelihood == "bernoulli"
    apply_preprocessing(x_train, pre)
    apply_preprocessing(x_eval, pre, clip=bernoulli and pre.normalize == "minmax")
    if bernoulli:
        check_unit_range(x_train, f"data_path={path!r}, training split", pre.normalize)
        check_unit_range(x_eval, f"data_path={path!r}, evaluation set", pre.normalize)
    return {"x_train": x_train, "y_train": y_train, "x_eval": x_eval, "y_eval": y_eval, "preprocessing": pre}


def load_for_assign(path: str, pre: Preprocessing, likelihood: str, channels: str = "auto",
                    label_column: Optional[str] = None, label_optional: bool = False
                    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Every sample of a file's x, transformed with a checkpoint's preprocessing, and its labels (or None).
    label_optional: the training run's label column, used where this file has it."""
    arrays = read_file(path, label_column, label_optional)
    x, shape = as_samples(arrays.pop("x"), channels, path)
    if not x.flags.writeable:   # a memory-mapped .npy: normalise a copy
        x = x.copy()
    if shape != pre.shape:
        raise DataError(f"data_path={path!r}: samples of shape {shape} ({Preprocessing(shape, '').describe()}); "
                        f"the checkpoint's model takes {pre.shape} ({pre.describe()})")
    y = arrays.get("y")
    check_labels(x, y, f"data_path={path!r}")
    check_finite(x, f"data_path={path!r}, x")
    bernoulli = likelihood == "bernoulli"
    apply_preprocessing(x, pre, clip=bernoulli and pre.normalize == "minmax")
    if bernoulli:
        check_unit_range(x, f"data_path={path!r}", pre.normalize)
    return x, y

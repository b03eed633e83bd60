"""Your own data from a file: read a .npz, .npy or numeric .csv, tell vectors from images, check every value,
split 85/15 as for MNIST and normalise with statistics of the training split only.

Samples are stored as one float32 array (N, F): vectors as they are (F = D), images flattened in channels-first
order (F = C*H*W). `Preprocessing` holds the sample shape and the normalisation; a checkpoint keeps it, so that
evaluation and `assign` transform new files exactly as training did.
"""
import csv
import math
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
def read_file(path: str, label_column: Optional[str] = None, label_optional: bool = False, test: bool = True) -> dict:
    """The arrays of a data file: x, and where present y, x_test, y_test (only with `test`), feature_names. Nothing
    is converted yet; a .npy is memory-mapped.

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
        loaded = np.load(path, mmap_mode="r" if suffix == ".npy" else None, allow_pickle=False)
        if suffix == ".npy":
            if not isinstance(loaded, np.ndarray):
                loaded.close()
                raise DataError(f"data_path={path!r} is a .npz archive (arrays {sorted(loaded.files)}): name it .npz")
            return {"x": loaded}
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"data_path={path!r} holds a single array (the .npy format): name it .npy, or save "
                            f"np.savez(path, x=samples, y=labels)")
        with loaded as f:
            if "x" not in f.files:
                raise DataError(f"data_path={path!r}: the .npz holds {sorted(f.files)} but no array 'x' (the samples); "
                                f"save it with np.savez(path, x=samples, y=labels)")
            out = {k: f[k] for k in ("x", "y") + (("x_test", "y_test") if test else ()) if k in f.files}
            if "feature_names" in f.files:
                out["feature_names"] = [str(n) for n in f["feature_names"]]
            return out
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:   # truncated zip, pickled objects, not an array
        raise DataError(f"data_path={path!r}: cannot read it ({type(e).__name__}: {e})") from None


def read_csv(path: str, label_column: Optional[str], label_optional: bool = False) -> dict:
    """A numeric CSV with a header row; label_column (by name) becomes y, every other column a feature.
    Every row must have the header's number of fields (a BOM before the header, as spreadsheets write, is fine)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if not header:
            raise DataError(f"data_path={path!r}: the file is empty; a .csv needs a header row and one row per sample")
        for line, row in enumerate(rows, start=2):    # numpy skips surplus fields when given usecols: check here
            if row and len(row) != len(header):
                raise DataError(f"data_path={path!r}: line {line} has {len(row)} fields, the header has "
                                f"{len(header)} (ragged CSV)")
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
        x = np.loadtxt(path, delimiter=",", skiprows=1, usecols=features, dtype=np.float32, ndmin=2, quotechar='"')
        y = None if label_column is None else np.loadtxt(path, delimiter=",", skiprows=1, dtype=str, ndmin=1,
                                                         usecols=[header.index(label_column)], quotechar='"')
    except ValueError:
        raise DataError(first_non_number(path, features)) from None
    if len(x) == 0:
        raise DataError(f"data_path={path!r}: a header row but no samples")
    out = {"x": x, "feature_names": [header[i] for i in features], "csv": True}
    if y is not None:
        y = np.char.strip(y)
        try:
            out["y"] = y.astype(np.int64)      # integer labels stay integers; any other labels stay strings
        except ValueError:
            out["y"] = y
    return out


def first_non_number(path: str, features: list) -> str:
    """The message for a CSV numpy could not read: its first non-numeric feature field, by line (from 1)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            for i in features if line > 1 and row else ():
                try:
                    float(row[i])
                except ValueError:
                    return (f"data_path={path!r}: line {line}, column {i + 1}: {row[i]!r} is not a number "
                            f"(a label column must be named with label_column=<name>)")
    return f"data_path={path!r}: not a numeric CSV with a header row"


# ---- shape and conversion --------------------------------------------------------------------------------
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


BLOCK_BYTES = 1 << 24   # what one block of rows may take while it is converted or checked (16 MiB)


def block_rows(row_bytes: int) -> int:
    return max(1, BLOCK_BYTES // max(row_bytes, 1))


def gather(x: np.ndarray, rows: np.ndarray, axes: Optional[tuple]) -> np.ndarray:
    """float32 (len(rows), F) of the given samples, channels first: the one copy loading makes, filled a block of
    rows at a time, so that a file of another type or layout never exists twice in full."""
    out = np.empty((len(rows), math.prod(x.shape[1:])), dtype=np.float32)
    step = block_rows(out.shape[1] * max(x.itemsize, 4))
    for i in range(0, len(rows), step):
        block = x[rows[i:i + step]]
        out[i:i + step] = (block.transpose(axes) if axes else block).reshape(len(block), -1)
    return out


def as_samples(x: np.ndarray, channels: str, path: str) -> tuple[np.ndarray, tuple]:
    """All samples as float32 (N, F) rows in channels-first order, and the sample shape."""
    shape, axes = sample_shape(x, channels, path)
    return gather(x, np.arange(len(x)), axes), shape


# ---- checks ------------------------------------------------------------------------------------------------
def check_finite(parts: list, what: str, csv_file: bool) -> None:
    """parts: (samples (n, F), their rows in the file). NaN or inf anywhere: how many samples, and the first."""
    bad = [np.zeros(0, dtype=np.int64)]
    for x, rows in parts:
        step = block_rows(x.shape[1])                          # a block at a time: no full-size boolean copy
        for i in range(0, len(x), step):
            bad.append(rows[i:i + step][~np.isfinite(x[i:i + step]).all(1)])
    bad = np.concatenate(bad)
    if len(bad):
        first = f"line {bad.min() + 2} of the file" if csv_file else f"row {bad.min()} (counted from 0)"
        raise DataError(f"{what}: {len(bad)} samples hold NaN or inf, the first at {first}; remove or impute them")


def check_labels(n: int, y: Optional[np.ndarray], what: str) -> None:
    if y is not None and (y.ndim != 1 or len(y) != n):
        raise DataError(f"{what}: {n} samples but labels of shape {y.shape}; give one label per sample")


def check_unit_range(x: np.ndarray, what: str, normalize: str, trained: bool = False) -> None:
    """Bernoulli targets must lie in [0, 1]. trained: the checkpoint's normalisation, which cannot change now."""
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        fix = (f"the checkpoint's model was trained with likelihood='bernoulli' and normalize={normalize!r}, so its "
               f"samples must lie in [0, 1] after that normalisation" if trained else
               "use normalize='minmax', or likelihood='gaussian' (with normalize='standard' for real-valued features)")
        raise DataError(f"{what}: values from {lo:.4g} to {hi:.4g} after normalize={normalize!r}, outside [0, 1] "
                        f"that likelihood='bernoulli' needs; {fix}")


def check_feature_names(names: Optional[list], shape: tuple, path: str) -> Optional[list]:
    """Names of vector features, one per feature (None for images or when the file has none)."""
    if names is None or len(shape) != 1:
        return None
    if len(names) != shape[0]:
        raise DataError(f"data_path={path!r}: {len(names)} feature_names for samples of {shape[0]} features")
    return names


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


def column_mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation in float64, two passes over blocks of rows, so that no
    float64 copy of x is made; returned as float32."""
    step = block_rows(8 * x.shape[1])
    total = np.zeros(x.shape[1])
    for i in range(0, len(x), step):
        total += x[i:i + step].sum(axis=0, dtype=np.float64)
    mean = total / len(x)
    squares = np.zeros(x.shape[1])
    for i in range(0, len(x), step):
        squares += ((x[i:i + step] - mean) ** 2).sum(axis=0)
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


def transform(x: np.ndarray, pre: Preprocessing, likelihood: str, what: str, beyond_training: bool = True,
              trained: bool = False) -> None:
    """Normalise x in place; under the Bernoulli likelihood its values must then lie in [0, 1]. beyond_training:
    samples other than the training split's, which minmax clips into its range. trained: pre is a checkpoint's."""
    bernoulli = likelihood == "bernoulli"
    apply_preprocessing(x, pre, clip=beyond_training and bernoulli and pre.normalize == "minmax")
    if bernoulli:
        check_unit_range(x, what, pre.normalize, trained)


# ---- the data set -----------------------------------------------------------------------------------------
def load_user_data(path: str, validation: bool, likelihood: str, normalize: str, channels: str = "auto",
                   label_column: Optional[str] = None, pre: Optional[Preprocessing] = None,
                   max_train_samples: Optional[int] = None, max_eval_samples: Optional[int] = None) -> dict:
    """x_train, y_train, x_eval, y_eval (labels None where the file has none) and the Preprocessing.

    The 85/15 split is MNIST's, train_test_split(test_size=0.15, random_state=42) of the file's x; validation=False
    evaluates on the file's x_test. `pre` (a checkpoint's) replaces the statistics this split would give.
    """
    arrays = read_file(path, label_column, test=not validation)
    raw = arrays.pop("x")
    shape, axes = sample_shape(raw, channels, path)
    y = arrays.get("y")
    check_labels(len(raw), y, f"data_path={path!r}")
    names = check_feature_names(arrays.get("feature_names"), shape, path)
    if len(raw) < 2:
        raise DataError(f"data_path={path!r}: {len(raw)} sample(s); a run needs enough for a training and a "
                        f"validation split and at least one batch")
    train_rows, val_rows = train_test_split(np.arange(len(raw)), test_size=0.15, random_state=42)
    train_rows = train_rows[:max_train_samples]
    x_train, y_train = gather(raw, train_rows, axes), None if y is None else y[train_rows]
    if validation:
        eval_rows = val_rows[:max_eval_samples]
        x_eval, y_eval = gather(raw, eval_rows, axes), None if y is None else y[eval_rows]
        check_finite([(x_train, train_rows), (x_eval, eval_rows)], f"data_path={path!r}, x", "csv" in arrays)
    elif "x_test" in arrays:
        check_finite([(x_train, train_rows)], f"data_path={path!r}, x", "csv" in arrays)
        test = arrays.pop("x_test")
        test_shape, test_axes = sample_shape(test, channels, path)
        if test_shape != shape:
            raise DataError(f"data_path={path!r}: x_test samples have shape {test_shape}, x has {shape}")
        y_eval = arrays.get("y_test")
        check_labels(len(test), y_eval, f"data_path={path!r}, x_test")
        eval_rows = np.arange(len(test))[:max_eval_samples]
        x_eval, y_eval = gather(test, eval_rows, test_axes), None if y_eval is None else y_eval[eval_rows]
        check_finite([(x_eval, eval_rows)], f"data_path={path!r}, x_test", False)
    else:
        raise DataError(f"data_path={path!r} has no test set (arrays x_test, y_test in a .npz): use validation=True "
                        f"to evaluate on the 15 % validation split")
    del raw   # the splits are the one copy: the file's array goes
    if pre is None:
        pre = fit_preprocessing(x_train, shape, normalize, names)
    elif pre.shape != shape:
        raise DataError(f"data_path={path!r}: samples of shape {shape}, the checkpoint's model takes {pre.shape}")
    transform(x_train, pre, likelihood, f"data_path={path!r}, training split", beyond_training=False)
    transform(x_eval, pre, likelihood, f"data_path={path!r}, evaluation set")
    return {"x_train": x_train, "y_train": y_train, "x_eval": x_eval, "y_eval": y_eval, "preprocessing": pre}


def load_for_assign(path: str, pre: Preprocessing, likelihood: str, channels: str = "auto",
                    label_column: Optional[str] = None, label_optional: bool = False
                    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Every sample of a file's x, transformed with a checkpoint's preprocessing, and its labels (or None).
    label_optional: the training run's label column, used where this file has it."""
    arrays = read_file(path, label_column, label_optional, test=False)
    raw = arrays.pop("x")
    shape, axes = sample_shape(raw, channels, path)
    if shape != pre.shape:
        raise DataError(f"data_path={path!r}: samples of shape {shape} ({Preprocessing(shape, '').describe()}); "
                        f"the checkpoint's model takes {pre.shape} ({pre.describe()})")
    names = check_feature_names(arrays.get("feature_names"), shape, path)
    if names is not None and pre.feature_names is not None and names != pre.feature_names:
        raise DataError(f"data_path={path!r}: features {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}; "
                        f"the checkpoint's model takes {', '.join(pre.feature_names[:10])}"
                        f"{' ...' if len(names) > 10 else ''} in this order")
    if len(raw) == 0:
        raise DataError(f"data_path={path!r}: no samples to place")
    y = arrays.get("y")
    check_labels(len(raw), y, f"data_path={path!r}")
    x = gather(raw, np.arange(len(raw)), axes)
    del raw
    check_finite([(x, np.arange(len(x)))], f"data_path={path!r}, x", "csv" in arrays)
    transform(x, pre, likelihood, f"data_path={path!r}", trained=True)
    return x, y

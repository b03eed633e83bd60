"""The run's configuration, checked before anything trains: each wrong value fails naming its key and the fix,
and the device a config names is one this machine has."""
import os

import torch
from sacred.utils import SacredError

from checkpoint import accelerator
from mnist_data import DATASETS
from user_data import CHANNELS, LIKELIHOODS, NORMALIZATIONS


class SetupError(SacredError, ValueError):
    """A config value or data file that cannot work: Sacred prints the message alone, without a traceback."""

    def __init__(self, message: str):
        super().__init__(message, print_traceback=False)


BOOLEAN_KEYS = ("validation", "convolution", "toroidal", "val_epochs", "more_runs", "leaky_logits", "eval_sample",
                "target_sample", "compile", "amp", "save_pretrain", "use_saved_pretrain", "deterministic")
ARCHITECTURE_KEYS = ("data_set", "convolution", "latent_dim", "som_dim", "posterior", "batchnorm", "adam", "data_path",
                     "likelihood", "normalize", "channels")
DATA_KEY_DEFAULTS = {"data_path": None, "label_column": None, "channels": "auto", "likelihood": "bernoulli",
                     "normalize": "max", "component_planes": None}   # what checkpoints older than these keys ran with


def check_config(c: dict, n_train: int | None = None) -> None:
    """Fail before training, naming the key, on a config value that cannot work."""
    def need(ok, key, what):
        if not ok:
            raise SetupError(f"config {key}={c[key]!r}: {what}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    need(c["data_path"] is not None or c["data_set"] in DATASETS, "data_set",
         f"must be one of {sorted(DATASETS)}, or give your own file with data_path=<file>")
    need(c["data_path"] is None or isinstance(c["data_path"], str), "data_path", "must be a file name")
    need(c["label_column"] is None or (isinstance(c["label_column"], str) and c["data_path"] is not None),
         "label_column", "names a column of the .csv given as data_path")
    need(c["channels"] in CHANNELS, "channels", f"must be one of {CHANNELS}")
    need(c["likelihood"] in LIKELIHOODS, "likelihood", f"must be one of {LIKELIHOODS}")
    need(c["normalize"] in NORMALIZATIONS, "normalize", f"must be one of {NORMALIZATIONS}")
    need(c["data_path"] is not None or c["normalize"] == "max", "normalize",
         "applies to data_path files; MNIST and Fashion-MNIST are always divided by each image's maximum")
    need(c["likelihood"] == "gaussian" or c["normalize"] != "standard", "normalize",
         "gives negative values, which likelihood='bernoulli' cannot model; use likelihood='gaussian' or "
         "normalize='minmax'")
    need(c["component_planes"] is None or (isinstance(c["component_planes"], (list, tuple)) and all(
        isinstance(v, (str, int)) and not isinstance(v, bool) for v in c["component_planes"])), "component_planes",
        "must be a list of feature names or indices, e.g. component_planes=[0,3,7]")
    need(isinstance(c["som_dim"], (list, tuple)) and len(c["som_dim"]) == 2
         and all(is_int(v) and v > 0 for v in c["som_dim"]), "som_dim", "must be two positive integers")
    for key in ("batch_size", "latent_dim", "decay_steps", "log_every"):
        need(is_int(c[key]) and c[key] > 0, key, "must be a positive integer")
    for key in ("epochs_pretrain", "som_epochs", "num_epochs"):
        need(is_int(c[key]) and c[key] >= 0, key, "must be a non-negative integer")
    every = c["checkpoint_every"]
    need(isinstance(every, (int, float)) and not isinstance(every, bool) and every >= 0, "checkpoint_every",
         "must be a non-negative number of seconds (0: a checkpoint every epoch)")
    for key in ("beta", "gamma", "theta", "prior", "learning_rate", "learning_rate_pretrain"):
        need(isinstance(c[key], (int, float)) and c[key] >= 0, key, "must be a non-negative number")
    need(isinstance(c["alpha"], (int, float)) and c["alpha"] > 0, "alpha", "degrees of freedom must be > 0")
    need(isinstance(c["prior_var"], (int, float)) and c["prior_var"] > 0, "prior_var", "a standard deviation must be > 0")
    need(isinstance(c["dropout"], (int, float)) and 0 <= c["dropout"] < 1, "dropout", "must be in [0, 1)")
    need(0 < c["decay_factor"] <= 1, "decay_factor", "must be in (0, 1]")
    need(isinstance(c["som_learning_rates"], (list, tuple))
         and all(isinstance(v, (int, float)) and v >= 0 for v in c["som_learning_rates"]),
         "som_learning_rates", "must be a list of non-negative numbers")
    for key in ("max_train_samples", "max_eval_samples"):
        need(c[key] is None or (is_int(c[key]) and c[key] > 0), key, "must be None or a positive integer")
    need(c["posterior"] in ("diag", "tril"), "posterior", "must be 'diag' or 'tril'")
    need(c["batchnorm"] in ("standard", "frozen"), "batchnorm", "must be 'standard' or 'frozen'")
    need(c["adam"] in ("torch", "tf1"), "adam", "must be 'torch' or 'tf1'")
    for key in BOOLEAN_KEYS:   # Sacred passes `key=false` as the string 'false', which would count as True
        need(isinstance(c[key], bool), key, "must be True or False (Python's spelling)")
    need(not c["more_runs"] or (is_int(c["n_runs"]) and c["n_runs"] > 0), "n_runs", "must be a positive integer")
    need(not c["use_saved_pretrain"] or os.path.exists(c["pretrain_path"]), "pretrain_path",
         "does not exist; run once with save_pretrain=True first")
    if c["use_saved_pretrain"] and n_train is None:
        saved = torch.load(c["pretrain_path"], map_location="cpu", weights_only=False)["config"]
        saved_value = lambda k: saved.get(k, DATA_KEY_DEFAULTS.get(k))
        differ = [f"{k}: saved {saved_value(k)!r}, now {c[k]!r}" for k in ARCHITECTURE_KEYS if saved_value(k) != c[k]]
        need(not differ, "pretrain_path", "was saved by another model (" + "; ".join(differ)
             + "); use those values, or save_pretrain=True with this config and another pretrain_path")
    if n_train is not None:
        need(c["batch_size"] <= n_train, "batch_size", f"is larger than the {n_train} training samples; use at most "
             f"{n_train}")


def pick_device(name: str) -> torch.device:
    """The device a config names; "auto" is CUDA where present. One that is absent here fails, naming the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SetupError(f"config device={name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    acc = accelerator(device)
    if acc is not None and not acc.is_available():
        raise SetupError(f"config device={name!r}: {device.type.upper()} is not available here; use device=cpu")
    if acc is not None and (device.index or 0) >= acc.device_count():
        raise SetupError(f"config device={name!r}: this machine has {acc.device_count()} {device.type.upper()} "
                         f"device(s), {device.type}:0 to {device.type}:{acc.device_count() - 1}")
    return device

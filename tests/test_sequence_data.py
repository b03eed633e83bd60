"""Time series for T-DPSOM: each file type, the reference's split, the normalisation's statistics, and every refused
input with its message."""
import h5py
import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from config_checks import SetupError
from sequence_data import EICU_LABEL_NAMES, load_all_sequences, load_sequences, split_rows
from user_data import Preprocessing

N, T, D, K = 20, 6, 3, 2


def stays(n=N, t=T, d=D):
    """x[n, t, d] = 100 n + 10 t + d + noise: every value tells its stay and step; features on other scales."""
    rng = np.random.default_rng(0)
    x = (100.0 * np.arange(n)[:, None, None] + 10.0 * np.arange(t)[None, :, None] + np.arange(d)
         + rng.normal(0, 1, (n, t, d)))
    return x * [1, 10, 0.1], rng.integers(0, 4, (n, t, K)).astype(np.float64)


def load(path, validation=True, normalize="none", batch_size=4, forecast_steps=2, **kw):
    return load_sequences(str(path), validation, normalize, batch_size, forecast_steps, **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    f = tmp_path_factory.mktemp("seq")
    x, y = stays()
    eicu = np.random.default_rng(1).integers(0, 3, (N, T, 12)).astype(np.float64)
    with h5py.File(f / "eICU_data.csv", "w") as h:          # the reference's HDF5 under its .csv name
        h.create_dataset("x", data=x)
        h.create_dataset("y", data=eicu)
    np.savez(f / "seq.npz", x=x.astype(np.float32), y=y, label_names=np.array(["score", "stage"]))
    np.save(f / "seq.npy", x)
    return f


# ---- readers and the split ---------------------------------------------------------------------------------
def test_the_three_readers_give_the_same_stays(files):
    h5, npz, npy = (load(files / n) for n in ("eICU_data.csv", "seq.npz", "seq.npy"))
    for a in (npz, npy):
        np.testing.assert_array_equal(a["x_train"], h5["x_train"])
        np.testing.assert_array_equal(a["x_eval"], h5["x_eval"])
    assert h5["x_train"].dtype == np.float32 and h5["x_train"].shape == (13, T, D)
    assert h5["label_names"] == list(EICU_LABEL_NAMES) and h5["y_eval"].shape == (4, T, 12)
    assert EICU_LABEL_NAMES[:4] == ("full_score_1", "full_score_6", "full_score_12", "full_score_24")
    assert npz["label_names"] == ["score", "stage"] and npz["y_train"].shape == (13, T, K)
    assert npy["y_train"] is None and npy["label_names"] is None


def test_hdf5_names_stored_or_defaulted(tmp_path):
    x, y = stays()
    with h5py.File(tmp_path / "named.h5", "w") as h:                  # h5py stores str arrays as bytes
        h.create_dataset("x", data=x)
        h.create_dataset("y", data=y[..., 0])                           # (N, T): one label column
        h.create_dataset("label_names", data=np.array([b"activity"]))
        h.create_dataset("feature_names", data=np.array([b"ax", b"ay", b"az"]))
    with h5py.File(tmp_path / "plain.h5", "w") as h:
        h.create_dataset("x", data=x)
        h.create_dataset("y", data=y)
    named, plain = load(tmp_path / "named.h5", normalize="standard"), load(tmp_path / "plain.h5")
    assert named["label_names"] == ["activity"] and named["y_train"].shape == (13, T, 1)
    assert named["preprocessing"].feature_names == ["ax", "ay", "az"]
    assert plain["label_names"] == ["label_0", "label_1"]                  # not 12 columns: not the eICU file


@pytest.mark.parametrize("n", [N, 23, 3])
@pytest.mark.parametrize("validation", [True, False])
def test_split_is_get_datas(tmp_path, n, validation):
    """TempDPSOM.py get_data, applied to the arrays themselves: train_test_split of the first int(0.85 n) stays
    (test_size 0.2, random_state 42); validation=False evaluates on the last 15 % in file order."""
    x, y = stays(n)
    np.savez(tmp_path / "s.npz", x=x, y=y)
    got = load(tmp_path / "s.npz", validation, batch_size=1)
    dev = int(len(x) * 0.85)
    x_train, x_val, _, y_val = train_test_split(x[:dev], y[:dev], test_size=0.20, random_state=42)
    if not validation:
        x_val, y_val = x[dev:], y[dev:]
    np.testing.assert_array_equal(got["x_train"], x_train.astype(np.float32))
    np.testing.assert_array_equal(got["x_eval"], x_val.astype(np.float32))
    np.testing.assert_array_equal(got["y_eval"], y_val)
    np.testing.assert_array_equal(x[got["train_rows"]], x_train)                  # the stays' places in the file
    # a split of all stays, or of the 85 % at DPSOM's 0.15, gives other training stays (3 stays are too few)
    wrongs = [train_test_split(np.arange(n), test_size=0.2, random_state=42)[0],
              train_test_split(np.arange(dev), test_size=0.15, random_state=42)[0]]
    for wrong in wrongs if n > 3 else []:
        assert len(wrong) != len(got["train_rows"]) or (wrong != got["train_rows"]).any()


def test_split_rows_shuffle_the_first_85_percent_and_test_on_the_rest():
    train, val = split_rows(N, validation=True)
    assert sorted(np.concatenate([train, val])) == list(range(17))
    test = split_rows(N, validation=False)[1]
    assert list(test) == [17, 18, 19]


def test_train_ratio_keeps_the_first_fraction(files):
    full, half = load(files / "seq.npz"), load(files / "seq.npz", train_ratio=0.5, max_eval_stays=2)
    np.testing.assert_array_equal(half["x_train"], full["x_train"][:6])          # int(13 * 0.5)
    np.testing.assert_array_equal(half["x_eval"], full["x_eval"][:2])


# ---- normalisation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", ["standard", "minmax"])
def test_statistics_are_the_training_stays_steps(files, normalize):
    raw, got = load(files / "seq.npz"), load(files / "seq.npz", normalize=normalize)
    rows = raw["x_train"].reshape(-1, D).astype(np.float64)                       # N_train * T steps
    pre = got["preprocessing"]
    if normalize == "standard":
        shift, scale = rows.mean(0), rows.std(0)
    else:
        shift, scale = rows.min(0), rows.max(0) - rows.min(0)
    np.testing.assert_allclose(pre.shift, shift, rtol=1e-6)
    np.testing.assert_allclose(pre.scale, scale, rtol=1e-6)
    # statistics per (step, feature) or over every stay would differ
    assert not np.allclose(raw["x_train"].mean(0)[0], shift, rtol=1e-3)
    everything = np.concatenate([raw["x_train"], raw["x_eval"]]).reshape(-1, D)
    assert not np.allclose(everything.mean(0) if normalize == "standard" else everything.min(0), shift, rtol=1e-3)
    # the evaluation stays get the training statistics, not their own
    np.testing.assert_allclose(got["x_eval"], (raw["x_eval"] - pre.shift) / pre.scale, rtol=1e-5, atol=1e-6)
    flat = got["x_train"].reshape(-1, D)
    if normalize == "standard":
        np.testing.assert_allclose(flat.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(flat.std(0), 1, rtol=1e-5)
    else:
        np.testing.assert_allclose([flat.min(0), flat.max(0)], [np.zeros(D), np.ones(D)], atol=1e-6)
    # a checkpoint's statistics are applied as stored, to another split and to a whole file
    again = load(files / "seq.npz", validation=False, normalize="none",
                 pre=Preprocessing.from_dict(pre.to_dict()))
    assert again["preprocessing"].normalize == normalize
    whole, y, names = load_all_sequences(str(files / "seq.npz"), pre)
    np.testing.assert_allclose(again["x_eval"], whole[17:], rtol=1e-6)
    assert whole.shape == (N, T, D) and y.shape == (N, T, K) and names == ["score", "stage"]


# ---- refused input ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    f = tmp_path_factory.mktemp("bad")
    x, y = stays()
    np.savez(f / "rank2.npz", x=x[:, :, 0])
    np.savez(f / "rank4.npz", x=x[..., None])
    nan = x.copy()
    nan[3, 2, 1], nan[5, 0, 0], nan[17, 1, 1] = np.nan, np.inf, np.nan
    np.savez(f / "nan.npz", x=nan)                        # stay 3 trains, 5 validates, 17 tests
    np.savez(f / "nan_test.npz", x=np.where(np.arange(N)[:, None, None] == 17, nan, x))
    ragged = np.empty(3, dtype=object)
    ragged[:] = [np.zeros((4, 2)), np.zeros((5, 2)), np.zeros((3, 2))]
    np.save(f / "ragged.npy", ragged, allow_pickle=True)
    np.savez(f / "ragged.npz", x=ragged)
    np.savez(f / "text.npz", x=np.full((N, T, D), "a"))
    np.savez(f / "labels.npz", x=x, y=y[:, :-1])
    np.savez(f / "label_nan.npz", x=x, y=np.where(np.arange(T) == 4, np.nan, y[..., 0]))
    np.savez(f / "label_text.npz", x=x, y=np.full((N, T), "up"))
    np.savez(f / "names.npz", x=x, y=y, label_names=np.array(["a", "b", "c"]))
    np.savez(f / "names_only.npz", x=x, label_names=np.array(["a"]))
    np.savez(f / "features.npz", x=x, feature_names=np.array(["a", "b"]))
    np.savez(f / "no_x.npz", data=x)
    np.savez(f / "few.npz", x=x[:2])
    np.savez(f / "empty_x.npz", x=np.zeros((0, T, D)))
    np.savez(f / "ok.npz", x=x)
    (f / "empty.h5").write_bytes(b"")
    (f / "data.csv").write_text("a,b\n1,2\n")
    (f / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with h5py.File(f / "no_x.h5", "w") as h:
        h.create_dataset("data", data=x)
    with h5py.File(f / "vlen.h5", "w") as h:              # HDF5's ragged rows
        h.create_dataset("x", (2,), dtype=h5py.vlen_dtype(np.float64))
    with h5py.File(f / "whole.h5", "w") as h:
        h.create_dataset("x", data=x)
    (f / "cut.h5").write_bytes((f / "whole.h5").read_bytes()[:1500])
    return f


BAD = [  # file, keyword arguments, what the message must say
    ("rank2.npz", {}, r"x has shape \(20, 6\); give stays as \(N, T, D\).*x\[\.\.\., None\]"),
    ("rank4.npz", {}, r"x has shape \(20, 6, 3, 1\); give stays as \(N, T, D\)"),
    ("nan.npz", {}, r"x: 2 stays hold NaN or inf, the first at stay 3, step 2 \(counted from 0\); remove or impute"),
    ("nan.npz", {"validation": False, "normalize": "standard"}, r"x: 2 stays hold NaN or inf, the first at stay 3,"),
    ("nan_test.npz", {}, None),                           # the test stays are not read with validation=True
    ("nan_test.npz", {"validation": False}, r"x: 1 stays hold NaN or inf, the first at stay 17, step 1"),
    ("ragged.npy", {}, r"object array \(stays of different lengths.*cut or pad them to a common T"),
    ("ragged.npz", {}, r"object array \(stays of different lengths.*cut or pad them to a common T"),
    ("vlen.h5", {}, r"x holds an object array \(stays of different lengths"),
    ("text.npz", {}, r"x holds values of type <U1; give numbers"),
    ("labels.npz", {}, r"20 stays of 6 steps but labels of shape \(20, 5, 2\); give y as \(N, T\) or \(N, T, K\)"),
    ("label_nan.npz", {}, r"labels y hold NaN or inf, the first at stay 0, step 4, column 0"),
    ("label_text.npz", {}, r"labels y of type <U2; give numbers"),
    ("names.npz", {}, r"3 label_names for 2 label columns in y"),
    ("names_only.npz", {}, r"label_names without labels"),
    ("features.npz", {}, r"2 feature_names for stays of 3 features"),
    ("ok.npz", {"forecast_steps": 6}, r"stays of 6 steps; forecast_steps=6 needs at least 7"),
    ("ok.npz", {"forecast_steps": 0}, None),
    ("ok.npz", {"batch_size": 14}, r"config batch_size=14: is larger than the 13 training stays .*use at most 13"),
    ("ok.npz", {"normalize": "max"}, r"config normalize='max': must be one of \('none', 'standard', 'minmax'\)"),
    ("ok.npz", {"pre": Preprocessing((4,), "none")}, r"stays of 3 features; the checkpoint's model takes 4"),
    ("few.npz", {"batch_size": 1}, r"2 stay\(s\); the reference's split needs at least 3"),
    ("empty_x.npz", {}, r"x has shape \(0, 6, 3\): no stays"),
    ("no_x.npz", {}, r"the .npz holds \['data'\] but no array 'x'"),
    ("no_x.h5", {}, r"the HDF5 file holds \['data'\] but no dataset 'x'"),
    ("cut.h5", {}, r"cannot read"),
    ("missing.npz", {}, r"missing.npz': no such file"),
    ("empty.h5", {}, r"the file is empty \(0 bytes\); give an HDF5 file with datasets x"),
    ("data.csv", {}, r"unknown file type \(first bytes b'a,b\\n1,2\\n' are not HDF5, .npz or .npy\)"),
    ("broken.npz", {}, r"cannot read it \(BadZipFile"),
]


@pytest.mark.parametrize("name, kw, message", BAD, ids=[f"{b[0]}-{'-'.join(b[1]) or 'plain'}" for b in BAD])
def test_refused_input_names_the_problem_and_the_fix(bad, name, kw, message):
    if message is None:   # accepted: forecast_steps=0 needs two steps, six are enough; unread NaN
        assert load(bad / name, **kw)["x_train"].shape == (13, T, D)
        return
    with pytest.raises(SetupError, match=message):
        load(bad / name, **kw)


def test_two_steps_are_the_least_even_without_a_forecast(tmp_path):
    x, _ = stays(t=1)
    np.savez(tmp_path / "one.npz", x=x)
    with pytest.raises(SetupError, match=r"stays of 1 steps; forecast_steps=0 needs at least 2"):
        load(tmp_path / "one.npz", forecast_steps=0)

"""Your own data: files of vectors or images, with or without labels, through the real entry points; `assign`;
every bad input with its message."""
import csv
import math
import tracemalloc

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dpsom
from dpsom_model import DPSOM
import training
import user_data
from user_data import Preprocessing, apply_preprocessing, as_samples, fit_preprocessing, load_user_data

TINY = dict(validation=True, batch_size=100, epochs_pretrain=1, som_epochs=1, som_learning_rates=[0.9, 0.1],
            num_epochs=1, latent_dim=8, som_dim=[4, 4], log_every=5, seed=3)
LABEL_FREE = {"nll", "mse", "quantization_error", "topographic_error", "nodes_used", "occupancy_entropy"}


def run(tmp_path, name="run", command="main", **updates):
    config = {**TINY, "logdir": str(tmp_path / name), "pretrain_path": str(tmp_path / "pre.pt"), **updates}
    return dpsom.ex.run(command, config_updates=config, options={"--loglevel": "ERROR"})


def gaussian_clusters(n=1500, k=6, d=20, seed=0):
    """k well-separated clusters in d dimensions, features on very different scales and offsets."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(0, 4, (k, d))
    y = rng.integers(0, k, n)
    scales, offsets = np.geomspace(0.5, 50, d), np.linspace(-100, 100, d)
    x = (centres[y] + rng.normal(0, 1, (n, d))) * scales + offsets
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = load_digits()
    folder = tmp_path_factory.mktemp("digits")
    np.savez(folder / "digits.npz", x=d.data, y=d.target)                  # vectors of 64 features
    np.savez(folder / "images.npz", x=d.images)                            # 8x8 images, no labels
    with open(folder / "digits.csv", "w", newline="") as f:                # the same vectors, labels in a column
        w = csv.writer(f)
        w.writerow([f"p{j}" for j in range(32)] + ["digit"] + [f"p{j}" for j in range(32, 64)])
        for row, label in zip(d.data, d.target):
            w.writerow([f"{v:g}" for v in row[:32]] + [int(label)] + [f"{v:g}" for v in row[32:]])
    return folder


def test_gaussian_clusters_reach_high_purity(tmp_path):
    x, y = gaussian_clusters()
    np.savez(tmp_path / "blobs.npz", x=x, y=y)
    r = run(tmp_path, data_path=str(tmp_path / "blobs.npz"), likelihood="gaussian", normalize="standard",
            epochs_pretrain=4, num_epochs=3)
    assert r.result["purity"] >= 0.95 and r.result["nmi"] >= 0.9
    # it reconstructs: below the NLL of predicting every standardised feature's mean, 0.5 * (1 + log 2 pi) each
    assert r.result["nll"] < 20 * 0.5 * (1 + math.log(2 * math.pi))


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits):
    """A run on the digits' vectors and labels (digits.npz), shared by the tests that read it: its Run and folder."""
    folder = tmp_path_factory.mktemp("digits_run")
    return run(folder, "dense", data_path=str(digits / "digits.npz")), folder / "dense"


def test_digits_dense_with_labels_and_conv_without(tmp_path, digits, digits_run):
    dense, dense_dir = digits_run
    assert {"nmi", "purity", "ami", "ari"} <= set(dense.result) and 0.2 < dense.result["purity"] <= 1
    ckpt = torch.load(dense_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["input_shape"] == (64,) and ckpt["model"]["encoder.0.0.weight"].shape == (500, 64)
    conv = run(tmp_path, "conv", data_path=str(digits / "images.npz"), convolution=True)
    assert set(conv.result) == LABEL_FREE
    ckpt = torch.load(tmp_path / "conv" / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["input_shape"] == (1, 8, 8) and ckpt["model"]["head.weight"].shape == (16, 2 * 2 * 256)
    vec = EventAccumulator(str(dense_dir), size_guidance={"images": 0})
    img = EventAccumulator(str(tmp_path / "conv"), size_guidance={"images": 0})
    vec.Reload(), img.Reload()
    assert {"train/component_planes/feature_0", "train/majority_label", "train/hit_map"} <= set(vec.Tags()["images"])
    assert "train/decoded_som" not in vec.Tags()["images"]
    assert {"train/decoded_som", "train/reconstructions", "train/hit_map"} <= set(img.Tags()["images"])
    assert "train/majority_label" not in img.Tags()["images"]             # no labels, no label pictures


def test_csv_with_label_column_equals_npz(tmp_path, digits, digits_run):
    a, _ = digits_run
    b = run(tmp_path, "csv", data_path=str(digits / "digits.csv"), label_column="digit",
            component_planes=["p3", "p60"])
    assert a.result == b.result
    tags = EventAccumulator(str(tmp_path / "csv"), size_guidance={"images": 0})
    tags.Reload()
    planes = {t for t in tags.Tags()["images"] if "component_planes" in t}
    assert planes == {"pretrain/component_planes/p3", "pretrain/component_planes/p60", "som_init/component_planes/p3",
                      "som_init/component_planes/p60", "train/component_planes/p3", "train/component_planes/p60"}


def test_assign_gives_evaluates_bmus_with_the_stored_statistics(tmp_path):
    x, y = gaussian_clusters(seed=1)
    x_test, y_test = gaussian_clusters(n=600, seed=2)
    x_test, y_test = x_test[y_test < 2][:200], y_test[y_test < 2][:200]   # two clusters: other statistics than x's
    np.savez(tmp_path / "train.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    np.savez(tmp_path / "new.npz", x=x_test, y=y_test)
    run(tmp_path, data_path=str(tmp_path / "train.npz"), likelihood="gaussian", normalize="standard", validation=False)
    logdir = tmp_path / "run"
    dpsom.ex.run("evaluate", config_updates={"checkpoint": str(logdir)}, options={"--loglevel": "ERROR"})
    evaluated = np.load(logdir / "evaluation_test.npz")
    dpsom.ex.run("assign", config_updates={"checkpoint": str(logdir), "data_path": str(tmp_path / "new.npz")},
                 options={"--loglevel": "ERROR"})
    placed = np.load(logdir / "assignments.npz")
    np.testing.assert_array_equal(placed["bmu"], evaluated["bmu"])
    np.testing.assert_array_equal(placed["label"], y_test)
    assert placed["q"].shape == (200, 16) and np.allclose(placed["q"].sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(placed["row"] * 4 + placed["column"], placed["bmu"])
    np.testing.assert_allclose(placed["q_bmu"], placed["q"][np.arange(200), placed["bmu"]])
    with open(logdir / "assignments.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and [int(r["bmu"]) for r in rows] == placed["bmu"].tolist()
    assert float(rows[7]["distance"]) == pytest.approx(float(placed["distance"][7]))
    state = torch.load(logdir / "checkpoint.pt", weights_only=False)
    model = training.build_model(state["config"])
    model.load_state_dict(state["model"])
    stored = Preprocessing.from_dict(state["config"]["preprocessing"])     # the training split's statistics
    train_rows = train_test_split(np.arange(len(x)), test_size=0.15, random_state=42)[0]
    np.testing.assert_allclose(stored.shift, x[train_rows].mean(0, dtype=np.float64), rtol=1e-5)
    np.testing.assert_allclose(stored.scale, x[train_rows].std(0, dtype=np.float64), rtol=1e-5)
    dist = training.infer(model, torch.as_tensor(apply_preprocessing(x_test.copy(), stored)), 100, False, decode=False)
    np.testing.assert_allclose(placed["distance"], dist["dist"].min(1).values.sqrt().numpy(), rtol=1e-6)
    # the check can fail: statistics recomputed on the new file move samples to other nodes
    refit = fit_preprocessing(x_test, (20,), "standard")
    dist = training.infer(model, torch.as_tensor(apply_preprocessing(x_test.copy(), refit)), 100, False, decode=False)
    assert (dist["dist"].argmin(1).numpy() != placed["bmu"]).mean() > 0.2


def test_layouts_and_preprocessing():
    nhwc = np.random.default_rng(0).random((5, 12, 16, 3)).astype(np.float32)
    x, shape = as_samples(nhwc, "auto", "f")
    assert shape == (3, 12, 16) and np.array_equal(x[2].reshape(3, 12, 16), nhwc[2].transpose(2, 0, 1))
    x2, shape2 = as_samples(nhwc.transpose(0, 3, 1, 2), "auto", "f")
    assert shape2 == shape and np.array_equal(x2, x)
    assert as_samples(np.zeros((4, 9, 9)), "auto", "f")[1] == (1, 9, 9)
    with pytest.raises(dpsom.DataError, match="channels=first or channels=last"):
        as_samples(np.zeros((4, 5, 6, 5)), "auto", "f")
    assert as_samples(np.zeros((4, 5, 6, 5)), "last", "f")[1] == (5, 5, 6)
    x = np.array([[1, 10], [3, 10], [5, 10]], dtype=np.float32)
    pre = fit_preprocessing(x, (2,), "standard")
    np.testing.assert_allclose(pre.shift, [3, 10])
    np.testing.assert_allclose(pre.scale, [math.sqrt(8 / 3), 1])                 # a constant feature gets scale 1
    pre = fit_preprocessing(x, (2,), "minmax")
    np.testing.assert_allclose(apply_preprocessing(np.array([[7, 10]], np.float32), pre, clip=True), [[1, 0]])
    assert Preprocessing.from_dict(pre.to_dict()) is not pre and Preprocessing.from_dict(pre.to_dict()).shape == (2,)


def test_networks_adapt_to_the_data_and_the_gaussian_nll_by_hand():
    torch.manual_seed(0)
    m = DPSOM(latent_dim=4, som_dim=(2, 3), convolution=True, input_shape=(3, 12, 16), likelihood="gaussian")
    x = torch.randn(5, 3 * 12 * 16)
    out = m(x)
    assert out.logits.shape == (5, 576) and m.encoder[0][0].in_channels == 3 and m.decoder[-1].out_channels == 3
    by_hand = 0.5 * ((x - out.logits) ** 2).sum(1) + 0.5 * 576 * math.log(2 * math.pi)
    assert m.nll(x, out.logits).item() == pytest.approx(by_hand.mean().item(), rel=1e-6)
    dense = DPSOM(latent_dim=4, som_dim=(2, 2), input_shape=(7,))
    assert dense(torch.rand(3, 7)).logits.shape == (3, 7)
    mnist = DPSOM(latent_dim=4, som_dim=(2, 2), convolution=True)                # today's shapes, unchanged
    assert mnist.head.in_features == 7 * 7 * 256 and mnist(torch.rand(2, 784)).logits.shape == (2, 784)
    with pytest.raises(ValueError, match=r"multiples of 4; these images are 30x30: crop or pad them to 28 or 32"):
        DPSOM(convolution=True, input_shape=(1, 30, 30))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    f = tmp_path_factory.mktemp("bad")
    x = np.random.default_rng(0).random((400, 5)).astype(np.float32)
    np.savez(f / "ok.npz", x=x)
    np.savez(f / "no_x.npz", data=x)
    nan = x.copy()
    nan[[17, 30, 31]] = np.nan
    np.savez(f / "nan.npz", x=nan)
    wide = x * 7 - 2
    wide[:, :2] = [-2, 5]
    np.savez(f / "wide.npz", x=wide)
    np.savez(f / "labels.npz", x=x, y=np.zeros(399))
    np.savez(f / "few.npz", x=x[:50])
    np.savez(f / "odd.npz", x=np.random.default_rng(0).random((400, 30, 30)))
    (f / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    header = "a,b,c\n"
    (f / "ragged.csv").write_text(header + "1,2,3\n4,5\n")
    (f / "wide.csv").write_text(header + "1,2,3\n4,5,6,7\n")
    (f / "nan.csv").write_text(header + "".join(f"{i},{i},{'nan' if i == 3 else i}\n" for i in range(300)))
    np.save(f / "zip.npy", x)
    (f / "zip.npy").write_bytes((f / "ok.npz").read_bytes())          # an archive under the wrong name
    np.save(f / "single.npy", x)
    (f / "single.npz").write_bytes((f / "single.npy").read_bytes())   # a single array under the wrong name
    np.savez(f / "names.npz", x=x, feature_names=np.array(["a", "b"]))
    np.savez(f / "test_shape.npz", x=x, x_test=x[:, :4])
    (f / "text.csv").write_text(header + "1,2,3\n4,x,6\n")
    (f / "empty.csv").write_text("")
    (f / "data.txt").write_text("1,2\n")
    return f


BAD = [  # file, extra config, what the message must say
    ("missing.npz", {}, r"data_path=.*missing.npz': no such file"),
    ("data.txt", {}, r"unknown file type '.txt'"),
    ("broken.npz", {}, r"cannot read it \(BadZipFile"),
    ("no_x.npz", {}, r"holds \['data'\] but no array 'x'"),
    ("nan.npz", {}, r"3 samples hold NaN or inf, the first at row 17"),
    ("wide.npz", {"normalize": "none"}, r"values from -2 to 5 after normalize='none', outside \[0, 1\].*minmax"),
    ("labels.npz", {}, r"400 samples but labels of shape \(399,\)"),
    ("few.npz", {}, r"batch_size=100: is larger than the 42 training samples"),
    ("odd.npz", {"convolution": True}, r"30x30: crop or pad them to 28 or 32 by 28 or 32"),
    ("ok.npz", {"convolution": True}, r"vectors of 5 features: use the dense model"),
    ("ok.npz", {"validation": False}, r"has no test set .*use validation=True"),
    ("ok.npz", {"label_column": "y"}, r"label_column='y' names a column of a .csv"),
    ("ok.npz", {"likelihood": "bernoulli", "normalize": "standard"}, r"normalize='standard'.*negative values"),
    ("ok.npz", {"component_planes": ["nope"]}, r"component_planes: 'nope' is not a feature; give names of feature_0"),
    ("ragged.csv", {}, r"line 3 has 2 fields, the header has 3 \(ragged CSV\)"),
    ("text.csv", {}, r"line 3, column 2: 'x' is not a number"),
    ("empty.csv", {}, r"the file is empty"),
    ("text.csv", {"label_column": "d"}, r"no column 'd' for label_column; the header has a, b, c"),
    ("wide.csv", {}, r"line 3 has 4 fields, the header has 3 \(ragged CSV\)"),
    ("nan.csv", {}, r"1 samples hold NaN or inf, the first at line 5 of the file"),
    ("zip.npy", {}, r"is a .npz archive \(arrays \['x'\]\): name it .npz"),
    ("single.npz", {}, r"holds a single array \(the .npy format\): name it .npy"),
    ("names.npz", {}, r"2 feature_names for samples of 5 features"),
    ("test_shape.npz", {"validation": False}, r"x_test samples have shape \(4,\), x has \(5,\)"),
]


@pytest.mark.parametrize("name, extra, message", BAD, ids=[f"{b[0]}-{'-'.join(b[1]) or 'plain'}" for b in BAD])
def test_bad_input_fails_before_training_with_its_message(tmp_path, bad_files, name, extra, message):
    with pytest.raises(dpsom.SetupError, match=message):
        run(tmp_path, data_path=str(bad_files / name), **extra)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_assign_refuses_another_shape(tmp_path, bad_files):
    run(tmp_path, data_path=str(bad_files / "ok.npz"), num_epochs=0, som_learning_rates=[])
    np.savez(tmp_path / "six.npz", x=np.zeros((3, 6)))
    with pytest.raises(dpsom.SetupError, match=r"samples of shape \(6,\) \(vectors of 6 features\); the checkpoint's "
                                                r"model takes \(5,\) \(vectors of 5 features\)"):
        dpsom.ex.run("assign", config_updates={"checkpoint": str(tmp_path / "run"), "data_path": str(tmp_path / "six.npz")},
                     options={"--loglevel": "ERROR"})
    with pytest.raises(dpsom.SetupError, match="config data_path=None: give the file"):
        dpsom.ex.run("assign", config_updates={"checkpoint": str(tmp_path / "run")}, options={"--loglevel": "ERROR"})


@pytest.mark.parametrize("kind", ["float32", "float64", "uint8 channels last"])
def test_loading_makes_one_float32_copy(tmp_path, monkeypatch, kind):
    rng = np.random.default_rng(0)
    x = {"float32": lambda: rng.random((20000, 50), dtype=np.float32), "float64": lambda: rng.random((20000, 50)),
         "uint8 channels last": lambda: rng.integers(0, 256, (20000, 4, 4, 3), dtype=np.uint8)}[kind]()
    np.savez(tmp_path / "x.npz", x=x)
    monkeypatch.setattr(user_data, "BLOCK_BYTES", 1 << 16)
    tracemalloc.start()
    data = load_user_data(str(tmp_path / "x.npz"), True, "bernoulli", "minmax")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    float32_bytes = x.size * 4
    # the file's array, the float32 splits, and small things (indices, a block): a second copy would add 100 %
    assert peak < x.nbytes + 1.15 * float32_bytes, (peak, x.nbytes, float32_bytes)
    assert data["x_train"].dtype == np.float32 and data["x_train"].flags.c_contiguous
    assert len(data["x_train"]) == 17000 and len(data["x_eval"]) == 3000 and data["y_train"] is None
    assert data["x_train"].min() == 0 and data["x_train"].max() == 1


def test_rgb_images_channels_first_and_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 1000)
    x = np.zeros((1000, 3, 8, 12), dtype=np.float32)
    x[np.arange(1000), y] = rng.random((1000, 8, 12)) * 0.5 + 0.5      # each class lights its own colour
    np.savez(tmp_path / "rgb.npz", x=x, y=np.array(["red", "green", "blue"])[y])
    r = run(tmp_path, data_path=str(tmp_path / "rgb.npz"), convolution=True, epochs_pretrain=3)
    assert r.result["purity"] > 0.9                                 # three colours are easy to tell apart
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    decoded = acc.Images("train/decoded_som")[-1]
    assert decoded.width == 4 * 13 + 1 and decoded.height == 4 * 9 + 1   # a 4x4 map of 12x8 images, 1-pixel lines
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(decoded.encoded_image_string)).mode == "RGB"
    legend = acc.Tensors("train/majority_label_codes/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert legend == "0: blue, 1: green, 2: red"


def test_npy_csv_assign_uses_the_runs_label_column_and_feature_order(tmp_path, digits):
    run(tmp_path, data_path=str(digits / "digits.csv"), label_column="digit", num_epochs=0, som_learning_rates=[])
    logdir = str(tmp_path / "run")
    d = load_digits()
    np.save(tmp_path / "new.npy", d.data[:50])                          # no labels, no names: placed by width
    dpsom.ex.run("assign", config_updates={"checkpoint": logdir, "data_path": str(tmp_path / "new.npy")},
                 options={"--loglevel": "ERROR"})
    from_npy = np.load(tmp_path / "run" / "assignments.npz")
    assert "label" not in from_npy.files and len(from_npy["bmu"]) == 50
    order = [1, 0] + list(range(2, 64))                                # two columns swapped
    with open(tmp_path / "new.csv", "w", newline="") as f:
        csv.writer(f).writerows([[f"p{j}" for j in order]] + [[f"{r[j]:g}" for j in order] for r in d.data[:50]])
    with pytest.raises(dpsom.SetupError, match=r"features p1, p0, p2.*the checkpoint's model takes p0, p1, p2.* in "
                                                r"this order"):
        dpsom.ex.run("assign", config_updates={"checkpoint": logdir, "data_path": str(tmp_path / "new.csv")},
                     options={"--loglevel": "ERROR"})
    rows = [[f"p{j}" for j in range(32)] + ["digit"] + [f"p{j}" for j in range(32, 64)]]
    rows += [[f"{v:g}" for v in r[:32]] + [int(t)] + [f"{v:g}" for v in r[32:]] for t, r in zip(d.target, d.data[:50])]
    with open(tmp_path / "new.csv", "w", newline="", encoding="utf-8-sig") as f:   # a spreadsheet's BOM
        csv.writer(f).writerows(rows)
    dpsom.ex.run("assign", config_updates={"checkpoint": logdir, "data_path": str(tmp_path / "new.csv")},
                 options={"--loglevel": "ERROR"})
    from_csv = np.load(tmp_path / "run" / "assignments.npz")
    np.testing.assert_array_equal(from_csv["bmu"], from_npy["bmu"])
    np.testing.assert_array_equal(from_csv["label"], d.target[:50])    # the run's label_column, found in the file

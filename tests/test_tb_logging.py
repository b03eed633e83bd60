"""TensorBoard (tb_logging.py): the picture builders on hand-made cases, every number and picture of a tiny run,
and the projector across writers."""
import glob
import os

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

import tb_logging
from test_end_to_end import METRICS
from utils import PALETTE, heatmap, image_grid, label_map

PHASES = ["pretrain", "som_init", "train"]
PICTURES = ["decoded_som", "reconstructions", "hit_map", "majority_label", "node_purity", "u_matrix"]


# ---- picture builders -----------------------------------------------------------------------------
def test_picture_builders():
    images = torch.arange(6.0).view(6, 1, 1).expand(6, 2, 3) / 10             # image k is filled with k/10
    grid = image_grid(images, 2, 3)
    assert grid.shape == (1, 2 * 3 + 1, 3 * 4 + 1)
    assert grid[0, 4:6, 9:12].eq(0.5).all() and grid[0, 0].eq(0.5).all()      # image 5: row 1, col 2
    picture = heatmap(np.array([[0.0, 1.0], [np.nan, 0.5]]), cell=4)
    assert picture.shape == (3, 8, 8) and 0 <= picture.min() and picture.max() <= 1
    assert np.allclose(picture[:, 4:, :4], 0.5) and not np.allclose(picture[:, :4, :4], picture[:, :4, 4:])
    labels = label_map(np.array([[1, -1]]), np.array([[1.0, 0.0]]), cell=12)
    assert labels.shape == (3, 12, 24) and np.all(labels[:, :, 12:] == 0)    # unused node black
    assert np.allclose(labels[:, 0, 0], PALETTE[1])                           # purity 1: the label's colour
    assert (labels[:, :, :12].sum(0) == 0).sum() == 8 * 2 * 2                 # the glyph "1": 8 pixels of 2x2
    faded = label_map(np.array([[1]]), np.array([[0.5]]), cell=12)
    assert np.allclose(faded[:, 0, 0], (1 + PALETTE[1]) / 2)                  # purity 1/2: halfway to white


# ---- a tiny run -----------------------------------------------------------------------------------
def test_run_logs_every_number_and_picture(tiny_run):
    r, logdir = tiny_run
    assert set(r.result) == METRICS
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    for name in METRICS:
        assert acc.Scalars(f"eval/{name}")[-1].value == pytest.approx(r.result[name], rel=1e-6)
    images = set(acc.Tags()["images"])
    assert {f"{phase}/{name}" for phase in PHASES for name in PICTURES} <= images
    assert [e.step for e in acc.Images("train/u_matrix")] == [9]
    decoded = acc.Images("som_init/decoded_som")[-1]
    assert (decoded.width, decoded.height) == (8 * 29 + 1, 8 * 29 + 1)
    hp = {tag: HParamsPluginData.FromString(content) for tag, content in acc.PluginTagToContent("hparams").items()}
    start = hp["_hparams_/session_start_info"].session_start_info.hparams
    assert start["som_dim_h"].number_value == 8 and start["som_dim_w"].number_value == 8
    assert start["latent_dim"].number_value == 10 and "logdir" not in start and "som_dim" not in start
    metric_tags = {m.name.tag for m in hp["_hparams_/experiment"].experiment.metric_infos}
    assert metric_tags == {f"eval/{name}" for name in METRICS}
    assert glob.glob(str(logdir / "*" / "events.out.tfevents.*")) == []      # no stray hparams sub-run
    with open(logdir / "projector_config.pbtxt") as f:
        projector = text_format.Parse(f.read(), ProjectorConfig())
    assert [e.tensor_name for e in projector.embeddings] == ["pretrain:00003", "som_init:00006", "train:00009"]
    embedding = projector.embeddings[-1]
    codes = np.loadtxt(logdir / embedding.tensor_path, delimiter="\t")
    assert codes.shape == (300, 10)
    with open(logdir / embedding.metadata_path) as f:
        assert f.readline().split() == ["label", "node"] and len(f.readlines()) == 300
    assert os.path.exists(logdir / embedding.sprite.image_path)


def test_projector_keeps_the_embeddings_of_an_earlier_writer(tmp_path):
    # a resumed run opens a new writer in the same folder; add_embedding alone would drop the earlier entries
    for step, tag in [(3, "pretrain"), (9, "train")]:
        log = tb_logging.Logger(str(tmp_path), None)
        log.embedding(tag, torch.randn(4, 2), np.arange(4), np.zeros(4), torch.rand(4, 1, 28, 28), step)
        log.writer.close()
    with open(tmp_path / "projector_config.pbtxt") as f:
        projector = text_format.Parse(f.read(), ProjectorConfig())
    assert [e.tensor_name for e in projector.embeddings] == ["pretrain:00003", "train:00009"]

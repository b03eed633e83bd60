"""TensorBoard for a run: one Logger for scalars, pictures, embeddings and hparams, and the pictures of the map.

Writes what the training loop hands it and computes no training numbers: the pictures take the evaluation
pass's codes (training.infer) and decode the prototypes themselves.
"""
import os

import numpy as np
import torch
from google.protobuf import text_format
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from dpsom_model import DPSOM
from utils import heatmap, label_map, node_statistics, picture_grid, u_matrix


class Logger:
    """One place that writes to TensorBoard (scalars, pictures, embeddings, hparams), and scalars to Sacred,
    under `<phase>/<name>`."""

    def __init__(self, logdir: str, run, purge_step: int | None = None):
        # purge_step: a resumed run hides what the interrupted one logged after its checkpoint
        self.writer, self.run = SummaryWriter(logdir, purge_step=purge_step), run

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for name, value in values.items():
            value = float(value)   # the only place tensors meet the host
            self.writer.add_scalar(f"{prefix}/{name}", value, step)
            if self.run is not None:
                self.run.log_scalar(f"{prefix}/{name}", value, step)

    def image(self, tag: str, picture, step: int) -> None:
        """A (channels, H, W) picture with values in [0, 1]."""
        self.writer.add_image(tag, picture, step)

    def embedding(self, tag: str, codes: torch.Tensor, labels: np.ndarray | None, nodes: np.ndarray,
                  images: torch.Tensor | None, step: int) -> None:
        """Latent codes (N, D) in the projector with each one's BMU node and label (if any), images (N, C, h, w)
        with C 1 or 3 (if any) as sprites."""
        config = os.path.join(self.writer.get_logdir(), "projector_config.pbtxt")
        if not hasattr(self.writer, "_projector_config") and os.path.exists(config):
            # add_embedding rewrites the file from this writer's entries: keep those of the run before a resume
            with open(config) as f:
                self.writer._projector_config = text_format.Parse(f.read(), ProjectorConfig())
        if labels is None:
            metadata, header = [int(n) for n in nodes], None
        else:
            metadata, header = [[str(a), int(n)] for a, n in zip(labels, nodes)], ["label", "node"]
        self.writer.add_embedding(codes, metadata=metadata, metadata_header=header, label_img=images,
                                  global_step=step, tag=tag)

    def hparams(self, config: dict, metrics: dict) -> None:
        """The config (paths left out, som_dim split into som_dim_h, som_dim_w) with the eval/... metrics in the
        HParams tab. Written into this run's folder; SummaryWriter.add_hparams would make a sub-run."""
        paths = ("data_dir", "logdir", "pretrain_path", "resume", "checkpoint", "preprocessing")
        values = {k: v for k, v in config.items() if k not in paths}
        values["som_dim_h"], values["som_dim_w"] = values.pop("som_dim")
        values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in values.items()}  # lists, None
        for summary in hparams_summaries(values, {f"eval/{k}": v for k, v in metrics.items()}):
            self.writer.file_writer.add_summary(summary)   # the values are the eval/... scalars of this run


PICTURE_EPOCHS = 10       # joint epochs between pictures (and at the end of every phase)
PROJECTOR_SAMPLES = 3000  # first samples of the evaluation set shown in the embedding projector
PAIR_ROWS, PAIR_COLS = 4, 8
COMPONENT_PLANES = 8      # features pictured over the map by default (vector data)


def component_planes(c: dict, width: int) -> list[tuple[str, int]]:
    """(name, feature index) of the features pictured over the map: component_planes, or the first 8."""
    names = (c.get("preprocessing") or {}).get("feature_names") or [f"feature_{j}" for j in range(width)]
    requested = c.get("component_planes")
    if requested is None:
        return [(names[j], j) for j in range(min(COMPONENT_PLANES, width))]
    planes = []
    for v in requested:
        j = names.index(v) if isinstance(v, str) and v in names else v
        if not isinstance(j, int) or not 0 <= j < width:
            raise ValueError(f"component_planes: {v!r} is not a feature; give names of {', '.join(names[:8])}"
                             f"{' ...' if width > 8 else ''} or indices 0 to {width - 1}")
        planes.append((names[j], j))
    return planes


@torch.no_grad()
def log_pictures(log: Logger, model: DPSOM, x: torch.Tensor, y: np.ndarray | None, encoded: dict, c: dict,
                 phase: str, step: int, projector: bool) -> None:
    """The map as TensorBoard pictures under `<phase>/...`, from one encoder pass over the evaluation set (x, y)
    with the evaluation's z: encoded holds its z (N, D) and dist (N, H*W), as training.infer(decode=False) returns.

    Images: decoded_som, every prototype decoded, laid out as the H x W grid (RGB with 3 channels, else the
    channels' mean); reconstructions, rows of inputs of the set's first samples, each above its reconstruction
    (posterior mean). Vectors: component_planes/<feature>, each chosen feature's decoded value over the map.
    Both: hit_map and u_matrix, one cell per node, and with labels majority_label (faded as the node's purity falls)
    and node_purity; with `projector`, the latent codes of the first PROJECTOR_SAMPLES samples in the embedding
    projector.
    """
    bmu = encoded["dist"].argmin(1).cpu().numpy()
    H, W = model.som_dim
    E = model.embeddings.view(H * W, -1)                                      # (H*W, D)
    shape = model.input_shape
    images = len(shape) == 3
    was_training = model.training
    model.eval()
    decoded = model.mean(model.decode(E))                                     # (H*W, F)
    if images:
        log.image(f"{phase}/decoded_som", picture_grid(decoded, shape, H, W), step)
        cols = min(PAIR_COLS, len(x))
        rows = min(PAIR_ROWS, len(x) // cols)
        inputs = x[:rows * cols]                                              # (rows*cols, F)
        recon = model.mean(model.decode(model.encode(inputs)[0]))
        pairs = torch.stack([inputs.view(rows, cols, -1), recon.view(rows, cols, -1)], 1)   # (rows, 2, cols, F)
        log.image(f"{phase}/reconstructions", picture_grid(pairs.view(rows * 2 * cols, -1), shape, 2 * rows, cols),
                  step)
    else:
        for name, j in component_planes(c, shape[0]):
            log.image(f"{phase}/component_planes/{name.replace('/', '_')}",
                      heatmap(decoded[:, j].view(H, W).cpu().numpy()), step)
    model.train(was_training)
    log.image(f"{phase}/hit_map", heatmap(np.bincount(bmu, minlength=H * W).reshape(H, W), lo=0), step)
    if y is not None:
        classes, codes = np.unique(y, return_inverse=True)
        if np.issubdtype(y.dtype, np.integer) and classes.min() >= 0 and classes.max() <= 9:
            codes = y                                                         # digits draw as themselves
        else:   # colours and glyphs of other labels are their codes 0, 1, ...: say which is which
            log.writer.add_text(f"{phase}/majority_label_codes", ", ".join(f"{k}: {c}" for k, c in enumerate(classes)),
                                step)
        hits, majority, purity = node_statistics(bmu, codes, H * W)
        log.image(f"{phase}/majority_label", label_map(majority.reshape(H, W), purity.reshape(H, W)), step)
        log.image(f"{phase}/node_purity", heatmap(np.where(hits > 0, purity, np.nan).reshape(H, W), lo=0, hi=1), step)
    u = u_matrix(E, model.neighbours, model.neighbour_mask)                  # (H*W,)
    log.image(f"{phase}/u_matrix", heatmap(u.view(H, W).cpu().numpy()), step)
    if projector:
        n = min(PROJECTOR_SAMPLES, len(x))
        sprites = (x[:n].view(n, *shape).cpu() if images and shape[0] in (1, 3) and model.likelihood == "bernoulli"
                   else None)                                                 # the projector shows [0, 1] images
        log.embedding(phase, encoded["z"][:n].cpu(), None if y is None else y[:n], bmu[:n], sprites, step)

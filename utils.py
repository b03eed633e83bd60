"""DPSOM's evaluation numbers and pictures. Labels are used only here, never in training.

Numbers: clustering (NMI, AMI, ARI, purity, Hungarian accuracy), reconstruction (Bernoulli NLL, MSE),
topology (quantization and topographic error, U-matrix) and map usage. Pictures are float arrays in [0, 1],
channels first, as TensorBoard's add_image takes them; no plotting library.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

from dpsom_model import nll_per_sample


# ---- clustering -------------------------------------------------------------------------------------
def contingency(clusters: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(distinct clusters, distinct labels) table of sample counts."""
    clusters, labels = np.asarray(clusters).ravel(), np.asarray(labels).ravel()
    if clusters.shape != labels.shape or clusters.size == 0:
        raise ValueError(f"need two non-empty arrays of one length, got {clusters.shape} and {labels.shape}")
    _, c = np.unique(clusters, return_inverse=True)
    _, y = np.unique(labels, return_inverse=True)
    table = np.zeros((c.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (c, y), 1)
    return table


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose cluster's majority label equals their own label."""
    table = contingency(clusters, labels)
    return float(table.max(axis=1).sum() / table.sum())


def cluster_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to labels (Hungarian algorithm).

    Meant for as many clusters as classes; otherwise the samples of unmatched clusters count as errors.
    """
    table = contingency(clusters, labels)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def nmi(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information with geometric averaging, as the reference reports it."""
    return float(normalized_mutual_info_score(labels, clusters, average_method="geometric"))


def ami(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Adjusted mutual information (arithmetic averaging, scikit-learn's default)."""
    return float(adjusted_mutual_info_score(labels, clusters))


def ari(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Adjusted Rand index."""
    return float(adjusted_rand_score(labels, clusters))


def clustering_metrics(clusters: np.ndarray, labels: np.ndarray, n_clusters: int | None = None) -> dict:
    """NMI, purity, AMI and ARI of one assignment; with n_clusters (the map's nodes) equal to the number of
    classes, the Hungarian `accuracy` too."""
    metrics = {"nmi": nmi(clusters, labels), "purity": purity(clusters, labels), "ami": ami(clusters, labels),
               "ari": ari(clusters, labels)}
    if n_clusters is not None and n_clusters == len(np.unique(labels)):
        metrics["accuracy"] = cluster_accuracy(clusters, labels)
    return metrics


# ---- reconstruction, topology, map usage ----------------------------------------------------------
def reconstruction_errors(x: torch.Tensor, out: torch.Tensor,
                          likelihood: str = "bernoulli") -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (B,): the NLL (summed over features; its batch mean is DPSOM.nll) and the mean squared error
    of the decoded mean over features. out: Bernoulli logits (the mean is their sigmoid) or Gaussian means."""
    nll = nll_per_sample(x, out, likelihood)                                        # (B,)
    mean = torch.sigmoid(out) if likelihood == "bernoulli" else out
    return nll, ((mean - x) ** 2).mean(1)


def quantization_error(dist: torch.Tensor) -> float:
    """Mean Euclidean distance of each latent code to its BMU; dist (N, nodes) holds squared distances."""
    return float(dist.min(dim=1).values.clamp(min=0).sqrt().mean())


def topographic_error(dist: torch.Tensor, neighbours: torch.Tensor, exists: torch.Tensor) -> float:
    """Fraction of samples whose first and second BMU are not grid neighbours.

    neighbours, exists: (nodes, 4) from dpsom_model.grid_neighbours, which decides toroidal or planar.
    """
    if dist.shape[1] < 2:
        return float("nan")
    k = dist.topk(2, dim=1, largest=False).indices                            # (N, 2) first, second BMU
    adjacent = ((neighbours[k[:, 0]] == k[:, 1:]) & exists[k[:, 0]]).any(1)    # (N,)
    return float((~adjacent).float().mean())


def u_matrix(prototypes: torch.Tensor, neighbours: torch.Tensor, exists: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance of each prototype (nodes, D) to its existing grid neighbours, (nodes,)."""
    d = (prototypes.unsqueeze(1) - prototypes[neighbours]).norm(dim=-1)       # (nodes, 4)
    return (d * exists).sum(1) / exists.sum(1).clamp(min=1)


def node_statistics(clusters: np.ndarray, labels: np.ndarray, n_nodes: int) -> tuple[np.ndarray, ...]:
    """Per node (n_nodes,): hits (samples it is the BMU of), majority label (-1 if unused), purity (the
    majority's share; 0 if unused)."""
    classes, y = np.unique(labels, return_inverse=True)
    table = np.zeros((n_nodes, len(classes)), dtype=np.int64)                # (nodes, classes)
    np.add.at(table, (np.asarray(clusters), y), 1)
    hits = table.sum(1)
    majority = np.where(hits > 0, classes[table.argmax(1)], -1)
    return hits, majority, table.max(1) / np.maximum(hits, 1)


def map_usage(clusters: np.ndarray, n_nodes: int) -> dict:
    """Nodes that are the BMU of some sample, and the entropy of node occupancy in bits (log2(nodes) if uniform)."""
    hits = np.bincount(np.asarray(clusters), minlength=n_nodes)
    p = hits[hits > 0] / hits.sum()
    return {"nodes_used": int((hits > 0).sum()), "occupancy_entropy": float((p * np.log2(1 / p)).sum())}


# ---- pictures ---------------------------------------------------------------------------------------
CELL = 24   # pixels per SOM node in the heatmaps
VIRIDIS = np.array([[0.267, 0.005, 0.329], [0.229, 0.322, 0.546], [0.128, 0.567, 0.551],
                    [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]])     # five stops of matplotlib's viridis
PALETTE = np.array([[0.122, 0.467, 0.706], [1.000, 0.498, 0.055], [0.173, 0.627, 0.173], [0.839, 0.153, 0.157],
                    [0.580, 0.404, 0.741], [0.549, 0.337, 0.294], [0.890, 0.467, 0.761], [0.498, 0.498, 0.498],
                    [0.737, 0.741, 0.133], [0.090, 0.745, 0.812]])     # matplotlib's tab10, one colour per label
DIGITS = ["111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
          "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111"]  # 3x5 glyphs


def image_grid(images: torch.Tensor, rows: int, cols: int, pad: int = 1) -> torch.Tensor:
    """(rows*cols, h, w) images in [0, 1] -> one (1, rows*(h+pad)+pad, cols*(w+pad)+pad) picture, row-major,
    with grey lines between the images."""
    _, h, w = images.shape
    tiles = F.pad(images.reshape(rows, cols, h, w), (pad, 0, pad, 0), value=0.5)   # (rows, cols, h+pad, w+pad)
    grid = tiles.permute(0, 2, 1, 3).reshape(rows * (h + pad), cols * (w + pad))
    return F.pad(grid, (0, pad, 0, pad), value=0.5).unsqueeze(0)


def picture_grid(images: torch.Tensor, shape: tuple, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, C*h*w) images, channels first -> one (3 or 1, ...) picture as image_grid lays it out: RGB when
    C is 3, else the channels' mean. Values outside [0, 1] (Gaussian data) are stretched over it."""
    C, h, w = shape
    pictures = images.reshape(-1, C, h, w)
    if C != 3:
        pictures = pictures.mean(1, keepdim=True)
    lo, hi = pictures.min(), pictures.max()
    if lo < 0 or hi > 1:
        pictures = (pictures - lo) / (hi - lo).clamp(min=1e-12)
    return torch.cat([image_grid(pictures[:, k], rows, cols) for k in range(pictures.shape[1])])


def heatmap(values: np.ndarray, lo: float | None = None, hi: float | None = None, cell: int = CELL) -> np.ndarray:
    """(H, W) values -> (3, H*cell, W*cell) viridis picture over [lo, hi] (default: the values' range);
    NaN cells grey."""
    v = np.asarray(values, dtype=np.float64)
    lo = np.nanmin(v) if lo is None else lo
    hi = np.nanmax(v) if hi is None else hi
    t = np.clip((v - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(v)
    stops = np.linspace(0, 1, len(VIRIDIS))
    rgb = np.stack([np.interp(t, stops, VIRIDIS[:, i]) for i in range(3)])   # (3, H, W)
    rgb[:, np.isnan(v)] = 0.5
    return rgb.repeat(cell, 1).repeat(cell, 2)


def label_map(majority: np.ndarray, purity: np.ndarray, cell: int = CELL) -> np.ndarray:
    """(H, W) majority labels (-1: unused node) and node purities -> (3, H*cell, W*cell) picture: the label's
    colour, faded towards white as the node's purity falls, with the label drawn on it (labels 0-9);
    unused nodes black."""
    colour = PALETTE[np.asarray(majority) % len(PALETTE)]                  # (H, W, 3)
    rgb = 1 - np.asarray(purity)[..., None] * (1 - colour)
    rgb[np.asarray(majority) < 0] = 0
    out = rgb.repeat(cell, 0).repeat(cell, 1)                               # (H*cell, W*cell, 3)
    s = max(cell // 6, 1)                                                   # glyph pixel size
    oy, ox = (cell - 5 * s) // 2, (cell - 3 * s) // 2
    for (r, c), label in np.ndenumerate(majority):
        if 0 <= label < len(DIGITS):
            glyph = (np.array(list(DIGITS[label])) == "1").reshape(5, 3).repeat(s, 0).repeat(s, 1)
            out[r * cell + oy:r * cell + oy + 5 * s, c * cell + ox:c * cell + ox + 3 * s][glyph] = 0
    return out.transpose(2, 0, 1)

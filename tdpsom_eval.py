"""T-DPSOM's evaluation numbers and pictures from arrays: no model here, only what an evaluation pass produced.

Inputs are the squared latent distances of every step to every node (N, T, H*W), the per-step labels
(N, T, K) and, for the forecast, encodings, reconstructions and predictions. Step n*T + t of the flat arrays is
stay n, step t, the C order in which TempDPSOM_model.py flattens its inputs. Clustering numbers come from
utils (scikit-learn), topology numbers from utils per step; Moran's I is given both as TempDPSOM.py's
evaluate_model computes it and in its standard form. Pictures are float arrays in [0, 1], channels first,
as tb_logging writes them.
"""
import numpy as np
import torch

from som import grid_neighbours
from utils import CELL, PALETTE, ami, heatmap, map_usage, nmi, purity, quantization_error, topographic_error


# ---- clustering of the steps against each label column ----------------------------------------------------
def label_columns(y: np.ndarray, label_names: list | None) -> list[tuple[str, np.ndarray]]:
    """(name, (N*T,) values) of each label column of y (N, T) or (N, T, K)."""
    y = np.asarray(y)
    y = y.reshape(y.shape[0] * y.shape[1], -1)                                # (N*T, K)
    names = label_names or [f"label_{k}" for k in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} label names for {y.shape[1]} label columns")
    return [(name, y[:, k]) for k, name in enumerate(names)]


def node_means(bmu: np.ndarray, labels: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per node (n_nodes,): the mean label of the steps it is the BMU of (NaN where none), and their count."""
    counts = np.bincount(bmu, minlength=n_nodes)
    sums = np.bincount(bmu, weights=labels.astype(np.float64), minlength=n_nodes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan), counts


# ---- Moran's I of the label means over the map --------------------------------------------------------------
def grid_weights(som_dim: tuple[int, int], toroidal: bool = True, reference: bool = False) -> np.ndarray:
    """(H*W, H*W) weights exp(-(|dr| + |dc|)) of two nodes' Manhattan distance on the grid, toroidal or planar.

    reference: evaluate_model's node coordinates (k // som_dim[0], k % som_dim[1]), which are (row, column) only
    on square maps (quirk Q17); it always wraps."""
    H, W = som_dim
    k = np.arange(H * W)
    r, c = (k // H, k % W) if reference else (k // W, k % W)
    dr, dc = np.abs(r[:, None] - r[None]), np.abs(c[:, None] - c[None])     # (H*W, H*W)
    if toroidal or reference:
        dr, dc = np.minimum(dr, H - dr), np.minimum(dc, W - dc)
    return np.exp(-(dr + dc).astype(np.float64))


def moran_i_reference(bmu: np.ndarray, labels: np.ndarray, som_dim: tuple[int, int]) -> float:
    """Moran's I as TempDPSOM.py's evaluate_model computes it (quirk Q17): a node that is nobody's BMU has label
    mean 0, deviations are from the mean over all steps rather than over nodes, and the weights include each
    node with itself (weight 1)."""
    means, _ = node_means(bmu, labels, som_dim[0] * som_dim[1])
    dev = np.nan_to_num(means, nan=0.0) - labels.astype(np.float64).mean()  # (H*W,)
    W = grid_weights(som_dim, reference=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(len(dev) * (dev @ W @ dev) / ((dev ** 2).sum() * W.sum()))


def moran_i(bmu: np.ndarray, labels: np.ndarray, som_dim: tuple[int, int], toroidal: bool = True) -> float:
    """Moran's I of the nodes' label means over the map, standard form: only nodes that are some step's BMU,
    deviations from their mean, no self-weights; the weights are the reference's exp(-Manhattan distance). NaN
    with fewer than two such nodes or no variation between them."""
    means, counts = node_means(bmu, labels, som_dim[0] * som_dim[1])
    used = counts > 0
    if used.sum() < 2:
        return float("nan")
    dev = means[used] - means[used].mean()                                    # (n,) over the used nodes
    if not (dev ** 2).sum() > 0:
        return float("nan")
    W = grid_weights(som_dim, toroidal)[np.ix_(used, used)]                   # (n, n)
    np.fill_diagonal(W, 0)
    return float(used.sum() / W.sum() * (dev @ W @ dev) / (dev ** 2).sum())


# ---- topology per step ------------------------------------------------------------------------------------
def topology(dist, som_dim: tuple[int, int], toroidal: bool = True) -> dict:
    """qe, te over all N*T steps and qe_step/<t>, te_step/<t> over the N stays' step t. dist (N, T, H*W)."""
    dist = torch.as_tensor(dist)
    N, T, nodes = dist.shape
    neighbours, exists = (t.to(dist.device) for t in grid_neighbours(tuple(som_dim), toroidal))
    flat = dist.reshape(N * T, nodes)                                         # (N*T, H*W)
    metrics = {"qe": quantization_error(flat), "te": topographic_error(flat, neighbours, exists)}
    for t in range(T):
        metrics[f"qe_step/{t}"] = quantization_error(dist[:, t])
    for t in range(T):
        metrics[f"te_step/{t}"] = topographic_error(dist[:, t], neighbours, exists)
    return metrics


# ---- forecast ---------------------------------------------------------------------------------------------
def mse(a, b) -> float:
    """Mean squared error over every element in float64: sklearn's mean_squared_error of the (-1, D) reshapes
    main() passes it, since every column has the same number of rows."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare arrays of shapes {a.shape} and {b.shape}")
    return float(((a - b) ** 2).mean())


def forecast_errors(x=None, x_rec=None, x_pred=None, z=None, z_pred=None) -> dict:
    """The errors TempDPSOM.py's main() reports after training, from whichever arrays are given.

    pred_ze: z_pred (N, S, L), the latent predictions of the last S steps, against z (N, T, L), the encodings of
    those steps. pred_xhat: x_pred (N, S, D), the decoded predictions, against the last S steps of x (N, T, D).
    pred_rec: x_rec (N, T, D), every step's reconstruction, against x. pred_ze_step/<h>, pred_xhat_step/<h>: the
    same at h steps ahead (1 is the first predicted step)."""
    metrics = {}
    for name, pred, truth in (("pred_ze", z_pred, z), ("pred_xhat", x_pred, x)):
        if pred is None or truth is None:
            continue
        S = np.shape(pred)[1]
        truth = np.asarray(truth)[:, -S:]                                     # (N, S, ·) the steps predicted
        metrics[name] = mse(pred, truth)
        for h in range(S):
            metrics[f"{name}_step/{h + 1}"] = mse(np.asarray(pred)[:, h], truth[:, h])
    if x_rec is not None and x is not None:
        metrics["pred_rec"] = mse(x_rec, x)
    return metrics


# ---- everything at once -----------------------------------------------------------------------------------
def sequence_metrics(dist, som_dim: tuple[int, int], y: np.ndarray | None = None, label_names: list | None = None,
                     toroidal: bool = True, forecast: dict | None = None) -> dict:
    """The evaluation numbers of one pass: qe, te, qe_step/<t>, te_step/<t>, nodes_used, occupancy_entropy;
    with labels, for each column nmi/<label>, ami/<label>, purity/<label>, moran/<label> (standard form) and
    moran_reference/<label> (evaluate_model's; its MI is moran_reference of the first column); with forecast
    (keyword arguments of forecast_errors), pred_ze, pred_xhat, pred_rec and their per-horizon values.

    dist (N, T, H*W): squared latent distances of every step to every node; its argmin is the BMU."""
    dist = torch.as_tensor(dist)
    bmu = dist.argmin(-1).reshape(-1).cpu().numpy()                           # (N*T,)
    metrics = topology(dist, som_dim, toroidal)
    metrics.update(map_usage(bmu, som_dim[0] * som_dim[1]))
    if y is not None:
        for name, labels in label_columns(y, label_names):
            metrics[f"nmi/{name}"] = nmi(bmu, labels)
            metrics[f"ami/{name}"] = ami(bmu, labels)
            metrics[f"purity/{name}"] = purity(bmu, labels)
            metrics[f"moran/{name}"] = moran_i(bmu, labels, som_dim, toroidal)
            metrics[f"moran_reference/{name}"] = moran_i_reference(bmu, labels, som_dim)
    metrics.update(forecast_errors(**(forecast or {})))
    return metrics


# ---- pictures ---------------------------------------------------------------------------------------------
def label_mean_pictures(bmu: np.ndarray, y: np.ndarray, som_dim: tuple[int, int], label_names: list | None = None,
                        cell: int = CELL) -> dict:
    """{label_mean/<label>: (3, H*cell, W*cell)}: each label column's mean over the steps each node is the BMU
    of, viridis over that column's range of node means; nodes nobody maps to are grey. bmu (N, T)."""
    H, W = som_dim
    flat = np.asarray(bmu).reshape(-1)
    return {f"label_mean/{name}": heatmap(node_means(flat, labels, H * W)[0].reshape(H, W), cell=cell)
            for name, labels in label_columns(y, label_names)}


def hit_map_picture(bmu: np.ndarray, som_dim: tuple[int, int], cell: int = CELL) -> np.ndarray:
    """(3, H*cell, W*cell): how many steps each node is the BMU of."""
    H, W = som_dim
    return heatmap(np.bincount(np.asarray(bmu).reshape(-1), minlength=H * W).reshape(H, W), lo=0, cell=cell)


def draw_segment(picture: np.ndarray, p0: np.ndarray, p1: np.ndarray, colour: np.ndarray, width: int) -> None:
    """Colour the pixels of the segment p0 -> p1 (pixel (row, column)) in picture (3, h, w); pixels off the
    picture are skipped, so a segment may leave it."""
    n = int(np.abs(p1 - p0).max()) + 1
    points = np.rint(np.linspace(p0, p1, n)).astype(int)                      # (n, 2)
    _, h, w = picture.shape
    for dy in range(width):
        for dx in range(width):
            r, c = points[:, 0] + dy - width // 2, points[:, 1] + dx - width // 2
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            picture[:, r[inside], c[inside]] = colour[:, None]


def trajectory_picture(bmu: np.ndarray, som_dim: tuple[int, int], toroidal: bool = True,
                       background: np.ndarray | None = None, cell: int = CELL) -> np.ndarray:
    """(3, H*cell, W*cell): the BMU path of each stay in bmu (n, T) (a few stays: one tab10 colour each) as a line
    through its nodes' centres, with a square on its first step. On a torus a step across an edge is drawn
    leaving one side and entering the other. background (H, W): values drawn as a heatmap under the lines
    (default: a white map with grey cell borders)."""
    H, W = som_dim
    if background is None:
        picture = np.ones((3, H * cell, W * cell))
        picture[:, ::cell], picture[:, :, ::cell] = 0.8, 0.8
    else:
        picture = heatmap(background, cell=cell)
    width = max(cell // 8, 1)
    for i, path in enumerate(np.asarray(bmu).reshape(len(bmu), -1)):
        colour = PALETTE[i % len(PALETTE)]
        nodes = np.stack([path // W, path % W], 1)                            # (T, 2) row, column
        for a, b in zip(nodes[:-1], nodes[1:]):
            step = b - a
            if toroidal:                                                       # the shorter way round
                step = (step + [H // 2, W // 2]) % [H, W] - [H // 2, W // 2]
            p0, p1 = a * cell + cell // 2, b * cell + cell // 2
            draw_segment(picture, p0, p0 + step * cell, colour, width)
            if (a + step != b).any():                                          # it crossed an edge
                draw_segment(picture, p1 - step * cell, p1, colour, width)
        r, c = nodes[0] * cell + cell // 2
        s = max(cell // 5, 1)
        picture[:, r - s:r + s + 1, c - s:c + s + 1] = colour[:, None, None]
    return picture

"""Clustering metrics for DPSOM's evaluation. Labels are used only here, never in training."""
import numpy as np
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose cluster's majority label equals their own label."""
    clusters, labels = np.asarray(clusters).ravel(), np.asarray(labels).ravel()
    if clusters.shape != labels.shape or clusters.size == 0:
        raise ValueError(f"need two non-empty arrays of one length, got {clusters.shape} and {labels.shape}")
    _, c = np.unique(clusters, return_inverse=True)
    _, y = np.unique(labels, return_inverse=True)
    table = np.zeros((c.max() + 1, y.max() + 1), dtype=np.int64)   # (clusters, classes) contingency
    np.add.at(table, (c, y), 1)
    return float(table.max(axis=1).sum() / clusters.size)


def nmi(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information with geometric averaging, as the reference reports it."""
    return float(normalized_mutual_info_score(labels, clusters, average_method="geometric"))


def ami(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Adjusted mutual information (arithmetic averaging, scikit-learn's default)."""
    return float(adjusted_mutual_info_score(labels, clusters))


def clustering_metrics(clusters: np.ndarray, labels: np.ndarray) -> dict:
    """NMI, purity and AMI of one assignment."""
    return {"nmi": nmi(clusters, labels), "purity": purity(clusters, labels), "ami": ami(clusters, labels)}

"""Balanced clustering of FFN neurons into equal-size experts.

k-means (scikit-learn) gives the centroids; each Lloyd step then assigns neurons to centroids
under the constraint that every cluster holds exactly `size` neurons. For FFN widths up to
`exact_limit` the constrained assignment is solved exactly as a linear assignment problem
(scipy); beyond it a greedy pass (most decided neurons first) keeps the cost reasonable.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans


def _assign_exact(dist: np.ndarray, size: int) -> np.ndarray:
    # one column per slot: cluster c owns slots [c*size, (c+1)*size)
    rows, cols = linear_sum_assignment(np.repeat(dist, size, axis=1))
    labels = np.empty(dist.shape[0], dtype=np.int64)
    labels[rows] = cols // size
    return labels


def _assign_greedy(dist: np.ndarray, size: int) -> np.ndarray:
    n, k = dist.shape
    order_within = np.sort(dist, axis=1)
    margin = order_within[:, 1] - order_within[:, 0] if k > 1 else np.zeros(n)
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, size)
    for i in np.argsort(-margin):
        for c in np.argsort(dist[i]):
            if room[c] > 0:
                labels[i], room[c] = c, room[c] - 1
                break
    return labels


def balanced_kmeans(
    points: np.ndarray, n_clusters: int, seed: int = 0, iters: int = 10, exact_limit: int = 4096
) -> np.ndarray:
    """Labels in [0, n_clusters) with exactly len(points) / n_clusters points per cluster."""
    n = points.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} points do not split into {n_clusters} equal clusters")
    size = n // n_clusters
    if n_clusters == 1:
        return np.zeros(n, dtype=np.int64)
    if size == 1:  # single-neuron experts: nothing to group
        return np.arange(n, dtype=np.int64)
    pts = points.astype(np.float64)
    km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed, max_iter=50).fit(pts)
    centroids = km.cluster_centers_
    assign = _assign_exact if n <= exact_limit else _assign_greedy
    labels = None
    for _ in range(iters):
        dist = _sq_dist(pts, centroids)
        new = assign(dist, size)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centroids = np.stack([pts[labels == c].mean(0) for c in range(n_clusters)])
    return labels


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]


def permutation_from_labels(labels: np.ndarray) -> np.ndarray:
    """Neuron order that puts cluster 0's neurons first, then cluster 1's, ... (stable)."""
    return np.argsort(labels, kind="stable")

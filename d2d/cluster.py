"""Balanced clustering of FFN neurons into equal-size experts.

Each Lloyd step assigns neurons to centroids under the constraint that every cluster holds
exactly `size` neurons. For FFN widths up to `exact_limit` the centroids start from k-means
(scikit-learn, k-means++) and the constrained assignment is solved exactly as a linear
assignment problem (scipy). Both grow steeply with the width (a 2,048-wide layer took 7.7 s,
an 8,192-wide one 13 s in k-means++ alone), so beyond it the centroids start at seeded random
neurons, the assignment is a greedy pass (the neurons with the clearest preference first) and
features wider than `max_dims` (the weight rows of a 4,096-wide model) are first reduced by a
seeded Gaussian projection, which keeps distances to within a few percent: a layer of an
8B-shaped FFN then clusters in seconds.

The features are either the neurons' weight rows or their co-activation profiles
(`ProfileSketch`): what each neuron's |activation| was on a set of tokens, normalised, so
that neurons that fire on the same tokens land in the same expert.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

MAX_DIMS = 512  # beyond the exact limit, wider features are projected to this many dimensions
SKETCH_DIMS = 512  # dimensions of a co-activation profile sketch


def _assign_exact(dist: np.ndarray, size: int) -> np.ndarray:
    # one column per slot: cluster c owns slots [c*size, (c+1)*size)
    rows, cols = linear_sum_assignment(np.repeat(dist, size, axis=1))
    labels = np.empty(dist.shape[0], dtype=np.int64)
    labels[rows] = cols // size
    return labels


def _assign_greedy(dist: np.ndarray, size: int) -> np.ndarray:
    n, k = dist.shape
    prefs = np.argsort(dist, axis=1)  # each neuron's clusters, nearest first
    rows = np.arange(n)
    margin = dist[rows, prefs[:, 1]] - dist[rows, prefs[:, 0]] if k > 1 else np.zeros(n)
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, size)
    for i in np.argsort(-margin):
        for c in prefs[i]:
            if room[c] > 0:
                labels[i], room[c] = c, room[c] - 1
                break
    return labels


def project(points: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """Seeded Gaussian random projection to `dims` columns (unchanged if not wider)."""
    if points.shape[1] <= dims:
        return points
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((points.shape[1], dims), dtype=np.float32) / np.sqrt(dims)
    return points.astype(np.float32) @ r


def balanced_kmeans(
    points: np.ndarray,
    n_clusters: int,
    seed: int = 0,
    iters: int = 10,
    exact_limit: int = 1536,
    max_dims: int = MAX_DIMS,
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
    if n <= exact_limit:
        pts = points.astype(np.float64)
        km = KMeans(n_clusters=n_clusters, n_init=1, random_state=seed, max_iter=50).fit(pts)
        centroids, assign = km.cluster_centers_, _assign_exact
    else:
        pts = project(points, max_dims, seed).astype(np.float32)
        start = np.random.default_rng(seed).choice(n, n_clusters, replace=False)
        centroids, assign = pts[start], _assign_greedy
    labels = None
    for _ in range(iters):
        dist = _sq_dist(pts, centroids)
        new = assign(dist, size)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        # every cluster holds `size` points: sorting by label gives one block per cluster
        order = np.argsort(labels, kind="stable")
        centroids = pts[order].reshape(n_clusters, size, -1).mean(1)
    return labels


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]


def permutation_from_labels(labels: np.ndarray) -> np.ndarray:
    """Neuron order that puts cluster 0's neurons first, then cluster 1's, ... (stable)."""
    return np.argsort(labels, kind="stable")


class ProfileSketch:
    """Co-activation profiles of one layer's neurons, accumulated token batch by token batch
    in constant memory: neuron j's profile is its |activation| on every token seen, kept as a
    seeded Gaussian projection of `dims` columns (plus its exact squared norm), so that the
    normalised profiles' distances survive without holding tokens x neurons."""

    def __init__(self, width: int, dims: int = SKETCH_DIMS):
        self.sketch = np.zeros((width, dims), dtype=np.float64)
        self.sq = np.zeros(width, dtype=np.float64)
        self.dims = dims

    def add(self, act: np.ndarray, proj: np.ndarray) -> None:
        """`act` [tokens, width] activations, `proj` [tokens, dims] the batch's projection
        rows (the same for every layer)."""
        a = np.abs(act).astype(np.float64)
        self.sketch += a.T @ proj
        self.sq += (a * a).sum(0)

    def features(self) -> np.ndarray:
        """[width, dims] the projected, unit-norm profiles (a neuron that never fired: 0)."""
        norm = np.sqrt(self.sq)
        return self.sketch / np.where(norm > 0, norm, 1.0)[:, None]


def projection_rows(n_tokens: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((n_tokens, dims)) / np.sqrt(dims)

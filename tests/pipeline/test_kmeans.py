"""The K-means arithmetic, without Ray."""

import numpy as np

from kmim.pipeline.kmeans import Assigner, kmeans_plus_plus, largest_remainder, lloyd_update, minibatch_update


def test_kmeans_plus_plus_picks_one_point_per_separated_group():
    rng = np.random.default_rng(0)
    groups = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], dtype=np.float32)
    x = np.concatenate([g + rng.standard_normal((50, 2)) for g in groups]).astype(np.float32)
    centers = kmeans_plus_plus(x, 4, np.random.default_rng(1))
    nearest_group = {int(np.argmin(((groups - c) ** 2).sum(1))) for c in centers}
    assert nearest_group == {0, 1, 2, 3}
    assert np.array_equal(centers, kmeans_plus_plus(x, 4, np.random.default_rng(1)))


def test_weighted_kmeans_plus_plus_ignores_zero_weight_points():
    x = np.array([[0.0], [1.0], [50.0], [51.0]], dtype=np.float32)
    w = np.array([1.0, 1.0, 0.0, 0.0])
    for seed in range(5):
        assert set(kmeans_plus_plus(x, 2, np.random.default_rng(seed), w).ravel()) == {0.0, 1.0}


def test_lloyd_update_means_and_splits_the_largest_for_empty_clusters():
    old = np.array([[0.0, 0.0], [9.0, 9.0], [5.0, 5.0]], dtype=np.float32)
    sums = np.array([[10.0, 20.0], [0.0, 0.0], [3.0, 3.0]])
    counts = np.array([10, 0, 1])
    new, reseeds = lloyd_update(sums, counts, old, np.random.default_rng(0), spherical=False)
    assert reseeds == 1
    assert np.allclose(new[2], [3, 3])
    assert np.allclose((new[0] + new[1]) / 2, [1, 2]) and not np.allclose(
        new[0], new[1]
    )  # split around the mean


def test_spherical_update_returns_unit_centers():
    new, _ = lloyd_update(
        np.array([[3.0, 4.0], [0.0, 2.0]]),
        np.array([1, 2]),
        np.zeros((2, 2), np.float32),
        np.random.default_rng(0),
        spherical=True,
    )
    assert np.allclose(np.linalg.norm(new, axis=1), 1)


def test_minibatch_update_moves_toward_the_batch_mean_with_decaying_rate():
    centers = np.zeros((1, 2), np.float32)
    seen = np.zeros(1)
    minibatch_update(centers, seen, np.array([[4.0, 4.0]]), np.array([2]), False)
    assert np.allclose(centers, [[2, 2]]) and seen[0] == 2  # first batch: rate 1 -> the batch mean
    minibatch_update(centers, seen, np.array([[0.0, 0.0]]), np.array([2]), False)
    assert np.allclose(centers, [[1, 1]])  # rate 2 / 4


def test_assigner_is_exact_nearest_center():
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((500, 8)).astype(np.float32), rng.standard_normal((7, 8)).astype(np.float32)
    d2, labels = Assigner(c).assign(x)
    brute = ((x[:, None] - c[None]) ** 2).sum(-1)
    assert np.array_equal(labels, brute.argmin(1))
    assert np.allclose(d2, brute.min(1), atol=1e-4)


def test_largest_remainder_splits_exactly_and_proportionally():
    assert largest_remainder(10, [5, 5, 5]) == [4, 3, 3]
    rng = np.random.default_rng(0)
    for _ in range(50):
        weights = rng.integers(1, 200, size=int(rng.integers(1, 9))).tolist()
        total = int(rng.integers(0, sum(weights) + 1))
        parts = largest_remainder(total, weights)
        assert sum(parts) == total and all(0 <= p <= w for p, w in zip(parts, weights))
        assert all(abs(p - total * w / sum(weights)) < 1 for p, w in zip(parts, weights))

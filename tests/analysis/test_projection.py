"""The ZS-SBIR projection on synthetic data whose class structure all classes share: trained on
seen classes only, each loss must carry over to classes it never saw."""

import numpy as np
import pytest

from pipelines.analysis.projection import ProjectionConfig, train_projection


def shared_structure(n_classes: int, per_class: int, seed: int = 0, text_dim: int = 6):
    """Class vectors t_c (text_dim) map into feature space through one fixed matrix, and large noise
    in 40 extra directions drowns them: x = [t_c A + small noise, big noise]. Half of each class
    is 'sketch' (query), half 'photo'."""
    rng = np.random.default_rng(seed)
    text = rng.normal(size=(n_classes, text_dim))
    mixing = rng.normal(size=(text_dim, 8))
    labels = np.repeat(np.arange(n_classes), per_class)
    signal = text[labels] @ mixing + 0.3 * rng.normal(size=(len(labels), 8))
    x = np.concatenate([signal, 3.0 * rng.normal(size=(len(labels), 40))], axis=1)
    is_query = np.tile(np.arange(per_class) < per_class // 2, n_classes)
    return x.astype(np.float32), labels, is_query, text.astype(np.float32)


def mean_ap(x: np.ndarray, labels: np.ndarray, is_query: np.ndarray) -> float:
    """Queries against the gallery by cosine similarity; non-interpolated AP averaged over queries."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    q, g = x[is_query], x[~is_query]
    order = np.argsort(-(q @ g.T), axis=1, kind="stable")
    relevant = labels[~is_query][order] == labels[is_query][:, None]
    ranks = np.arange(1, relevant.shape[1] + 1)
    return float(np.mean([(np.cumsum(r) / ranks)[r].mean() for r in relevant]))


SEEN, UNSEEN = range(0, 12), range(12, 16)


def split(data, classes):
    x, labels, is_query, text = data
    keep = np.isin(labels, list(classes))
    return x[keep], labels[keep] - min(classes), is_query[keep], text[list(classes)]


@pytest.mark.parametrize("config", [
    ProjectionConfig(dim=8, loss="cross-entropy", epochs=60),
    ProjectionConfig(dim=8, loss="triplet", epochs=60, batch_size=64),
], ids=["cross-entropy", "triplet"])
def test_a_projection_trained_on_seen_classes_helps_unseen_ones(one_torch_thread, config):
    data = shared_structure(16, 40)
    x_seen, y_seen, q_seen, _ = split(data, SEEN)
    x_unseen, y_unseen, q_unseen, _ = split(data, UNSEEN)
    weights = train_projection(x_seen, y_seen, q_seen, config)
    assert weights.shape == (48, 8)
    before, after = mean_ap(x_unseen, y_unseen, q_unseen), mean_ap(x_unseen @ weights, y_unseen, q_unseen)
    assert after > before + 0.2, (before, after)  # raw features: about 0.52 (chance 0.25)


def test_into_text_embeddings_it_classifies_unseen_classes_by_name(one_torch_thread):
    data = shared_structure(16, 40)
    x_seen, y_seen, q_seen, text_seen = split(data, SEEN)
    x_unseen, y_unseen, _, text_unseen = split(data, UNSEEN)
    config = ProjectionConfig(dim=None, text_embeddings="names.safetensors", epochs=60)
    weights = train_projection(x_seen, y_seen, q_seen, config, class_vectors=text_seen)
    assert weights.shape == (48, text_seen.shape[1])  # the map lands in the text space

    def by_name(x, text):
        z = x @ weights
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        return np.argmax(z @ (text / np.linalg.norm(text, axis=1, keepdims=True)).T, axis=1)

    assert np.mean(by_name(x_seen, text_seen) == y_seen) > 0.9
    # the unseen classes' names were never used in training, yet their images land next to them
    assert np.mean(by_name(x_unseen, text_unseen) == y_unseen) > 0.8  # chance 0.25


def test_triplet_needs_two_classes_in_the_gallery_domain(one_torch_thread):
    x, labels, _, _ = shared_structure(2, 6)
    with pytest.raises(ValueError, match="at least two seen classes"):
        train_projection(x, labels, labels == 1, ProjectionConfig(loss="triplet", epochs=1))  # photos of class 0 only


@pytest.mark.parametrize("changes, message", [
    ({"loss": "contrastive"}, "loss must be one of cross-entropy, triplet"),
    ({"loss": "triplet", "text_embeddings": "t.safetensors"}, "triplet loss has none"),
    ({"dim": None}, "needs a width"),
    ({"margin": -0.1}, "margin not negative"),
    ({"epochs": 0}, "must be positive"),
])
def test_bad_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        ProjectionConfig(**changes)

"""The handwritten-digits data behind fusediff's shipped model, and the classifier that checks it.

The data are scikit-learn's bundled 8x8 digits (1,797 images, values 0-16, ink bright on a
dark background; from the UCI optical recognition of handwritten digits set). They are
upscaled bilinearly to ``size`` x ``size`` and mapped to [-1, 1], ink at +1. The classifier is
a small multilayer perceptron fit to the same upscaled real digits; it judges whether samples
of the model are recognisable digits, and :data:`CONFIDENT` is the class probability it must
reach for a sample to count as labelled with confidence.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 16  # side of the upscaled images the model is trained on
CONFIDENT = 0.8  # class probability above which a label counts as confident


def load_digits_images(size: int = SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """Real digits as a (N, 1, size, size) float32 tensor in [-1, 1], and their labels (N,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    if size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return (pixels.clamp(0, 1) * 2 - 1).contiguous(), data.target.copy()


def fit_classifier(size: int = SIZE, holdout: float = 0.25, seed: int = 0):
    """An MLP classifier of upscaled real digits, its held-out accuracy, and the held-out split.

    The held-out split also gives the fraction of real digits classified with the confidence
    the tests demand, a yardstick for the samples.
    """
    from sklearn.neural_network import MLPClassifier
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_images(size)
    features = images.flatten(1).numpy()
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=holdout,
                                                        random_state=seed, stratify=labels)
    clf = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=500, random_state=seed)
    clf.fit(x_train, y_train)
    return clf, float(clf.score(x_test, y_test)), (x_test, y_test)


def classify(clf, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidences (largest class probability) of (N, 1, H, W) images in [-1, 1]."""
    probs = clf.predict_proba(images.detach().float().cpu().flatten(1).numpy())
    return clf.classes_[probs.argmax(1)], probs.max(1)

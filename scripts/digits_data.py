"""The handwritten-digits data behind fusediff's shipped model, and the classifier that checks it.

The data are scikit-learn's bundled 8x8 digits (1,797 images, values 0-16, ink bright on a
dark background; from the UCI optical recognition of handwritten digits set), upscaled
bilinearly to ``size`` x ``size`` and mapped to [-1, 1], ink at +1, by
:func:`fusediff.training.digits.load_digits_images`. The classifier is
a small multilayer perceptron fit to the same upscaled real digits and to a class of images that
are not digits; it judges whether samples of the model are recognisable digits, and
:data:`CONFIDENT` is the probability of a digit class it must reach for a sample to count as
labelled with confidence.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fusediff.training.digits import SIZE
from fusediff.training.digits import load_digits_images as _load_digits_images

CONFIDENT = 0.8  # class probability above which a label counts as confident
NOT_A_DIGIT = 10  # the classifier's reject class


def load_digits_images(size: int = SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """Real digits as a (N, 1, size, size) float32 tensor in [-1, 1], and their labels (N,) as a numpy array.

    The data come from :func:`fusediff.training.digits.load_digits_images`; labels stay numpy here,
    as the classifier below uses them."""
    images, labels = _load_digits_images(size)
    return images, labels.numpy()


def non_digits(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """n images in [-1, 1] that are not digits: noise, smooth blobs, flat fields and two digits on top
    of each other, a quarter each. They teach the classifier a reject class."""
    g = torch.Generator().manual_seed(seed)
    k = n // 4
    noise = torch.randn(k, 1, size, size, generator=g) * 1.5 * torch.rand(k, 1, 1, 1, generator=g)
    blobs = [F.avg_pool2d(z, w, stride=1, padding=w // 2) * (2 + 4 * torch.rand(len(z), 1, 1, 1, generator=g))
             for w, z in ((w, torch.randn(k // 3 + 1, 1, size, size, generator=g)) for w in (3, 5, 7))]
    flat = (torch.rand(k, 1, 1, 1, generator=g) * 2 - 1).expand(k, 1, size, size)
    digits, labels = load_digits_images(size)
    i, j = (torch.randint(0, len(digits), (n - 3 * k,), generator=g) for _ in range(2))
    different = torch.from_numpy(labels[i.numpy()] != labels[j.numpy()])
    overlays = torch.maximum(digits[i], digits[j])[different]
    return torch.cat([noise, torch.cat(blobs)[:k], flat, overlays]).clamp(-1, 1)


def fit_classifier(size: int = SIZE, holdout: float = 0.25, seed: int = 0):
    """An MLP classifier of upscaled real digits plus a reject class, its held-out accuracy, and the
    held-out real digits (features, labels).

    The reject class (label :data:`NOT_A_DIGIT`) is fit to :func:`non_digits`, so noise, blank
    or scrambled images are not labelled as digits with confidence. The held-out real digits give
    the fraction the judge labels with confidence, a yardstick for the samples.
    """
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    images, labels = load_digits_images(size)
    fakes = non_digits(800, seed=seed + 1234, size=size)
    features = torch.cat([images, fakes]).flatten(1).numpy()
    targets = np.concatenate([labels, np.full(len(fakes), NOT_A_DIGIT)])
    x_train, x_test, y_train, y_test = train_test_split(features, targets, test_size=holdout,
                                                        random_state=seed, stratify=targets)
    clf = MLPClassifier(hidden_layer_sizes=(256,), alpha=1e-3, max_iter=500, random_state=seed)
    clf.fit(x_train, y_train)
    real = y_test != NOT_A_DIGIT
    return clf, float(clf.score(x_test, y_test)), (x_test[real], y_test[real])


def classify(clf, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Labels (:data:`NOT_A_DIGIT` for a reject) and their probabilities of (N, 1, H, W) images in [-1, 1]."""
    probs = clf.predict_proba(images.detach().float().cpu().flatten(1).numpy())
    return clf.classes_[probs.argmax(1)], probs.max(1)


def confident_digits(clf, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Labels of (N, 1, H, W) images in [-1, 1], and which are digits labelled with confidence."""
    labels, conf = classify(clf, images)
    return labels, (labels != NOT_A_DIGIT) & (conf >= CONFIDENT)

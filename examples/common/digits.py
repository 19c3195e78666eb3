"""scikit-learn's digits: the train/test split and the batch order of the digits examples."""

from __future__ import annotations

import jax
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

Data = dict[str, np.ndarray]
Batch = dict[str, jax.Array]


def split(seed: int) -> tuple[Data, Data]:
    """The 1797 8x8 digits split 80/20, stratified by class, pixels as given (0 to 16).

    Args:
      seed: fixes the split.

    Returns:
      ``(train, test)``, each ``{"x": float64 (n, 64), "y": int32 (n,)}``: 1437 and 360
      examples.
    """
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return {"x": x_tr, "y": y_tr.astype(np.int32)}, {"x": x_te, "y": y_te.astype(np.int32)}


def batch_order(n_train: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """Which training examples each step uses: ``batch_size`` distinct ones per step.

    Drawn once from a seeded generator, so every run of an example sees the same batches in
    the same order.

    Returns:
      Integer indices of shape ``(steps, batch_size)``.

    Raises:
      ValueError: if ``batch_size`` exceeds ``n_train``.
    """
    if batch_size > n_train:
        raise ValueError(f"batch size {batch_size} exceeds the {n_train} training examples")
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n_train)[:batch_size] for _ in range(steps)])


def take(data: Data, idx: np.ndarray) -> Batch:
    """The examples ``idx`` of ``data``, as a batch on the default device."""
    return jax.device_put({key: value[idx] for key, value in data.items()})

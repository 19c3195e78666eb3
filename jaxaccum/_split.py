"""Checking a batch pytree and cutting it into k micro-batches."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccum import _options, _parallel


class Split(_options.Option):
    """How a batch of N examples becomes k micro-batches (a member or its string).

    Attributes:
      STRIDED: ``"strided"`` (default): micro-batch ``j`` holds examples ``j, j+k, j+2k,
        ...``. A batch sharded over devices along its leading axis stays local to each
        device.
      CONTIGUOUS: ``"contiguous"``: micro-batch ``j`` holds examples ``j*N/k ...
        (j+1)*N/k - 1``.
      PRESPLIT: ``"presplit"``: every leaf already has a leading axis of size k;
        micro-batch ``j`` is ``leaf[j]``.
    """

    STRIDED = "strided"
    CONTIGUOUS = "contiguous"
    PRESPLIT = "presplit"


def check_split(split: Any) -> Split:
    return Split.parse(split, "split")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def leaves_with_paths(tree: Any, label: str) -> list[tuple[str, Any]]:
    """Every leaf of ``tree`` with a readable path such as ``batch['x']``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(label + jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def leaf_dtype(x: Any) -> Any:
    """The dtype of an array, abstract value or Python scalar (PRNG key dtypes included)."""
    return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def changed_leaves(
    before: Any, after: Any, label: str, *, dtypes: bool = True
) -> list[tuple[str, Any, Any]]:
    """``(path, before_leaf, after_leaf)`` for every leaf whose shape (or dtype) differs.

    The two trees must have the same structure; paths read like ``label['x']``.
    """
    return [
        (path, a, b)
        for (path, a), (_, b) in zip(
            leaves_with_paths(before, label), leaves_with_paths(after, label), strict=True
        )
        if np.shape(a) != np.shape(b) or (dtypes and leaf_dtype(a) != leaf_dtype(b))
    ]


def leading_size(
    batch: dict[str, Any], what: str = "the batch", axes: dict[str, int] | None = None
) -> int:
    """The shared example-axis size of all leaves; raises a teaching error otherwise.

    Args:
      batch: maps an argument label to its pytree of arrays.
      what: how to name the batch in messages.
      axes: the example axis of each argument (default 0 for all).
    """
    leaves = [
        (pl, (axes or {}).get(label, 0))
        for label, tree in batch.items()
        for pl in leaves_with_paths(tree, label)
    ]
    if not leaves:
        raise ValueError(
            f"{what} has no array leaves ({', '.join(batch)} is an empty pytree); pass a pytree "
            "of arrays whose leading axis indexes examples."
        )
    sizes: dict[str, int] = {}
    for (path, leaf), axis in leaves:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise TypeError(
                f"leaf {path} of {what} is a {type(leaf).__name__}, not an array; batch leaves "
                "must be arrays with a leading example axis. Move non-array values out of the "
                "batch into another argument."
            )
        if np.ndim(leaf) == 0:
            raise ValueError(
                f"leaf {path} of {what} is a scalar with no leading example axis; give it "
                "shape (N, ...) or pass it as a non-batch argument."
            )
        if np.ndim(leaf) <= axis:
            raise ValueError(
                f"leaf {path} of {what} has shape {tuple(leaf.shape)}, with no axis {axis} for "
                "in_axes to name as its example axis; give in_axes per batch argument, each "
                "below the leaves' number of dimensions."
            )
        sizes[path] = int(leaf.shape[axis])
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{p}: {n}" for p, n in sizes.items())
        raise ValueError(
            f"leaves of {what} disagree on the leading (example) axis size: {listing}. "
            "Every batch leaf needs the same leading size."
        )
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{what} is empty: its leading axis has size 0 at {next(iter(sizes))}.")
    return n


def axes_of(batch: dict[str, Any], in_axes: tuple[int, ...]) -> dict[str, int]:
    """The example axis of each batch argument (``in_axes`` has one entry per argument)."""
    if len(in_axes) == 1:
        in_axes = in_axes * len(batch)
    return dict(zip(batch, in_axes, strict=True))


def presplit_size(batch: dict[str, Any], k: int, axes: dict[str, int] | None = None) -> int:
    """N of a presplit batch: every leaf ``(k, N/k, ...)`` at its axis; returns N (checked)."""
    sizes = {
        path: (np.shape(leaf), (axes or {}).get(label, 0))
        for label, tree in batch.items()
        for path, leaf in leaves_with_paths(tree, label)
    }
    bad = {p: shape for p, (shape, a) in sizes.items() if len(shape) < a + 2 or shape[a] != k}
    if bad:
        raise ValueError(
            f"split='presplit' needs every batch leaf shaped (k, N/k, ...) at its example axis "
            f"with k={k}, got {bad}; reshape to (k, N/k, ...) or use split='strided'."
        )
    per = {shape[a + 1] for shape, a in sizes.values()}
    if len(per) > 1:
        raise ValueError(f"batch leaves disagree on the micro-batch size: {sizes}.")
    return k * per.pop()


def check_divisible(n: int, k: int, where: str) -> None:
    if k > n:
        raise ValueError(
            f"k={k} is larger than the batch size {n} at {where}; choose k <= {n} "
            f"(a divisor of {n}: {divisors(n)})."
        )
    if n % k:
        raise ValueError(
            f"batch size {n} at leaf {where} is not divisible by k={k}; choose k from "
            f"{divisors(n)}, or pad the batch to a multiple of k with jaxaccum.pad_batch and "
            "give the padding zero weight through weight_fn."
        )


def microbatches(
    batch: dict[str, Any], k: int, split: Split, axes: dict[str, int] | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    """A free reshape of every leaf exposing a micro-batch axis (checked first).

    Returns ``(views, index_axes)``: micro-batch ``j`` is ``index(views, j, index_axes)``.
    An argument's example axis ``a`` (0 unless ``axes`` says otherwise) of size N is
    reshaped to ``(N/k, k)`` for the strided split, indexed at ``a + 1`` inside the
    loop instead of transposed, or to ``(k, N/k)`` for the contiguous one, indexed at
    ``a``: the batch is never copied, and a sharding of the example axis stays local to
    each device. Micro-batch j keeps its example axis at ``a``.
    """
    axes = axes or {label: 0 for label in batch}
    n = leading_size(batch, axes=axes)
    first = next(p for label, t in batch.items() for p, _ in leaves_with_paths(t, label))
    if split == "presplit":
        if n != k:
            raise ValueError(
                f"split='presplit' needs an example axis of size k={k} on every batch leaf, "
                f"got {n} at {first}; reshape to (k, N/k, ...) or use split='strided'."
            )
        return {label: jax.tree.map(jnp.asarray, t) for label, t in batch.items()}, axes
    check_divisible(n, k, first)
    views: dict[str, Any] = {}
    index_axes: dict[str, int] = {}
    for label, tree in batch.items():
        a = axes[label]
        if split == "contiguous":
            _check_contiguous(tree, a, label)
        parts = (k, n // k) if split == "contiguous" else (n // k, k)
        views[label] = jax.tree.map(
            lambda x, a=a, parts=parts: jnp.reshape(x, (*x.shape[:a], *parts, *x.shape[a + 1 :])),
            tree,
        )
        index_axes[label] = a if split == "contiguous" else a + 1
    return views, index_axes


def _check_contiguous(tree: Any, axis: int, label: str) -> None:
    """Raises if a contiguous split would have to move a batch sharded by its type."""
    for path, leaf in leaves_with_paths(tree, label):
        entry = _parallel.base.explicit_entry(leaf, axis)
        if entry is not None:
            raise ValueError(
                f"split='contiguous' cannot cut batch leaf {path}, whose example axis is "
                f"sharded over the Explicit mesh axes {entry!r}: the j-th block of examples "
                "lives on some devices only, so each micro-batch would be moved. Use "
                "split='strided' (the default: every device keeps its own examples), or "
                f"data_axis={entry!r} to split each device's examples separately."
            )


def index(views: dict[str, Any], j: Any, axes: dict[str, int]) -> dict[str, Any]:
    """Micro-batch ``j`` of views made by :func:`microbatches`; ``0 <= j < k`` (a loop index).

    Negative indices are not normalised: XLA fuses the slice into each consumer, and a
    ``j < 0`` select there would be recomputed per element.
    """

    def one(v: jax.Array, axis: int) -> jax.Array:
        return jax.lax.dynamic_index_in_dim(
            v, j, axis, keepdims=False, allow_negative_indices=False
        )

    return {
        label: jax.tree.map(lambda v, a=axes[label]: one(v, a), t) for label, t in views.items()
    }


def pad_batch(batch: Any, multiple: int) -> tuple[Any, jax.Array]:
    """Pads a batch along its leading axis to a multiple of ``multiple``.

    Padding rows are zeros. The returned mask is ``True`` for real examples, so a
    ``weight_fn`` that counts it (or a loss that multiplies by it) gives the padding no
    weight, and a short final batch keeps a static shape (no recompilation).

    Args:
      batch: a pytree of arrays sharing a leading axis of size N.
      multiple: the padded size is the smallest multiple of this that is >= N.

    Returns:
      ``(padded_batch, mask)`` where ``mask`` has shape ``(padded_size,)`` and dtype bool.

    Raises:
      ValueError: if ``multiple`` is not a positive int or the batch is malformed.

    Examples:
      >>> import jax.numpy as jnp, jaxaccum
      >>> padded, mask = jaxaccum.pad_batch({"x": jnp.ones((5, 2))}, 4)
      >>> padded["x"].shape, mask.tolist()
      ((8, 2), [True, True, True, True, True, False, False, False])
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}.")
    n = leading_size({"batch": batch})
    size = -(-n // multiple) * multiple

    def pad(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        return jnp.pad(x, [(0, size - n)] + [(0, 0)] * (x.ndim - 1))

    return jax.tree.map(pad, batch), jnp.arange(size) < n

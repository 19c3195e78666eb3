"""Exact merging of BatchNorm statistics over equal-sized micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxaccum import _options


class BatchNormMode(_options.Option):
    """How BatchNorm running statistics are updated in a step (a member or its string).

    Attributes:
      SEQUENTIAL: ``"sequential"`` (default): micro-batch j normalises with its own
        statistics and updates the running statistics, in order: k momentum updates per
        step, as k consecutive calls of a hand-written loop (PyTorch's and T5X's behaviour
        with accumulation).
      EXACT: ``"exact"``: micro-batch j still normalises with its own statistics (in one
        pass nothing else is possible), but the running statistics get **one** momentum
        update per step, from the statistics of all k micro-batches merged exactly (count,
        mean and sum of squares: the parallel-variance combination), which is what the
        full batch would have computed. Needs equal micro-batch sizes; only the statistics
        of ``flax.linen.BatchNorm`` / ``flax.nnx.BatchNorm`` can be merged this way.
    """

    SEQUENTIAL = "sequential"
    EXACT = "exact"


def merged_update(
    old: jax.Array,
    written: jax.Array,
    written_mean: jax.Array,
    written_mean_sq: jax.Array,
    momentum: float,
    is_mean: bool,
) -> jax.Array:
    """One momentum update of a running mean or variance from k merged micro-batches.

    Given zero running statistics, BatchNorm writes ``(1 - m) * stat_j`` for micro-batch j.
    ``written`` is the mean over micro-batches of what it wrote for this leaf,
    ``written_mean`` the same for the layer's running mean, and ``written_mean_sq`` the
    mean of its square. With equal micro-batch sizes the whole batch's mean is the mean of
    the means, and its variance is ``E_j[var_j + mean_j^2] - mean^2``.
    """
    a = 1.0 - momentum
    mu = written_mean / a
    if is_mean:
        stat = mu
    else:
        second_moment = written / a + written_mean_sq / (a * a)
        stat = jnp.maximum(0.0, second_moment - mu * mu)
    return (momentum * old + a * stat).astype(old.dtype)


Path = tuple[Any, ...]
KeysOf = Callable[[Any], Path]


def is_stat(keys: Path, momenta: Mapping[Path, float]) -> bool:
    """Whether the leaf at ``keys`` is a running mean or variance of a known BatchNorm."""
    return bool(keys) and keys[:-1] in momenta and keys[-1] in ("mean", "var")


def moments(
    tree: Any, momenta: Mapping[Path, float], keys_of: KeysOf
) -> tuple[dict[Path, jax.Array], dict[Path, jax.Array]]:
    """What one micro-batch wrote to each BatchNorm statistic (float32), and its square.

    Averaged over the micro-batches, these are the ``written`` and ``written_mean_sq`` of
    :func:`merged_update`.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    first = {
        keys_of(path): leaf.astype(jnp.float32)
        for path, leaf in flat
        if is_stat(keys_of(path), momenta)
    }
    return first, {keys: jnp.square(v) for keys, v in first.items()}


def merge(
    old: Any,
    first: Mapping[Path, jax.Array],
    second: Mapping[Path, jax.Array],
    momenta: Mapping[Path, float],
    keys_of: KeysOf,
    *,
    only_stats: str | None = None,
) -> Any:
    """One momentum update of every BatchNorm statistic in ``old`` from k merged micro-batches.

    ``first`` and ``second`` are :func:`moments` averaged over the micro-batches. Leaves that
    are not BatchNorm statistics are kept, or, with ``only_stats`` (the collection's name),
    refused: they cannot be merged exactly.
    """

    def one(path: Any, leaf: Any) -> Any:
        keys = keys_of(path)
        if not is_stat(keys, momenta):
            if only_stats is None:
                return leaf
            raise ValueError(
                f"{only_stats}{jax.tree_util.keystr(path)} is not the running mean or variance "
                "of a flax.linen.BatchNorm, so it cannot be merged exactly; choose "
                "batch_norm='sequential', or keep other variables out of the "
                f"{only_stats!r} collection."
            )
        module, name = keys[:-1], keys[-1]
        mean = (*module, "mean")
        return merged_update(
            leaf, first[keys], first[mean], second[mean], momenta[module], name == "mean"
        )

    return jax.tree_util.tree_map_with_path(one, old)

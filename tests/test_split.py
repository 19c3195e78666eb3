"""``_split``: cutting a batch into k micro-batches, against numpy indexing.

Micro-batch ``j`` from :func:`_split.microbatches` and :func:`_split.index` must equal the
numpy slice the split's definition names (strided ``x[j::k]``, contiguous
``x[j*N/k:(j+1)*N/k]``, presplit ``x[j]``), taken along the argument's example axis. These
are copies of the same values, so they are compared for equality. Bad batches raise errors
naming the argument and the leaf path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxaccum
from jaxaccum import _split
from jaxaccum._split import Split

RNG = np.random.default_rng(0)


def reference(x: np.ndarray, j: int, k: int, split: str, axis: int = 0) -> np.ndarray:
    """Micro-batch j of k by the split's definition, cut by numpy indexing."""
    x = np.moveaxis(x, axis, 0)
    n = x.shape[0]
    if split == "strided":
        part = x[j::k]
    elif split == "contiguous":
        part = x[j * n // k : (j + 1) * n // k]
    else:
        part = x[j]
    return np.moveaxis(part, 0, axis)


def cut(batch: dict, k: int, split: str, axes: dict | None = None) -> list[dict]:
    views, index_axes = _split.microbatches(batch, k, Split(split), axes)
    return [_split.index(views, jnp.int32(j), index_axes) for j in range(k)]


@pytest.mark.parametrize("split", ["strided", "contiguous"])
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_micro_batches_are_the_numpy_slices(split, k):
    batch = {
        "batch": {"x": RNG.normal(size=(6, 4)).astype(np.float32), "y": np.arange(6)},
        "mask": np.arange(6) % 2 == 0,
    }
    for j, mb in enumerate(cut(batch, k, split)):
        for label in ("x", "y"):
            expected = reference(batch["batch"][label], j, k, split)
            np.testing.assert_array_equal(np.asarray(mb["batch"][label]), expected)
        np.testing.assert_array_equal(np.asarray(mb["mask"]), reference(batch["mask"], j, k, split))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_presplit_micro_batch_j_is_leaf_j(k):
    batch = {"batch": {"x": RNG.normal(size=(k, 3, 2)).astype(np.float32)}}
    for j, mb in enumerate(cut(batch, k, "presplit")):
        np.testing.assert_array_equal(np.asarray(mb["batch"]["x"]), batch["batch"]["x"][j])


@pytest.mark.parametrize("split", ["strided", "contiguous"])
def test_example_axis_other_than_zero_stays_in_place(split):
    """Time-major ``(T, N, F)`` with in_axes=1 next to an ordinary ``(N, F)`` argument."""
    seq = RNG.normal(size=(5, 8, 3)).astype(np.float32)
    labels = np.arange(8 * 2).reshape(8, 2)
    batch = {"seq": seq, "labels": labels}
    axes = _split.axes_of(batch, (1, 0))
    assert axes == {"seq": 1, "labels": 0}
    for j, mb in enumerate(cut(batch, 4, split, axes)):
        assert mb["seq"].shape == (5, 2, 3)
        np.testing.assert_array_equal(np.asarray(mb["seq"]), reference(seq, j, 4, split, 1))
        np.testing.assert_array_equal(np.asarray(mb["labels"]), reference(labels, j, 4, split))


def test_one_in_axes_entry_applies_to_every_argument():
    assert _split.axes_of({"a": 0, "b": 0, "c": 0}, (2,)) == {"a": 2, "b": 2, "c": 2}


def test_presplit_at_axis_one():
    x = RNG.normal(size=(7, 3, 2)).astype(np.float32)  # (T, k, N/k)
    for j, mb in enumerate(cut({"x": x}, 3, "presplit", {"x": 1})):
        np.testing.assert_array_equal(np.asarray(mb["x"]), x[:, j])


def test_splitting_is_traceable_with_a_traced_index():
    batch = {"x": np.arange(12.0, dtype=np.float32).reshape(6, 2)}
    views, axes = _split.microbatches(batch, 3, Split.STRIDED)
    f = jax.jit(lambda v, j: _split.index(v, j, axes))
    for j in range(3):
        np.testing.assert_array_equal(np.asarray(f(views, j)["x"]), batch["x"][j::3])


# --- leading size and its errors -----------------------------------------------------------


def test_leading_size_is_the_shared_example_axis():
    batch = {"batch": {"x": np.zeros((6, 2)), "y": np.zeros(6)}, "t": np.zeros((3, 6))}
    assert _split.leading_size(batch, axes={"t": 1}) == 6


@pytest.mark.parametrize(
    ("batch", "axes", "error", "message"),
    [
        (
            {"batch": {}},
            None,
            ValueError,
            r"the batch has no array leaves \(batch is an "
            r"empty pytree\)",
        ),
        (
            {"batch": {"x": np.zeros(4), "n": 3}},
            None,
            TypeError,
            r"leaf batch\['n'\] of the "
            r"batch is a int, not an array",
        ),
        (
            {"batch": {"x": np.zeros(4), "s": np.float32(1)}},
            None,
            ValueError,
            r"leaf "
            r"batch\['s'\] of the batch is a scalar with no leading example axis",
        ),
        (
            {"batch": {"x": np.zeros(4), "y": np.zeros(5)}},
            None,
            ValueError,
            r"disagree on the "
            r"leading \(example\) axis size: batch\['x'\]: 4, batch\['y'\]: 5",
        ),
        (
            {"batch": {"x": np.zeros((0, 2))}},
            None,
            ValueError,
            r"the batch is empty: its "
            r"leading axis has size 0 at batch\['x'\]",
        ),
        (
            {"seq": [np.zeros((4, 2))]},
            {"seq": 2},
            ValueError,
            r"leaf seq\[0\] of the batch "
            r"has shape \(4, 2\), with no axis 2 for in_axes",
        ),
    ],
)
def test_malformed_batches_name_the_leaf(batch, axes, error, message):
    with pytest.raises(error, match=message):
        _split.leading_size(batch, axes=axes)


def test_k_larger_than_the_batch_lists_the_divisors():
    with pytest.raises(
        ValueError,
        match=r"k=8 is larger than the batch size 6 at batch\['x'\]; "
        r"choose k <= 6 \(a divisor of 6: \[1, 2, 3, 6\]\)",
    ):
        _split.microbatches({"batch": {"x": np.zeros(6)}}, 8, Split.STRIDED)


def test_k_that_does_not_divide_names_the_leaf_and_the_fix():
    message = (
        r"batch size 10 at leaf batch\['x'\] is not divisible by k=4; choose k from "
        r"\[1, 2, 5, 10\], or pad the batch .* jaxaccum.pad_batch"
    )
    with pytest.raises(ValueError, match=message):
        _split.microbatches({"batch": {"x": np.zeros(10)}}, 4, Split.CONTIGUOUS)


def test_presplit_needs_a_leading_axis_of_size_k():
    with pytest.raises(
        ValueError,
        match=r"split='presplit' needs an example axis of size "
        r"k=4 on every batch leaf, got 8 at batch\['x'\]",
    ):
        _split.microbatches({"batch": {"x": np.zeros((8, 2))}}, 4, Split.PRESPLIT)


def test_presplit_size_is_k_times_the_micro_batch_size():
    batch = {"batch": {"x": np.zeros((4, 3, 2)), "y": np.zeros((4, 3))}}
    assert _split.presplit_size(batch, 4) == 12
    assert _split.presplit_size({"t": np.zeros((5, 4, 3))}, 4, {"t": 1}) == 12


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"batch": {"x": np.zeros((3, 2))}}, r"with k=4, got \{\"batch\['x'\]\": \(3, 2\)\}"),
        ({"batch": {"x": np.zeros((4,))}}, r"with k=4, got \{\"batch\['x'\]\": \(4,\)\}"),
        (
            {"batch": {"x": np.zeros((4, 2)), "y": np.zeros((4, 3))}},
            r"disagree on the "
            r"micro-batch size",
        ),
    ],
)
def test_presplit_size_names_the_leaves_that_do_not_fit(batch, message):
    with pytest.raises(ValueError, match=message):
        _split.presplit_size(batch, 4)


def test_divisors_are_every_divisor():
    for n in (1, 7, 12, 36):
        assert _split.divisors(n) == [d for d in range(1, n + 1) if n % d == 0]


# --- split option --------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["strided", "contiguous", "presplit", *Split])
def test_check_split_takes_members_and_strings(value):
    assert _split.check_split(value) == value
    assert isinstance(_split.check_split(value), Split)


@pytest.mark.parametrize("bad", ["Strided", "interleaved", None, 0])
def test_check_split_names_the_parameter_and_the_choices(bad):
    message = r"split=.* is not one of \('strided', 'contiguous', 'presplit'\)"
    with pytest.raises(ValueError, match=message):
        _split.check_split(bad)


# --- pad_batch ----------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "multiple", "size"), [(5, 4, 8), (8, 4, 8), (1, 3, 3), (6, 1, 6)])
def test_pad_batch_pads_with_zero_rows_and_masks_them(n, multiple, size):
    batch = {"x": RNG.normal(size=(n, 2)).astype(np.float32), "y": [np.arange(n, dtype=np.int32)]}
    padded, mask = jaxaccum.pad_batch(batch, multiple)
    np.testing.assert_array_equal(
        np.asarray(padded["x"]), np.concatenate([batch["x"], np.zeros((size - n, 2))])
    )
    np.testing.assert_array_equal(
        np.asarray(padded["y"][0]), np.concatenate([batch["y"][0], np.zeros(size - n)])
    )
    assert padded["x"].dtype == jnp.float32 and padded["y"][0].dtype == jnp.int32
    assert mask.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(mask), np.arange(size) < n)


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4", None])
def test_pad_batch_needs_a_positive_int_multiple(bad):
    with pytest.raises(ValueError, match=r"multiple must be a positive int, got "):
        jaxaccum.pad_batch({"x": np.zeros(3)}, bad)


def test_pad_batch_names_the_leaf_of_a_malformed_batch():
    with pytest.raises(ValueError, match=r"batch\['y'\]: 4"):
        jaxaccum.pad_batch({"x": np.zeros(3), "y": np.zeros(4)}, 2)


# --- leaf paths ----------------------------------------------------------------------------


def test_leaves_with_paths_read_like_python_indexing():
    tree = {"x": np.zeros(2), "pair": (np.ones(1), [np.ones(3)])}
    paths = [path for path, _ in _split.leaves_with_paths(tree, "batch")]
    assert paths == ["batch['pair'][0]", "batch['pair'][1][0]", "batch['x']"]


def test_changed_leaves_lists_shape_and_dtype_changes():
    before = {"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32), "c": np.zeros(1)}
    after = {"a": np.zeros(2, np.float32), "b": np.zeros(4, np.float32), "c": np.zeros(1, int)}
    changed = _split.changed_leaves(before, after, "state")
    assert [(path, np.shape(a), np.shape(b)) for path, a, b in changed] == [
        ("state['b']", (3,), (4,)),
        ("state['c']", (1,), (1,)),
    ]
    assert [path for path, _, _ in _split.changed_leaves(before, after, "s", dtypes=False)] == [
        "s['b']"
    ]


def test_leaf_dtype_of_arrays_scalars_and_keys():
    assert _split.leaf_dtype(np.zeros(2, np.int8)) == np.int8
    assert _split.leaf_dtype(1.0) == jnp.float32  # a Python float as JAX would type it
    assert jnp.issubdtype(_split.leaf_dtype(jax.random.key(0)), jax.dtypes.prng_key)


def test_contiguous_split_refuses_a_batch_sharded_by_its_type():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = jax.device_put(np.zeros((4, 2)), jax.sharding.NamedSharding(mesh, jax.P("data")))
    message = (
        r"split='contiguous' cannot cut batch leaf batch\['x'\], whose example axis is "
        r"sharded over the Explicit mesh axes 'data'.*Use split='strided'"
    )
    with pytest.raises(ValueError, match=message):
        _split.microbatches({"batch": {"x": x}}, 2, Split.CONTIGUOUS)
    views, axes = _split.microbatches({"batch": {"x": x}}, 2, Split.STRIDED)  # stays local
    assert _split.index(views, 1, axes)["batch"]["x"].shape == (2, 2)

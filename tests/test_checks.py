"""``_checks``: each validator with good and bad input.

A good value passes (normalised where the validator returns one); a bad one raises the
documented exception type with a message that names the argument, so that the user can
tell which of several options to fix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccum import _checks

# --- loss_fn and weight_fn -------------------------------------------------------------------


def test_callable_functions_pass():
    _checks.check_functions(lambda p, b: 0.0, None, ("params", "batch"))
    _checks.check_functions(jnp.mean, lambda mb: 1.0, ("params", "batch"))


def test_loss_fn_must_be_callable():
    message = r"loss_fn must be callable as loss_fn\(apply, batch\), got float"
    with pytest.raises(TypeError, match=message):
        _checks.check_functions(0.5, None, ("apply", "batch"))


def test_weight_fn_must_be_callable():
    message = r"weight_fn must be callable as weight_fn\(micro_batch\), got str"
    with pytest.raises(TypeError, match=message):
        _checks.check_functions(jnp.mean, "mask", ("params", "batch"))


# --- what loss_fn returns --------------------------------------------------------------------


@pytest.mark.parametrize("loss", [jnp.float32(1.5), 1.5, np.float32(0.5), jnp.bfloat16(1)])
def test_a_scalar_loss_passes(loss):
    assert _checks.split_loss(loss, has_aux=False) == (loss, None)
    got, aux = _checks.split_loss((loss, {"acc": 1}), has_aux=True)
    assert (got, aux) == (loss, {"acc": 1})


@pytest.mark.parametrize("loss", [2, True, jnp.int32(2), jnp.complex64(1j)])
def test_a_loss_that_cannot_be_differentiated_is_refused(loss):
    with pytest.raises(TypeError, match=r"loss_fn's loss must be a real floating scalar"):
        _checks.split_loss(loss, has_aux=False)


@pytest.mark.parametrize(
    ("out", "has_aux", "message"),
    [
        (
            jnp.float32(1.0),
            True,
            r"loss_fn must return a pair \(loss, aux\) when has_aux=True, "
            r"but it returned a float32 array of shape \(\)",
        ),
        ((1.0, 2.0, 3.0), True, r"loss_fn must return a pair .* returned a tuple of 3 item"),
        (
            (jnp.float32(1.0), {}),
            False,
            r"loss_fn returned a tuple of 2 item\(s\), but with "
            r"has_aux=False it must return the scalar loss alone",
        ),
        (
            jnp.zeros(4),
            False,
            r"loss_fn's loss must be a scalar, got a float32 array of shape "
            r"\(4,\)",
        ),
        (
            (jnp.zeros(4), None),
            True,
            r"loss_fn's loss \(the first item of \(loss, aux\)\) must "
            r"be a scalar",
        ),
        ("0.5", False, r"loss_fn's loss must be a scalar, got a str"),
    ],
)
def test_a_loss_that_does_not_fit_names_loss_fn(out, has_aux, message):
    with pytest.raises(TypeError, match=message):
        _checks.split_loss(out, has_aux)


# --- optimizer state ---------------------------------------------------------------------------

PARAMS = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
NAMES = ("state.opt_state", "optimizer.init(state.params)")
FIX = "build it with optimizer.init(params)."


def check_state(opt_state, tx=None, params=None):
    tx = tx or optax.adam(1e-3)
    _checks.check_opt_state(opt_state, tx.init, params or PARAMS, NAMES, FIX)


def test_a_matching_optimizer_state_passes():
    check_state(optax.adam(1e-3).init(PARAMS))
    # dtypes are not compared: a state kept in bfloat16 still fits
    check_state(jax.tree.map(lambda x: x.astype(jnp.bfloat16), optax.adam(1e-3).init(PARAMS)))


def test_a_state_of_another_optimizer_names_both_state_types():
    message = (
        r"state.opt_state was made for another optimizer or other params: it holds the "
        r"Optax states \(TraceState, EmptyState\) but optimizer.init\(state.params\) .*"
        r"\(ScaleByAdamState, EmptyState\); build it with optimizer.init\(params\)."
    )
    with pytest.raises(ValueError, match=message):
        check_state(optax.sgd(1e-3, momentum=0.9).init(PARAMS))


def test_a_state_for_a_params_tree_of_another_structure_names_the_leaves():
    other = {"w": jnp.zeros((3, 2)), "v": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"only state.opt_state has .*\['v'\]") as info:
        check_state(optax.adam(1e-3).init(other))
    assert "only optimizer.init(state.params) has state.opt_state[0].mu['b']" in str(info.value)


def test_a_state_for_params_of_other_shapes_names_the_leaf_and_both_shapes():
    other = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(2)}
    message = (
        r"state.opt_state was made for params of other shapes than "
        r"optimizer.init\(state.params\).*: state.opt_state\[0\].mu\['w'\] has shape "
        r"\(3, 4\), not \(3, 2\); state.opt_state\[0\].nu\['w'\] has shape \(3, 4\), "
        r"not \(3, 2\); build it with optimizer.init\(params\)."
    )
    with pytest.raises(ValueError, match=message):
        check_state(optax.adam(1e-3).init(other))


def test_many_mismatched_leaves_are_cut_short():
    params = {f"p{i}": jnp.zeros(2) for i in range(8)}
    other = {f"p{i}": jnp.zeros(3) for i in range(8)}
    with pytest.raises(ValueError, match=r"; and 11 more; build it") as info:
        check_state(optax.adam(1e-3).init(other), params=params)
    assert str(info.value).count("has shape (3,), not (2,)") == 5


def test_check_layout_compares_any_state_with_what_its_init_gives():
    expected = {"acc": jax.ShapeDtypeStruct((3,), jnp.float32), "n": jax.ShapeDtypeStruct((), int)}
    names, fix = ("state.inner", "multi_steps(...).init(params)"), "rebuild the state."
    _checks.check_layout({"acc": jnp.zeros(3), "n": 0}, expected, names, fix)
    with pytest.raises(ValueError, match=r"state.inner\['acc'\] has shape \(4,\), not \(3,\)"):
        _checks.check_layout({"acc": jnp.zeros(4), "n": 0}, expected, names, fix)
    with pytest.raises(ValueError, match=r"only state.inner has state.inner\['m'\]"):
        _checks.check_layout({"acc": jnp.zeros(3), "m": 0}, expected, names, fix)


# --- the transform's options -----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 8, np.int64(4), np.int32(2)])
def test_k_is_a_positive_int(k):
    assert _checks.check_k(k) == int(k)
    assert type(_checks.check_k(k)) is int


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4", None])
def test_bad_k_is_named(bad):
    with pytest.raises(ValueError, match=r"k must be a positive int \(the number of micro-"):
        _checks.check_k(bad)


@pytest.mark.parametrize("unroll", [True, False, 1, 4])
def test_unroll_is_a_positive_int_or_a_bool(unroll):
    assert _checks.check_unroll(unroll) is unroll


@pytest.mark.parametrize("bad", [0, -1, 1.5, None, "2"])
def test_bad_unroll_is_named(bad):
    with pytest.raises(ValueError, match=r"unroll must be a positive int or a bool, got"):
        _checks.check_unroll(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("float32", np.float32), (jnp.bfloat16, jnp.bfloat16), (np.float64, np.float64)],
)
def test_accum_dtype_is_a_floating_dtype_or_none(value, expected):
    got = _checks.check_accum_dtype(value)
    assert got == (None if expected is None else np.dtype(expected))


@pytest.mark.parametrize("bad", ["int32", jnp.bool_, np.complex64, "float33"])
def test_bad_accum_dtype_is_named(bad):
    with pytest.raises(ValueError, match=r"accum_dtype must be a floating dtype"):
        _checks.check_accum_dtype(bad)


@pytest.mark.parametrize("key", [jax.random.key(0), jax.random.PRNGKey(0)])
def test_one_prng_key_passes(key):
    _checks.check_key(key, "the rng argument key")


def test_raw_rbg_key_data_passes():
    _checks.check_key(jnp.zeros(4, jnp.uint32), "key")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            jax.random.split(jax.random.key(0), 2),
            r"the rng argument key must be one PRNG key "
            r"\(jax.random.key\(seed\), or a legacy uint32 jax.random.PRNGKey\(seed\)\), got shape "
            r"\(2,\) dtype key<fry>",
        ),
        (
            jnp.zeros(3, jnp.uint32),
            r"the rng argument key is a uint32 array of shape \(3,\), "
            r"which is not a legacy PRNG key",
        ),
        (
            jax.random.split(jax.random.PRNGKey(0), 2),
            r"the rng argument key must be one PRNG "
            r"key .* got shape \(2, 2\) dtype uint32",
        ),
        (jnp.zeros(2, jnp.float32), r"the rng argument key must be one PRNG key .*dtype float32"),
        (0, r"the rng argument key must be one PRNG key .*got int"),
    ],
)
def test_anything_but_one_key_is_named(bad, message):
    with pytest.raises(TypeError, match=message):
        _checks.check_key(bad, "the rng argument key")


@pytest.mark.parametrize(
    ("in_axes", "n", "expected"),
    [(0, 1, (0,)), (1, 3, (1,)), ((0, 1), 2, (0, 1)), ([2], 2, (2,)), (np.int64(1), 1, (1,))],
)
def test_in_axes_is_one_axis_or_one_per_batch_argument(in_axes, n, expected):
    got = _checks.check_in_axes(in_axes, n)
    assert got == expected and all(type(a) is int for a in got)


@pytest.mark.parametrize(
    ("bad", "n"), [(-1, 1), ((0, 1, 0), 2), (True, 1), ("0", 1), (None, 1), ((0.0,), 1), ((), 1)]
)
def test_bad_in_axes_is_named(bad, n):
    with pytest.raises(ValueError, match=rf"in_axes must be a non-negative int .* \({n}: batch"):
        _checks.check_in_axes(bad, n)


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, 0), (3, 3), (np.int32(4), 4)])
def test_num_real_microbatches_in_range_passes(value, expected):
    assert _checks.check_num_real(value, 4) == expected


@pytest.mark.parametrize("bad", [5, -1, 1.5, np.arange(2), True, "2"])
def test_num_real_microbatches_out_of_range_is_named(bad):
    with pytest.raises(ValueError, match=r"num_real_microbatches must be an integer in \[0, k=4\]"):
        _checks.check_num_real(bad, 4)


def test_traced_num_real_microbatches_must_be_an_integer_scalar():
    seen = []
    jax.jit(lambda m: seen.append(_checks.check_num_real(m, 4)))(jnp.int32(2))
    assert isinstance(seen[0], jax.core.Tracer)
    for bad in (jnp.float32(2.0), jnp.arange(2)):
        with pytest.raises(TypeError, match=r"num_real_microbatches must be an integer scalar"):
            jax.jit(lambda m: _checks.check_num_real(m, 4))(bad)

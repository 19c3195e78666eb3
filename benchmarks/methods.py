"""Ways to get the gradient of one batch split into k micro-batches: jaxaccum and its peers.

Every builder takes a :class:`~benchmarks.workloads.Workload` and k and returns a
:class:`~benchmarks.common.Method` whose ``result()`` is ``((loss, grads), state)``: the mean
loss over the N examples, its gradient, and the carried state after the last micro-batch
(None for workloads without state). With state (the CNN's BatchNorm statistics), micro-batch j+1
sees the state micro-batch j returned, except in ``optax.microbatch`` (see there).

* ``full batch``: the gradient step on all N examples at once (the reference).
* ``jaxaccum.accumulate``: ``jax.jit(jaxaccum.accumulate(jax.value_and_grad(loss), k))``;
  with state, ``jaxaccum.accumulate(step, k, batch_argnums=2, carry_argnums=1)``.
* ``optax.microbatch``: ``optax.microbatching.microbatch`` with the MEAN accumulator,
  jitted.
* ``optax.MultiSteps``: k calls of a jitted train step around
  ``optax.MultiSteps(optax.sgd(1.0), k)``, params and optimizer state donated; the
  gradient is read back as ``params - new_params``.
* ``python loop``: k calls of a jitted micro-batch gradient step, summed with a jitted add,
  then a jitted divide by k.
* ``hand-written scan``: the ``lax.scan`` a user would write over
  ``batch.reshape(k, N // k, ...)``, summing in the carry and dividing at the end.
* ``jaxaccum.accumulate unroll=u`` (not a peer): the same accumulation with the scan
  unrolled u times, to measure the unroll policy.
* ``jaxaccum.train_step`` and ``jaxaccum.multi_steps`` (the ``builders`` mode, stateless
  workloads): jaxaccum's training-side builders around ``optax.sgd(1.0)``, which also apply
  the update; the gradient is read back as ``params - new_params``.

Micro-batch j holds examples j, j+k, ... ("strided", as ``jaxaccum.accumulate`` and
``optax.microbatch`` split), except in the hand-written scan, whose reshape makes micro-batch
j the j-th block of N/k examples ("contiguous"). Without state the split does not change
the gradient; with BatchNorm it does, so each method is checked against the python loop on
the same micro-batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxaccum
from benchmarks.common import Method, compiled
from benchmarks.workloads import Batch, Workload

FULL = "full batch"
JAXACCUM = "jaxaccum.accumulate"
MICROBATCH = "optax.microbatch"
MULTISTEPS = "optax.MultiSteps"
LOOP = "python loop"
SCAN = "hand-written scan"
PEERS = (MICROBATCH, MULTISTEPS, LOOP, SCAN)
# Methods whose micro-batch j is the j-th block of N/k examples (the others: j, j+k, ...).
CONTIGUOUS = frozenset({SCAN})
# Methods that cannot carry state through the micro-batches: each starts from the input
# state, and the k new states are averaged.
AVERAGED_STATE = frozenset({MICROBATCH})


def batch_size(batch: Batch) -> int:
    """N, the leading size of the batch's arrays."""
    return len(next(iter(batch.values())))


def micro_batches(batch: Batch, k: int, contiguous: bool = False) -> list[Batch]:
    """The k micro-batches of ``batch``, sliced ahead of time (strided unless contiguous)."""
    n = batch_size(batch) // k

    def micro(j: int) -> Batch:
        if contiguous:
            return jax.tree.map(lambda x: x[j * n : (j + 1) * n], batch)
        return jax.tree.map(lambda x: x[j::k], batch)

    return jax.block_until_ready([micro(j) for j in range(k)])


def one_call(name: str, fn: Callable[..., Any], w: Workload, stateless: bool = False) -> Method:
    """A method that is one jitted call of ``fn`` on the whole batch.

    ``fn`` is ``(params, state, batch) -> ((loss, grads), state)``, or with ``stateless``
    ``(params, batch) -> (loss, grads)``.
    """
    args = (w.params, w.batch) if stateless else (w.params, w.state, w.batch)
    c = compiled(fn, *args)
    step = functools.partial(c.fn, *args)
    result = (lambda: (step(), None)) if stateless else step
    return Method(name, step, result, c.memory, c.compile_s, flops=c.flops)


def full_batch(w: Workload) -> Method:
    """The baseline: one gradient step over the whole batch."""
    if w.state is None:
        return one_call(FULL, jax.value_and_grad(w.loss), w, stateless=True)
    return one_call(FULL, w.grad_step(), w)


def accumulated(w: Workload, k: int, unroll: int | bool = 1) -> Callable[..., Any]:
    """``jaxaccum.accumulate`` of the gradient step, carrying the state if there is one.

    Takes ``(params, batch)`` without state and ``(params, state, batch)`` with it.
    """
    if w.state is None:
        return jaxaccum.accumulate(jax.value_and_grad(w.loss), k, unroll=unroll)
    return jaxaccum.accumulate(w.grad_step(), k, batch_argnums=2, carry_argnums=1, unroll=unroll)


def jaxaccum_accumulate(w: Workload, k: int) -> Method:
    """The jaxaccum method: one jitted call of :func:`accumulated`."""
    return one_call(JAXACCUM, accumulated(w, k), w, stateless=w.state is None)


def compile_seconds(w: Workload, k: int, repeats: int = 3) -> float:
    """Median seconds to trace and compile :func:`accumulated` afresh, over ``repeats``."""
    args = (w.params, w.batch) if w.state is None else (w.params, w.state, w.batch)
    return float(np.median([compiled(accumulated(w, k), *args).compile_s for _ in range(repeats)]))


def unrolled_name(unroll: int | bool) -> str:
    """The table label of ``jaxaccum.accumulate(..., unroll=unroll)``."""
    return f"{JAXACCUM} unroll={unroll}"


def jaxaccum_unrolled(w: Workload, k: int, unroll: int | bool) -> Method:
    """``jaxaccum.accumulate`` with ``unroll`` micro-batches per loop iteration.

    Not a peer: it measures what unrolling the scan buys in time and costs in memory and
    compile time, the measurement behind the default ``unroll=1``.
    """
    return one_call(unrolled_name(unroll), accumulated(w, k, unroll), w, stateless=w.state is None)


def optax_microbatch(w: Workload, k: int) -> Method:
    """``optax.microbatch`` of the gradient step with the mean accumulator.

    It has no carried state: every micro-batch starts from the input state, and the new
    states come out as outputs averaged like the gradients. For BatchNorm with momentum m
    that gives ``m * old + (1 - m) * mean_j(stats_j)``, not the sequential update.
    """
    fn = optax.microbatching.microbatch(
        w.grad_step(),
        argnums=2,
        microbatch_size=batch_size(w.batch) // k,
        accumulator=optax.microbatching.AccumulationType.MEAN,
    )
    return one_call(MICROBATCH, fn, w)


def hand_written_scan(w: Workload, k: int) -> Method:
    """A ``lax.scan`` over ``batch.reshape(k, N // k, ...)``: sum in the carry, divide once."""
    grad_step = w.grad_step()

    def scanned(params: Any, state: Any, batch: Batch) -> Any:
        mbs = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)

        def body(carry: Any, mb: Batch) -> tuple[Any, None]:
            total, state = carry
            out, state = grad_step(params, state, mb)
            return (jax.tree.map(jnp.add, total, out), state), None

        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (total, state), _ = jax.lax.scan(body, (zeros, state), mbs)
        return jax.tree.map(lambda x: x / k, total), state

    return one_call(SCAN, scanned, w)


def python_loop(w: Workload, k: int, contiguous: bool = False) -> Method:
    """k calls of a jitted micro-batch gradient step, a jitted sum, then a jitted / k."""
    mbs = micro_batches(w.batch, k, contiguous)
    fn, memory, compile_s, _ = compiled(w.grad_step(), w.params, w.state, mbs[0])
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    mean = jax.jit(lambda t: jax.tree.map(lambda x: x / k, t))

    def step() -> Any:
        total, state = fn(w.params, w.state, mbs[0])
        for mb in mbs[1:]:
            out, state = fn(w.params, state, mb)
            total = add(total, out)
        return mean(total), state

    return Method(LOOP, step, step, memory, compile_s, one_call=False)


def across_calls(name: str, opt: optax.GradientTransformation, w: Workload, k: int) -> Method:
    """k calls of a jitted train step whose optimizer ``opt`` applies one update per k calls.

    Params, optimizer state and carried state are donated, as in a training loop (fresh
    copies are made before the clock starts). ``opt`` wraps ``optax.sgd(1.0)``: the one
    update after k calls is minus the mean gradient, so the gradient is read back as
    ``params - new_params``.
    """
    opt_state0 = opt.init(w.params)
    mbs = micro_batches(w.batch, k)
    grad_step = w.grad_step()

    def train_step(p: Any, s: Any, state: Any, mb: Batch) -> tuple[Any, Any, Any, jax.Array]:
        (loss, grads), state = grad_step(p, state, mb)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, state, loss

    fn, memory, compile_s, _ = compiled(
        train_step, w.params, opt_state0, w.state, mbs[0], donate_argnums=(0, 1, 2)
    )
    fresh: list[Any] = []

    def prepare() -> None:
        fresh[:] = [jax.block_until_ready(jax.tree.map(jnp.copy, (w.params, opt_state0, w.state)))]

    def step() -> tuple[Any, Any, list[jax.Array]]:
        if not fresh:
            prepare()
        (p, s, state), losses = fresh.pop(), []
        for mb in mbs:
            p, s, state, loss = fn(p, s, state, mb)
            losses.append(loss)
        return p, state, losses

    def result() -> Any:
        new_params, state, losses = step()
        grads = jax.tree.map(jnp.subtract, w.params, new_params)
        return (jnp.mean(jnp.stack(losses)), grads), state

    return Method(name, step, result, memory, compile_s, prepare, one_call=False)


def optax_multisteps(w: Workload, k: int) -> Method:
    """k calls of a jitted train step with ``optax.MultiSteps(optax.sgd(1.0), k)``."""
    opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=k)
    return across_calls(MULTISTEPS, opt, w, k)


def jaxaccum_multi_steps(w: Workload, k: int) -> Method:
    """k calls of a jitted train step with ``jaxaccum.multi_steps(optax.sgd(1.0), k)``."""
    opt = jaxaccum.multi_steps(optax.sgd(1.0), every_k_schedule=k)
    return across_calls("jaxaccum.multi_steps", opt, w, k)


def jaxaccum_train_step(w: Workload, k: int) -> Method:
    """``jaxaccum.train_step(loss, optax.sgd(1.0), k).update``, jitted with the state donated.

    k micro-batches and one SGD update in one call (stateless workloads only); fresh
    copies of the state are made before the clock starts. The gradient is read back as
    ``params - new_params``.
    """
    built = jaxaccum.train_step(w.loss, optax.sgd(1.0), k)
    state0 = built.init(w.params)
    fn, memory, compile_s, _ = compiled(built.update, state0, w.batch, donate_argnums=0)
    fresh: list[Any] = []

    def prepare() -> None:
        fresh[:] = [jax.block_until_ready(jax.tree.map(jnp.copy, state0))]

    def step() -> tuple[jaxaccum.TrainState, jaxaccum.TrainMetrics]:
        if not fresh:
            prepare()
        return fn(fresh.pop(), w.batch)

    def result() -> Any:
        state, metrics = step()
        return (metrics.loss, jax.tree.map(jnp.subtract, w.params, state.params)), None

    return Method("jaxaccum.train_step", step, result, memory, compile_s, prepare)


def build_all(w: Workload, k: int, full: Method) -> list[Method]:
    """The full batch (already built, shared across k), jaxaccum and its four peers."""
    return [
        full,
        jaxaccum_accumulate(w, k),
        optax_microbatch(w, k),
        optax_multisteps(w, k),
        python_loop(w, k),
        hand_written_scan(w, k),
    ]

"""A linen model inside the engine's micro-batch loop: its ``apply``, its collections."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaccum import _checks, _engine
from jaxaccum.flax import _batch_norm as _bn
from jaxaccum.flax._batch_norm import BatchNormMode
from jaxaccum.flax._state import CollectionMode

# How one collection is handled: its CollectionMode, or BatchNormMode.EXACT (batch_stats).
Mode = CollectionMode | BatchNormMode


def _teaching(err: Exception, names: Sequence[str]) -> Exception:
    mutable = sorted(names) or ["batch_stats"]
    if isinstance(err, flax.errors.ScopeCollectionNotFound):
        return ValueError(
            f"the model uses a variable collection the state does not hold ({err}). Create "
            "the state from everything model.init returns, not only its params: "
            "jaxaccum.flax.TrainState.from_variables(model.apply, model.init(key, x), tx); "
            f"the step then passes every collection to the model (mutable={mutable})."
        )
    return ValueError(
        f"the model tried to update a variable collection it was not allowed to ({err}). "
        "Inside jaxaccum.flax.train_step, call the model through the `apply` argument of "
        "loss_fn, which passes the params, every collection of the state and "
        f"mutable={mutable} for you:\n"
        "    def loss_fn(apply, batch):\n"
        "        logits = apply(batch['x'], train=True)\n"
        "        ...\n"
        "and keep the collections in the state: "
        "jaxaccum.flax.TrainState.from_variables(model.apply, model.init(key, x), tx). "
        "Calling the model yourself, the corrected call is\n"
        f"    model.apply({{'params': params, **collections}}, x, train=True, mutable={mutable})"
    )


class Model:
    """A linen model inside the engine's micro-batch loop, for one traced step.

    Sequential collections travel as the engine's carry; the others (``fixed``) start each
    micro-batch from the step's value (exact BatchNorm statistics from zero, so what the
    layer writes is its statistic) and are reduced over the micro-batches. The momentum of
    every ``nn.BatchNorm`` called is recorded for the exact merge.
    """

    def __init__(
        self,
        apply_fn: Callable[..., Any],
        loss_fn: Callable[..., Any],
        wants_params: bool,
        modes: dict[str, Mode],
        rng_names: tuple[str, ...],
        cols: dict[str, Any],
    ) -> None:
        self.apply_fn, self.loss_fn, self.wants_params = apply_fn, loss_fn, wants_params
        self.modes, self.rng_names = modes, rng_names
        self.names = list(modes)
        self.fixed = [n for n in modes if modes[n] != CollectionMode.SEQUENTIAL]
        self.momenta: dict[tuple[str, ...], float] = {}
        self.axis_names: list[str] = []  # what the layers called reduce over
        self.cols = cols  # the step's collections, before any micro-batch

    def carried(self) -> dict[str, Any]:
        return {n: v for n, v in self.cols.items() if n not in self.fixed}

    def given(self) -> dict[str, Any]:
        exact = lambda n: self.modes[n] == BatchNormMode.EXACT  # noqa: E731
        return {
            n: jax.tree.map(jnp.zeros_like, self.cols[n]) if exact(n) else self.cols[n]
            for n in self.fixed
        }

    def _record(self, next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
            self.momenta[tuple(context.module.path)] = float(context.module.momentum)
        self.axis_names.extend(_engine.axis_names_of(context.module))
        return next_fun(*args, **kwargs)

    def forward(self, p: Any, batch: Any, carry: Any, fixed: Any, key: Any) -> tuple[Any, Any]:
        """The user's loss on one micro-batch, and the collections its ``apply`` calls left."""
        streams = {} if key is None else _engine.stream_keys(key, self.rng_names)
        calls: list[dict[str, Any]] = []

        def apply(*args: Any, **kwargs: Any) -> Any:
            self._check_call(kwargs, len(calls), fixed)
            # A later call sees the collections as the earlier calls left them.
            variables = {"params": p, **carry, **(calls[-1] if calls else {}), **fixed}
            rngs = {n: jax.random.fold_in(r, len(calls)) for n, r in streams.items()}
            extra = {"rngs": rngs if calls else streams} if streams else {}
            with nn.intercept_methods(self._record):
                if not self.names:
                    calls.append({})
                    return self.apply_fn(variables, *args, **extra, **kwargs)
                out, new = self.apply_fn(variables, *args, mutable=self.names, **extra, **kwargs)
            calls.append({**(calls[-1] if calls else {}), **dict(new)})
            return out

        try:
            out = self.loss_fn(apply, batch, **({"params": p} if self.wants_params else {}))
        except (flax.errors.ModifyScopeVariableError, flax.errors.ScopeCollectionNotFound) as err:
            raise _teaching(err, self.names) from err
        except flax.errors.InvalidRngError as err:
            raise TypeError(
                f"the model asked for a PRNG stream the step did not give it ({err}). "
                f"The step passes rngs={list(self.rng_names)} from the state's key: build the "
                "state with a key, TrainState.from_variables(model.apply, variables, tx, "
                "key=jax.random.key(0)), and name every stream the model uses in "
                "train_step(..., rngs=('dropout', ...))."
            ) from err
        if self.names and not calls:
            raise TypeError(
                f"loss_fn never called `apply`, so the collections {self.names} were not "
                "updated; compute the model's output with apply(x, ...) inside loss_fn."
            )
        return out, calls[-1] if calls else {}

    def _check_call(self, kwargs: dict[str, Any], calls: int, fixed: Any) -> None:
        if "mutable" in kwargs or "rngs" in kwargs:
            raise TypeError(
                "apply(...) passes mutable= and rngs= itself (from the state's "
                "collections and the train step's rngs); call it without them."
            )
        if calls and fixed:
            raise ValueError(
                f"loss_fn called apply {calls + 1} times in one micro-batch, but the "
                f"collections {sorted(fixed)} (modes "
                f"{ {n: str(self.modes[n]) for n in sorted(fixed)} }) are combined from one "
                "update per micro-batch, so a second update would be lost; call apply once "
                "per micro-batch (concatenate the inputs), or carry them with "
                "collections={name: 'sequential'}, which threads every call's updates into "
                "the next."
            )

    def after(self, new: Any, carry: Any, fixed: Any, counted: jax.Array) -> tuple[Any, Any]:
        """Sequential collections move on (a dropped micro-batch leaves them); the others'
        values are what gets reduced."""
        for n, old in {**carry, **fixed}.items():
            _checks.collection_layout(n, new.get(n, old), old)
        moved = {
            n: jax.tree.map(lambda a, b: jnp.where(counted, a, b), new.get(n, v), v)
            for n, v in carry.items()
        }
        reduced = {
            n: _bn.moments(new.get(n, v), self.momenta, _linen_keys)
            if self.modes[n] == BatchNormMode.EXACT
            else new.get(n, v)
            for n, v in fixed.items()
        }
        return reduced, moved

    def finish(self, reduced: Any, carry: Any) -> Any:
        """Every collection after the step: merged, reduced or carried."""

        def one(n: str) -> Any:
            v = self.cols[n]
            if self.modes[n] == BatchNormMode.EXACT:
                first, second = reduced[n]
                return _bn.merge(v, first, second, self.momenta, _linen_keys, only_stats=n)
            return jax.tree.map(lambda r, o: r.astype(jnp.asarray(o).dtype), reduced[n], v)

        return {**carry, **{n: one(n) for n in self.fixed}}


def _linen_keys(path: Any) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)

"""Equinox interop: modules as parameters, and wrappers Equinox does not take for transforms.

An Equinox model is one pytree holding its weights next to everything else (activation
functions, integer buffers, ``eqx.nn.StateIndex`` markers); Equinox trains the leaves
``eqx.filter(model, eqx.is_inexact_array)`` selects. The train steps and ``multi_steps``
do the same for any params that are or hold an ``equinox.Module``, and leave every other
pytree as it is given. Equinox stays optional: nothing here imports it. A tree cannot hold
an Equinox module before Equinox is imported, so the module is looked up where Python keeps
the imported ones.

Equinox warns when a module stores a JAX-transformed callable (whose parameters it cannot
see). ``jax.grad`` returns a plain function, so Equinox suspects every plain function: it
follows ``__wrapped__`` links and warns if one leads to array-like leaves. The function
:func:`jaxaccum.accumulate` returns is not such a transform; :func:`wraps` gives it its
step function's name and signature without the link, so ``eqx.filter_jit`` of it stays
quiet, as it is for the step function itself.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import jax

F = TypeVar("F", bound=Callable[..., Any])


def holds_module(tree: Any) -> bool:
    """Whether ``tree`` is an ``equinox.Module`` or has one among its nodes."""
    eqx = sys.modules.get("equinox")
    if eqx is None:
        return False
    is_module = lambda x: isinstance(x, eqx.Module)  # noqa: E731
    return any(is_module(x) for x in jax.tree.leaves(tree, is_leaf=is_module))


def split(params: Any) -> tuple[Any, Any]:
    """``(trained, rest)``: what the optimizer sees, and what passes through unchanged.

    For params that are or hold an Equinox module, ``trained`` is the tree with its inexact
    arrays and None elsewhere, ``rest`` the tree with None at those arrays (Equinox's
    ``eqx.partition(params, eqx.is_inexact_array)``). Any other pytree is trained whole:
    ``(params, None)``.
    """
    if not holds_module(params):
        return params, None
    eqx = sys.modules["equinox"]
    return eqx.partition(params, eqx.is_inexact_array)


def trained(tree: Any) -> Any:
    """The part of ``tree`` (params, or gradients shaped like them) that is trained."""
    return split(tree)[0]


def merge(trained: Any, rest: Any) -> Any:
    """The params :func:`split` took apart, with the trained leaves ``trained`` holds."""
    if rest is None:
        return trained
    return sys.modules["equinox"].combine(trained, rest)


def wraps(wrapped: Callable[..., Any]) -> Callable[[F], F]:
    """``functools.wraps(wrapped)`` that keeps ``wrapped``'s signature but no link to it.

    The wrapper gets the name, docstring and ``inspect.signature`` of ``wrapped``, and no
    ``__wrapped__``: Equinox would follow that link into ``wrapped`` (e.g. an
    ``eqx.filter_value_and_grad``, whose ``has_aux`` flag is a leaf) and warn of a
    JAX-transformed callable.
    """

    def decorate(wrapper: F) -> F:
        functools.update_wrapper(wrapper, wrapped)
        delattr(wrapper, "__wrapped__")
        with contextlib.suppress(TypeError, ValueError):  # callables without a signature
            setattr(wrapper, "__signature__", inspect.signature(wrapped))  # noqa: B010
        return wrapper

    return decorate

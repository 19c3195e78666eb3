"""Accumulation across calls: one micro-batch per call, around an Optax optimizer.

Modules, by concept:

* ``state``: :class:`MultiStepsState`, what a window holds between calls, and its
  conversion from an ``optax.MultiStepsState`` (``MultiStepsState.from_optax``);
* ``window``: the window's arithmetic: the empty window, one call's weighted gradient added
  to it, and its close, which runs the inner optimizer once on the window's mean (or sum);
* ``builder``: :func:`multi_steps`, which checks its options once and builds ``init`` and
  ``update`` from the window's pieces;
* ``transformation``: :class:`MultiStepsTransformation`, what ``multi_steps`` returns, with
  ``optax.MultiSteps``' methods, and :func:`flush`, which closes a partial window.
"""

from jaxaccum._multisteps.builder import multi_steps as multi_steps
from jaxaccum._multisteps.state import MultiStepsState as MultiStepsState
from jaxaccum._multisteps.transformation import MultiStepsTransformation as MultiStepsTransformation
from jaxaccum._multisteps.transformation import flush as flush

"""Program surgery kept apart from the core: platform-specific rewrites of a traced step.

The core (:mod:`jaxaccum._accumulate`) calls the user's step in a ``lax.scan`` as a
hand-written loop would. What lives here changes how a trace lowers on one platform, runs
only where it pays, and falls back to the plain call otherwise:

- :mod:`jaxaccum._internal.cpu_conv`: convolutions inside the micro-batch loop laid out the
  way XLA:CPU's fast kernels take them (XLA:CPU canonicalizes convolutions only in the
  entry computation, so a rolled loop's convolutions would run as naive loop nests). Every
  other backend lowers the step exactly as traced. Tested in ``tests/test_internal.py``;
  what it buys is in ``docs/guides/cpu.md`` and ``benchmarks/RESULTS.md``.
"""

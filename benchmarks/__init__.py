"""jaxaccum's benchmarks, one command with a mode per benchmark.

Run from the repository root as ``python -m benchmarks MODE [options]`` (``--help`` lists
the modes and each mode's options); ``benchmarks/README.md`` says what each measures and
``benchmarks/RESULTS.md`` holds the latest run of each. Nothing here is imported by the
library, and importing this package imports nothing heavy: the command line is parsed,
and ``--help`` answers, before JAX starts.
"""


class UsageError(ValueError):
    """A command line that asks for something a mode cannot do (reported as a usage error)."""

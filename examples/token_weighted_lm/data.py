"""Sentences from the docstrings of standard-library modules, as padded character ids.

Real English shipped with Python, so the example needs no download. Each example is one
sentence padded to a fixed length: examples, and the micro-batches they are split into,
hold different numbers of real tokens.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODULES = (
    "argparse", "collections", "textwrap", "json", "inspect", "functools", "itertools",
    "pathlib", "random", "statistics", "string", "shutil", "unittest", "logging", "email",
    "http.client", "urllib.request", "csv", "datetime", "decimal",
)  # fmt: skip
PAD = 0
Batch = dict[str, jax.Array]


def load_sentences() -> list[str]:
    """Sentences of 20 to 120 characters from the docstrings of ``MODULES``, in order."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        with warnings.catch_warnings():  # reading a deprecated alias's docstring is fine
            warnings.simplefilter("ignore", DeprecationWarning)
            members = inspect.getmembers(module)
        for _, obj in members:
            doc = inspect.getdoc(obj)
            if doc and getattr(obj, "__module__", name) == name:
                docs.append(doc)
    text = " ".join(" ".join(docs).split())
    sentences = (s.strip() for s in re.split(r"(?<=[.!?])\s+", text))
    return [s for s in sentences if 20 <= len(s) <= 120]


def encode(sentences: Sequence[str], length: int) -> tuple[np.ndarray, int]:
    """Character ids (0 is padding), each sentence cut or padded to ``length`` + 1.

    Returns:
      ``(ids, vocab_size)`` with ``ids`` of shape ``(len(sentences), length + 1)``.
    """
    chars = sorted(set("".join(sentences)))
    index = {c: i + 1 for i, c in enumerate(chars)}
    ids = np.full((len(sentences), length + 1), PAD, np.int32)
    for row, s in enumerate(sentences):
        codes = [index[c] for c in s[: length + 1]]
        ids[row, : len(codes)] = codes
    return ids, len(chars) + 1


def as_batch(ids: np.ndarray) -> Batch:
    """Inputs, next-character targets and the mask of real target tokens."""
    return {
        "x": jnp.asarray(ids[:, :-1]),
        "y": jnp.asarray(ids[:, 1:]),
        "mask": jnp.asarray(ids[:, 1:] != PAD, jnp.float32),
    }


def token_count(batch: Batch) -> jax.Array:
    """The number of real target tokens in a (micro-)batch: the weight of its mean loss."""
    return batch["mask"].sum()

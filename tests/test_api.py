"""The public surface changes only on purpose."""

from __future__ import annotations

import importlib.metadata
import inspect
import pathlib

import jaxaccum

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_all_is_pinned():
    assert jaxaccum.__all__ == [
        "FSDP",
        "DataAxis",
        "DynamicLossScale",
        "LeafInfo",
        "LossScaleState",
        "MultiStepsState",
        "NonFinite",
        "Reduce",
        "Reduction",
        "Split",
        "TrainMetrics",
        "TrainState",
        "TrainStep",
        "accumulate",
        "flush",
        "multi_steps",
        "pad_batch",
        "train_step",
    ]
    for name in jaxaccum.__all__:
        assert hasattr(jaxaccum, name)


def test_inspection_tools_live_in_a_submodule():
    assert jaxaccum.inspect.__all__ == [
        "Collective",
        "CollectiveReport",
        "MemoryStats",
        "MicrobatchPlan",
        "ScalingRule",
        "accumulation_steps",
        "collectives",
        "compiled_memory",
        "effective_batch_size",
        "plan_microbatches",
        "scale_learning_rate",
    ]
    for name in jaxaccum.inspect.__all__:
        assert hasattr(jaxaccum.inspect, name)
        assert not hasattr(jaxaccum, name), name


def test_version_matches_installed_metadata():
    assert importlib.metadata.version("jaxaccum") == jaxaccum.__version__


def test_package_is_typed():
    assert (ROOT / "jaxaccum" / "py.typed").exists()


def test_public_functions_document_args_returns_and_examples():
    for name in (
        "accumulate",
        "collectives",
        "compiled_memory",
        "pad_batch",
        "train_step",
        "accumulation_steps",
        "multi_steps",
        "flush",
        "plan_microbatches",
    ):
        owner = jaxaccum.inspect if name in jaxaccum.inspect.__all__ else jaxaccum
        doc = inspect.getdoc(getattr(owner, name)) or ""
        for section in (
            "Args:",
            "Returns:",
            "Raises:" if name not in ("compiled_memory", "collectives") else "",
            ">>>",
        ):
            assert section in doc, (name, section)

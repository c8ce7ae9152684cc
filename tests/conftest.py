"""Shared, expensive fixtures: built once per test session.

`toy_world` builds the tiny models (all three architectures) and the default-size dataset into a temp dir (~5 s).
Environment for the CPU stack is set here, before any test imports vLLM or torch.
"""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")        # GiB of KV cache per CPU engine
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: weight updates take tensors
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):   # two workers on two cores: one OpenMP thread each, subprocesses too, or
    os.environ.setdefault("OMP_NUM_THREADS", "1")   # their threads spin-wait on each other (notes/cpu-stack.md)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> Path:
    """A toy world with tiny models, models/{qwen2_5_vl,qwen2_vl,qwen3_vl}-tiny, and data/{train,validation,
    test}.jsonl."""
    import toy
    out = tmp_path_factory.mktemp("toy")
    toy.build(toy.Args(out=str(out), sizes=("tiny",)))
    return out


@pytest.fixture(scope="session")
def vllm_engine(toy_world):
    """get(arch) -> a rollout.VLLMEngine on the tiny `arch` model (fp32), started at most once per session (per xdist
    worker: its users share the xdist_group "vllm_engine"). Tests that change its weights must restore them
    (tests/test_rollout.py does, in a finally)."""
    import rollout
    engines = {}

    def get(arch: str = "qwen2_5_vl"):
        if arch not in engines:
            cfg = rollout.RolloutConfig(dtype="float32", max_model_len=1024)
            engines[arch] = rollout.VLLMEngine(str(toy_world / "models" / f"{arch}-tiny"), cfg)
        return engines[arch]
    return get


def pytest_collection_modifyitems(items):
    """The slow tests first (stable order otherwise): pytest-xdist hands out work in collection order, and a
    minutes-long test started last would leave the other worker idle to the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)

"""Shared, expensive fixtures: built once per test session.

`toy_world` builds the tiny models (both architectures) and the default-size dataset into a temp dir (~5 s).
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
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory) -> Path:
    """A toy world with tiny models: models/{qwen2_5_vl,qwen2_vl}-tiny and data/{train,validation,test}.jsonl."""
    import toy
    out = tmp_path_factory.mktemp("toy")
    toy.build(toy.Args(out=str(out), sizes=("tiny",)))
    return out

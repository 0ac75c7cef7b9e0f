"""Shared fixtures: compiled tiny models and random HF checkpoints, cached per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One compile cache for the whole session (LAB_TEST_CACHE reuses one across sessions)."""
    from runtime_patch import settings

    path = settings.path("LAB_TEST_CACHE") or tmp_path_factory.mktemp("cache")
    settings.set_value("LAB_CACHE_DIR", str(path))  # entry points run as subprocesses share it
    return path


@pytest.fixture(scope="session")
def tiny_config():
    from engine.config import preset

    return preset("tiny")


@pytest.fixture(scope="session")
def gqa_config():
    """A second shape: 3 layers, GQA 8/2 heads of 16, untied head, no RoPE scaling, tied embeddings."""
    from engine.config import ModelConfig

    return ModelConfig(name="gqa-test", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=512,
                       max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True)


def _checkpoint(config, cache_dir: Path, std: float = 0.1) -> Path:
    from harness.oracle import random_checkpoint

    return random_checkpoint(config, cache_dir / "hf" / config.name, seed=0, std=std)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_config, cache_dir) -> Path:
    return _checkpoint(tiny_config, cache_dir)


@pytest.fixture(scope="session")
def gqa_checkpoint(gqa_config, cache_dir) -> Path:
    return _checkpoint(gqa_config, cache_dir)


@pytest.fixture(scope="session")
def compiled(cache_dir):
    """compiled(config, quant, tp=1) -> Artifact, compiled once per session."""
    from engine.compile import BuildSpec, compile_model

    def get(config, quant: str, tp: int = 1, target: str = "llvm", lm_head: str = "replicated",
            **kernels):
        return compile_model(BuildSpec(config, quant, tp, target, lm_head=lm_head, **kernels), cache_dir)

    return get


@pytest.fixture
def library_calls():
    """library_calls(name, record=...) -> a list of what `record(*args)` returned (default: the
    name) for each call of library function `name` in this process: its CPU version, wrapped.
    Every wrapped function is put back afterwards."""
    import tvm_ffi

    from runtime_patch import cpu_functions, functions

    wrapped = []

    def wrap(name, record=None):
        functions.register("llvm", [name])
        impl, calls = cpu_functions.IMPLEMENTATIONS[name], []

        def call(*args):
            calls.append(record(*args) if record else name)
            impl(*args)

        tvm_ffi.register_global_func(name, call, override=True)
        wrapped.append(name)
        return calls

    yield wrap
    for name in wrapped:
        tvm_ffi.register_global_func(name, cpu_functions.IMPLEMENTATIONS[name], override=True)

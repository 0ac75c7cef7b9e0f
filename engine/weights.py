"""Weights for one tensor-parallel rank, in the engine's layout, from a checkpoint or a seed.

A `TensorSource` hands out regions of the logical (Hugging Face named, unsharded) weights as
float32; `rank_params` turns them into the exported module's parameters for one rank: fused
q/k/v and gate/up, sliced for the rank, quantized, cast. Only the rank's slices are ever read
or generated, so a 70B model is never materialised whole in one process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .config import ConfigError, ModelConfig
from .quantize import QuantSpec, quantize
from .sharding import ShardPlan

Span = tuple[int, int] | None


class TensorSource(Protocol):
    def get(self, name: str, rows: Span = None, cols: Span = None) -> np.ndarray: ...


def hf_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    c, d = config, config.head_dim
    leaf = name.split(".")[-2] if name.endswith(".weight") else name
    shapes = {
        "embed_tokens": (c.vocab_size, c.hidden_size), "lm_head": (c.vocab_size, c.hidden_size),
        "q_proj": (c.num_attention_heads * d, c.hidden_size),
        "k_proj": (c.num_key_value_heads * d, c.hidden_size),
        "v_proj": (c.num_key_value_heads * d, c.hidden_size),
        "o_proj": (c.hidden_size, c.num_attention_heads * d),
        "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
    }
    return shapes.get(leaf, (c.hidden_size,))


def _region(shape: tuple[int, ...], rows: Span, cols: Span) -> tuple[slice, ...]:
    idx = [slice(*rows) if rows else slice(None)]
    if len(shape) > 1:
        idx.append(slice(*cols) if cols else slice(None))
    return tuple(idx)


class SafetensorsSource:
    """A local Hugging Face checkpoint folder (`*.safetensors`, single file or sharded)."""

    def __init__(self, folder: str | Path, config: ModelConfig):
        from safetensors import SafetensorError, safe_open

        self.folder, self.config = Path(folder), config
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"{str(self.folder)!r} has no *.safetensors weights (pickled .bin checkpoints "
                              "are not read: convert them with `save_pretrained(..., safe_serialization=True)`)")
        self._where: dict[str, Path] = {}
        for file in files:
            try:
                with safe_open(file, framework="numpy") as f:
                    self._where.update({k: file for k in f.keys()})
            except (SafetensorError, OSError) as err:
                raise ConfigError(f"{file} is not a readable safetensors file ({err})") from None
        self._open = safe_open

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, rows: Span = None, cols: Span = None) -> np.ndarray:
        if name not in self._where:
            raise ConfigError(f"checkpoint {str(self.folder)!r} lacks tensor {name!r}")
        file = self._where[name]
        with self._open(file, framework="numpy") as f:
            sl = f.get_slice(name)
            shape = tuple(sl.get_shape())
            if shape != hf_shape(self.config, name):
                raise ConfigError(f"{file}: {name} has shape {shape}, config.json implies {hf_shape(self.config, name)}")
            if sl.get_dtype() not in ("BF16",):
                return np.asarray(sl[_region(shape, rows, cols)], dtype=np.float32)
        return _read_with_torch(file, name, _region(shape, rows, cols))


def _read_with_torch(file: Path, name: str, region: tuple[slice, ...]) -> np.ndarray:
    """bfloat16 has no numpy dtype: decode through safetensors' torch binding."""
    try:
        from safetensors import safe_open
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError(f"{file} stores bfloat16 weights, which need torch to decode; pip install torch") from None
    with safe_open(file, framework="pt") as f:
        return f.get_slice(name)[region].float().numpy()


BLOCK = 32  # random weights are generated in blocks of rows (or columns) of this many


class RandomSource:
    """Seeded random weights, generated block by block along the dimension that gets sharded.

    Every block's values depend only on (seed, tensor name, block index), so the full model is the
    same function whatever the tp, while each rank generates only its own blocks.
    """

    def __init__(self, config: ModelConfig, seed: int = 0, std: float = 0.02):
        self.config, self.seed, self.std = config, seed, std

    def _rng(self, name: str, block: int) -> np.random.Generator:
        digest = hashlib.sha256(f"{self.seed}/{name}/{block}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def get(self, name: str, rows: Span = None, cols: Span = None) -> np.ndarray:
        shape = hf_shape(self.config, name)
        if len(shape) == 1:
            return (1.0 + self.std * self._rng(name, 0).standard_normal(shape, dtype=np.float32))
        by_cols = name.endswith(("o_proj.weight", "down_proj.weight"))  # sharded along the input
        axis_len = shape[1] if by_cols else shape[0]
        lo, hi = (cols if by_cols else rows) or (0, axis_len)
        other = shape[0] if by_cols else shape[1]
        parts = []
        for block in range(lo // BLOCK, -(-hi // BLOCK)):
            start = block * BLOCK
            n = min(BLOCK, axis_len - start)
            values = self.std * self._rng(name, block).standard_normal((n, other), dtype=np.float32)
            parts.append(values[max(lo - start, 0):hi - start])
        out = np.concatenate(parts, axis=0)  # [selected along the sharded axis, other]
        other_span = rows if by_cols else cols
        if other_span:
            out = out[:, slice(*other_span)]
        return np.ascontiguousarray(out.T) if by_cols else out


def _layer_tensors(plan: ShardPlan, rank: int, prefix: str) -> Iterator[tuple[str, list[tuple[str, Span, Span]]]]:
    """(engine param stem, [(hf name, rows, cols) to concatenate along rows])."""
    q, kv, mlp = plan.rows("q", rank), plan.rows("kv", rank), plan.rows("mlp", rank)
    a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
    yield f"{prefix}.input_layernorm", [(f"{prefix}.input_layernorm.weight", None, None)]
    yield f"{a}.qkv_proj", [(f"{a}.q_proj.weight", q, None), (f"{a}.k_proj.weight", kv, None),
                            (f"{a}.v_proj.weight", kv, None)]
    yield f"{a}.o_proj", [(f"{a}.o_proj.weight", None, q)]
    yield f"{prefix}.post_attention_layernorm", [(f"{prefix}.post_attention_layernorm.weight", None, None)]
    yield f"{m}.gate_up_proj", [(f"{m}.gate_proj.weight", mlp, None), (f"{m}.up_proj.weight", mlp, None)]
    yield f"{m}.down_proj", [(f"{m}.down_proj.weight", None, mlp)]


def engine_tensors(config: ModelConfig, plan: ShardPlan, rank: int):
    yield "model.embed_tokens", [("model.embed_tokens.weight", None, None)]
    for i in range(config.num_hidden_layers):
        yield from _layer_tensors(plan, rank, f"model.layers.{i}")
    yield "model.norm", [("model.norm.weight", None, None)]
    if not config.tie_word_embeddings:
        yield "lm_head", [("lm_head.weight", None, None)]


def rank_params(source: TensorSource, config: ModelConfig, spec: QuantSpec, plan: ShardPlan,
                rank: int, expected_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The parameters of rank `rank`, keyed by the exported module's parameter names."""
    out: dict[str, np.ndarray] = {}
    for stem, parts in engine_tensors(config, plan, rank):
        value = np.concatenate([source.get(n, r, c) for n, r, c in parts], axis=0)
        if value.ndim == 2 and spec.quantized:
            out[f"{stem}.q_weight"], out[f"{stem}.q_scale"] = quantize(value, spec)
        else:
            out[f"{stem}.weight"] = value.astype(spec.model_dtype)
    if expected_names is not None and list(out) != list(expected_names):
        missing = sorted(set(expected_names) - set(out))
        extra = sorted(set(out) - set(expected_names))
        raise RuntimeError(f"weight layout does not match the compiled model (missing {missing}, extra {extra})")
    return out


def open_source(config: ModelConfig, path: str | Path | None, seed: int = 0) -> TensorSource:
    if path is None:
        return RandomSource(config, seed)
    source = SafetensorsSource(path, config)
    if config.tie_word_embeddings is False and not source.has("lm_head.weight"):
        raise ConfigError(f"{path}: lm_head.weight is missing but tie_word_embeddings is false in config.json")
    return source


def describe(source: TensorSource) -> str:
    if isinstance(source, RandomSource):
        return f"random(seed={source.seed}, std={source.std})"
    return f"safetensors({source.folder})"

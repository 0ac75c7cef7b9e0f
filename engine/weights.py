"""Weights for one tensor-parallel rank, in the engine's layout, from a checkpoint or a seed.

A `TensorSource` hands out regions of the logical (Hugging Face named, unsharded) weights as
float32; `rank_params` turns them into the exported module's parameters for one rank: fused
q/k/v and gate/up, sliced for the rank, quantized, cast. Only the rank's slices are ever read
or generated, so a 70B model is never materialised whole in one process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

import numpy as np

from .config import ConfigError, ModelConfig
from .quantize import QuantSpec, quantize, quantize_torch
from .sharding import ShardPlan, Span, hf_shape, split_axis


class TensorSource(Protocol):
    def get(self, name: str, rows: Span = None, cols: Span = None) -> np.ndarray: ...


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
    same function whatever the tp, while each rank generates only its own blocks. numpy's
    generator here; `TorchRandomSource` draws on a (GPU) device instead, much faster for big
    models, with other values (a random model is a function of seed and backend).
    """

    backend = "numpy"

    def __init__(self, config: ModelConfig, seed: int = 0, std: float = 0.02):
        self.config, self.seed, self.std = config, seed, std

    def _block_seed(self, name: str, block: int) -> int:
        digest = hashlib.sha256(f"{self.seed}/{name}/{block}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def _normal(self, name: str, block: int, shape: tuple[int, ...]):
        return np.random.default_rng(self._block_seed(name, block)).standard_normal(shape, dtype=np.float32)

    @staticmethod
    def _cat(parts):
        return np.concatenate(parts, axis=0)

    @staticmethod
    def _transpose(x):
        return np.ascontiguousarray(x.T)

    def get(self, name: str, rows: Span = None, cols: Span = None):
        shape = hf_shape(self.config, name)
        if len(shape) == 1:
            return 1.0 + self.std * self._normal(name, 0, shape)
        by_cols = split_axis(name) == "cols"  # sharded along the input
        axis_len = shape[1] if by_cols else shape[0]
        lo, hi = (cols if by_cols else rows) or (0, axis_len)
        other = shape[0] if by_cols else shape[1]
        parts = []
        for block in range(lo // BLOCK, -(-hi // BLOCK)):
            start = block * BLOCK
            values = self.std * self._normal(name, block, (min(BLOCK, axis_len - start), other))
            parts.append(values[max(lo - start, 0):hi - start])
        out = self._cat(parts)  # [selected along the sharded axis, other]
        other_span = rows if by_cols else cols
        if other_span:
            out = out[:, slice(*other_span)]
        return self._transpose(out) if by_cols else out


class TorchRandomSource(RandomSource):
    """`RandomSource` drawn with torch on `device` (e.g. "cuda:0"); returns torch tensors there."""

    backend = "torch"

    def __init__(self, config: ModelConfig, seed: int = 0, std: float = 0.02, device: str = "cpu"):
        super().__init__(config, seed, std)
        import torch

        self.torch, self.device = torch, device
        self._gen = torch.Generator(device=device)

    def _normal(self, name: str, block: int, shape: tuple[int, ...]):
        self._gen.manual_seed(self._block_seed(name, block))
        return self.torch.randn(shape, generator=self._gen, device=self.device, dtype=self.torch.float32)

    def _cat(self, parts):
        return self.torch.cat(parts, dim=0)

    def release(self) -> None:
        """Return the float32 intermediates torch's caching allocator still holds to the device."""
        if self.device != "cpu":
            self.torch.cuda.empty_cache()

    @staticmethod
    def _transpose(x):
        return x.T.contiguous()


def rank_params(source: TensorSource, spec: QuantSpec, plan: ShardPlan, rank: int,
                expected_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The parameters of rank `rank` (the sharding table read through `plan`), quantized with
    `spec`, keyed by the exported module's parameter names."""
    out: dict[str, np.ndarray] = {}
    on_torch = getattr(source, "backend", "numpy") == "torch"
    for stem, parts in plan.tensors(rank):
        values = [source.get(n, r, c) for n, r, c in parts]
        value = source._cat(values) if on_torch else np.concatenate(values, axis=0)
        if value.ndim == 2 and spec.quantized:
            packed, scale = (quantize_torch if on_torch else quantize)(value, spec)
            out[f"{stem}.q_weight"], out[f"{stem}.q_scale"] = packed, scale
        elif on_torch:
            out[f"{stem}.weight"] = value.to(getattr(source.torch, spec.model_dtype))
        else:
            out[f"{stem}.weight"] = value.astype(spec.model_dtype)
    if expected_names is not None and list(out) != list(expected_names):
        missing = sorted(set(expected_names) - set(out))
        extra = sorted(set(out) - set(expected_names))
        raise RuntimeError(f"weight layout does not match the compiled model (missing {missing}, extra {extra})")
    return out


def open_source(config: ModelConfig, path: str | Path | None, seed: int = 0, backend: str = "numpy",
                device: str = "cpu") -> TensorSource:
    """A checkpoint folder, or (path None) seeded random weights drawn with `backend`."""
    if path is None:
        if backend == "torch":
            return TorchRandomSource(config, seed, device=device)
        if backend != "numpy":
            raise ConfigError(f"unknown random weights backend {backend!r}; choose numpy or torch")
        return RandomSource(config, seed)
    source = SafetensorsSource(path, config)
    if config.tie_word_embeddings is False and not source.has("lm_head.weight"):
        raise ConfigError(f"{path}: lm_head.weight is missing but tie_word_embeddings is false in config.json")
    return source


def source_spec(source: TensorSource) -> dict:
    """A JSON-able description from which a worker process reopens the same source."""
    if isinstance(source, RandomSource):
        return {"kind": "random", "seed": source.seed, "std": source.std, "backend": source.backend}
    return {"kind": "safetensors", "path": str(source.folder)}


def source_from_spec(config: ModelConfig, spec: dict, device: str = "cpu") -> TensorSource:
    """`device`: where a torch-backed random source draws (the worker's own GPU)."""
    if spec["kind"] == "random":
        if spec.get("backend") == "torch":
            return TorchRandomSource(config, spec["seed"], spec["std"], device)
        return RandomSource(config, spec["seed"], spec["std"])
    return SafetensorsSource(spec["path"], config)


def to_tvm(value, device):
    """A host numpy array or a torch tensor (zero-copy through DLPack) as a TVM tensor on `device`."""
    import tvm

    if isinstance(value, np.ndarray):
        return tvm.runtime.tensor(value, device)
    return tvm.runtime.from_dlpack(value.contiguous())


def nbytes(value) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else value.numel() * value.element_size()

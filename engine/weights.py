"""Weights for one tensor-parallel rank, in the engine's layout, from a checkpoint or a seed.

A `TensorSource` hands out regions of the logical (Hugging Face named, unsharded) weights as
float32; `rank_params` turns them into the exported module's parameters for one rank: fused
q/k/v and gate/up, sliced for the rank, quantized, cast. Only the rank's slices are ever read
or generated, so a 70B model is never materialised whole in one process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
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


# safetensors dtypes and their sizes; the engine reads the float ones (FLOAT_DTYPES)
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                        "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def safetensors_header(file: Path) -> dict[str, dict]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file, each entry checked
    against the file: its byte range lies inside the file and holds exactly its shape's bytes, and
    the range's last byte can be read (a truncated or unreadable file is refused here, reading
    one byte per tensor, never the tensors)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConfigError(f"{file} is not a safetensors file ({size} bytes: shorter than its header); "
                                  "re-download or re-save it")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise ConfigError(f"{file} is truncated or not a safetensors file (its header claims {n} bytes, "
                                  f"the file holds {size}); re-download or re-save it")
            raw = f.read(n)
            try:
                header = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ConfigError(f"{file}: its safetensors header is not valid JSON (a damaged or truncated file); "
                                  "re-download or re-save it") from None
            if not isinstance(header, dict):
                raise ConfigError(f"{file}: its safetensors header is not a JSON object; re-download or re-save it")
            data_start, data_bytes = 8 + n, size - 8 - n
            tensors = {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                tensors[name] = _check_entry(file, name, entry, data_bytes)
            fd = f.fileno()
            for name, entry in tensors.items():
                begin, end = entry["data_offsets"]
                if end > begin and len(os.pread(fd, 1, data_start + end - 1)) != 1:
                    raise ConfigError(f"{file}: tensor {name} cannot be read to its end; re-download or re-save it")
    except OSError as err:
        raise ConfigError(f"{file} cannot be read ({err.strerror or err})") from None
    return tensors


def _check_entry(file: Path, name: str, entry, data_bytes: int) -> dict:
    bad = ConfigError(f"{file}: the header entry of tensor {name} is malformed ({entry!r}); re-download or re-save it")
    if not isinstance(entry, dict):
        raise bad
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if (dtype not in SAFETENSORS_ITEMSIZE or not isinstance(shape, list) or not isinstance(offsets, list)
            or len(offsets) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                            for v in [*shape, *offsets]) or offsets[0] > offsets[1]):
        raise bad
    begin, end = offsets
    if end > data_bytes:
        raise ConfigError(f"{file} is truncated: tensor {name} ends at byte {end} of the data, which holds "
                          f"{data_bytes}; re-download or re-save it")
    expected = math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]
    if end - begin != expected:
        raise ConfigError(f"{file}: tensor {name} ({dtype} {shape}) should take {expected} bytes, its header gives "
                          f"{end - begin}; re-download or re-save it")
    return {"dtype": dtype, "shape": tuple(shape), "data_offsets": (begin, end)}


def required_tensors(config: ModelConfig) -> list[str]:
    """The Hugging Face tensors the engine reads for `config` (the sharding table, unsharded)."""
    return [name for _, parts in ShardPlan(config, 1).tensors(0) for name, _, _ in parts]


def check_checkpoint(folder: str | Path, config: ModelConfig) -> None:
    """Refuse a checkpoint folder the engine cannot read, before anything is compiled: every
    tensor the model needs present, of the shape config.json implies (engine.sharding.hf_shape),
    stored as a float, and its file whole (safetensors_header). ConfigError names the file and
    the tensor. Reads the files' headers and one byte per tensor."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{str(folder)!r} has no *.safetensors weights (pickled .bin checkpoints are not read: "
                          "convert them with `save_pretrained(..., safe_serialization=True)`)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            listed = set(weight_map.values()) if isinstance(weight_map, dict) else set()
        except (OSError, ValueError, AttributeError):
            raise ConfigError(f"{index} is not a valid safetensors index (JSON with a weight_map); "
                              "re-download it") from None
        absent = sorted(f for f in listed if not isinstance(f, str) or not (folder / f).is_file())
        if absent:
            raise ConfigError(f"{index} names {absent[0]}, which is not in {folder}"
                              + (f" ({len(absent)} files missing)" if len(absent) > 1 else "")
                              + "; download the missing shards")
    where: dict[str, tuple[Path, dict]] = {}
    for file in files:
        for name, entry in safetensors_header(file).items():
            where[name] = (file, entry)
    cfg_file = folder / "config.json"
    needed = required_tensors(config)
    missing = [n for n in needed if n not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        why = ("; config.json sets tie_word_embeddings false, so the LM head is a tensor of its own"
               if missing[0] == "lm_head.weight" else "")
        raise ConfigError(f"{folder}: tensor {missing[0]}{more} is missing from the checkpoint, which {cfg_file} "
                          f"({config.num_hidden_layers} layers) needs{why}")
    bf16 = False
    for name in needed:
        file, entry = where[name]
        expected = hf_shape(config, name)
        if entry["shape"] != expected:
            raise ConfigError(f"{file}: tensor {name} has shape {list(entry['shape'])}, but {cfg_file} implies "
                              f"{list(expected)}")
        if entry["dtype"] not in FLOAT_DTYPES:
            raise ConfigError(f"{file}: tensor {name} is stored as {entry['dtype']}; the engine reads float weights "
                              f"({', '.join(FLOAT_DTYPES)}): pre-quantized checkpoints are not supported, quantize "
                              "with quant=... instead")
        bf16 = bf16 or entry["dtype"] == "BF16"
    if bf16 and importlib.util.find_spec("torch") is None:
        raise ConfigError(f"{folder} stores bfloat16 weights, which need torch to decode; pip install torch")


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
    check_checkpoint(path, config)
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

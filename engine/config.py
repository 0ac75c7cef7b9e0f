"""Model configuration: Llama hyper-parameters, named presets, and reading a HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any


# Where the engine's heavy kernels come from (BuildSpec options, each "tir" (TVM's own) or
# "library" (runtime_patch.functions: the project's CUDA plugins, NumPy on llvm); "auto" is
# library on cuda, tir on llvm, except decode_gemv, see AUTO_LIBRARY_GEMV_BITS):
#   prefill_gemm       the prefill linears: TVM's TIR matmuls, or cuBLAS with the project's RMSNorm,
#                      SiLU and residual adds around them (engine.model.kernels)
#   prefill_attention  a prefill's attention over the tokens it appends (paged KV cache): TVM's TIR
#                      kernel, or cuBLAS GEMMs and a softmax kernel
#   decode_attention   a decode step's attention over the paged KV cache's pages: TVM's TIR kernel,
#                      or the project's (split over the keys)
#   decode_gemv        the batch-1 decode GEMVs of q4f16_1 and q8f16_1 weights: TVM's (dlight)
#                      kernels, or the project's (runtime_patch/native/quant_gemv.cu)
#   decode_norm        the decode steps' RMSNorms (batch 1 and batched): TVM's kernel, or the
#                      project's (runtime_patch/native/rms_norm.cu: one memory round trip a row)
#   allreduce          tp > 1: TVM's CCL collective (NCCL; cpu_shm on llvm), or the project's
#                      one-shot allreduce over CUDA IPC (NCCL where peers have no P2P access)
KERNEL_OPTIONS = ("prefill_gemm", "prefill_attention", "decode_attention", "decode_gemv", "decode_norm", "allreduce")
# The weight widths whose batch-1 decode GEMV is the library's under decode_gemv=auto on cuda:
# both are faster than TVM's end to end (Llama-3-8B on an H200, one run: q8f16_1 357.3 against
# 339.9 tokens/s since the x reads lost their bank conflicts; q4f16_1 383.4 against 357.1 when
# it was chosen), docs/BENCHMARKS.md.
AUTO_LIBRARY_GEMV_BITS = (4, 8)
KERNEL_SOURCES = ("tir", "library")
# The KV cache (BuildSpec.kv_cache): TVM's paged cache (its attention calls split the decode's CUDA
# graph), or the project's pre-allocated one (engine/model/static_kv.py: the decode step is one
# graph); "auto" is static on cuda, paged on llvm.
KV_CACHES = ("paged", "static")


class ConfigError(ValueError):
    """A user-facing configuration problem; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family model. Field names follow Hugging Face's `LlamaConfig`."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    head_dim: int = 0

    def __post_init__(self) -> None:
        check_fields(self.to_dict(), self.name)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind in (None, "default"):
                object.__setattr__(self, "rope_scaling", None)
            elif "rope_type" not in self.rope_scaling:
                # older checkpoints name it "type"; TVM's RoPE kernels read "rope_type" only
                object.__setattr__(self, "rope_scaling", {**self.rope_scaling, "rope_type": kind})

    @property
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_attention_heads + 2 * self.num_key_value_heads) + self.num_attention_heads * d * h
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * per_layer + self.vocab_size * h + h + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` of an equivalent Hugging Face `LlamaForCausalLM`."""
        d = {k: v for k, v in self.to_dict().items() if k != "name"}
        d.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                 attention_bias=False, mlp_bias=False, torch_dtype="float32")
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        return d


# The fields of a ModelConfig (HF names) and what each must be; checked for presets, artifacts'
# specs and every config.json (`where` names the file in the message).
POSITIVE_INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "vocab_size", "max_position_embeddings")
LLAMA3_SCALING_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(values: dict[str, Any], where: str) -> None:
    """Raise ConfigError naming `where` and the field if `values` (ModelConfig fields, HF names)
    cannot describe a Llama the engine builds: types (an integer given as "64" is refused),
    ranges, and the divisibility the attention layout needs."""
    def refuse(field: str, what: str) -> None:
        raise ConfigError(f"{where}: {field} {what}, got {values.get(field)!r}")

    for field in POSITIVE_INT_FIELDS:
        value = values.get(field)
        if not _is_int(value) or value < 1:
            refuse(field, "must be a positive integer")
    head_dim = values.get("head_dim", 0)
    if not _is_int(head_dim) or head_dim < 0:
        refuse("head_dim", "must be a positive integer (or absent)")
    for field in ("rms_norm_eps", "rope_theta"):
        if field in values and (not _is_number(values[field]) or values[field] <= 0):
            refuse(field, "must be a positive number")
    if not isinstance(values.get("tie_word_embeddings", False), bool):
        refuse("tie_word_embeddings", "must be true or false")
    hidden, heads, kv_heads = values["hidden_size"], values["num_attention_heads"], values["num_key_value_heads"]
    if head_dim == 0:
        if hidden % heads:
            raise ConfigError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; "
                              "set head_dim explicitly")
        head_dim = hidden // heads
    if head_dim % 2:
        raise ConfigError(f"{where}: the head dimension is {head_dim}, an odd number; rotary embeddings rotate "
                          "pairs of channels, so head_dim (hidden_size / num_attention_heads) must be even")
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    scaling = values.get("rope_scaling")
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        refuse("rope_scaling", "must be an object (or null)")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return
    if kind != "llama3":
        raise ConfigError(f"{where}: rope_scaling type {kind!r} is not supported; only Llama-3 ('llama3') "
                          "scaling or none")
    for field in LLAMA3_SCALING_FIELDS:
        value = scaling.get(field)
        if not _is_number(value) or value <= 0:
            raise ConfigError(f"{where}: rope_scaling.{field} must be a positive number for llama3 scaling, "
                              f"got {value!r}")


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Shapes from the public config.json of each model.
PRESETS: dict[str, ModelConfig] = {
    # The CPU default: GQA, Llama-3 RoPE scaling, compiles and runs in seconds.
    "tiny": ModelConfig(
        name="tiny", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
        max_position_embeddings=2048, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_SCALING, "factor": 4.0, "original_max_position_embeddings": 256},
    ),
    # CPU-sized checks of the CUDA decode attention's tensor-core kernel (head_dim 64 and 128, four
    # query heads per KV head as Llama-3-8B's) against transformers: experiments.verify device=cuda.
    # (tiny-d128 with intermediate_size 1024 met a near-tie of its random weights at a greedy step
    # that q0f16 on the GPU decided the other way, the SIMT kernel's run alike: 1536 has none.)
    "tiny-d128": ModelConfig(
        name="tiny-d128", hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=1024,
        max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_SCALING,
    ),
    "tiny-d64": ModelConfig(
        name="tiny-d64", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=1024,
        max_position_embeddings=4096,
    ),
    "tinyllama-1.1b": ModelConfig(
        name="tinyllama-1.1b", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
        max_position_embeddings=2048, rope_theta=10000.0,
    ),
    "llama3.2-1b": ModelConfig(
        name="llama3.2-1b", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True, head_dim=64,
        rope_scaling={**_LLAMA3_SCALING, "factor": 32.0},
    ),
    "llama3-8b": ModelConfig(
        name="llama3-8b", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0,
    ),
    "llama2-13b": ModelConfig(
        name="llama2-13b", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
        max_position_embeddings=4096, rope_theta=10000.0,
    ),
    "llama3-70b": ModelConfig(
        name="llama3-70b", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


_HF_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}


def from_hf_folder(path: str | Path) -> ModelConfig:
    """Read the `config.json` of a local Hugging Face Llama checkpoint folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"checkpoint folder {str(folder)!r} does not exist; pass model.path=<a local HF Llama folder>")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"{str(folder)!r} has no config.json; it must be a Hugging Face checkpoint folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_file} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg_file} must hold a JSON object")
    archs = raw.get("architectures") or []
    if raw.get("model_type") not in (None, "llama") or (archs and "LlamaForCausalLM" not in archs):
        raise ConfigError(f"{cfg_file} describes {raw.get('model_type') or archs}, not a Llama (LlamaForCausalLM)")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "vocab_size") if k not in raw]
    if missing:
        raise ConfigError(f"{cfg_file} lacks {', '.join(missing)}; is it a Llama config.json?")
    if raw.get("hidden_act", "silu") != "silu" or raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ConfigError(f"{cfg_file}: only silu activation without attention/MLP biases is supported")
    fields = {k: raw[k] for k in _HF_FIELDS if raw.get(k) is not None}
    rope = raw.get("rope_parameters")  # transformers >= 5 keeps theta and scaling here
    if rope is not None and not isinstance(rope, dict):
        raise ConfigError(f"{cfg_file}: rope_parameters must be an object, got {rope!r}")
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            fields["rope_theta"] = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling.get("rope_type", "default") != "default":
            fields["rope_scaling"] = scaling
    fields.setdefault("num_key_value_heads", raw["num_attention_heads"])
    fields.setdefault("max_position_embeddings", 2048)
    check_fields(fields, str(cfg_file))  # the file and the field in the message
    return ModelConfig(name=folder.name, **fields)

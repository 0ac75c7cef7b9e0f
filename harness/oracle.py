"""The numerical oracle: Hugging Face `transformers`' LlamaForCausalLM on the CPU in float32."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.config import ConfigError, ModelConfig
from engine.quantize import QuantSpec, dequantize, quantize

_QUANTIZED_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "lm_head", "embed_tokens")


def _transformers():
    try:
        import torch
        import transformers
    except ImportError:
        raise ConfigError("the oracle needs torch and transformers: pip install -e '.[test]'") from None
    return torch, transformers


def random_checkpoint(config: ModelConfig, folder: Path, seed: int = 0, std: float = 0.02) -> Path:
    """Write a seeded random HF checkpoint (`save_pretrained`, safetensors) once; reuse it after."""
    torch, transformers = _transformers()
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return folder
    if config.num_params > 2_000_000_000:
        raise ConfigError(f"{config.name} has {config.num_params / 1e9:.1f}B parameters: too large for a float32 "
                          "random checkpoint on this machine; use model=tiny or model.path=DIR")
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**config.to_hf_dict(), initializer_range=std)
    model = transformers.LlamaForCausalLM(hf_config)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class Reference:
    """transformers on `folder`, optionally with the engine's quantization applied to its weights
    (quantize then dequantize), so that it computes the function the engine is meant to compute."""

    def __init__(self, folder: str | Path, quant: QuantSpec | None = None):
        torch, transformers = _transformers()
        self.torch = torch
        try:
            self.model = transformers.LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        except Exception as err:  # noqa: BLE001  (a checkpoint transformers refuses: the user's to fix)
            text = " ".join(str(err).split())[:500]
            raise ConfigError(f"{folder}: transformers cannot load this checkpoint as the reference "
                              f"({type(err).__name__}: {text}); fix or re-save the checkpoint") from None
        if quant is not None and quant.quantized:
            self._apply_quantization(quant)

    def _apply_quantization(self, quant: QuantSpec) -> None:
        with self.torch.no_grad():
            seen = set()
            for name, module in self.model.named_modules():
                weight = getattr(module, "weight", None)
                if weight is None or name.split(".")[-1] not in _QUANTIZED_LEAVES or id(weight) in seen:
                    continue
                seen.add(id(weight))  # a tied embedding / LM head is quantized once
                w = weight.detach().numpy()
                weight.copy_(self.torch.from_numpy(dequantize(*quantize(w, quant), quant)))

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits at every position of `tokens` [len, vocab], float32."""
        with self.torch.no_grad():
            out = self.model(self.torch.tensor([tokens], dtype=self.torch.long))
        return out.logits[0].float().numpy()

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """The argmax continuation, one forward step per token over transformers' KV cache (not
        `generate`, whose default logits processors can change a token)."""
        import inspect

        torch, tokens = self.torch, []
        # transformers >= 5.x calls the KV cache `cache`; earlier, `past_key_values`
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = self.model(torch.tensor([prompt], dtype=torch.long), use_cache=True)
            for _ in range(new_tokens):
                tokens.append(int(out.logits[0, -1].argmax()))
                out = self.model(torch.tensor([tokens[-1:]], dtype=torch.long), use_cache=True,
                                 **{name: getattr(out, name)})
        return tokens


def relative_error(engine: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(engine - reference).max() / max(np.abs(reference).max(), 1e-30))


def confident_rows(engine: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The rows [.., vocab] where the reference's top-1/top-2 margin exceeds twice the largest
    absolute logits difference of that row: elsewhere the engine picking the other token is a
    legitimate near-tie of float16 arithmetic, not a wrong kernel."""
    top2 = np.sort(reference, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]
    diff = np.abs(engine - reference).max(axis=-1)
    return margin > 2 * diff


def confident_agreement(engine: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """Top-1 agreement over the confident rows (confident_rows). (fraction, rows)."""
    rows = confident_rows(engine, reference)
    if not rows.any():
        return 1.0, 0
    agree = engine[rows].argmax(-1) == reference[rows].argmax(-1)
    return float(agree.mean()), int(rows.sum())


def greedy_divergence(engine_tokens: list[int], reference_tokens: list[int], engine_logits: np.ndarray,
                      reference_logits: np.ndarray, first_row: int) -> tuple[int | None, bool]:
    """Where two greedy continuations of the same prompt first differ, and whether that step is a
    near-tie: (the first differing step or None, near_tie). Step i was predicted, teacher-forced, by
    row first_row + i of the logits (the prompt's last row predicts step 0). After a legitimate
    near-tie the continuations go their own ways, so only the first difference can be judged."""
    first = next((i for i, (a, b) in enumerate(zip(engine_tokens, reference_tokens)) if a != b), None)
    if first is None and len(engine_tokens) != len(reference_tokens):
        first = min(len(engine_tokens), len(reference_tokens))
    if first is None or first_row + first >= len(reference_logits):
        return first, False
    row = first_row + first
    return first, not bool(confident_rows(engine_logits[row], reference_logits[row]))

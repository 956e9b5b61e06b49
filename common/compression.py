"""Compressed wire formats for the adapter (`[compression]`): 8-bit values with one fp16
scale per block of BLOCK values, both ways; on the way up also 4-bit values (two a byte)
and top-k sparsified deltas.

Down, the coordinator sends its full-precision global adapter rounded to int8; it keeps the
full-precision adapter itself and adds the sites' deltas to that, so the rounding of one
round never carries into the next. Up, a site sends its delta (trained adapter minus what it
received), int8 or top-k, with error feedback: what the rounding or the sparsification left
out is kept at the site (`residual`) and added to its next delta, so nothing is lost, only
delayed (Seide et al. 2014; Karimireddy et al. 2019).

Encoded arrays keep the adapter's names: `name` holds the int8 values (int4: packed in
pairs, flattened), `name@scale` the block scales, and for top-k `name@mask` the kept
positions as a packed bit mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import numpy as np

Arrays = dict[str, np.ndarray]
Down = Literal["none", "int8"]
Up = Literal["none", "int8", "int4", "topk"]
BLOCK = 64
"""Values per scale: a 3% overhead on int8 (fp16 scales), and an outlier spoils 63 others."""
SCALE, MASK = "@scale", "@mask"
_FP16_MAX = float(np.finfo(np.float16).max)


class CompressionError(ValueError):
    """Encoded arrays that do not decode to the adapter they stand for."""


def quantize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per block of BLOCK values (in flattened order) and the fp16 scales."""
    flat = np.asarray(values, dtype=np.float32).ravel()
    blocks = np.pad(flat, (0, -flat.size % BLOCK)).reshape(-1, BLOCK)
    scale = np.minimum(np.abs(blocks).max(axis=1) / 127, _FP16_MAX).astype(np.float16)
    divisor = np.where(scale > 0, scale, 1).astype(np.float32)[:, None]
    q = np.clip(np.rint(blocks / divisor), -127, 127).astype(np.int8)
    return q.ravel()[: flat.size].reshape(np.shape(values)), scale


def quantize4(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit (-7..7) per block of BLOCK values, two to a byte (flattened), and
    the fp16 scales."""
    flat = np.asarray(values, dtype=np.float32).ravel()
    blocks = np.pad(flat, (0, -flat.size % BLOCK)).reshape(-1, BLOCK)
    scale = np.minimum(np.abs(blocks).max(axis=1) / 7, _FP16_MAX).astype(np.float16)
    divisor = np.where(scale > 0, scale, 1).astype(np.float32)[:, None]
    q = (np.clip(np.rint(blocks / divisor), -7, 7).astype(np.int16) + 8).ravel()[: flat.size]
    q = np.pad(q, (0, flat.size % 2))
    return (q[0::2] | (q[1::2] << 4)).astype(np.uint8), scale


def dequantize4(packed: np.ndarray, scale: np.ndarray, size: int) -> np.ndarray:
    """`size` fp32 values of packed 4-bit blocks; raises CompressionError when they do not fit."""
    if packed.dtype != np.uint8 or packed.shape != (math.ceil(size / 2),):
        raise CompressionError(f"{math.ceil(size / 2)} bytes of 4-bit values expected")
    if scale.dtype != np.float16 or scale.shape != (math.ceil(size / BLOCK),):
        raise CompressionError(f"{size} values need {math.ceil(size / BLOCK)} fp16 scales")
    q = np.empty(packed.size * 2, dtype=np.float32)
    q[0::2], q[1::2] = packed & 0x0F, packed >> 4
    blocks = np.pad(q[:size] - 8, (0, -size % BLOCK)).reshape(-1, BLOCK)
    return (blocks * scale.astype(np.float32)[:, None]).ravel()[:size]


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """fp32 values of int8 blocks; raises CompressionError when the two do not fit."""
    if q.dtype != np.int8 or scale.dtype != np.float16 or scale.ndim != 1:
        raise CompressionError(f"int8 values, fp16 scales expected; got {q.dtype}, {scale.dtype}")
    if scale.size != math.ceil(q.size / BLOCK):
        raise CompressionError(f"{q.size} values need {math.ceil(q.size / BLOCK)} scales")
    blocks = np.pad(q.ravel().astype(np.float32), (0, -q.size % BLOCK)).reshape(-1, BLOCK)
    values = blocks * scale.astype(np.float32)[:, None]
    return values.ravel()[: q.size].reshape(q.shape)


def encode_global(arrays: Mapping[str, np.ndarray], down: Down) -> Arrays:
    """The global adapter as it travels to the sites."""
    if down == "none":
        return dict(arrays)
    out: Arrays = {}
    for name, values in arrays.items():
        out[name], out[name + SCALE] = quantize(values)
    return out


def decode_global(arrays: Mapping[str, np.ndarray], down: Down) -> Arrays:
    """The adapter a site received, in fp32 (as it was sent when `down` is none)."""
    if down == "none":
        return dict(arrays)
    names = [name for name in arrays if "@" not in name]
    try:
        return {name: dequantize(arrays[name], arrays[name + SCALE]) for name in names}
    except KeyError as e:
        raise CompressionError(f"the global adapter lacks {e.args[0]}") from None


def encode_update(
    adapter: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray],
    up: Up,
    topk_fraction: float = 0.1,
) -> tuple[Arrays, Arrays]:
    """What a site sends for its trained `adapter`, and its new residual: the delta from
    `received` plus the last `residual`, minus what the encoding lets through."""
    if up == "none":
        return dict(adapter), {}
    out: Arrays = {}
    left: Arrays = {}
    for name, values in adapter.items():
        delta = np.asarray(values, np.float32) - np.asarray(received[name], np.float32)
        if name in residual:
            delta = delta + residual[name]
        if up == "int8":
            out[name], out[name + SCALE] = quantize(delta)
            sent = dequantize(out[name], out[name + SCALE])
        elif up == "int4":
            out[name], out[name + SCALE] = quantize4(delta)
            sent = dequantize4(out[name], out[name + SCALE], delta.size).reshape(delta.shape)
        else:
            out[name], out[name + SCALE], out[name + MASK] = _top_k(delta, topk_fraction)
            sent = _dense(out[name], out[name + SCALE], out[name + MASK], delta.shape)
        left[name] = delta - sent
    return out, left


def decode_update(
    arrays: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], up: Up
) -> Arrays:
    """A site's adapter from what it sent: `base` (the coordinator's full-precision global
    adapter) plus the decoded delta, in base's dtypes. Raises CompressionError."""
    if up == "none":
        return dict(arrays)
    expected = {*base, *(n + SCALE for n in base), *(n + MASK for n in base if up == "topk")}
    if set(arrays) != expected:
        raise CompressionError(f"{len(set(arrays) ^ expected)} arrays missing or unexpected")
    out: Arrays = {}
    for name, reference in base.items():
        if up == "int8":
            if arrays[name].shape != reference.shape:
                raise CompressionError(f"{name}: shape {arrays[name].shape}, not {reference.shape}")
            delta = dequantize(arrays[name], arrays[name + SCALE])
        elif up == "int4":
            size = reference.size
            delta = dequantize4(arrays[name], arrays[name + SCALE], size).reshape(reference.shape)
        else:
            delta = _dense(arrays[name], arrays[name + SCALE], arrays[name + MASK], reference.shape)
        out[name] = (reference.astype(np.float32) + delta).astype(reference.dtype)
    return out


def _top_k(delta: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The largest `fraction` of entries by magnitude, int8, in flattened order, and their
    positions as packed bits."""
    flat = delta.ravel()
    keep = max(1, math.ceil(fraction * flat.size))
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep :]] = True
    q, scale = quantize(flat[mask])
    return q, scale, np.packbits(mask)


def _dense(
    q: np.ndarray, scale: np.ndarray, packed: np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    size = math.prod(shape)
    if packed.dtype != np.uint8 or packed.shape != (math.ceil(size / 8),):
        raise CompressionError(f"a mask of {math.ceil(size / 8)} bytes expected")
    mask = np.unpackbits(packed, count=size).astype(bool)
    if int(mask.sum()) != q.size or q.ndim != 1:
        raise CompressionError(f"the mask marks {int(mask.sum())} positions for {q.size} values")
    dense = np.zeros(size, dtype=np.float32)
    dense[mask] = dequantize(q, scale)
    return dense.reshape(shape)

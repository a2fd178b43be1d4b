"""Decoder (codec/FORMAT.md 6.1): :class:`EncodedMatrix` -> int8 / float32 dense matrix.

Every entry point validates the matrix first (:func:`validate`), so the numba kernels below run
only on streams whose codewords, offsets and lengths are known to be in range.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

from ._parallel import row_bounds
from .matrix import EncodedMatrix, bf16_bits_to_float, validate

__all__ = ["decode", "dequantize"]


@numba.njit(cache=True)
def _decode(lo, hi, codewords, row_offsets, row_class, entry_length, entry_nonzero, entry_negative, values, out):
    """out[r, j] = values[r, symbol + 1] for every symbol of rows r in [lo, hi); only the nonzero bits
    of each entry are visited (zeros come from the fill), the last entry's overshoot is dropped.

    values: [rows, 3] of out's dtype, the decoded value of symbols -1, 0, +1 per row."""
    cols = out.shape[1]
    for r in range(lo, hi):
        k = row_class[r]
        neg_value = values[r, 0]
        pos_value = values[r, 2]
        out[r, :] = values[r, 1]
        col = 0
        for i in range(row_offsets[r], row_offsets[r + 1]):
            c = codewords[i]
            nz = entry_nonzero[k, c]
            neg = entry_negative[k, c]
            while nz != 0:
                bit = trailing_zeros(nz)
                j = col + bit
                if j >= cols:
                    break
                out[r, j] = neg_value if (neg >> np.uint64(bit)) & np.uint64(1) else pos_value
                nz &= nz - np.uint64(1)
            col += entry_length[k, c]


@numba.njit(parallel=True, cache=True)
def _decode_parallel(bounds, codewords, row_offsets, row_class, entry_length, entry_nonzero, entry_negative,
                     values, out):
    for i in numba.prange(bounds.shape[0] - 1):
        _decode(bounds[i], bounds[i + 1], codewords, row_offsets, row_class, entry_length, entry_nonzero,
                entry_negative, values, out)


def _run(enc: EncodedMatrix, values: np.ndarray) -> np.ndarray:
    d = enc.dictionary
    out = np.empty((enc.rows, enc.cols), dtype=values.dtype)
    args = (np.asarray(enc.codewords), np.asarray(enc.row_offsets), np.asarray(enc.row_class),
            d.entry_length, d.entry_nonzero, d.entry_negative, values, out)
    bounds = row_bounds(enc.rows, enc.rows * enc.cols)
    if bounds is None:
        _decode(0, enc.rows, *args)
    else:
        _decode_parallel(bounds, *args)
    return out


def decode(enc: EncodedMatrix) -> np.ndarray:
    """The ternary codes of ``enc`` as int8 ``[rows, cols]`` in {-1, 0, 1}. Raises
    :class:`CodecError` if ``enc`` is invalid."""
    validate(enc)
    values = np.empty((enc.rows, 3), dtype=np.int8)
    values[:] = (-1, 0, 1)
    return _run(enc, values)


def dequantize(enc: EncodedMatrix) -> np.ndarray:
    """The weights of ``enc`` as float32 ``[rows, cols]``: -1 -> a, 0 -> 0, +1 -> b per row (the bf16
    scales, exactly). Raises :class:`CodecError` if ``enc`` is invalid."""
    validate(enc)
    scales = bf16_bits_to_float(np.asarray(enc.scales))
    values = np.zeros((enc.rows, 3), dtype=np.float32)
    values[:, 0] = scales[:, 0]
    values[:, 2] = scales[:, 1]
    return _run(enc, values)

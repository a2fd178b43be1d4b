"""CPU reference for ``y = x @ W.T`` with W in the codec format, decoding on the fly.

W is never materialized: the codewords of each row r are expanded on the fly and only the set bits
of their nonzero masks are visited, accumulating ``y[:, r] = b * sum_{W[r,j]=+1} x[:, j] +
a * sum_{W[r,j]=-1} x[:, j]`` in two float32 vectors of ``tokens`` values. Only the ~11.5% nonzero
weights cost work, as in the GPU kernel's GEMV (FORMAT.md 6.2). The runtime's CPU fallback and the
GPU kernel's tests use it.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.cpython.unsafe.numbers import trailing_zeros

from ._parallel import row_bounds
from .matrix import EncodedMatrix, bf16_bits_to_float, validate

__all__ = ["matmul"]


@numba.njit(cache=True)
def _matmul(lo, hi, xt, codewords, row_offsets, row_class, entry_length, entry_nonzero, entry_negative, scales,
            out):
    """out[r, t] = sum_j W[r, j] xt[j, t] for rows r in [lo, hi).

    xt: float32 [cols, tokens] (x transposed, so each weight's column is one contiguous vector);
    scales: float32 [rows, 2]; out: float32 [rows, tokens]."""
    cols, tokens = xt.shape
    # sums[0] collects x over the row's +1 weights, sums[1] over its -1 weights; indexing by the
    # sign bit instead of branching on it avoids a mispredicted branch per nonzero (signs are random).
    sums = np.empty((2, tokens), dtype=np.float32)
    for r in range(lo, hi):
        k = row_class[r]
        sums[:] = 0.0
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
                side = sums[(neg >> np.uint64(bit)) & np.uint64(1)]
                for t in range(tokens):
                    side[t] += xt[j, t]
                nz &= nz - np.uint64(1)
            col += entry_length[k, c]
        a = scales[r, 0]
        b = scales[r, 1]
        for t in range(tokens):
            out[r, t] = b * sums[0, t] + a * sums[1, t]


@numba.njit(parallel=True, cache=True)
def _matmul_parallel(bounds, xt, codewords, row_offsets, row_class, entry_length, entry_nonzero, entry_negative,
                     scales, out):
    for i in numba.prange(bounds.shape[0] - 1):
        _matmul(bounds[i], bounds[i + 1], xt, codewords, row_offsets, row_class, entry_length, entry_nonzero,
                entry_negative, scales, out)


def matmul(x, enc: EncodedMatrix):
    """``x @ W.T`` for W = :func:`dequantize` (enc), without forming W.

    Args:
        x: float32 or bfloat16 ``[tokens, cols]``, numpy (float32) or torch (any CPU float dtype).
        enc: the encoded ``[rows, cols]`` weight matrix (validated here).

    Returns:
        float32 ``[tokens, rows]``: a torch tensor if ``x`` is one, else a numpy array. Accumulates in
        float32, so it matches a dense float32 matmul of the dequantized weights to rounding.
    """
    is_torch = hasattr(x, "detach")
    if is_torch:
        import torch

        if x.is_floating_point() is False or x.dim() != 2:
            raise ValueError(f"x must be a 2-D float tensor [tokens, cols], got {x.dtype} {tuple(x.shape)}")
        xt = x.detach().to(device="cpu", dtype=torch.float32).numpy().T
    else:
        xn = np.asarray(x)
        if xn.ndim != 2 or xn.dtype.kind != "f":
            raise ValueError(f"x must be a 2-D float array [tokens, cols], got {xn.dtype} {xn.shape}")
        xt = xn.astype(np.float32, copy=False).T
    if xt.shape[0] != enc.cols:
        raise ValueError(f"x has {xt.shape[0]} columns but the matrix has cols = {enc.cols}")
    validate(enc)
    d = enc.dictionary
    xt = np.ascontiguousarray(xt)  # [cols, tokens]
    out = np.empty((enc.rows, xt.shape[1]), dtype=np.float32)  # [rows, tokens]
    args = (xt, np.asarray(enc.codewords), np.asarray(enc.row_offsets), np.asarray(enc.row_class),
            d.entry_length, d.entry_nonzero, d.entry_negative, bf16_bits_to_float(np.asarray(enc.scales)), out)
    # Work grows with the nonzeros (~cols / 8 per row) times the tokens.
    bounds = row_bounds(enc.rows, enc.rows * max(1, enc.cols // 8) * xt.shape[1])
    if bounds is None:
        _matmul(0, enc.rows, *args)
    else:
        _matmul_parallel(bounds, *args)
    y = np.ascontiguousarray(out.T)  # [tokens, rows]
    if is_torch:
        import torch

        return torch.from_numpy(y)
    return y

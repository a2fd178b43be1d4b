"""Encoder (codec/FORMAT.md 3.1, 3.4): ternary int8 matrix -> :class:`EncodedMatrix`.

Rows are independent, so numba encodes them in parallel (``prange``) in one pass: each row is
walked through its class's trie into a per-row scratch line of ``cols`` codewords (a row can never
need more; the untouched tail of the ``np.empty`` scratch is never paged in), then the lines are
compacted behind a prefix sum of the per-row counts. One trie step is one table load, so the walk
costs a few cycles per weight.
"""

from __future__ import annotations

import numba
import numpy as np

from .dictionary import Dictionary, default_dictionary
from .matrix import EncodedMatrix, float_to_bf16_bits

__all__ = ["encode", "CLASS_SELECTIONS"]

CLASS_SELECTIONS = ("estimate", "exact")

_BF16_MINUS_ONE = 0xBF80
_BF16_ONE = 0x3F80


@numba.njit(cache=True)
def _walk_count(row, trie):
    """Codewords a tunstall class needs for one row (the walk of _encode_tunstall, without output)."""
    node = 0
    n = 0
    for j in range(row.shape[0]):
        v = trie[node, row[j] + 1]
        if v < 0:
            n += 1
            node = 0
        else:
            node = v
    return n + (node != 0)


@numba.njit(parallel=True, cache=True)
def _encode_tunstall(ternary, tries, class_cost, exact, row_class, scratch, counts):
    """Encodes every row; returns the first row holding a value outside -1/0/1, or -1.

    tries: int32 [K, nodes, 3] (Dictionary.encoder_tables); class_cost: float64 [K, 3], -log2 of
    each class's design probabilities; row_class, counts: outputs [rows]; scratch: uint16 [rows, cols].
    """
    rows, cols = ternary.shape
    num_classes = tries.shape[0]
    bad = np.full(rows, -1, dtype=np.int64)
    for r in numba.prange(rows):
        row = ternary[r]
        neg = 0
        pos = 0
        for j in range(cols):
            v = row[j]
            if v < -1 or v > 1:
                bad[r] = r
                break
            neg += v == -1
            pos += v == 1
        if bad[r] >= 0:
            continue
        zero = cols - neg - pos
        best = 0
        if num_classes > 1:
            if exact:
                best_n = _walk_count(row, tries[0])
                for k in range(1, num_classes):
                    n = _walk_count(row, tries[k])
                    if n < best_n:
                        best_n = n
                        best = k
            else:
                best_cost = np.inf
                for k in range(num_classes):
                    cost = neg * class_cost[k, 0] + zero * class_cost[k, 1] + pos * class_cost[k, 2]
                    if cost < best_cost:
                        best_cost = cost
                        best = k
        row_class[r] = best
        trie = tries[best]
        out = scratch[r]
        node = 0
        n = 0
        for j in range(cols):
            v = trie[node, row[j] + 1]
            if v < 0:
                out[n] = ~v
                n += 1
                node = 0
            else:
                node = v
        # Row end inside the tree: complete the walk with virtual zeros (FORMAT.md 3.1).
        while node != 0:
            v = trie[node, 1]
            if v < 0:
                out[n] = ~v
                n += 1
                node = 0
            else:
                node = v
        counts[r] = n
    for r in range(rows):
        if bad[r] >= 0:
            return r
    return -1


@numba.njit(parallel=True, cache=True)
def _encode_pairs(ternary, children, node_code, scratch, counts):
    """Greedy longest match over symbol pairs (qmoe-pairs mode, FORMAT.md 3.1); odd widths end with
    a virtual zero. children: int32 [nodes, 9] (0 = no child), node_code: int32 [nodes]. Returns the
    first row holding a value outside -1/0/1, or -1."""
    rows, cols = ternary.shape
    bad = np.full(rows, -1, dtype=np.int64)
    for r in numba.prange(rows):
        row = ternary[r]
        for j in range(cols):
            if row[j] < -1 or row[j] > 1:
                bad[r] = r
                break
        if bad[r] >= 0:
            continue
        out = scratch[r]
        node = 0
        n = 0
        for j in range(0, cols, 2):
            second = row[j + 1] if j + 1 < cols else 0
            p = 3 * (row[j] + 1) + second + 1
            nxt = children[node, p]
            if nxt == 0:
                out[n] = node_code[node]
                n += 1
                nxt = children[0, p]
            node = nxt
        out[n] = node_code[node]
        counts[r] = n + 1
    for r in range(rows):
        if bad[r] >= 0:
            return r
    return -1


@numba.njit(parallel=True, cache=True)
def _compact(scratch, counts, offsets, codewords):
    for r in numba.prange(counts.shape[0]):
        start = offsets[r]
        for i in range(counts[r]):
            codewords[start + i] = scratch[r, i]


def _scales_bits(scales, rows):
    if scales is None:
        bits = np.empty((rows, 2), dtype=np.uint16)
        bits[:, 0] = _BF16_MINUS_ONE
        bits[:, 1] = _BF16_ONE
        return bits
    if hasattr(scales, "detach"):
        scales = scales.detach().float().cpu().numpy()
    s = np.asarray(scales)
    if s.shape != (rows, 2) or s.dtype.kind != "f":
        raise ValueError(f"scales must be a float array of shape ({rows}, 2), got {s.dtype} {s.shape}")
    bits = float_to_bf16_bits(s)
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    bad = ~(np.isfinite(back).all(axis=1) & (back[:, 0] <= 0) & (back[:, 1] >= 0))
    if bad.any():
        r = int(np.argmax(bad))
        raise ValueError(f"scales row {r}: (a, b) = ({s[r, 0]}, {s[r, 1]}) must be finite in bf16 with a <= 0 <= b")
    return bits


def encode(ternary, scales=None, dictionary: Dictionary | None = None,
           class_selection: str = "estimate") -> EncodedMatrix:
    """Encodes a ternary matrix.

    Args:
        ternary: int8 ``[rows, cols]`` (numpy or torch) holding -1/0/1; ``cols >= 1``.
        scales: optional float ``[rows, 2]`` per-row (a, b) with a <= 0 <= b, stored as bf16
            (round to nearest even); default a = -1, b = +1.
        dictionary: a :class:`Dictionary`; default :func:`default_dictionary`.
        class_selection: ``"estimate"`` picks each row's class by cross-entropy of its symbol counts,
            ``"exact"`` by the shortest encoding (FORMAT.md 3.4; K extra trie walks per row).

    Returns:
        :class:`EncodedMatrix`. Raises ValueError on a wrong dtype/shape, a value outside -1/0/1
        (naming the row) or bad scales.
    """
    if hasattr(ternary, "detach"):
        ternary = ternary.detach().cpu().numpy()
    t = np.asarray(ternary)
    if t.ndim != 2 or t.dtype != np.int8:
        raise ValueError(f"ternary must be an int8 array of shape (rows, cols), got {t.dtype} {t.shape}")
    rows, cols = t.shape
    if cols < 1:
        raise ValueError(f"ternary must have at least one column, got shape {t.shape}")
    if class_selection not in CLASS_SELECTIONS:
        raise ValueError(f"class_selection must be one of {CLASS_SELECTIONS}, got {class_selection!r}")
    dictionary = default_dictionary() if dictionary is None else dictionary
    if not isinstance(dictionary, Dictionary):
        raise ValueError(f"dictionary must be a codec Dictionary, got {type(dictionary).__name__}")
    scale_bits = _scales_bits(scales, rows)
    t = np.ascontiguousarray(t)
    counts = np.empty(rows, dtype=np.int64)
    row_class = np.zeros(rows, dtype=np.uint8)
    tables = dictionary.encoder_tables()
    if dictionary.mode == "tunstall":
        scratch = np.empty((rows, cols), dtype=np.uint16)
        class_cost = -np.log2(dictionary.class_probabilities)
        bad = _encode_tunstall(t, tables, class_cost, class_selection == "exact", row_class, scratch, counts)
    else:
        scratch = np.empty((rows, (cols + 1) // 2), dtype=np.uint16)
        bad = _encode_pairs(t, tables[0][0], tables[1][0], scratch, counts)
    if bad >= 0:
        raise ValueError(f"ternary row {bad} holds values outside -1/0/1")
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] > (1 << 31) - 1:
        raise ValueError(f"matrix needs {offsets[-1]} codewords, more than the format's 2^31 - 1; split it")
    codewords = np.empty(int(offsets[-1]), dtype=np.uint16)
    _compact(scratch, counts, offsets, codewords)
    return EncodedMatrix(rows, cols, codewords, offsets.astype(np.uint32), row_class, scale_bits, dictionary)

"""Encoder (codec/FORMAT.md 3.1, 3.4): ternary int8 matrix -> :class:`EncodedMatrix`.

Rows are independent, so numba encodes them in parallel (row chunks over threads, see
``_parallel``) in one pass: each row is walked through its class's trie into a per-row scratch
line of ``cols`` codewords (a row never needs more, as every codeword consumes at least one symbol
before the row end; the untouched tail of the ``np.empty`` scratch is never paged in), then the
lines are compacted behind a prefix sum of the per-row counts. One trie step is one table load.
"""

from __future__ import annotations

import numba
import numpy as np

from ._parallel import row_bounds
from .dictionary import Dictionary, default_dictionary
from .matrix import EncodedMatrix, float_to_bf16_bits

__all__ = ["encode", "CLASS_SELECTIONS"]

CLASS_SELECTIONS = ("estimate", "exact")

_BF16_MINUS_ONE = 0xBF80
_BF16_ONE = 0x3F80


@numba.njit(cache=True)
def _walk_count(row, trie):
    """Codewords a tunstall class needs for one row (the walk of _walk, without output)."""
    node = 0
    n = 0
    for j in range(row.shape[0]):
        v = trie[node, row[j] + 1]
        n += v < 0
        node = max(v, 0)
    return n + (node != 0)


@numba.njit(cache=True)
def _finish(trie, node, out, n):
    """Completes a walk that stopped inside the tree with virtual zeros (FORMAT.md 3.1)."""
    while node != 0:
        v = trie[node, 1]
        out[n] = ~v
        n += v < 0
        node = max(v, 0)
    return n


# The walk is a chain of dependent table loads (next node = trie[node, symbol]), so one row at a
# time is bound by load latency. Walking four rows in lockstep gives the core four independent
# chains; the step is branchless (a leaf's codeword is stored unconditionally and overwritten
# unless the count advances), which measured ~3x faster per core than the plain loop.
@numba.njit(cache=True)
def _walk(row, trie, out):
    node = 0
    n = 0
    for j in range(row.shape[0]):
        v = trie[node, row[j] + 1]
        out[n] = ~v
        n += v < 0
        node = max(v, 0)
    return _finish(trie, node, out, n)


@numba.njit(cache=True)
def _walk4(r0, r1, r2, r3, t0, t1, t2, t3, o0, o1, o2, o3, counts):
    a0 = a1 = a2 = a3 = 0
    n0 = n1 = n2 = n3 = 0
    for j in range(r0.shape[0]):
        v0 = t0[a0, r0[j] + 1]
        v1 = t1[a1, r1[j] + 1]
        v2 = t2[a2, r2[j] + 1]
        v3 = t3[a3, r3[j] + 1]
        o0[n0] = ~v0
        o1[n1] = ~v1
        o2[n2] = ~v2
        o3[n3] = ~v3
        n0 += v0 < 0
        n1 += v1 < 0
        n2 += v2 < 0
        n3 += v3 < 0
        a0 = max(v0, 0)
        a1 = max(v1, 0)
        a2 = max(v2, 0)
        a3 = max(v3, 0)
    counts[0] = _finish(t0, a0, o0, n0)
    counts[1] = _finish(t1, a1, o1, n1)
    counts[2] = _finish(t2, a2, o2, n2)
    counts[3] = _finish(t3, a3, o3, n3)


@numba.njit(cache=True)
def _choose_class(row, tries, class_cost, exact):
    """(class, valid): the row's class (FORMAT.md 3.4) and whether all its values are -1/0/1."""
    neg = 0
    pos = 0
    bad = False
    for j in range(row.shape[0]):
        v = row[j]
        neg += v == -1
        pos += v == 1
        bad |= (v < -1) | (v > 1)
    if bad:
        return 0, False
    zero = row.shape[0] - neg - pos
    best = 0
    if tries.shape[0] > 1:
        if exact:
            best_n = _walk_count(row, tries[0])
            for k in range(1, tries.shape[0]):
                n = _walk_count(row, tries[k])
                if n < best_n:
                    best_n = n
                    best = k
        else:
            best_cost = np.inf
            for k in range(tries.shape[0]):
                cost = neg * class_cost[k, 0] + zero * class_cost[k, 1] + pos * class_cost[k, 2]
                if cost < best_cost:
                    best_cost = cost
                    best = k
    return best, True


@numba.njit(cache=True)
def _encode_tunstall(lo, hi, ternary, tries, class_cost, exact, row_class, scratch, counts, bad):
    """Encodes rows [lo, hi) (lo a multiple of 4) in groups of four; flags rows holding a value
    outside -1/0/1 in bad (and skips their group).

    tries: int32 [K, nodes, 3] (Dictionary.encoder_tables); class_cost: float64 [K, 3], -log2 of
    each class's design probabilities; row_class, counts, bad: outputs [rows]; scratch: uint16
    [rows, cols].
    """
    for first in range(lo, hi, 4):
        last = min(first + 4, hi)
        valid = True
        for r in range(first, last):
            k, ok = _choose_class(ternary[r], tries, class_cost, exact)
            row_class[r] = k
            bad[r] = not ok
            valid &= ok
        if not valid:
            continue
        if last - first == 4:
            _walk4(ternary[first], ternary[first + 1], ternary[first + 2], ternary[first + 3],
                   tries[row_class[first]], tries[row_class[first + 1]], tries[row_class[first + 2]],
                   tries[row_class[first + 3]], scratch[first], scratch[first + 1], scratch[first + 2],
                   scratch[first + 3], counts[first:last])
        else:
            for r in range(first, last):
                counts[r] = _walk(ternary[r], tries[row_class[r]], scratch[r])


@numba.njit(parallel=True, cache=True)
def _encode_tunstall_parallel(bounds, ternary, tries, class_cost, exact, row_class, scratch, counts, bad):
    for i in numba.prange(bounds.shape[0] - 1):
        _encode_tunstall(bounds[i], bounds[i + 1], ternary, tries, class_cost, exact, row_class, scratch,
                         counts, bad)


@numba.njit(cache=True)
def _encode_pairs(lo, hi, ternary, children, node_code, scratch, counts, bad):
    """Greedy longest match over symbol pairs (qmoe-pairs mode, FORMAT.md 3.1) for rows [lo, hi);
    odd widths end with a virtual zero. children: int32 [nodes, 9] (0 = no child), node_code: int32
    [nodes]. Rows holding a value outside -1/0/1 are flagged in bad and skipped."""
    cols = ternary.shape[1]
    for r in range(lo, hi):
        row = ternary[r]
        invalid = False
        for j in range(cols):
            invalid |= (row[j] < -1) | (row[j] > 1)
        bad[r] = invalid
        if invalid:
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


@numba.njit(parallel=True, cache=True)
def _encode_pairs_parallel(bounds, ternary, children, node_code, scratch, counts, bad):
    for i in numba.prange(bounds.shape[0] - 1):
        _encode_pairs(bounds[i], bounds[i + 1], ternary, children, node_code, scratch, counts, bad)


@numba.njit(cache=True)
def _compact(lo, hi, scratch, counts, offsets, codewords):
    for r in range(lo, hi):
        start = offsets[r]
        for i in range(counts[r]):
            codewords[start + i] = scratch[r, i]


@numba.njit(parallel=True, cache=True)
def _compact_parallel(bounds, scratch, counts, offsets, codewords):
    for i in numba.prange(bounds.shape[0] - 1):
        _compact(bounds[i], bounds[i + 1], scratch, counts, offsets, codewords)


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
    bad = np.zeros(rows, dtype=np.bool_)
    tables = dictionary.encoder_tables()
    bounds = row_bounds(rows, t.size, align=4)
    if dictionary.mode == "tunstall":
        scratch = np.empty((rows, cols), dtype=np.uint16)
        args = (t, tables, -np.log2(dictionary.class_probabilities), class_selection == "exact", row_class,
                scratch, counts, bad)
        if bounds is None:
            _encode_tunstall(0, rows, *args)
        else:
            _encode_tunstall_parallel(bounds, *args)
    else:
        scratch = np.empty((rows, (cols + 1) // 2), dtype=np.uint16)
        args = (t, tables[0][0], tables[1][0], scratch, counts, bad)
        if bounds is None:
            _encode_pairs(0, rows, *args)
        else:
            _encode_pairs_parallel(bounds, *args)
    if bad.any():
        raise ValueError(f"ternary row {int(np.argmax(bad))} holds values outside -1/0/1")
    offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] > (1 << 31) - 1:
        raise ValueError(f"matrix needs {offsets[-1]} codewords, more than the format's 2^31 - 1; split it")
    codewords = np.empty(int(offsets[-1]), dtype=np.uint16)
    if bounds is None:
        _compact(0, rows, scratch, counts, offsets, codewords)
    else:
        _compact_parallel(bounds, scratch, counts, offsets, codewords)
    return EncodedMatrix(rows, cols, codewords, offsets.astype(np.uint32), row_class, scale_bits, dictionary)

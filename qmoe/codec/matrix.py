"""Encoded matrices (codec/FORMAT.md 2.2, 2.4): container, validation, layer packing, bit accounting."""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from ._parallel import row_bounds
from .dictionary import Dictionary
from .errors import CodecError

__all__ = [
    "EncodedMatrix",
    "validate",
    "pack_layer",
    "unpack_expert",
    "bits_report",
    "float_to_bf16_bits",
    "bf16_bits_to_float",
    "C2048_EXPERT_WEIGHTS",
]

# Expert weights of switch-c-2048: 30 sparse blocks x 2048 experts x 2 matrices of 2080 x 6144.
C2048_EXPERT_WEIGHTS = 30 * 2048 * 2 * 2080 * 6144

_MAX_OFFSET = (1 << 31) - 1


def float_to_bf16_bits(x) -> np.ndarray:
    """float32/float64 array -> uint16 bf16 bit patterns, rounding to nearest even (as torch does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def bf16_bits_to_float(bits) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


@dataclass(eq=False)
class EncodedMatrix:
    """One ternary matrix ``rows x cols`` in the codec format (FORMAT.md 2.2).

    Attributes:
        rows, cols: the decoded shape (``cols >= 1``, ``rows >= 0``).
        codewords: uint16 ``[n]``, all rows' codewords in row order.
        row_offsets: uint32 ``[rows + 1]``, row r owns ``codewords[row_offsets[r]:row_offsets[r+1]]``.
        row_class: uint8 ``[rows]``, dictionary class per row.
        scales: uint16 ``[rows, 2]``, bf16 bit patterns of (a, b), a <= 0 <= b.
        dictionary: the shared :class:`Dictionary` (not counted in ``nbytes``).
    """

    rows: int
    cols: int
    codewords: np.ndarray
    row_offsets: np.ndarray
    row_class: np.ndarray
    scales: np.ndarray
    dictionary: Dictionary

    @property
    def nbytes(self) -> int:
        """Every byte needed to decode this matrix except the shared dictionary."""
        return int(self.codewords.nbytes + self.row_offsets.nbytes + self.row_class.nbytes + self.scales.nbytes)

    @property
    def shape(self):
        return (self.rows, self.cols)

    def scales_float(self) -> np.ndarray:
        """float32 ``[rows, 2]`` (a, b) per row."""
        return bf16_bits_to_float(self.scales)

    def __repr__(self):
        return (f"EncodedMatrix({self.rows}x{self.cols}, {self.codewords.shape[0]} codewords, "
                f"{8 * self.nbytes / max(1, self.rows * self.cols):.4f} bits/weight, {self.dictionary!r})")


def _array(value, dtype, shape, name):
    a = np.asarray(value)
    if a.dtype != np.dtype(dtype):
        raise CodecError(f"{name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.shape != shape:
        raise CodecError(f"{name} has shape {a.shape}, expected {shape}")
    return np.ascontiguousarray(a)


@numba.njit(cache=True)
def _check_rows(lo, hi, codewords, row_offsets, row_class, entry_length, entry_count, cols, status, bad_codeword):
    """For rows r in [lo, hi): status[r] = -1 if the row obeys FORMAT.md 2.2 rules 3-4, else a reason
    code (the offending codeword index goes to bad_codeword[r]). Offsets and classes are checked
    before this runs."""
    for r in range(lo, hi):
        k = row_class[r]
        start = np.int64(row_offsets[r])
        end = np.int64(row_offsets[r + 1])
        count = entry_count[k]
        covered = np.int64(0)
        for i in range(start, end):
            c = np.int64(codewords[i])
            if c >= count:
                status[r] = 1
                bad_codeword[r] = i
                break
            if covered >= cols:
                status[r] = 2
                bad_codeword[r] = i
                break
            covered += entry_length[k, c]
        if status[r] < 0 and covered < cols:
            status[r] = 3


@numba.njit(parallel=True, cache=True)
def _check_rows_parallel(bounds, codewords, row_offsets, row_class, entry_length, entry_count, cols, status,
                         bad_codeword):
    for i in numba.prange(bounds.shape[0] - 1):
        _check_rows(bounds[i], bounds[i + 1], codewords, row_offsets, row_class, entry_length, entry_count, cols,
                    status, bad_codeword)


def validate(enc: EncodedMatrix) -> None:
    """Checks every invariant of FORMAT.md 2.2 on ``enc``; raises :class:`CodecError` naming the array,
    row and codeword that is wrong. Never reads out of bounds, whatever the arrays hold."""
    if not isinstance(enc, EncodedMatrix):
        raise CodecError(f"expected an EncodedMatrix, got {type(enc).__name__}")
    if not isinstance(enc.dictionary, Dictionary):
        raise CodecError("EncodedMatrix.dictionary is not a codec Dictionary")
    rows, cols = enc.rows, enc.cols
    if not (isinstance(rows, (int, np.integer)) and isinstance(cols, (int, np.integer))) or rows < 0 or cols < 1:
        raise CodecError(f"matrix shape must be rows >= 0, cols >= 1 integers, got ({rows!r}, {cols!r})")
    rows, cols = int(rows), int(cols)
    codewords = np.asarray(enc.codewords)
    if codewords.dtype != np.uint16 or codewords.ndim != 1:
        raise CodecError(f"codewords must be a 1-D uint16 array, got {codewords.dtype} {codewords.shape}")
    offsets = _array(enc.row_offsets, np.uint32, (rows + 1,), "row_offsets")
    row_class = _array(enc.row_class, np.uint8, (rows,), "row_class")
    scales = _array(enc.scales, np.uint16, (rows, 2), "scales")
    n = codewords.shape[0]
    if offsets[0] != 0:
        raise CodecError(f"row_offsets[0] is {offsets[0]}, expected 0")
    if offsets[-1] != n:
        raise CodecError(f"row_offsets[{rows}] is {offsets[-1]} but there are {n} codewords")
    if n > _MAX_OFFSET:
        raise CodecError(f"{n} codewords exceed the format's limit of 2^31 - 1")
    steps = np.diff(offsets.astype(np.int64))
    if rows and steps.min() < 1:
        r = int(np.argmax(steps < 1))
        raise CodecError(f"row {r}: row_offsets {offsets[r]} -> {offsets[r + 1]} do not increase "
                         f"(every row needs at least one codeword)")
    d = enc.dictionary
    if rows and row_class.max() >= d.num_classes:
        r = int(np.argmax(row_class >= d.num_classes))
        raise CodecError(f"row {r}: row_class {row_class[r]} but the dictionary has {d.num_classes} classes")
    if rows:
        bad_codeword = np.zeros(rows, dtype=np.int64)
        status = np.full(rows, -1, dtype=np.int8)
        args = (codewords, offsets, row_class, d.entry_length, d.entry_count, cols, status, bad_codeword)
        # Validation touches each codeword once; ~24 weights per codeword at typical sparsity.
        bounds = row_bounds(rows, 24 * n)
        if bounds is None:
            _check_rows(0, rows, *args)
        else:
            _check_rows_parallel(bounds, *args)
        if status.max() >= 0:
            r = int(np.argmax(status >= 0))
            k = int(row_class[r])
            i = int(bad_codeword[r])
            if status[r] == 1:
                raise CodecError(f"row {r}: codeword {i} has value {codewords[i]}, outside class {k}'s "
                                 f"{d.entry_count[k]} entries")
            if status[r] == 2:
                raise CodecError(f"row {r}: codeword {i} starts past the row end (cols = {cols}); "
                                 f"lengths inconsistent with row_offsets")
            raise CodecError(f"row {r}: its codewords cover fewer than cols = {cols} symbols")
        a, b = bf16_bits_to_float(scales[:, 0]), bf16_bits_to_float(scales[:, 1])
        bad = ~(np.isfinite(a) & np.isfinite(b) & (a <= 0) & (b >= 0))
        if bad.any():
            r = int(np.argmax(bad))
            raise CodecError(f"row {r}: scales (a, b) = ({a[r]}, {b[r]}) must be finite with a <= 0 <= b")


def pack_layer(matrices) -> dict:
    """Packs E encoded matrices of one MoE layer (same shape, same dictionary) into the layer layout
    of FORMAT.md 2.4.

    Returns a dict of numpy arrays: ``codewords`` uint16 [total], ``expert_offsets`` int64 [E+1],
    ``row_offsets`` uint32 [E, rows+1], ``row_class`` uint8 [E, rows], ``scales`` uint16 [E, rows, 2],
    ``shape`` int64 [2] = (rows, cols), ``dictionary_fingerprint`` uint8 [32] (SHA-256 digest).
    """
    matrices = list(matrices)
    if not matrices:
        raise ValueError("pack_layer needs at least one encoded matrix")
    first = matrices[0]
    for e, m in enumerate(matrices):
        if not isinstance(m, EncodedMatrix):
            raise ValueError(f"expert {e}: expected an EncodedMatrix, got {type(m).__name__}")
        if m.shape != first.shape:
            raise ValueError(f"expert {e}: shape {m.shape} differs from expert 0's {first.shape}")
        if m.dictionary.fingerprint != first.dictionary.fingerprint:
            raise ValueError(f"expert {e}: encoded with a different dictionary than expert 0")
    counts = np.array([m.codewords.shape[0] for m in matrices], dtype=np.int64)
    expert_offsets = np.zeros(len(matrices) + 1, dtype=np.int64)
    np.cumsum(counts, out=expert_offsets[1:])
    return {
        "codewords": np.concatenate([m.codewords for m in matrices]).astype(np.uint16, copy=False),
        "expert_offsets": expert_offsets,
        "row_offsets": np.stack([m.row_offsets for m in matrices]),
        "row_class": np.stack([m.row_class for m in matrices]),
        "scales": np.stack([m.scales for m in matrices]),
        "shape": np.array(first.shape, dtype=np.int64),
        "dictionary_fingerprint": np.frombuffer(bytes.fromhex(first.dictionary.fingerprint), dtype=np.uint8).copy(),
    }


def unpack_expert(layer: dict, e: int, dictionary: Dictionary | None = None) -> EncodedMatrix:
    """Expert ``e`` of a packed layer (see :func:`pack_layer`) as a validated :class:`EncodedMatrix`.

    ``dictionary`` defaults to :func:`default_dictionary`; its fingerprint must match the layer's.
    Raises :class:`CodecError` on inconsistent arrays or a dictionary mismatch.
    """
    from .dictionary import default_dictionary

    dictionary = default_dictionary() if dictionary is None else dictionary
    for name in ("codewords", "expert_offsets", "row_offsets", "row_class", "scales", "shape",
                 "dictionary_fingerprint"):
        if name not in layer:
            raise CodecError(f"layer is missing array {name!r}")
    fingerprint = bytes(np.asarray(layer["dictionary_fingerprint"], dtype=np.uint8)).hex()
    if fingerprint != dictionary.fingerprint:
        raise CodecError(f"layer was encoded with dictionary {fingerprint[:12]}..., "
                         f"given {dictionary.fingerprint[:12]}...")
    shape = np.asarray(layer["shape"])
    if shape.shape != (2,):
        raise CodecError(f"layer shape array must hold (rows, cols), got {shape!r}")
    rows, cols = int(shape[0]), int(shape[1])
    expert_offsets = np.asarray(layer["expert_offsets"])
    num_experts = expert_offsets.shape[0] - 1 if expert_offsets.ndim == 1 else -1
    if num_experts < 1 or expert_offsets.dtype != np.int64:
        raise CodecError(f"expert_offsets must be int64 [E+1], got {expert_offsets.dtype} {expert_offsets.shape}")
    if not 0 <= e < num_experts:
        raise CodecError(f"expert {e} out of range: the layer has {num_experts} experts")
    codewords = np.asarray(layer["codewords"])
    start, end = int(expert_offsets[e]), int(expert_offsets[e + 1])
    if not 0 <= start <= end <= codewords.shape[0]:
        raise CodecError(f"expert {e}: expert_offsets [{start}, {end}) outside the {codewords.shape[0]} codewords")
    for name, shp in (("row_offsets", (num_experts, rows + 1)), ("row_class", (num_experts, rows)),
                      ("scales", (num_experts, rows, 2))):
        if np.asarray(layer[name]).shape != shp:
            raise CodecError(f"layer {name} has shape {np.asarray(layer[name]).shape}, expected {shp}")
    enc = EncodedMatrix(rows, cols, codewords[start:end], np.asarray(layer["row_offsets"])[e],
                        np.asarray(layer["row_class"])[e], np.asarray(layer["scales"])[e], dictionary)
    validate(enc)
    return enc


def bits_report(encoded, dictionary_amortized_over: int = C2048_EXPERT_WEIGHTS) -> dict:
    """Bits per weight of one encoded matrix or a list of them, by component.

    Args:
        encoded: an :class:`EncodedMatrix` or a list of them (same dictionary).
        dictionary_amortized_over: number of weights that share the dictionary (default: every
            expert weight of switch-c-2048); 0 leaves the dictionary out.

    Returns:
        dict with ``weights`` (count), per-weight bits ``codewords``, ``row_offsets``, ``row_class``,
        ``scales``, ``dictionary`` and ``total``, and ``matrix_bytes`` (sum of ``nbytes``).
    """
    matrices = [encoded] if isinstance(encoded, EncodedMatrix) else list(encoded)
    if not matrices:
        raise ValueError("bits_report needs at least one encoded matrix")
    weights = sum(m.rows * m.cols for m in matrices)
    if weights == 0:
        raise ValueError("bits_report: the matrices hold no weights")
    per = lambda nbytes: 8.0 * nbytes / weights  # noqa: E731
    report = {
        "weights": weights,
        "codewords": per(sum(m.codewords.nbytes for m in matrices)),
        "row_offsets": per(sum(m.row_offsets.nbytes for m in matrices)),
        "row_class": per(sum(m.row_class.nbytes for m in matrices)),
        "scales": per(sum(m.scales.nbytes for m in matrices)),
        "dictionary": (8.0 * matrices[0].dictionary.nbytes / dictionary_amortized_over
                       if dictionary_amortized_over else 0.0),
        "matrix_bytes": sum(m.nbytes for m in matrices),
    }
    report["total"] = sum(report[k] for k in ("codewords", "row_offsets", "row_class", "scales", "dictionary"))
    return report

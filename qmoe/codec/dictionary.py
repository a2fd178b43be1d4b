"""Codec dictionaries (codec/FORMAT.md sections 2.1, 2.3, 3, 4): construction, fitting, validation.

A :class:`Dictionary` holds ``K`` classes of up to 65536 entries; entry ``(k, c)`` is a run of
``entry_length[k, c]`` ternary symbols described by two bit masks (nonzero, negative; bit 0 = first
symbol). Two modes share the layout:

* ``"tunstall"``: each class a complete Tunstall tree for i.i.d. symbols with the class's design
  probabilities (:func:`tunstall_class`), :func:`default_dictionary` and :func:`fit_dictionary`.
* ``"qmoe-pairs"``: QMoE's static pair dictionary (:func:`qmoe_dictionary`), for comparison.

The encoder's tries are rebuilt from the entry tables (:meth:`Dictionary.encoder_tables`), so a
dictionary loaded from disk encodes exactly like the one that was built.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct

import numba
import numpy as np

from .errors import CodecError

__all__ = [
    "FORMAT_VERSION",
    "SLOTS",
    "MAX_LENGTH",
    "MAX_NONZERO",
    "MAX_CLASSES",
    "DEFAULT_CLASS_ZERO_PROBABILITIES",
    "Dictionary",
    "tunstall_class",
    "default_dictionary",
    "qmoe_dictionary",
    "fit_dictionary",
    "row_symbol_counts",
]

FORMAT_VERSION = 1
SLOTS = 1 << 16  # codewords are uint16
MAX_LENGTH = 64  # symbols per entry: one uint64 mask
MAX_NONZERO = 32  # nonzero symbols per entry: a GPU lane's compacted sign bits fit in 32 bits
MAX_CLASSES = 16
MODES = ("tunstall", "qmoe-pairs")

# P(0) of the default dictionary's classes, each with P(-1) = P(+1). Chosen by
# benchmarks/bits_per_param.py (FORMAT.md section 5): they span GPTQ ternary sparsities from the
# optimized grid (~45% zeros) to min/max grids on sparse rows (~95%).
DEFAULT_CLASS_ZERO_PROBABILITIES = (0.55, 0.72, 0.81, 0.85, 0.875, 0.895, 0.915, 0.945)

QMOE_ZERO_PROBABILITY = 0.885
QMOE_MAX_PAIRS = 14

_ENTRY_TENSORS = ("entry_length", "entry_nonzero", "entry_negative", "entry_count")


class Dictionary:
    """``K`` classes of codec entries (FORMAT.md 2.1), validated on construction.

    Attributes:
        mode: ``"tunstall"`` or ``"qmoe-pairs"``.
        entry_length: uint8 ``[K, 65536]``, symbols per entry (0 = unused slot).
        entry_nonzero: uint64 ``[K, 65536]``, bit i set iff symbol i of the run is nonzero.
        entry_negative: uint64 ``[K, 65536]``, bit i set iff symbol i is -1.
        entry_count: int32 ``[K]``, entries of class k are codewords ``0..entry_count[k]-1``.
        class_probabilities: float64 ``[K, 3]``, design (p_-1, p_0, p_+1) per class; the encoder's
            class estimate uses them, decoding does not.
        max_length: longest entry the construction allowed (informational).
    """

    def __init__(self, mode, entry_length, entry_nonzero, entry_negative, entry_count,
                 class_probabilities, max_length=MAX_LENGTH):
        if mode not in MODES:
            raise CodecError(f"dictionary mode {mode!r} is not one of {MODES}")
        self.mode = mode
        self.entry_length = np.ascontiguousarray(entry_length, dtype=np.uint8)
        self.entry_nonzero = _as_mask(entry_nonzero)
        self.entry_negative = _as_mask(entry_negative)
        self.entry_count = np.ascontiguousarray(entry_count, dtype=np.int32)
        self.class_probabilities = np.ascontiguousarray(class_probabilities, dtype=np.float64)
        self.max_length = int(max_length)
        self._validate()
        self.fingerprint = self._fingerprint()
        self._tables = None

    @property
    def num_classes(self) -> int:
        return int(self.entry_count.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tables (the safetensors payload, without its JSON header)."""
        return int(self.entry_length.nbytes + self.entry_nonzero.nbytes
                   + self.entry_negative.nbytes + self.entry_count.nbytes)

    def __repr__(self):
        return (f"Dictionary(mode={self.mode!r}, num_classes={self.num_classes}, "
                f"fingerprint={self.fingerprint[:12]}...)")

    def _validate(self):
        k = self.entry_count.shape[0] if self.entry_count.ndim == 1 else -1
        if not 1 <= k <= MAX_CLASSES:
            raise CodecError(f"dictionary entry_count must have shape [K] with 1 <= K <= {MAX_CLASSES}, "
                             f"got {self.entry_count.shape}")
        for name in ("entry_length", "entry_nonzero", "entry_negative"):
            if getattr(self, name).shape != (k, SLOTS):
                raise CodecError(f"dictionary {name} must have shape [{k}, {SLOTS}], "
                                 f"got {getattr(self, name).shape}")
        if self.class_probabilities.shape != (k, 3):
            raise CodecError(f"dictionary class_probabilities must have shape [{k}, 3], "
                             f"got {self.class_probabilities.shape}")
        if not (np.all(self.class_probabilities > 0) and np.all(self.class_probabilities < 1)):
            raise CodecError("dictionary class_probabilities must lie strictly between 0 and 1")
        bad = _check_entries(self.entry_length, self.entry_nonzero, self.entry_negative, self.entry_count)
        if bad[0] >= 0:
            cls, slot, what = bad
            reasons = {
                0: f"entry_count[{cls}] = {self.entry_count[cls]} is outside 1..{SLOTS}",
                1: f"entry ({cls}, {slot}) has length {self.entry_length[cls, slot]}, expected 1..{MAX_LENGTH}",
                2: f"entry ({cls}, {slot}) has mask bits at or beyond its length {self.entry_length[cls, slot]}",
                3: f"entry ({cls}, {slot}) has a negative bit where the symbol is zero",
                4: f"entry ({cls}, {slot}) has more than {MAX_NONZERO} nonzero symbols",
                5: f"unused slot ({cls}, {slot}) (>= entry_count) is not all zero",
            }
            raise CodecError(f"invalid dictionary: {reasons[what]}")

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(b"qmoe-codec-v1\0" + self.mode.encode() + b"\0")
        h.update(struct.pack("<I", self.num_classes))
        for k in range(self.num_classes):
            h.update(struct.pack("<i", int(self.entry_count[k])))
            h.update(self.entry_length[k].tobytes())
            h.update(self.entry_nonzero[k].astype("<u8").tobytes())
            h.update(self.entry_negative[k].astype("<u8").tobytes())
        return h.hexdigest()

    def metadata(self) -> dict:
        """The JSON metadata object of FORMAT.md 2.3."""
        return {
            "format_version": FORMAT_VERSION,
            "mode": self.mode,
            "num_classes": self.num_classes,
            "max_length": self.max_length,
            "class_probabilities": self.class_probabilities.tolist(),
            "fingerprint": self.fingerprint,
        }

    def to_tensors(self):
        """Returns ``(tensors, metadata)``: numpy arrays and a ``{"qmoe_codec": json}`` str dict, ready
        for ``safetensors.numpy.save_file(tensors, path, metadata=metadata)``. The masks are int64
        views of the uint64 bit patterns (FORMAT.md 2.1)."""
        tensors = {
            "entry_length": self.entry_length,
            "entry_nonzero": self.entry_nonzero.view(np.int64),
            "entry_negative": self.entry_negative.view(np.int64),
            "entry_count": self.entry_count,
        }
        return tensors, {"qmoe_codec": json.dumps(self.metadata(), sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors, metadata) -> "Dictionary":
        """Inverse of :meth:`to_tensors`. ``tensors`` maps names to numpy arrays or torch tensors;
        ``metadata`` is the safetensors metadata dict (or the decoded JSON object). Raises
        :class:`CodecError` on a wrong version, missing tensor, bad table or fingerprint mismatch."""
        if isinstance(metadata, dict) and "qmoe_codec" in metadata:
            metadata = metadata["qmoe_codec"]
        if isinstance(metadata, (str, bytes)):
            try:
                metadata = json.loads(metadata)
            except json.JSONDecodeError as exc:
                raise CodecError(f"dictionary metadata is not valid JSON: {exc}") from None
        if not isinstance(metadata, dict):
            raise CodecError("dictionary metadata must be a JSON object")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise CodecError(f"dictionary format_version {metadata.get('format_version')!r} is not "
                             f"supported (expected {FORMAT_VERSION})")
        arrays = {}
        for name in _ENTRY_TENSORS:
            if name not in tensors:
                raise CodecError(f"dictionary tensor {name!r} is missing")
            t = tensors[name]
            arrays[name] = t.numpy() if hasattr(t, "numpy") else np.asarray(t)
        expected = {"entry_length": ("uint8",), "entry_nonzero": ("int64", "uint64"),
                    "entry_negative": ("int64", "uint64"), "entry_count": ("int32",)}
        for name, dtypes in expected.items():
            if arrays[name].dtype.name not in dtypes:
                raise CodecError(f"dictionary tensor {name!r} has dtype {arrays[name].dtype}, "
                                 f"expected {' or '.join(dtypes)}")
        try:
            d = cls(metadata["mode"], arrays["entry_length"], arrays["entry_nonzero"],
                    arrays["entry_negative"], arrays["entry_count"], metadata["class_probabilities"],
                    metadata.get("max_length", MAX_LENGTH))
        except KeyError as exc:
            raise CodecError(f"dictionary metadata lacks {exc}") from None
        if "fingerprint" in metadata and metadata["fingerprint"] != d.fingerprint:
            raise CodecError(f"dictionary fingerprint mismatch: metadata says {metadata['fingerprint']}, "
                             f"tables hash to {d.fingerprint}")
        return d

    def save(self, path):
        """Writes ``dictionary.safetensors`` (FORMAT.md 2.3) to ``path``."""
        from safetensors.numpy import save_file

        tensors, metadata = self.to_tensors()
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path) -> "Dictionary":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if "qmoe_codec" not in metadata:
            raise CodecError(f"{path}: no 'qmoe_codec' metadata; not a qmoe codec dictionary")
        return cls.from_tensors(tensors, metadata)

    def encoder_tables(self):
        """The encoder's tries, built once and cached.

        ``tunstall``: int32 ``[K, nodes, 3]``; ``children[k, node, s + 1]`` is the internal node
        reached by symbol ``s`` (> 0) or ``~codeword`` (< 0) at a leaf; node 0 is the root.
        ``qmoe-pairs``: ``(children int32 [1, nodes, 9], node_code int32 [1, nodes])`` over pairs
        indexed ``3 (s1 + 1) + (s2 + 1)``; ``children`` is 0 where a node has no such child.
        Raises :class:`CodecError` if a class does not have the structure its mode needs.
        """
        if self._tables is None:
            if self.mode == "tunstall":
                tries = []
                for k in range(self.num_classes):
                    children, err = _build_tunstall_trie(self.entry_length[k], self.entry_nonzero[k],
                                                         self.entry_negative[k], int(self.entry_count[k]))
                    if err >= 0:
                        raise CodecError(f"dictionary class {k} is not a complete prefix-free tree "
                                         f"(conflict at entry {err}); it cannot be encoded in tunstall mode")
                    tries.append(children)
                nodes = max(t.shape[0] for t in tries)
                table = np.zeros((self.num_classes, nodes, 3), dtype=np.int32)
                for k, t in enumerate(tries):
                    table[k, : t.shape[0]] = t
                self._tables = table
            else:
                if self.num_classes != 1:
                    raise CodecError("a qmoe-pairs dictionary has exactly one class")
                children, node_code, err = _build_pair_trie(self.entry_length[0], self.entry_nonzero[0],
                                                            self.entry_negative[0], int(self.entry_count[0]))
                if err >= 0:
                    raise CodecError(f"qmoe-pairs dictionary is not a prefix-closed pair trie "
                                     f"containing every single pair (conflict at entry {err})")
                self._tables = (children[None], node_code[None])
        return self._tables


def _as_mask(a):
    """uint64 bit masks from uint64 or int64 (the safetensors/torch view) input."""
    a = np.asarray(a)
    if a.dtype == np.int64:
        a = a.view(np.uint64)
    return np.ascontiguousarray(a, dtype=np.uint64)


@numba.njit(cache=True)
def _check_entries(entry_length, entry_nonzero, entry_negative, entry_count):
    """First violation of FORMAT.md 2.1 invariants as (class, slot, reason), or (-1, -1, -1)."""
    for k in range(entry_count.shape[0]):
        count = entry_count[k]
        if count < 1 or count > entry_length.shape[1]:
            return k, -1, 0
        for c in range(entry_length.shape[1]):
            length = np.int64(entry_length[k, c])
            nz = entry_nonzero[k, c]
            neg = entry_negative[k, c]
            if c >= count:
                if length != 0 or nz != 0 or neg != 0:
                    return k, c, 5
                continue
            if length < 1 or length > MAX_LENGTH:
                return k, c, 1
            if length < 64:
                if (nz >> np.uint64(length)) != 0:
                    return k, c, 2
            if (neg & ~nz) != 0:
                return k, c, 3
            bits = 0
            while nz != 0:
                nz &= nz - np.uint64(1)
                bits += 1
            if bits > MAX_NONZERO:
                return k, c, 4
    return -1, -1, -1


@numba.njit(cache=True)
def _symbol(nz, neg, i):
    bit = np.uint64(1) << np.uint64(i)
    if nz & bit == 0:
        return 0
    return -1 if neg & bit != 0 else 1


@numba.njit(cache=True)
def _build_tunstall_trie(length, nonzero, negative, count):
    """Trie of one class as int32 [nodes, 3] (see Dictionary.encoder_tables) and -1, or the first
    entry that breaks "complete and prefix-free" as the second value. 0 marks a missing child: the
    root is never anyone's child."""
    children = np.zeros((count + 1, 3), dtype=np.int32)
    nodes = 1
    for c in range(count):
        node = 0
        for i in range(length[c]):
            s = _symbol(nonzero[c], negative[c], i) + 1
            v = children[node, s]
            if i == length[c] - 1:
                if v != 0:
                    return children[:nodes], c
                children[node, s] = ~c
            elif v == 0:
                if nodes == children.shape[0]:
                    return children[:nodes], c
                children[node, s] = nodes
                node = nodes
                nodes += 1
            elif v < 0:
                return children[:nodes], c
            else:
                node = v
    for node in range(nodes):
        for s in range(3):
            if children[node, s] == 0:
                return children[:nodes], count
    return children[:nodes].copy(), -1


@numba.njit(cache=True)
def _build_pair_trie(length, nonzero, negative, count):
    """Pair trie of a prefix-closed dictionary: children int32 [nodes, 9], node_code int32 [nodes],
    and -1, or the first offending entry (odd length, duplicate, missing prefix) as third value."""
    children = np.zeros((count + 1, 9), dtype=np.int32)
    node_code = np.full(count + 1, -1, dtype=np.int32)
    nodes = 1
    for c in range(count):
        if length[c] % 2 != 0:
            return children, node_code, c
        node = 0
        for i in range(0, length[c], 2):
            p = 3 * (_symbol(nonzero[c], negative[c], i) + 1) + _symbol(nonzero[c], negative[c], i + 1) + 1
            v = children[node, p]
            if v == 0:
                children[node, p] = nodes
                v = nodes
                nodes += 1
            node = v
        if node_code[node] >= 0:
            return children, node_code, c
        node_code[node] = c
    for node in range(1, nodes):
        if node_code[node] < 0:
            return children, node_code, count
    for p in range(9):
        if children[0, p] == 0:
            return children, node_code, count
    return children[:nodes].copy(), node_code[:nodes].copy(), -1


def _normalized(probabilities):
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (3,) or not np.all(np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"class probabilities must be three positive numbers (p_-1, p_0, p_+1), got {probabilities}")
    return p / p.sum()


@numba.njit(cache=True)
def _before(prob, a, b):
    """Heap order: higher probability first, then the node created (pushed) first."""
    return prob[a] > prob[b] or (prob[a] == prob[b] and a < b)


@numba.njit(cache=True)
def _heap_push(heap, size, prob, node):
    i = size
    heap[i] = node
    while i > 0:
        parent = (i - 1) // 2
        if not _before(prob, heap[i], heap[parent]):
            break
        heap[i], heap[parent] = heap[parent], heap[i]
        i = parent
    return size + 1


@numba.njit(cache=True)
def _heap_pop(heap, size, prob):
    top = heap[0]
    size -= 1
    heap[0] = heap[size]
    i = 0
    while True:
        best = i
        for child in (2 * i + 1, 2 * i + 2):
            if child < size and _before(prob, heap[child], heap[best]):
                best = child
        if best == i:
            break
        heap[i], heap[best] = heap[best], heap[i]
        i = best
    return top, size


@numba.njit(cache=True)
def _grow_tunstall(p, max_entries, max_length, max_nonzero):
    """Tunstall tree growth (FORMAT.md 3.2). Nodes are numbered in creation order; returns per-node
    (prob, length, nonzero mask, negative mask) and a mask of the nodes that are leaves at the end."""
    nodes = 3 + 3 * ((max_entries - 3) // 2)
    prob = np.zeros(nodes)
    length = np.zeros(nodes, dtype=np.int64)
    nonzero = np.zeros(nodes, dtype=np.uint64)
    negative = np.zeros(nodes, dtype=np.uint64)
    nnz = np.zeros(nodes, dtype=np.int64)
    leaf = np.zeros(nodes, dtype=np.bool_)
    heap = np.zeros(nodes, dtype=np.int64)
    size = 0
    created = 0
    for s in range(3):  # symbols -1, 0, +1
        prob[created] = p[s]
        length[created] = 1
        nonzero[created] = np.uint64(s != 1)
        negative[created] = np.uint64(s == 0)
        nnz[created] = s != 1
        leaf[created] = True
        size = _heap_push(heap, size, prob, created)
        created += 1
    leaves = 3
    while leaves + 2 <= max_entries and size > 0:
        node, size = _heap_pop(heap, size, prob)
        leaf[node] = False
        bit = np.uint64(1) << np.uint64(length[node])
        for s in range(3):
            prob[created] = prob[node] * p[s]
            length[created] = length[node] + 1
            nonzero[created] = nonzero[node] | (bit if s != 1 else np.uint64(0))
            negative[created] = negative[node] | (bit if s == 0 else np.uint64(0))
            nnz[created] = nnz[node] + (s != 1)
            leaf[created] = True
            if length[created] < max_length and nnz[created] < max_nonzero:
                size = _heap_push(heap, size, prob, created)
            created += 1
        leaves += 2
    return prob[:created], length[:created], nonzero[:created], negative[:created], leaf[:created]


def tunstall_class(probabilities, max_entries=SLOTS - 1, max_length=MAX_LENGTH):
    """Builds one Tunstall class (FORMAT.md 3.2) for i.i.d. symbols.

    Args:
        probabilities: (p_-1, p_0, p_+1), all > 0 (normalized here).
        max_entries: leaves to grow to (3..65535; 65535 for a full class; an even number stops one
            short, as each expansion adds two leaves).
        max_length: longest entry, <= 64.

    Returns:
        ``(length uint8 [65536], nonzero uint64 [65536], negative uint64 [65536], count)`` with codewords
        in order of decreasing design probability (ties: creation order).
    """
    p = _normalized(probabilities)
    if not 3 <= max_entries <= SLOTS - 1:
        raise ValueError(f"max_entries must be in 3..{SLOTS - 1}, got {max_entries}")
    if not 1 <= max_length <= MAX_LENGTH:
        raise ValueError(f"max_length must be in 1..{MAX_LENGTH}, got {max_length}")
    prob, node_length, node_nonzero, node_negative, leaf = _grow_tunstall(p, max_entries, max_length, MAX_NONZERO)
    leaves = np.flatnonzero(leaf)  # creation order
    order = leaves[np.argsort(-prob[leaves], kind="stable")]  # decreasing probability, ties by creation
    count = order.shape[0]
    length = np.zeros(SLOTS, dtype=np.uint8)
    nonzero = np.zeros(SLOTS, dtype=np.uint64)
    negative = np.zeros(SLOTS, dtype=np.uint64)
    length[:count] = node_length[order]
    nonzero[:count] = node_nonzero[order]
    negative[:count] = node_negative[order]
    return length, nonzero, negative, count


def tunstall_dictionary(class_probabilities, max_entries=SLOTS - 1, max_length=MAX_LENGTH) -> Dictionary:
    """A ``tunstall`` dictionary with one class per row of ``class_probabilities`` ``[K, 3]``."""
    class_probabilities = np.asarray(class_probabilities, dtype=np.float64).reshape(-1, 3)
    k = class_probabilities.shape[0]
    if not 1 <= k <= MAX_CLASSES:
        raise ValueError(f"need 1..{MAX_CLASSES} classes, got {k}")
    tables = [tunstall_class(p, max_entries, max_length) for p in class_probabilities]
    return Dictionary(
        "tunstall",
        np.stack([t[0] for t in tables]),
        np.stack([t[1] for t in tables]),
        np.stack([t[2] for t in tables]),
        np.array([t[3] for t in tables], dtype=np.int32),
        np.stack([_normalized(p) for p in class_probabilities]),
        max_length,
    )


def _symmetric(p0):
    return ((1.0 - p0) / 2.0, p0, (1.0 - p0) / 2.0)


@functools.lru_cache(maxsize=None)
def default_dictionary() -> Dictionary:
    """The default ``tunstall`` dictionary (FORMAT.md 5): 8 symmetric classes at
    :data:`DEFAULT_CLASS_ZERO_PROBABILITIES`, 65535 entries each, entries up to 64 symbols. Cached."""
    return tunstall_dictionary([_symmetric(p0) for p0 in DEFAULT_CLASS_ZERO_PROBABILITIES])


@numba.njit(cache=True)
def _grow_pairs(p, entries, max_pairs):
    """QMoE's construction (FORMAT.md 3.3): pop the most probable pair sequence (ties: pushed first)
    as the next entry, push its 9 one-pair extensions. Returns (pairs, nonzero, negative) per entry."""
    capacity = 9 + 9 * entries
    prob = np.zeros(capacity)
    npairs = np.zeros(capacity, dtype=np.int64)
    nonzero = np.zeros(capacity, dtype=np.uint64)
    negative = np.zeros(capacity, dtype=np.uint64)
    heap = np.zeros(capacity, dtype=np.int64)
    size = 0
    pushed = 0
    out_pairs = np.zeros(entries, dtype=np.int64)
    out_nonzero = np.zeros(entries, dtype=np.uint64)
    out_negative = np.zeros(entries, dtype=np.uint64)
    for pair in range(9):  # index 3 (s1 + 1) + (s2 + 1)
        s1, s2 = pair // 3, pair % 3
        prob[pushed] = p[s1] * p[s2]
        npairs[pushed] = 1
        nonzero[pushed] = np.uint64((s1 != 1) | ((s2 != 1) << 1))
        negative[pushed] = np.uint64((s1 == 0) | ((s2 == 0) << 1))
        size = _heap_push(heap, size, prob, pushed)
        pushed += 1
    for code in range(entries):
        node, size = _heap_pop(heap, size, prob)
        out_pairs[code] = npairs[node]
        out_nonzero[code] = nonzero[node]
        out_negative[code] = negative[node]
        if npairs[node] < max_pairs:
            shift = np.uint64(2 * npairs[node])
            for pair in range(9):
                s1, s2 = pair // 3, pair % 3
                prob[pushed] = prob[node] * (p[s1] * p[s2])
                npairs[pushed] = npairs[node] + 1
                nonzero[pushed] = nonzero[node] | (np.uint64((s1 != 1) | ((s2 != 1) << 1)) << shift)
                negative[pushed] = negative[node] | (np.uint64((s1 == 0) | ((s2 == 0) << 1)) << shift)
                size = _heap_push(heap, size, prob, pushed)
                pushed += 1
    return out_pairs, out_nonzero, out_negative


@functools.lru_cache(maxsize=None)
def qmoe_dictionary() -> Dictionary:
    """QMoE's static pair dictionary (FORMAT.md 3.3): one class, 65536 entries of 1..14 ternary pairs,
    the most probable pair sequences at P(0) = 0.885. Cached."""
    ps = np.array(_symmetric(QMOE_ZERO_PROBABILITY))
    pairs, nonzero, negative = _grow_pairs(ps, SLOTS, QMOE_MAX_PAIRS)
    return Dictionary("qmoe-pairs", (2 * pairs).astype(np.uint8)[None], nonzero[None], negative[None],
                      np.array([SLOTS], dtype=np.int32), ps[None], 2 * QMOE_MAX_PAIRS)


@numba.njit(parallel=True, cache=True)
def _row_counts(ternary, out):
    rows, cols = ternary.shape
    for r in numba.prange(rows):
        neg = 0
        zero = 0
        for j in range(cols):
            v = ternary[r, j]
            neg += v == -1
            zero += v == 0
        out[r, 0] = neg
        out[r, 1] = zero
        out[r, 2] = cols - neg - zero


def row_symbol_counts(ternary) -> np.ndarray:
    """Per-row symbol counts int64 ``[rows, 3]`` = (n_-1, n_0, n_+1) of an int8 ``[rows, cols]`` matrix
    (values outside -1/0/1 are counted as +1; callers validate first)."""
    ternary = np.ascontiguousarray(ternary, dtype=np.int8)
    out = np.empty((ternary.shape[0], 3), dtype=np.int64)
    _row_counts(ternary, out)
    return out


def _check_ternary(t, what):
    t = t.numpy() if hasattr(t, "numpy") and not isinstance(t, np.ndarray) else np.asarray(t)
    if t.ndim != 2 or t.dtype != np.int8:
        raise ValueError(f"{what} must be an int8 array of shape (rows, cols), got {t.dtype} {t.shape}")
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError(f"{what} holds values outside -1/0/1")
    return np.ascontiguousarray(t)


def fit_class_probabilities(counts, classes=8, iterations=50):
    """Clusters rows, given their symbol counts int ``[rows, 3]``, into ``classes`` distributions by
    Lloyd iterations under KL divergence (FORMAT.md 4). Returns float64 ``[K, 3]`` sorted by P(0),
    K <= classes (fewer when there are fewer distinct rows)."""
    counts = np.asarray(counts, dtype=np.float64)
    counts = counts[counts.sum(axis=1) > 0]
    if counts.shape[0] == 0:
        raise ValueError("fit_dictionary needs at least one row with at least one column")
    if not 1 <= classes <= MAX_CLASSES:
        raise ValueError(f"classes must be in 1..{MAX_CLASSES}, got {classes}")
    eps = 1e-6
    totals = counts.sum(axis=1)
    q = counts / totals[:, None]  # [rows, 3] empirical distributions
    order = np.argsort(q[:, 1], kind="stable")
    cum = np.cumsum(totals[order]) / totals.sum()
    # Initial centroids: rows at the count-weighted quantiles of the zero fraction.
    picks = order[np.minimum(np.searchsorted(cum, (np.arange(classes) + 0.5) / classes), len(order) - 1)]
    centroids = np.unique(q[picks], axis=0)
    assign = None
    for _ in range(iterations):
        logc = np.log(np.clip(centroids, eps, 1.0))  # [K, 3]
        cross = -(counts @ logc.T)  # [rows, K] total cross-entropy in nats
        new = np.argmin(cross, axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        used = np.unique(assign)
        centroids = np.stack([counts[assign == k].sum(axis=0) / totals[assign == k].sum() for k in used])
    centroids = np.clip(centroids, eps, 1.0 - 2 * eps)
    centroids /= centroids.sum(axis=1, keepdims=True)
    return centroids[np.argsort(centroids[:, 1], kind="stable")]


def fit_dictionary(samples, classes=8, max_length=MAX_LENGTH) -> Dictionary:
    """Fits a ``tunstall`` dictionary to a model's own ternary matrices (FORMAT.md 4).

    Args:
        samples: an int8 ``[rows, cols]`` matrix of -1/0/1, or an iterable of them (any shapes).
        classes: number of classes K (1..16); fewer are built if the rows have fewer distinct
            distributions.
        max_length: longest entry (<= 64).
    """
    if isinstance(samples, np.ndarray) or hasattr(samples, "numpy"):
        samples = [samples]
    counts = [row_symbol_counts(_check_ternary(m, f"fit_dictionary sample {i}")) for i, m in enumerate(samples)]
    if not counts:
        raise ValueError("fit_dictionary needs at least one sample matrix")
    return tunstall_dictionary(fit_class_probabilities(np.concatenate(counts), classes), max_length=max_length)

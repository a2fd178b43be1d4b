"""``torch.library`` ops for ``y = x @ W.T`` with W in the qmoe ternary codec format (codec/FORMAT.md).

One op, ``qmoe::ternary_grouped_matmul``, computes a whole MoE layer: tokens sorted by expert, expert
``e`` owning rows ``token_offsets[e]:token_offsets[e+1]`` of ``x``, every expert's matrix in the layer
layout of FORMAT.md 2.4. It has

* a fake (meta) implementation that checks shapes and dtypes, so ``torch.compile`` traces it;
* a CUDA implementation calling ``qmoe._cuda`` (cuda/ternary_gemm.cu): one asynchronous call per layer,
  no host synchronisation, so it can be captured in a CUDA graph;
* a CPU implementation that runs the codec's CPU reference, :func:`qmoe.codec.matmul`, per expert
  (no dense copy of W).

Tensor layout (what :class:`qmoe.storage.PackedExperts` holds and :func:`dictionary_tensors` builds):

=================  ===========================  ==============================================
``x``              bf16 / fp16 / fp32 [T, cols]  activations sorted by expert
``token_offsets``  int64 [E + 1]                 token range per expert (0 first, T last)
``codewords``      uint16 (or int16) [n]         all experts' codewords
``expert_offsets`` int64 [E + 1]                 expert e's codewords start at expert_offsets[e]
``row_offsets``    int32 (uint32 bits) [E, R+1]  per expert, relative to its first codeword
``row_class``      uint8 [E, R]                  dictionary class per row
``scales``         bf16 (or int16 bits) [E, R, 2] (a, b) per row: -1 -> a, +1 -> b
``entry_*``        the dictionary tables         see :func:`dictionary_tensors`
``packed_entries`` int64 [K, 65536, 2]           GPU form of the dictionary, :func:`pack_dictionary`
=================  ===========================  ==============================================

Importing this module never needs a GPU or the compiled extension; running the CUDA implementation
without ``qmoe._cuda`` raises :class:`RuntimeError` saying how to build it.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import numpy as np
import torch

__all__ = [
    "pack_dictionary",
    "dictionary_tensors",
    "ternary_grouped_matmul",
    "ternary_matmul",
    "grouped_ternary_matmul",
    "cuda_available",
    "kernel_path",
]

_DICTIONARY_KEYS = ("entry_length", "entry_nonzero", "entry_negative", "entry_count", "packed_entries")
_LAYER_KEYS = ("codewords", "expert_offsets", "row_offsets", "row_class", "scales")
_SLOTS = 1 << 16
_CUDA_DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_KERNEL_PATHS = {"auto": 0, "gemv": 1, "tile": 2}
_kernel_path = "auto"


# -- dictionary preparation ----------------------------------------------------------------------


def pack_dictionary(entry_length, entry_nonzero, entry_negative) -> np.ndarray:
    """Repacks dictionary entries into the 16-byte records the kernel loads (``qmoe::PackedEntry``).

    Args:
        entry_length: uint8 ``[K, 65536]``; entry_nonzero, entry_negative: uint64 (or int64 bit
            patterns) ``[K, 65536]``, as in FORMAT.md 2.1.

    Returns:
        int64 ``[K, 65536, 2]``: word 0 = the nonzero mask; word 1 = the signs of the nonzeros
        compacted in order (bit i = sign of the i-th nonzero; <= 32 nonzeros per entry) in bits 0-31
        and the length in bits 32-63.
    """
    length = np.ascontiguousarray(entry_length, dtype=np.uint8)
    nonzero = np.ascontiguousarray(entry_nonzero).view(np.uint64)
    negative = np.ascontiguousarray(entry_negative).view(np.uint64)
    if length.ndim != 2 or length.shape[1] != _SLOTS or nonzero.shape != length.shape or negative.shape != length.shape:
        raise ValueError(f"dictionary tables must all be [K, {_SLOTS}]; got entry_length {length.shape}, "
                         f"entry_nonzero {nonzero.shape}, entry_negative {negative.shape}")
    # A vectorized PEXT: walk the 64 symbol positions, appending each nonzero's sign at its rank.
    signs = np.zeros(length.shape, dtype=np.uint64)
    rank = np.zeros(length.shape, dtype=np.uint64)
    one = np.uint64(1)
    for bit in range(64):
        b = np.uint64(bit)
        signs |= ((negative >> b) & one) << rank
        rank += (nonzero >> b) & one
    if rank.max(initial=0) > 32:
        raise ValueError("dictionary entry with more than 32 nonzero symbols (FORMAT.md 2.1 invariant 2)")
    packed = np.empty(length.shape + (2,), dtype=np.uint64)  # [K, 65536, 2]
    packed[..., 0] = nonzero
    packed[..., 1] = signs | (length.astype(np.uint64) << np.uint64(32))
    return packed.view(np.int64)


def dictionary_tensors(dictionary, device=None) -> Dict[str, torch.Tensor]:
    """The tensors the ops take for a :class:`qmoe.codec.Dictionary`.

    Returns a dict with ``entry_length`` uint8 [K, 65536], ``entry_nonzero`` / ``entry_negative``
    int64 [K, 65536] (uint64 bit patterns), ``entry_count`` int32 [K] (the CPU implementation's
    tables) and ``packed_entries`` int64 [K, 65536, 2] (the CUDA kernel's), on ``device``.
    """
    tensors = {
        "entry_length": torch.from_numpy(np.ascontiguousarray(dictionary.entry_length, dtype=np.uint8)),
        "entry_nonzero": torch.from_numpy(np.ascontiguousarray(dictionary.entry_nonzero).view(np.int64)),
        "entry_negative": torch.from_numpy(np.ascontiguousarray(dictionary.entry_negative).view(np.int64)),
        "entry_count": torch.from_numpy(np.ascontiguousarray(dictionary.entry_count, dtype=np.int32)),
        "packed_entries": torch.from_numpy(
            pack_dictionary(dictionary.entry_length, dictionary.entry_nonzero, dictionary.entry_negative)),
    }
    return {k: v.to(device) if device is not None else v for k, v in tensors.items()}


# -- argument checks shared by every implementation ------------------------------------------------


def _check(x, token_offsets, codewords, expert_offsets, row_offsets, row_class, scales, entry_length,
           entry_nonzero, entry_negative, entry_count, packed_entries):
    """Validates dtypes, shapes and devices; returns (num_experts, rows, cols). Values are checked by
    the CPU implementation (via qmoe.codec.validate) and are the loader's job on the GPU."""
    def fail(msg):
        raise ValueError(f"qmoe::ternary_grouped_matmul: {msg}")

    if x.dim() != 2 or not x.dtype.is_floating_point:
        fail(f"x must be a float tensor [tokens, cols], got {x.dtype} {tuple(x.shape)}")
    if row_class.dim() != 2 or row_class.dtype != torch.uint8:
        fail(f"row_class must be uint8 [E, rows], got {row_class.dtype} {tuple(row_class.shape)}")
    num_experts, rows = row_class.shape
    cols = x.shape[1]
    if num_experts < 1:
        fail("the layer needs at least one expert")
    if cols < 1:
        fail("x must have at least one column (FORMAT.md 2.2: cols >= 1)")
    expected = {
        "token_offsets": (token_offsets, (torch.int64,), (num_experts + 1,)),
        "codewords": (codewords, (torch.uint16, torch.int16), None),
        "expert_offsets": (expert_offsets, (torch.int64,), (num_experts + 1,)),
        "row_offsets": (row_offsets, (torch.int32, torch.uint32), (num_experts, rows + 1)),
        "scales": (scales, (torch.bfloat16, torch.int16, torch.uint16), (num_experts, rows, 2)),
        "entry_length": (entry_length, (torch.uint8,), None),
        "entry_nonzero": (entry_nonzero, (torch.int64, torch.uint64), None),
        "entry_negative": (entry_negative, (torch.int64, torch.uint64), None),
        "entry_count": (entry_count, (torch.int32,), None),
        "packed_entries": (packed_entries, (torch.int64,), None),
    }
    for name, (t, dtypes, shape) in expected.items():
        if t.dtype not in dtypes:
            fail(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
        if shape is not None and tuple(t.shape) != shape:
            fail(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
        if t.device != x.device:
            fail(f"{name} is on {t.device} but x is on {x.device}")
    if codewords.dim() != 1:
        fail(f"codewords must be 1-D, got shape {list(codewords.shape)}")
    k = entry_count.shape[0] if entry_count.dim() == 1 else -1
    if k < 1 or any(tuple(t.shape) != (k, _SLOTS) for t in (entry_length, entry_nonzero, entry_negative)):
        fail(f"dictionary tables must be [K, {_SLOTS}] with entry_count [K]; got entry_length "
             f"{list(entry_length.shape)}, entry_count {list(entry_count.shape)}")
    if tuple(packed_entries.shape) != (k, _SLOTS, 2):
        fail(f"packed_entries must be [{k}, {_SLOTS}, 2] (see pack_dictionary), got {list(packed_entries.shape)}")
    return num_experts, rows, cols


# -- the op ----------------------------------------------------------------------------------------


@torch.library.custom_op("qmoe::ternary_grouped_matmul", mutates_args=(), device_types="cpu")
def ternary_grouped_matmul(x: torch.Tensor, token_offsets: torch.Tensor, codewords: torch.Tensor,
                           expert_offsets: torch.Tensor, row_offsets: torch.Tensor, row_class: torch.Tensor,
                           scales: torch.Tensor, entry_length: torch.Tensor, entry_nonzero: torch.Tensor,
                           entry_negative: torch.Tensor, entry_count: torch.Tensor,
                           packed_entries: torch.Tensor) -> torch.Tensor:
    """``y[t] = x[t] @ W_e.T`` for every token t of every expert e; see the module docstring for the
    layout. Returns ``[T, rows]`` in x's dtype, fp32-accumulated.

    This body is the CPU implementation: :func:`qmoe.codec.matmul` per expert with tokens, which
    validates each expert's matrix (FORMAT.md 2.2) and raises :class:`qmoe.codec.CodecError` naming
    the expert and row on corrupt data."""
    from . import codec

    num_experts, rows, cols = _check(x, token_offsets, codewords, expert_offsets, row_offsets, row_class, scales,
                                     entry_length, entry_nonzero, entry_negative, entry_count, packed_entries)
    bounds = token_offsets.tolist()
    if bounds[0] != 0 or bounds[-1] != x.shape[0] or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"qmoe::ternary_grouped_matmul: token_offsets must rise from 0 to {x.shape[0]} "
                         f"(the token count), got {bounds[:4]}...{bounds[-2:]}")
    starts = expert_offsets.tolist()
    dictionary = _cpu_dictionary(entry_length, entry_nonzero, entry_negative, entry_count)
    codewords_np = codewords.view(torch.int16).numpy().view(np.uint16)
    row_offsets_np = row_offsets.view(torch.int32).numpy().view(np.uint32)
    scales_np = scales.view(torch.int16).numpy().view(np.uint16)
    row_class_np = row_class.numpy()
    y = x.new_zeros(x.shape[0], rows)  # [T, rows]
    for e in range(num_experts):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            continue
        lo, hi = starts[e], starts[e + 1]
        if not 0 <= lo <= hi <= codewords_np.shape[0]:
            raise codec.CodecError(f"expert {e}: expert_offsets [{lo}, {hi}) outside the "
                                   f"{codewords_np.shape[0]} codewords")
        enc = codec.EncodedMatrix(rows, cols, codewords_np[lo:hi], row_offsets_np[e], row_class_np[e], scales_np[e],
                                  dictionary)
        try:
            y[a:b] = codec.matmul(x[a:b], enc).to(x.dtype)
        except codec.CodecError as exc:
            raise codec.CodecError(f"expert {e}: {exc}") from None
    return y


@ternary_grouped_matmul.register_fake
def _(x, token_offsets, codewords, expert_offsets, row_offsets, row_class, scales, entry_length, entry_nonzero,
      entry_negative, entry_count, packed_entries):
    _, rows, _ = _check(x, token_offsets, codewords, expert_offsets, row_offsets, row_class, scales, entry_length,
                        entry_nonzero, entry_negative, entry_count, packed_entries)
    return x.new_empty(x.shape[0], rows)


@ternary_grouped_matmul.register_kernel("cuda")
def _(x, token_offsets, codewords, expert_offsets, row_offsets, row_class, scales, entry_length, entry_nonzero,
      entry_negative, entry_count, packed_entries):
    num_experts, rows, cols = _check(x, token_offsets, codewords, expert_offsets, row_offsets, row_class, scales,
                                     entry_length, entry_nonzero, entry_negative, entry_count, packed_entries)
    if x.dtype not in _CUDA_DTYPES:
        raise ValueError(f"qmoe::ternary_grouped_matmul: the CUDA kernel takes bf16, fp16 or fp32 x, got {x.dtype}")
    ext = _cuda_extension()
    x = x.contiguous()
    tensors = [token_offsets, codewords, expert_offsets, row_offsets, row_class, scales, packed_entries]
    token_offsets, codewords, expert_offsets, row_offsets, row_class, scales, packed_entries = (
        t.contiguous() for t in tensors)
    y = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)  # [T, rows]
    workspace_bytes = ext.workspace_bytes(num_experts, x.shape[0])
    workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=x.device)
    ext.grouped_matmul(
        x=x.data_ptr(), y=y.data_ptr(), dtype=_CUDA_DTYPES[x.dtype], total_tokens=x.shape[0],
        token_offsets=token_offsets.data_ptr(), num_experts=num_experts, codewords=codewords.data_ptr(),
        n_codewords=codewords.numel(), expert_offsets=expert_offsets.data_ptr(), row_offsets=row_offsets.data_ptr(),
        row_class=row_class.data_ptr(), scales=scales.data_ptr(), entries=packed_entries.data_ptr(),
        num_classes=packed_entries.shape[0], rows=rows, cols=cols, workspace=workspace.data_ptr(),
        workspace_bytes=workspace_bytes, path=_KERNEL_PATHS[_kernel_path], device=x.device.index,
        stream=torch.cuda.current_stream(x.device).cuda_stream)
    return y


# -- Python-facing helpers -------------------------------------------------------------------------


def grouped_ternary_matmul(x_sorted: torch.Tensor, token_offsets: torch.Tensor, layer: Dict[str, torch.Tensor],
                           dictionary: Dict[str, torch.Tensor]) -> torch.Tensor:
    """One MoE matrix of a layer for expert-sorted tokens: ``[T, cols] -> [T, rows]``.

    Args:
        x_sorted: ``[T, cols]`` tokens sorted by expert (CPU: any float dtype; CUDA: bf16/fp16/fp32).
        token_offsets: int64 ``[E + 1]``, expert e owns ``x_sorted[token_offsets[e]:token_offsets[e+1]]``.
        layer: the layer layout (``codewords``, ``expert_offsets``, ``row_offsets``, ``row_class``,
            ``scales``), e.g. :attr:`qmoe.storage.PackedExperts.tensors`, on x's device.
        dictionary: :func:`dictionary_tensors` of the checkpoint's dictionary, on x's device.

    The op dispatches on the device: the CUDA kernel on a GPU, the codec's CPU reference on the CPU.
    """
    missing = [k for k in _LAYER_KEYS if k not in layer] + [k for k in _DICTIONARY_KEYS if k not in dictionary]
    if missing:
        raise ValueError(f"grouped_ternary_matmul: missing tensors {missing}")
    token_offsets = token_offsets.to(device=x_sorted.device, dtype=torch.int64)
    return torch.ops.qmoe.ternary_grouped_matmul(
        x_sorted, token_offsets, *(layer[k] for k in _LAYER_KEYS), *(dictionary[k] for k in _DICTIONARY_KEYS))


def ternary_matmul(x: torch.Tensor, matrix: Dict[str, torch.Tensor], dictionary: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``x @ W.T`` for one matrix in the FORMAT.md 2.2 layout: ``[T, cols] -> [T, rows]``.

    ``matrix`` holds ``codewords`` [n], ``row_offsets`` int32 [rows + 1], ``row_class`` uint8 [rows],
    ``scales`` bf16 [rows, 2]; it runs as a one-expert layer of the grouped op. The offsets are built
    with device-side ops (no host-to-device copy), so this too can be captured in a CUDA graph.
    """
    missing = [k for k in ("codewords", "row_offsets", "row_class", "scales") if k not in matrix]
    if missing:
        raise ValueError(f"ternary_matmul: missing tensors {missing}")
    pair = torch.arange(2, dtype=torch.int64, device=x.device)  # [0, 1]
    layer = {
        "codewords": matrix["codewords"],
        "expert_offsets": pair * matrix["codewords"].shape[0],
        "row_offsets": matrix["row_offsets"].unsqueeze(0),
        "row_class": matrix["row_class"].unsqueeze(0),
        "scales": matrix["scales"].unsqueeze(0),
    }
    return grouped_ternary_matmul(x, pair * x.shape[0], layer, dictionary)


@contextlib.contextmanager
def kernel_path(path: str):
    """Within the block, CUDA calls use ``path`` for experts with many tokens: ``"auto"`` (default:
    chosen from the shape), ``"gemv"`` (warp-per-row decode for every expert) or ``"tile"``
    (tensor-core tiles for every expert with >= 16 tokens). For tests and benchmarks; results agree
    to rounding. Read when the op runs, so it does not change a captured CUDA graph."""
    global _kernel_path
    if path not in _KERNEL_PATHS:
        raise ValueError(f"kernel path must be one of {sorted(_KERNEL_PATHS)}, got {path!r}")
    previous, _kernel_path = _kernel_path, path
    try:
        yield
    finally:
        _kernel_path = previous


def cuda_available() -> bool:
    """True when the compiled kernel extension is importable and a CUDA device is visible."""
    try:
        _cuda_extension()
    except RuntimeError:
        return False
    return torch.cuda.is_available()


def _cuda_extension():
    try:
        from . import _cuda
    except ImportError as exc:
        raise RuntimeError(
            "qmoe's CUDA kernel (qmoe._cuda) is not built: install qmoe with nvcc on PATH and QMOE_NO_CUDA "
            f"unset (pip install -e .), or run on the CPU ({exc})") from None
    return _cuda


# The CPU implementation needs a qmoe.codec.Dictionary; building one validates and fingerprints the
# tables (tens of ms), so the last one is cached. The cache holds the table tensors themselves and
# matches by identity and version counter, so a freed tensor's memory can never alias a stale entry.
_dictionary_cache: list = []  # [(tables, versions, Dictionary)]


def _cpu_dictionary(entry_length, entry_nonzero, entry_negative, entry_count):
    from . import codec

    tables = (entry_length, entry_nonzero, entry_negative, entry_count)
    versions = tuple(t._version for t in tables)
    for cached_tables, cached_versions, dictionary in _dictionary_cache:
        if all(a is b for a, b in zip(cached_tables, tables)) and cached_versions == versions:
            return dictionary
    # Decoding reads only the tables; the design probabilities matter to the encoder alone.
    uniform = np.full((entry_count.shape[0], 3), 1.0 / 3.0)
    dictionary = codec.Dictionary("tunstall", entry_length.numpy(), entry_nonzero.numpy(), entry_negative.numpy(),
                                  entry_count.numpy(), uniform)
    _dictionary_cache[:] = [(tables, versions, dictionary)]  # one live dictionary per process is the norm
    return dictionary

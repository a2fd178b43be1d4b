"""Calibration activations, off the accelerator, in RAM or spilled to disk.

Every sample's hidden states live in one contiguous ``[total_tokens, width]`` buffer with per-sample
offsets (QMoE's "list buffer"): sample ``i`` owns rows ``offsets[i]:offsets[i+1]``. A store is either
in memory (pinned when a GPU is used, so host-device copies overlap) or a file read and written with
positional I/O. File-backed stores do not map the file, so the resident set stays bounded by the
chunks in flight; the OS page cache may keep the file's pages, but those are reclaimable and not
charged to the process.

A store is persisted with :meth:`ActivationStore.commit`: the payload is fsynced and renamed into
place, next to a small JSON header, so a later run can resume from it bit for bit.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NP_VIEW = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"activation stores hold float32, bfloat16 or float16, not {dtype}")


class ActivationStore:
    """Rows of hidden states ``[total_tokens, width]`` with per-sample offsets.

    ``path=None`` keeps the buffer in memory; otherwise rows live in ``path + ".tmp"`` until
    :meth:`commit` renames it to ``path``.
    """

    def __init__(self, lengths: Sequence[int], width: int, dtype: torch.dtype = torch.float32,
                 path: Optional[str] = None, pin: bool = False):
        _dtype_name(dtype)
        self.lengths = [int(n) for n in lengths]
        self.offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self.offsets[1:])
        self.width = int(width)
        self.dtype = dtype
        self.path = path
        self.row_bytes = self.width * torch.finfo(dtype).bits // 8
        self._fd = None
        self.committed_path: Optional[str] = None  # where the current contents are persisted
        self._dirty = True
        if path is None:
            self._buffer = torch.zeros(self.num_tokens, self.width, dtype=dtype, pin_memory=pin)
        else:
            self._buffer = None
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fd = os.open(path + ".tmp", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, self.nbytes)

    # -- geometry ----------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.row_bytes

    @property
    def on_disk(self) -> bool:
        return self._buffer is None

    @staticmethod
    def bytes_needed(lengths: Sequence[int], width: int, dtype: torch.dtype) -> int:
        return int(sum(lengths)) * width * torch.finfo(dtype).bits // 8

    # -- row access --------------------------------------------------------------------------
    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a new tensor [stop - start, width]."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"rows {start}:{stop} outside 0:{self.num_tokens}")
        if self._buffer is not None:
            return self._buffer[start:stop].clone()
        raw = os.pread(self._fd, (stop - start) * self.row_bytes, start * self.row_bytes)
        arr = np.frombuffer(raw, dtype=_NP_VIEW[self.dtype]).reshape(stop - start, self.width)
        return torch.from_numpy(arr.copy()).view(self.dtype)

    def write_rows(self, start: int, data: torch.Tensor) -> None:
        stop = start + data.shape[0]
        if data.dim() != 2 or data.shape[1] != self.width or not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"cannot write {tuple(data.shape)} at row {start} of [{self.num_tokens}, {self.width}]")
        data = data.detach().to("cpu", self.dtype).contiguous()
        self._touch()
        if self._buffer is not None:
            self._buffer[start:stop] = data
        else:
            os.pwrite(self._fd, data.view(_torch_view(self.dtype)).numpy().tobytes(), start * self.row_bytes)

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows at ``index`` ([n] int64, any order) -> [n, width]."""
        index = index.to("cpu", torch.int64)
        if self._buffer is not None:
            return self._buffer[index]
        out = torch.empty(len(index), self.width, dtype=self.dtype)
        for lo, hi, pos in _runs(index):
            out[pos:pos + hi - lo] = self.read_rows(lo, hi)
        return out

    def scatter(self, index: torch.Tensor, data: torch.Tensor) -> None:
        """Writes ``data[k]`` to row ``index[k]``."""
        index = index.to("cpu", torch.int64)
        if self._buffer is not None:
            self._touch()
            self._buffer[index] = data.detach().to("cpu", self.dtype)
            return
        for lo, hi, pos in _runs(index):
            self.write_rows(lo, data[pos:pos + hi - lo])

    def read_samples(self, i0: int, i1: int) -> list:
        """Per-sample tensors [len_i, width] for samples i0..i1-1."""
        block = self.read_rows(int(self.offsets[i0]), int(self.offsets[i1]))
        base = int(self.offsets[i0])
        return [block[int(self.offsets[i]) - base:int(self.offsets[i + 1]) - base] for i in range(i0, i1)]

    def write_samples(self, i0: int, tensors: Sequence[torch.Tensor]) -> None:
        self.write_rows(int(self.offsets[i0]), torch.cat(list(tensors), 0))

    # -- persistence -------------------------------------------------------------------------
    def _touch(self) -> None:
        if self._buffer is None and self.committed_path is not None:
            raise RuntimeError(f"{self.committed_path}: a committed on-disk store is immutable")
        self._dirty = True

    def commit(self, path: Optional[str] = None) -> str:
        """Persists the store atomically at ``path`` (default: its own path); returns where it lives.

        A store unchanged since its last commit is not written again: the earlier path is returned.
        """
        if not self._dirty and self.committed_path is not None:
            return self.committed_path
        path = path or self.path
        if path is None:
            raise ValueError("an in-memory store needs a path to commit to")
        header = {"lengths": self.lengths, "width": self.width, "dtype": _dtype_name(self.dtype)}
        if self._buffer is not None:
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(self._buffer.view(_torch_view(self.dtype)).numpy().tobytes())
                f.flush()
                os.fsync(f.fileno())
        else:
            os.fsync(self._fd)
            tmp = self.path + ".tmp"
        os.replace(tmp, path)
        if self._buffer is None:
            self.path = path  # the open descriptor now refers to the committed file
        from .storage import atomic_write_json

        atomic_write_json(path + ".json", header)
        self.committed_path, self._dirty = path, False
        return path

    @classmethod
    def open(cls, path: str, in_memory: bool, pin: bool = False,
             work_path: Optional[str] = None) -> "ActivationStore":
        """Loads a committed store; ``in_memory=False`` copies it to ``work_path`` and works there."""
        with open(path + ".json") as f:
            header = json.load(f)
        dtype = _DTYPES[header["dtype"]]
        expected = cls.bytes_needed(header["lengths"], header["width"], dtype)
        if os.path.getsize(path) != expected:
            raise ValueError(f"{path}: {os.path.getsize(path)} bytes, header promises {expected}")
        store = cls(header["lengths"], header["width"], dtype,
                    path=None if in_memory else (work_path or path + ".work"), pin=pin)
        chunk_rows = max(1, (64 << 20) // store.row_bytes)
        with open(path, "rb") as f:
            for start in range(0, store.num_tokens, chunk_rows):
                stop = min(store.num_tokens, start + chunk_rows)
                raw = f.read((stop - start) * store.row_bytes)
                arr = np.frombuffer(raw, dtype=_NP_VIEW[dtype]).reshape(stop - start, store.width)
                store.write_rows(start, torch.from_numpy(arr.copy()).view(dtype))
        if not in_memory:
            os.fsync(store._fd)
        store.committed_path, store._dirty = path, False  # identical to the committed file
        return store

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buffer = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _torch_view(dtype: torch.dtype) -> torch.dtype:
    return torch.int16 if dtype == torch.bfloat16 else dtype


def _runs(index: torch.Tensor):
    """Splits row indices into maximal runs of consecutive rows: yields (first, last+1, position).

    ``position`` is where the run starts in ``index``; runs follow ``index`` order, so callers copy
    straight between the store and a tensor laid out like ``index``.
    """
    if len(index) == 0:
        return
    idx = index.numpy()
    breaks = np.nonzero(np.diff(idx) != 1)[0] + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(idx)]])
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield int(idx[s]), int(idx[e - 1]) + 1, s


class MemoryBudget:
    """Decides which stores stay in RAM: the first ones that fit in ``limit`` bytes, the rest spill."""

    def __init__(self, limit_bytes: Optional[int], spill_dir: str, pin: bool = False):
        self.limit = limit_bytes
        self.spill_dir = spill_dir
        self.pin = pin
        self.in_memory = 0

    def new_store(self, name: str, lengths: Sequence[int], width: int, dtype: torch.dtype) -> ActivationStore:
        need = ActivationStore.bytes_needed(lengths, width, dtype)
        if self.limit is None or self.in_memory + need <= self.limit:
            self.in_memory += need
            return ActivationStore(lengths, width, dtype, path=None, pin=self.pin)
        return ActivationStore(lengths, width, dtype, path=os.path.join(self.spill_dir, name))

    def release(self, store: ActivationStore) -> None:
        if not store.on_disk:
            self.in_memory -= store.nbytes
        store.close()

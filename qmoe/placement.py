"""Memory planner: which device holds which block of a compressed checkpoint, decided before loading.

Blocks run in a fixed order (``shared``, encoder blocks, ``encoder.final_layer_norm``, decoder
blocks, ``decoder.final_layer_norm``, ``lm_head``), so the runtime places them as a pipeline: every
device holds one contiguous run of blocks and hidden states hop to the next device between runs. Only
``[tokens, d_model]`` activations cross devices, never weights.

Per-block memory comes from the checkpoint's manifest and config alone (no weights are read):

* dense tensors: their element counts from :meth:`SwitchConfig.block_tensor_shapes` times the size
  of the runtime dtype (bf16 on GPUs, possibly float32 on the CPU);
* compressed experts: the block file's size from the manifest minus its dense bf16 bytes; the
  experts stay in their stored layout in memory, so file bytes are memory bytes (the safetensors
  header, a few KiB, is counted too: a slight overestimate);
* the codec dictionary (ternary checkpoints): one copy on every device holding a sparse block
  (several CPU entries, as in the multi-device tests, share one copy at runtime; the plan counts
  one per entry, erring on the safe side).

Placement: for a fixed utilization ``u`` a greedy pass fills device ``i`` with blocks while its
bytes stay within ``u * budget_i``; the greedy pass is optimal for contiguous runs in a fixed device
order, so a bisection on ``u`` gives the placement that minimizes the largest utilization
(the "balanced" map). The plan fits when that utilization is at most 1.

Device budgets: an explicit ``"cuda:0=20GiB"`` wins; otherwise the currently free memory
(``torch.cuda.mem_get_info`` / ``MemAvailable``) minus :data:`DEFAULT_HEADROOM` of it, kept for
activations, the KV cache and the allocator.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Collection, Dict, List, Mapping, Sequence

import torch

from .config import SwitchConfig

__all__ = ["PlacementError", "DeviceBudget", "parse_size", "format_bytes", "parse_devices",
           "block_memory", "balanced_placement", "validate_device_map", "default_dense_dtype", "plan_blocks",
           "dictionary_memory", "plan",
           "format_plan", "DEFAULT_HEADROOM"]

DEFAULT_HEADROOM = 0.10

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


class PlacementError(ValueError):
    """A device list, budget or device map that cannot be used."""


@dataclass
class DeviceBudget:
    """A device and the bytes the planner may put on it (``explicit``: given by the user)."""

    device: str
    budget_bytes: int
    explicit: bool


def parse_size(text: str) -> int:
    """``"24GiB"`` / ``"1.5G"`` / ``"500MB"`` / ``"1048576"`` -> bytes. Binary (``GiB``) and decimal
    (``GB``, ``G``) units are told apart by the ``i``."""
    m = _SIZE_RE.match(str(text))
    if m is None:
        raise PlacementError(f"cannot read memory size {text!r}; expected e.g. 24GiB, 500MB or a byte count")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    return int(value * (1024 if binary else 1000) ** _UNITS[unit])


def format_bytes(n: float) -> str:
    """Bytes as a short binary-unit string (``"1.50 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _free_memory(device: str) -> int:
    """Currently free memory of ``device`` in bytes."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError(f"device {device!r}: CUDA is not available on this machine")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise PlacementError(f"device {device!r}: only {torch.cuda.device_count()} CUDA devices are visible")
        return int(torch.cuda.mem_get_info(index)[0])
    if dev.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    raise PlacementError(f"device {device!r}: only cpu and cuda devices are supported")


def parse_devices(devices: Sequence[str | DeviceBudget] | str | None,
                  headroom: float = DEFAULT_HEADROOM) -> List[DeviceBudget]:
    """Device specs -> budgets (:class:`DeviceBudget` entries pass through unchanged).

    ``devices``: a list (or comma-separated string) of ``"cuda:0"``, ``"cpu"``, optionally with a
    budget, ``"cuda:1=20GiB"``; ``None`` or ``"auto"`` means every visible GPU, or the CPU when there
    is none. Devices without a budget get their free memory minus ``headroom`` of it. The same device
    may appear twice (two pipeline stages sharing it, as the multi-device tests do with ``cpu``);
    each entry then reports that device's full free memory, so give explicit budgets in that case.
    """
    if devices is None or devices == "auto":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        devices = [f"cuda:{i}" for i in range(n)] or ["cpu"]
    elif isinstance(devices, str):
        devices = [d for d in devices.split(",") if d.strip()]
    if not devices:
        raise PlacementError("no devices given")
    if not 0 <= headroom < 1:
        raise PlacementError(f"headroom must be in [0, 1), got {headroom}")
    out = []
    for spec in devices:
        if isinstance(spec, DeviceBudget):
            out.append(spec)
            continue
        name, _, size = str(spec).partition("=")
        name = name.strip()
        try:
            torch.device(name)
        except RuntimeError:
            raise PlacementError(f"{spec!r} is not a device; expected e.g. cuda:0, cpu or cuda:1=20GiB") from None
        if size:
            out.append(DeviceBudget(name, parse_size(size), explicit=True))
        else:
            out.append(DeviceBudget(name, int(_free_memory(name) * (1 - headroom)), explicit=False))
    return out


def block_memory(config: SwitchConfig, block_bytes: Mapping[str, int], dense_dtype: torch.dtype,
                 expert_fraction: float = 1.0) -> Dict[str, int]:
    """Resident bytes of every block once loaded, in execution order.

    ``block_bytes``: stored size of each block file (from the manifest); a tied ``lm_head`` may be
    absent (it reuses ``shared.weight`` and costs nothing). Dense tensors are counted at
    ``dense_dtype``; the rest of the file (packed experts) at its stored size times
    ``expert_fraction`` (the share of experts a process holds under expert parallelism).
    """
    if not 0 < expert_fraction <= 1:
        raise PlacementError(f"expert_fraction must be in (0, 1], got {expert_fraction}")
    elem = torch.empty((), dtype=dense_dtype).element_size()
    out = {}
    for name in config.block_names():
        if name not in block_bytes:
            if name == "lm_head" and config.tie_word_embeddings:
                out[name] = 0
                continue
            raise PlacementError(f"the checkpoint has no block {name!r}, which the config requires")
        shapes = config.block_tensor_shapes(name)
        dense_numel = sum(math.prod(shape) for tensor, shape in shapes.items() if ".mlp.experts." not in tensor)
        rest = max(0, int(block_bytes[name]) - 2 * dense_numel)  # dense is stored as bf16
        has_experts = any(".mlp.experts." in tensor for tensor in shapes)
        out[name] = (math.ceil(rest * expert_fraction) if has_experts else rest) + dense_numel * elem
    return out


def balanced_placement(sizes: Mapping[str, int], budgets: Sequence[int], device_overhead: int = 0,
                       overhead_blocks: Collection[str] = ()) -> tuple[List[List[str]], float]:
    """Splits blocks (``sizes``, in execution order) into ``len(budgets)`` contiguous runs.

    ``device_overhead``: bytes a device pays once when it holds any block of ``overhead_blocks``
    (the codec dictionary, one copy per device with ternary layers). Returns ``(runs, utilization)``:
    ``runs[i]`` are the blocks of device ``i`` (possibly empty) and ``utilization`` the smallest
    achievable ``max_i bytes_i / budgets[i]``; it exceeds 1 when the model does not fit. Devices with
    a zero budget take no bytes.
    """
    names = list(sizes)
    overhead_blocks = set(overhead_blocks)
    if any(b < 0 for b in budgets) or not budgets:
        raise PlacementError(f"device budgets must be non-negative and at least one, got {list(budgets)}")
    if any(sizes[n] < 0 for n in names) or device_overhead < 0:
        raise PlacementError("block sizes and the device overhead must be non-negative")

    def run_bytes(run: Sequence[str]) -> int:
        return sum(sizes[n] for n in run) + (device_overhead if overhead_blocks.intersection(run) else 0)

    def greedy(u: float) -> List[List[str]] | None:
        runs: List[List[str]] = [[] for _ in budgets]
        i, used, paid = 0, 0, False
        for name in names:
            while True:
                if i == len(budgets):
                    return None
                cost = sizes[name] + (device_overhead if name in overhead_blocks and not paid else 0)
                if used + cost <= u * budgets[i]:
                    break
                i, used, paid = i + 1, 0, False
            runs[i].append(name)
            used += cost
            paid = paid or name in overhead_blocks
        return runs

    total = sum(sizes.values()) + (device_overhead if overhead_blocks.intersection(names) else 0)
    if total == 0:
        return [names] + [[] for _ in budgets[1:]], 0.0
    if sum(budgets) == 0:
        raise PlacementError("every device has a zero budget")
    # Upper bound: everything on the largest device (+1 byte so float rounding cannot make it infeasible).
    lo, hi = 0.0, (total + 1) / max(budgets)
    for _ in range(100):
        mid = (lo + hi) / 2
        if greedy(mid) is None:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    runs = greedy(hi)
    assert runs is not None  # hi is always feasible
    util = max(run_bytes(run) / b if b else 0.0 for run, b in zip(runs, budgets))
    return runs, util


def validate_device_map(device_map: Mapping[str, str], block_names: Sequence[str]) -> Dict[str, str]:
    """Checks an explicit ``{block name: device}`` map covers exactly the model's blocks."""
    unknown = sorted(set(device_map) - set(block_names))
    missing = [b for b in block_names if b not in device_map]
    if unknown or missing:
        raise PlacementError(f"device_map: unknown blocks {unknown[:6]}, missing blocks {missing[:6]}; "
                             f"it must name every block of {block_names[0]!r} ... {block_names[-1]!r}")
    out = {}
    for block in block_names:
        try:
            out[block] = str(torch.device(device_map[block]))
        except (RuntimeError, TypeError):
            raise PlacementError(f"device_map[{block!r}] = {device_map[block]!r} is not a device") from None
    return out


def default_dense_dtype(devices: Sequence[str]) -> torch.dtype:
    """The runtime's dtype for dense weights: bf16 when every device is a GPU, else float32 (PyTorch's
    CPU bf16 matmuls are several times slower than float32 ones)."""
    return torch.bfloat16 if all(torch.device(d).type == "cuda" for d in devices) else torch.float32


def plan_blocks(config: SwitchConfig, block_bytes: Mapping[str, int],
                devices: Sequence[str | DeviceBudget] | str | None = None, dense_dtype: torch.dtype | None = None,
                headroom: float = DEFAULT_HEADROOM, dictionary_bytes: int = 0, expert_fraction: float = 1.0) -> dict:
    """Plans the placement of a model whose block files have sizes ``block_bytes``.

    ``devices``: as in :func:`parse_devices`; ``headroom``: fraction of free memory left unplanned;
    ``dense_dtype``: default :func:`default_dense_dtype`; ``dictionary_bytes``: resident size of the
    codec dictionary, counted once on every device holding a sparse block (0 for integer experts);
    ``expert_fraction``: share of every layer's experts this process holds (expert parallelism).
    Returns a JSON-able dict::

        {"fits": bool, "utilization": float, "total_bytes": int,
         "devices": [{"device", "budget_bytes", "explicit", "used_bytes", "blocks": [...]}],
         "device_map": {block: device}, "block_bytes": {block: resident bytes}, "dictionary_bytes": int}
    """
    budgets = parse_devices(devices, headroom)
    dense_dtype = dense_dtype or default_dense_dtype([b.device for b in budgets])
    sizes = block_memory(config, block_bytes, dense_dtype, expert_fraction)
    sparse_blocks = {f"{stack}.block.{i}" for stack in ("encoder", "decoder")
                     for i in range(config.num_blocks(stack)) if config.is_sparse(stack, i)}
    # An lm_head tied to the embeddings and not stored is shared.weight itself: it runs where the
    # embeddings live, at no cost, instead of taking a place at the end of the pipeline.
    tied_head = config.tie_word_embeddings and "lm_head" not in block_bytes
    placed = {b: n for b, n in sizes.items() if not (tied_head and b == "lm_head")}
    runs, util = balanced_placement(placed, [b.budget_bytes for b in budgets], dictionary_bytes, sparse_blocks)
    if tied_head:
        next(run for run in runs if "shared" in run).append("lm_head")
    device_map = {}
    entries = []
    for budget, run in zip(budgets, runs):
        for block in run:
            device_map[block] = budget.device
        used = sum(sizes[b] for b in run) + (dictionary_bytes if sparse_blocks.intersection(run) else 0)
        entries.append({"device": budget.device, "budget_bytes": budget.budget_bytes,
                        "explicit": budget.explicit, "used_bytes": used, "blocks": run})
    return {"fits": util <= 1.0, "utilization": util, "total_bytes": sum(e["used_bytes"] for e in entries),
            "dense_dtype": str(dense_dtype).replace("torch.", ""), "headroom": headroom, "devices": entries,
            "device_map": device_map, "block_bytes": sizes, "dictionary_bytes": dictionary_bytes}


def dictionary_memory(checkpoint) -> int:
    """Resident bytes of a checkpoint's codec dictionary as the ops hold it on a device (0 without one)."""
    if checkpoint.dictionary is None:
        return 0
    from .ops import dictionary_tensors

    return sum(t.numel() * t.element_size() for t in dictionary_tensors(checkpoint.dictionary).values())


def plan(path: str, devices: Sequence[str] | str | None = None, dense_dtype: torch.dtype | None = None,
         headroom: float = DEFAULT_HEADROOM) -> dict:
    """:func:`plan_blocks` for a compressed checkpoint folder or Hub id (``qmoe plan DIR --devices
    ...``): reads its manifest, config and the codec dictionary, no block weights."""
    from .storage import open_compressed

    ckpt = open_compressed(path)
    sizes = {name: ckpt.block_bytes(name) for name in ckpt.block_names()}
    result = plan_blocks(ckpt.config, sizes, devices, dense_dtype, headroom, dictionary_memory(ckpt))
    result["checkpoint"] = str(path)
    return result


def format_plan(result: dict) -> str:
    """Human-readable table of a :func:`plan` result."""
    lines = [f"{'device':<10} {'budget':>12} {'used':>12} {'use':>6}  blocks"]
    for d in result["devices"]:
        use = d["used_bytes"] / d["budget_bytes"] if d["budget_bytes"] else 0.0
        blocks = d["blocks"]
        span = "-" if not blocks else blocks[0] if len(blocks) == 1 else f"{blocks[0]} .. {blocks[-1]} ({len(blocks)})"
        budget = format_bytes(d["budget_bytes"]) + ("" if d["explicit"] else "*")
        lines.append(f"{d['device']:<10} {budget:>12} {format_bytes(d['used_bytes']):>12} {use:>6.1%}  {span}")
    lines.append(f"total {format_bytes(result['total_bytes'])} (dense weights in {result['dense_dtype']}); "
                 f"largest device utilization {result['utilization']:.1%}: "
                 + ("fits" if result["fits"] else "DOES NOT FIT"))
    if any(not d["explicit"] for d in result["devices"]):
        lines.append(f"* free memory now, minus {result['headroom']:.0%} headroom for activations and the KV cache")
    return "\n".join(lines)

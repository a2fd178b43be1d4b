"""Peak resident memory while streaming a large Switch checkpoint block by block.

Generates a Switch checkpoint in the Hugging Face layout (sharded safetensors and/or sharded .bin,
shards cut across block boundaries as in real checkpoints), then, each in a fresh subprocess:

* **stream**: ``CheckpointReader.iter_blocks()``, touching every byte of every tensor (a checksum)
  and dropping the block before the next one, as the compression pipeline does;
* **full** (baseline): load every shard whole (``safetensors.torch.load_file`` /
  ``torch.load(weights_only=True)`` without mmap) and keep the state dict, as a naive loader does.

Memory is the peak RSS (``VmHWM``) minus the RSS right after ``import torch``. Target: the stream
stays below twice the largest block.

    python benchmarks/stream_memory.py            # >= 4 GB checkpoint, 21 blocks, both formats
    python benchmarks/stream_memory.py --quick    # ~0.4 GB, under a minute
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from qmoe.config import SwitchConfig  # noqa: E402

# All-sparse (c2048-like) bf16 models; sizes chosen so the full one is >= 4 GB in >= 12 blocks.
SIZES = {
    "full": dict(d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_experts=16, num_layers=8, vocab_size=32128),
    "quick": dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_experts=16, num_layers=3, vocab_size=32128),
    "test": dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_experts=8, num_layers=2, vocab_size=8192),
}


def make_config(size: str) -> SwitchConfig:
    s = dict(SIZES[size])
    n = s.pop("num_layers")
    return SwitchConfig.from_dict({
        "architectures": ["SwitchTransformersForConditionalGeneration"], "model_type": "switch_transformers",
        "num_layers": n, "num_decoder_layers": n, "num_sparse_encoder_layers": n, "num_sparse_decoder_layers": n,
        "is_full_sparse": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16", **s,
    })


def write_checkpoint(directory: str, cfg: SwitchConfig, fmt: str, shard_bytes: int, seed: int = 0) -> dict:
    """Writes ``cfg``'s tensors (random bf16) as HF shards of about ``shard_bytes`` each, holding at
    most one shard in memory. Returns sizes: total and per block."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    g = torch.Generator().manual_seed(seed)
    names_shapes = [(n, s) for b in cfg.block_names() for n, s in cfg.block_tensor_shapes(b).items()]
    total = sum(_numel(s) * 2 for _, s in names_shapes)
    n_shards = max(1, -(-total // shard_bytes))
    shard_files = ([f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)] if fmt == "safetensors"
                   else [f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin" for i in range(n_shards)])
    weight_map, shard, shard_size, shard_idx = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_size, shard_idx
        path = os.path.join(directory, shard_files[shard_idx])
        if fmt == "safetensors":
            save_file(shard, path, metadata={"format": "pt"})
        else:
            torch.save(shard, path)
        shard, shard_size, shard_idx = {}, 0, shard_idx + 1

    for name, shape in names_shapes:
        # Random 16-bit patterns viewed as bf16: as incompressible as real weights, and fast to make.
        t = torch.randint(-2 ** 15, 2 ** 15, shape, dtype=torch.int16, generator=g).view(torch.bfloat16)
        if shard and shard_size + t.numel() * 2 > shard_bytes and shard_idx < n_shards - 1:
            flush()
        shard[name] = t
        shard_size += t.numel() * 2
        weight_map[name] = shard_files[shard_idx]
    flush()
    shard_files = shard_files[:shard_idx]
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    with open(os.path.join(directory, index), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return {"total_bytes": total, "shards": len(shard_files),
            "block_bytes": {b: sum(_numel(s) * 2 for s in cfg.block_tensor_shapes(b).values())
                            for b in cfg.block_names()}}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _checksum(t: torch.Tensor) -> int:
    """Reads every byte of ``t`` without allocating beside it: max and min of its 16-bit patterns
    (an int16 reduction needs no widened copy, unlike a sum)."""
    flat = t.reshape(-1).view(torch.int16)
    return int(flat.max()) * 65536 + int(flat.min())


def _measure(directory: str, mode: str) -> dict:
    """Runs in the child process (``import torch`` already done at module import)."""
    base_kb = _status_kb("VmRSS")
    from qmoe.checkpoint import CheckpointReader

    t0 = time.perf_counter()
    checksum = 0
    if mode == "stream":
        reader = CheckpointReader(directory)
        blocks = 0
        for _, tensors in reader.iter_blocks():
            for t in tensors.values():
                checksum += _checksum(t)
            # Any surviving view keeps its shard's mapping, and with it every touched page, resident.
            del tensors, t
            blocks += 1
    else:
        reader = CheckpointReader(directory)
        files = sorted({f for b in reader.block_names() for f in reader.files_for_block(b)})
        state = {}
        for file in files:
            path = os.path.join(directory, file)
            if file.endswith(".safetensors"):
                from safetensors.torch import load_file

                state.update(load_file(path))
            else:
                state.update(torch.load(path, weights_only=True))
        for t in state.values():
            checksum += _checksum(t)
        blocks = len(reader.block_names())
    return {"mode": mode, "seconds": time.perf_counter() - t0, "rss_after_import_torch_mb": base_kb / 1024,
            "peak_rss_mb": _status_kb("VmHWM") / 1024, "growth_mb": (_status_kb("VmHWM") - base_kb) / 1024,
            "blocks": blocks, "checksum": checksum}


def measure(directory: str, mode: str) -> dict:
    """Measures ``mode`` ("stream" or "full") in a fresh Python process, so VmHWM is its own."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", directory, "--mode", mode],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measurement subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(size: str, formats: list[str], workdir: str, keep: bool, baseline: bool = True) -> list[dict]:
    cfg = make_config(size)
    rows = []
    for fmt in formats:
        directory = os.path.join(workdir, f"switch-{size}-{fmt}")
        t0 = time.perf_counter()
        sizes = write_checkpoint(directory, cfg, fmt, shard_bytes=int(max(sizes_of(cfg).values()) * 1.5))
        write_s = time.perf_counter() - t0
        largest_block = max(sizes["block_bytes"].values())
        stream = measure(directory, "stream")
        full = measure(directory, "full") if baseline else None
        if full is not None and full["checksum"] != stream["checksum"]:
            raise RuntimeError("streamed and fully loaded checkpoints disagree")
        rows.append({
            "format": fmt, "checkpoint_mb": sizes["total_bytes"] / 2 ** 20, "shards": sizes["shards"],
            "blocks": stream["blocks"], "largest_block_mb": largest_block / 2 ** 20,
            "stream_growth_mb": stream["growth_mb"], "stream_over_largest_block": stream["growth_mb"] * 2 ** 20
            / largest_block, "stream_seconds": stream["seconds"], "rss_after_import_torch_mb":
            stream["rss_after_import_torch_mb"], "full_load_growth_mb": full and full["growth_mb"],
            "full_load_seconds": full and full["seconds"], "write_seconds": write_s,
        })
        if not keep:
            shutil.rmtree(directory)
    return rows


def sizes_of(cfg: SwitchConfig) -> dict[str, int]:
    return {b: sum(_numel(s) * 2 for s in cfg.block_tensor_shapes(b).values()) for b in cfg.block_names()}


def print_table(rows: list[dict]) -> None:
    head = ("format", "ckpt MB", "shards", "blocks", "largest blk MB", "stream peak-base MB", "x largest",
            "full-load peak-base MB", "stream s", "full s")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        full = "-" if r["full_load_growth_mb"] is None else f"{r['full_load_growth_mb']:.0f}"
        full_s = "-" if r["full_load_seconds"] is None else f"{r['full_load_seconds']:.1f}"
        print(f"{r['format']} | {r['checkpoint_mb']:.0f} | {r['shards']} | {r['blocks']} | "
              f"{r['largest_block_mb']:.0f} | {r['stream_growth_mb']:.0f} | {r['stream_over_largest_block']:.2f} | "
              f"{full} | {r['stream_seconds']:.1f} | {full_s}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~0.4 GB checkpoint instead of >= 4 GB")
    p.add_argument("--formats", default="safetensors,bin", help="comma-separated: safetensors,bin")
    p.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp dir in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--no-baseline", action="store_true", help="skip the full-load baseline")
    p.add_argument("--json", default=os.path.join(REPO, "benchmarks", "results", "stream_memory.json"))
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(_measure(args.measure, args.mode)))
        return 0
    size = "quick" if args.quick else "full"
    workdir = args.workdir or tempfile.mkdtemp(prefix="qmoe-stream-", dir="/tmp")
    try:
        rows = run(size, args.formats.split(","), workdir, args.keep, baseline=not args.no_baseline)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(rows)
    ok = all(r["stream_over_largest_block"] < 2.0 for r in rows)
    print(f"target peak-base < 2 x largest block: {'met' if ok else 'MISSED'}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"size": size, "config": SIZES[size], "rows": rows, "target_met": ok}, f, indent=2)
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

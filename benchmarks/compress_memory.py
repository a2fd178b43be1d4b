"""Peak resident memory of `qmoe compress` on a generated checkpoint much larger than --max-cpu-memory.

Generates a c2048-style (all blocks sparse, bf16, untied) Switch checkpoint with random weights in
sharded safetensors, then compresses it twice in fresh subprocesses: once with activations in RAM and
once with ``--max-cpu-memory`` far below both the checkpoint and the activation buffers, so they spill
to disk. Reports peak RSS (``ru_maxrss`` of the child) minus the RSS of a child that only imports
qmoe and torch, next to the checkpoint, largest block and activation sizes, and checks that both runs
wrote identical checkpoints.

    python benchmarks/compress_memory.py            # ~1.1 GB checkpoint, 256 MiB limit
    python benchmarks/compress_memory.py --quick    # ~150 MB checkpoint, 32 MiB limit
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_checkpoint(path: str, d_model: int, d_ff: int, experts: int, layers: int, shards: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from qmoe.config import SwitchConfig
    from qmoe.data import bundled_model_path

    with open(os.path.join(bundled_model_path(), "config.json")) as f:
        cfg = json.load(f)
    cfg.update(d_model=d_model, d_ff=d_ff, d_kv=64, num_heads=max(1, d_model // 64), num_experts=experts,
               num_layers=layers, num_decoder_layers=layers, num_sparse_encoder_layers=layers,
               num_sparse_decoder_layers=layers, encoder_sparse_step=1, decoder_sparse_step=1,
               tie_word_embeddings=False, torch_dtype="bfloat16")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(bundled_model_path(), name), path)
    config = SwitchConfig.from_dict(cfg)
    gen = torch.Generator().manual_seed(0)
    blocks = [b for b in config.block_names()]
    per_shard = -(-len(blocks) // shards)
    weight_map, sizes = {}, {}
    for s in range(shards):
        tensors = {}
        for block in blocks[s * per_shard:(s + 1) * per_shard]:
            size = 0
            for name, shape in config.block_tensor_shapes(block).items():
                fan_in = shape[-1]
                t = torch.randn(*shape, generator=gen) * (fan_in ** -0.5)
                if name.endswith("layer_norm.weight"):
                    t = torch.ones(*shape)
                tensors[name] = t.to(torch.bfloat16)
                size += tensors[name].numel() * 2
            sizes[block] = size
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, os.path.join(path, fname))
        weight_map.update({k: fname for k in tensors})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f)
    return {"checkpoint_bytes": sum(sizes.values()), "largest_block_bytes": max(sizes.values()),
            "blocks": len(blocks)}


CHILD = r"""
import resource, sys, json
sys.path.insert(0, {repo!r})
import torch, qmoe.compress, qmoe.codec
qmoe.codec.default_dictionary()
if {run}:
    from qmoe.cli import main
    main({argv!r})
print(json.dumps({{"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def child(argv, run: bool) -> int:
    code = CHILD.format(repo=REPO, run=run, argv=argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout + proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])["maxrss"]


def digest(path: str) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            if f == "qmoe_report.json" or f == "qmoe_manifest.json":
                continue
            with open(os.path.join(root, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "compress_memory.json"))
    args = ap.parse_args(argv)
    if args.quick:
        shape = dict(d_model=256, d_ff=1024, experts=16, layers=2, shards=4)
        limit_mib, samples = 32, 32
    else:
        shape = dict(d_model=512, d_ff=2048, experts=32, layers=4, shards=8)
        limit_mib, samples = 256, 128
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        info = make_checkpoint(ckpt, **shape)
        base = child([], run=False)
        rows = []
        for label, extra in (("activations in RAM", []), (f"--max-cpu-memory {limit_mib}MiB", 
                                                          ["--max-cpu-memory", f"{limit_mib}MiB"])):
            out = os.path.join(tmp, "out-" + str(len(rows)))
            argv = ["compress", ckpt, "--out", out, "--samples", str(samples), "--val-samples", "8", "--quiet",
                    "--method", "gptq", *extra]
            t0 = time.time()
            peak = child(argv, run=True)
            rows.append({"run": label, "peak_rss_bytes": peak, "above_import_bytes": peak - base,
                         "seconds": time.time() - t0, "digest": digest(out)})
            shutil.rmtree(out)
    tokens = samples * 568
    act_bytes = tokens * shape["d_model"] * 4
    print(f"checkpoint {info['checkpoint_bytes'] / 2**20:.0f} MiB in {info['blocks']} blocks, largest block "
          f"{info['largest_block_bytes'] / 2**20:.0f} MiB; one activation buffer ~{act_bytes / 2**20:.0f} MiB "
          f"(~3 live); RSS after imports {base / 2**20:.0f} MiB")
    print(f"{'run':28s} {'peak RSS':>10s} {'above imports':>14s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['run']:28s} {r['peak_rss_bytes'] / 2**20:8.0f}Mi {r['above_import_bytes'] / 2**20:12.0f}Mi "
              f"{r['seconds']:8.1f}")
    same = rows[0]["digest"] == rows[1]["digest"]
    margin = rows[1]["above_import_bytes"] - limit_mib * 2**20
    print(f"identical checkpoints: {same}; spilled run: peak above imports = limit + {margin / 2**20:.0f} MiB "
          f"({margin / info['largest_block_bytes']:.2f} x largest block)")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"checkpoint": info, "limit_bytes": limit_mib * 2**20, "import_rss_bytes": base, "runs": rows,
                   "identical": same, "shape": shape, "samples": samples}, f, indent=2)
    if not same:
        sys.exit("spilled run wrote a different checkpoint")


if __name__ == "__main__":
    main()

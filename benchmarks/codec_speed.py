"""Speed of the codec on the CPU: encode, validate, decode, dequantize and matmul, against baselines
measured in the same run (numpy 2-bit packing for encode/decode, dense float32 matmul of the
decoded weights for matmul).

Reports best-of-N wall time as weights/s, and also weights per CPU-second (process CPU time over all
threads), which is what the code achieves per core when the machine is shared and wall time is
noisy; ``load`` is the 1-minute load average at the start of each measurement.

Usage: python benchmarks/codec_speed.py [--quick] [--json PATH] [--rows 2080 --cols 6144] [--p0 0.885]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import numba
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from qmoe import codec  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "codec_speed.json"


def timed(fn, repeats):
    """(best wall seconds, CPU seconds of that run, load average before it)."""
    fn()  # warm up: numba dispatch / cache load
    best = None
    for _ in range(repeats):
        load = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if best is None or wall < best[0]:
            best = (wall, cpu, load)
    return best


def pack2(t):
    """Baseline 'encoder': 4 weights per byte."""
    flat = (t.reshape(-1, 4) + 1).astype(np.uint8)
    return flat[:, 0] | flat[:, 1] << 2 | flat[:, 2] << 4 | flat[:, 3] << 6


def unpack2(packed, shape):
    """Baseline 'decoder' for pack2."""
    out = np.empty((packed.size, 4), np.int8)
    for i in range(4):
        out[:, i] = (packed >> (2 * i)) & 3
    return (out - 1).reshape(shape)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and token counts (< 1 minute)")
    parser.add_argument("--json", type=pathlib.Path, default=RESULTS, help=f"output JSON (default {RESULTS})")
    parser.add_argument("--rows", type=int, default=2080)
    parser.add_argument("--cols", type=int, default=6144)
    parser.add_argument("--p0", type=float, default=0.885)
    args = parser.parse_args(argv)
    if args.cols % 4:
        parser.error("--cols must be a multiple of 4 (the 2-bit packing baseline)")
    repeats = 3 if args.quick else 7
    rng = np.random.default_rng(0)
    u = rng.random((args.rows, args.cols))
    t = np.where(u < (1 - args.p0) / 2, -1, np.where(u >= (1 + args.p0) / 2, 1, 0)).astype(np.int8)
    scales = np.stack([-rng.random(args.rows), rng.random(args.rows)], axis=1)
    weights = t.size
    default, qmoe = codec.default_dictionary(), codec.qmoe_dictionary()
    enc = codec.encode(t, scales=scales)
    enc_qmoe = codec.encode(t, scales=scales, dictionary=qmoe)
    packed = pack2(t)
    w = codec.dequantize(enc)

    cases = [
        ("encode tunstall (default)", lambda: codec.encode(t, scales=scales, dictionary=default), weights),
        ("encode tunstall exact class", lambda: codec.encode(t, scales=scales, class_selection="exact"), weights),
        ("encode qmoe pairs", lambda: codec.encode(t, scales=scales, dictionary=qmoe), weights),
        ("baseline: numpy 2-bit pack", lambda: pack2(t), weights),
        ("validate", lambda: codec.validate(enc), weights),
        ("decode tunstall", lambda: codec.decode(enc), weights),
        ("decode qmoe pairs", lambda: codec.decode(enc_qmoe), weights),
        ("dequantize tunstall", lambda: codec.dequantize(enc), weights),
        ("baseline: numpy 2-bit unpack", lambda: unpack2(packed, t.shape), weights),
    ]
    for tokens in ((1, 16) if args.quick else (1, 8, 64)):
        x = rng.standard_normal((tokens, args.cols)).astype(np.float32)
        cases.append((f"matmul tokens={tokens}", lambda x=x: codec.matmul(x, enc), weights * tokens))
        cases.append((f"baseline: dense fp32 x @ W.T tokens={tokens}", lambda x=x: x @ w.T, weights * tokens))

    print(f"{args.rows}x{args.cols} at P(0)={args.p0}, {numba.get_num_threads()} numba threads, "
          f"{os.cpu_count()} CPUs; best of {repeats}")
    print(f"{'operation':<44} {'ms':>9} {'Mweights/s':>11} {'per CPU-s':>10} {'load':>5}")
    results = []
    for name, fn, work in cases:
        wall, cpu, load = timed(fn, repeats)
        row = {"operation": name, "ms": 1e3 * wall, "mweights_per_s": work / wall / 1e6,
               "mweights_per_cpu_s": work / max(cpu, 1e-9) / 1e6, "load": load}
        results.append(row)
        print(f"{name:<44} {row['ms']:9.2f} {row['mweights_per_s']:11.1f} {row['mweights_per_cpu_s']:10.1f} {load:5.1f}")
    by = {r["operation"]: r for r in results}
    ratios = {
        "encode_vs_pack": by["encode tunstall (default)"]["ms"] / by["baseline: numpy 2-bit pack"]["ms"],
        "decode_vs_unpack": by["decode tunstall"]["ms"] / by["baseline: numpy 2-bit unpack"]["ms"],
    }
    for tokens in ((1, 16) if args.quick else (1, 8, 64)):
        ratios[f"matmul_vs_dense_tokens{tokens}"] = (by[f"matmul tokens={tokens}"]["ms"]
                                                     / by[f"baseline: dense fp32 x @ W.T tokens={tokens}"]["ms"])
    print("time ratios (ours / baseline): " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "codec_speed", "quick": args.quick, "command": " ".join(sys.argv),
        "machine": platform.platform(), "cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
        "shape": [args.rows, args.cols], "p0": args.p0, "results": results, "ratios": ratios}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Per-layer time of the qmoe CUDA decode+GEMM against torch bf16 matmul, measured in the same run.

Two tables:

* single matrix: ``x [B, cols] @ W.T`` for the Switch shapes 768x3072, 3072x768 (base/large-128),
  2080x6144, 6144x2080 (c2048), B = 1..64: our kernel (qmoe.ops.ternary_matmul) vs ``x @ W_bf16.T``.
  Targets (H100): >= 2x faster than bf16 at B = 1 on the c2048 shapes, no slower up to B = 16.
* grouped layer: E experts (128 at 768x3072, 2048 at 2080x6144), tokens per expert fixed or random in
  1..64: one grouped call vs launching the kernel once per expert with tokens (target: >= 5x), and the
  paper's "ideal" dense baseline (all tokens through one shared bf16 weight).

All times are device times per call from CUDA-graph replays (see ``timed``), so Python dispatch
overhead, which would flatter the grouped call even more, is left out of every comparison.

Weights are random ternary at P(0) = 0.885 (c2048's sparsity), encoded with the default dictionary. A
grouped layer replicates a few distinct encoded experts (encoding 2048 large experts would take
minutes and changes nothing for timing: every expert still has its own codewords in memory).

Usage::

    python benchmarks/kernel.py [--quick] [--json PATH] [--iters N]

Needs a CUDA device and the compiled extension; without them it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from qmoe import codec, ops  # noqa: E402

SHAPES = [(768, 3072), (3072, 768), (2080, 6144), (6144, 2080)]  # (rows, cols) of W; y = x @ W.T
BATCHES = [1, 2, 4, 8, 16, 32, 64]
GROUPED = [(128, 3072, 768), (128, 768, 3072), (2048, 6144, 2080), (2048, 2080, 6144)]  # (E, rows, cols)
P_ZERO = 0.885
DEVICE = "cuda"


def timed(fn, iters, reps=20):
    """Median GPU milliseconds per call of ``fn``.

    ``reps`` calls are captured in one CUDA graph and the graph is replayed ``iters`` times between CUDA
    events, so the figure is device time (as in a model run under CUDA graphs), not Python dispatch.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (allocator, lazy module loading) off the capture stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return float(np.median(times))


def encode_random(rng, rows, cols, dictionary):
    """A random ternary matrix at P(0) = 0.885 with random per-row scales, encoded."""
    p = [(1 - P_ZERO) / 2, P_ZERO, (1 - P_ZERO) / 2]
    w = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=(rows, cols), p=p)
    scales = np.stack([-rng.uniform(0.01, 0.05, rows), rng.uniform(0.01, 0.05, rows)], axis=1)
    return codec.encode(w, scales=scales, dictionary=dictionary)


def layer_tensors(encoded_distinct, num_experts, device):
    """The layer layout of ``num_experts`` experts cycling through ``encoded_distinct``."""
    from qmoe.storage import PackedExperts

    experts = [encoded_distinct[e % len(encoded_distinct)] for e in range(num_experts)]
    tensors = PackedExperts.from_encoded(experts, experts[0].dictionary).tensors
    return {k: v.to(device) for k, v in tensors.items()}


def bench_single(dictionary, dict_gpu, batches, iters, rng):
    rows_out = []
    for rows, cols in SHAPES:
        enc = encode_random(rng, rows, cols, dictionary)
        layer = layer_tensors([enc], 1, DEVICE)
        dense = torch.from_numpy(codec.dequantize(enc)).to(DEVICE, torch.bfloat16)  # [rows, cols]
        for batch in batches:
            x = torch.randn(batch, cols, dtype=torch.bfloat16, device=DEVICE)
            # As in a model, the token offsets come ready-made (from routing), not built per call.
            token_offsets = torch.tensor([0, batch], device=DEVICE)

            def ours():
                return ops.grouped_ternary_matmul(x, token_offsets, layer, dict_gpu)

            t_ours = timed(ours, iters)
            t_bf16 = timed(lambda: x @ dense.T, iters)
            t_tile = None
            if batch >= 16:  # forced tensor cores show where "auto" should switch on this GPU
                with ops.kernel_path("tile"):
                    t_tile = timed(ours, iters)
            err = (ours().float() - (x @ dense.T).float()).abs().max().item()
            rows_out.append({"rows": rows, "cols": cols, "batch": batch, "qmoe_ms": t_ours, "bf16_ms": t_bf16,
                             "speedup": t_bf16 / t_ours, "forced_tile_ms": t_tile, "max_abs_diff_vs_bf16": err,
                             "bits_per_weight": 8 * enc.nbytes / (rows * cols)})
            tile_note = f"  (tiles forced: {t_tile * 1e3:8.1f} us)" if t_tile is not None else ""
            print(f"{rows:>5}x{cols:<5} B={batch:<3} qmoe {t_ours * 1e3:8.1f} us  bf16 {t_bf16 * 1e3:8.1f} us  "
                  f"speedup {t_bf16 / t_ours:5.2f}x{tile_note}", flush=True)
    return rows_out


def bench_grouped(dictionary, dict_gpu, configs, token_patterns, iters, rng):
    rows_out = []
    for num_experts, rows, cols in configs:
        distinct = [encode_random(rng, rows, cols, dictionary) for _ in range(4)]
        layer = layer_tensors(distinct, num_experts, DEVICE)
        dense = torch.from_numpy(codec.dequantize(distinct[0])).to(DEVICE, torch.bfloat16)
        for pattern in token_patterns:
            counts = (rng.integers(1, 65, num_experts) if pattern == "random 1-64"
                      else np.full(num_experts, int(pattern)))
            bounds = np.concatenate([[0], np.cumsum(counts)])
            token_offsets = torch.from_numpy(bounds).to(DEVICE)
            x = torch.randn(int(bounds[-1]), cols, dtype=torch.bfloat16, device=DEVICE)
            # The per-expert baseline: one launch per expert with tokens (the kernel's single-matrix mode,
            # offsets prepared beforehand so each call is exactly one kernel).
            starts = layer["expert_offsets"].tolist()
            per_expert = []
            for e in range(num_experts):
                a, b = int(bounds[e]), int(bounds[e + 1])
                one = {"codewords": layer["codewords"][starts[e]:starts[e + 1]],
                       "expert_offsets": torch.tensor([0, starts[e + 1] - starts[e]], device=DEVICE),
                       "row_offsets": layer["row_offsets"][e:e + 1], "row_class": layer["row_class"][e:e + 1],
                       "scales": layer["scales"][e:e + 1]}
                per_expert.append((one, x[a:b], torch.tensor([0, b - a], device=DEVICE)))

            def loop():
                for one, xe, offsets_e in per_expert:
                    ops.grouped_ternary_matmul(xe, offsets_e, one, dict_gpu)

            t_grouped = timed(lambda: ops.grouped_ternary_matmul(x, token_offsets, layer, dict_gpu), iters)
            t_loop = timed(loop, max(3, iters // 10), reps=1)
            t_ideal = timed(lambda: x @ dense.T, iters)
            rows_out.append({"experts": num_experts, "rows": rows, "cols": cols, "tokens_per_expert": pattern,
                             "tokens": int(bounds[-1]), "grouped_ms": t_grouped, "per_expert_loop_ms": t_loop,
                             "ideal_dense_bf16_ms": t_ideal, "speedup_vs_loop": t_loop / t_grouped,
                             "ratio_vs_ideal": t_grouped / t_ideal})
            r = rows_out[-1]
            print(f"E={num_experts:<5} {rows:>5}x{cols:<5} tokens/expert {pattern:<11} grouped {t_grouped:8.3f} ms  "
                  f"loop {t_loop:8.3f} ms ({r['speedup_vs_loop']:5.1f}x)  ideal dense {t_ideal:8.3f} ms", flush=True)
    return rows_out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes, batches and iterations (< 1 minute)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per measurement (median reported)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "kernel.json"), help="where to write results")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("benchmarks/kernel.py: no CUDA device visible; nothing to measure (the kernel needs a GPU).")
        return 0
    if not ops.cuda_available():
        print("benchmarks/kernel.py: qmoe._cuda is not built (install with nvcc on PATH: pip install -e .).")
        return 0

    iters = args.iters or (20 if args.quick else 100)
    batches = [1, 16, 64] if args.quick else BATCHES
    configs = GROUPED[:1] + GROUPED[2:3] if args.quick else GROUPED
    patterns = ["random 1-64"] if args.quick else ["1", "8", "64", "random 1-64"]
    rng = np.random.default_rng(0)
    started = time.time()
    dictionary = codec.default_dictionary()
    dict_gpu = ops.dictionary_tensors(dictionary, device=DEVICE)

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("== single matrix: y = x @ W.T, bf16 activations ==")
    single = bench_single(dictionary, dict_gpu, batches, iters, rng)
    print("== grouped MoE layer: one call vs a launch per expert ==")
    grouped = bench_grouped(dictionary, dict_gpu, configs, patterns, iters, rng)

    result = {
        "benchmark": "kernel",
        "command": " ".join([os.path.basename(sys.executable), "benchmarks/kernel.py"] + (argv or sys.argv[1:])),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "host": platform.node(),
        "p_zero": P_ZERO,
        "iters": iters,
        "single": single,
        "grouped": grouped,
        "seconds": time.time() - started,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

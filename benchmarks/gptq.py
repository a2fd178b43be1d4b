"""Batched GPTQ: time per expert against a per-expert loop, and error of RTN vs GPTQ grids.

Part 1 (speed): for c2048-shaped (wi: 6144 rows x 2080 cols) and base-shaped (3072 x 768)
problems, quantizes groups of G experts to ternary with one batched ``gptq_quantize`` call and,
in the same run, with a plain Python loop calling it one expert at a time (the baseline). Reports
seconds per expert for both and their ratio.

Part 2 (accuracy): on correlated synthetic inputs, the Hessian-weighted error
``tr((W - Q) H (W - Q)^T) / tr(W H W^T)`` of round-to-nearest and GPTQ with the QMoE min/max
ternary grid, with the optimized grid unconstrained and with sparsity floors (``min_zero_fraction``
0.8 and 0.88, about QMoE's sparsity), and 2-bit for reference, plus the fraction of zero codes,
which is what a sparsity-exploiting codec pays for.

Synthetic data: Gaussian weights; inputs ``X = (Z_f F + Z) * s`` with 64 shared latent factors
``F`` (correlated features) and log-normal per-feature scales ``s`` (a few loud features), so
``H = 2 X^T X / n`` is far from diagonal. Each expert's Hessian is the shared one rescaled by its
own random per-feature gains (``D H D``), which keeps experts distinct without 16 large X^T X.

Usage:
    python benchmarks/gptq.py [--quick] [--device cpu|cuda] [--threads N] [--repeats R] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qmoe.gptq import gptq_quantize  # noqa: E402
from qmoe.quant import make_grid, quantize_rtn  # noqa: E402

SHAPES = {"c2048": (6144, 2080), "base": (3072, 768)}  # name -> (rows, cols) of one expert's wi


def correlated_hessian(cols: int, tokens: int, seed: int, device) -> torch.Tensor:
    """``2 X^T X / n`` for correlated synthetic inputs ``X [tokens, cols]`` (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(64, cols, generator=g)  # shared latent directions
    x = torch.randn(tokens, 64, generator=g) @ factors / 4 + torch.randn(tokens, cols, generator=g)
    x *= torch.exp(0.5 * torch.randn(cols, generator=g))  # uneven feature scales
    x = x.to(device)
    return 2 * x.T @ x / tokens  # [cols, cols]


def expert_problems(experts: int, rows: int, cols: int, base_h: torch.Tensor, seed: int):
    """``experts`` Gaussian weight matrices and per-expert Hessians ``D_e H D_e``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(experts, rows, cols, generator=g).to(base_h.device)  # [E, rows, cols]
    gains = torch.exp(0.3 * torch.randn(experts, cols, generator=g)).to(base_h.device)  # [E, cols]
    H = gains[:, :, None] * base_h[None] * gains[:, None, :]  # [E, cols, cols]
    return w, H


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_group(w, H, device, repeats: int) -> tuple[float, float]:
    """Seconds per expert: one batched call, and a loop of single-expert calls (baseline).

    Each is the best of ``repeats`` runs, alternating which goes first, because the machine may
    be shared and the first run after allocating a shape pays for page faults.
    """
    E = w.shape[0]

    def batched():
        gptq_quantize(w, H, bits="ternary")

    def loop():
        for e in range(E):
            gptq_quantize(w[e : e + 1], H[e : e + 1], bits="ternary")

    best = {batched: float("inf"), loop: float("inf")}
    for r in range(repeats):
        for fn in (batched, loop) if r % 2 == 0 else (loop, batched):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[fn] = min(best[fn], (time.perf_counter() - t0) / E)
    return best[batched], best[loop]


def relative_errors(w, H) -> list[dict]:
    """RTN and GPTQ errors for each grid on one batch of experts (means over experts)."""
    energy = ((w @ H) * w).double().sum(dim=(1, 2))  # [E], tr(W H W^T)
    diag = torch.diagonal(H, dim1=1, dim2=2)

    def rel(q):
        d = w - q
        return (((d @ H) * d).double().sum(dim=(1, 2)) / energy).mean().item()

    rows = []
    variants = [("ternary", "minmax", 0.0), ("ternary", "optimized", 0.0), ("ternary", "optimized", 0.8),
                ("ternary", "optimized", 0.88), (2, "minmax", 0.0)]
    for bits, grid_kind, zeros in variants:
        label = f"ternary {grid_kind}" if bits == "ternary" else "2-bit"
        if zeros:
            label += f", zeros >= {zeros:.0%}"
        grid = make_grid(w, bits, grid_kind, hessian_diag=diag, min_zero_fraction=zeros)
        q = quantize_rtn(w, grid)
        rows.append({"method": f"RTN {label}", "rel_error": rel(q), "zeros": (q == 0).float().mean().item()})
        res = gptq_quantize(w, H, bits=bits, ternary_grid=grid_kind, min_zero_fraction=zeros)
        rows.append({
            "method": f"GPTQ {label}",
            "rel_error": (res.loss.double() / energy).mean().item(),
            "zeros": (res.qweight == 0).float().mean().item(),
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small groups only (under a minute)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=2, help="timing runs per measurement (best is kept; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "gptq.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.quick:
        plan = {"base": [1, 4], "c2048": [1]}
        error_plan = {"base": 2}
        args.repeats = 1
    else:
        plan = {"base": [1, 4, 16, 64], "c2048": [1, 4, 16]}
        error_plan = {"base": 8, "c2048": 4}

    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg()[0],
        "quick": args.quick,
        "repeats": args.repeats,
    }
    print(f"# batched GPTQ benchmark on {args.device} ({info['device']}), torch {info['torch']}, "
          f"{info['threads']} threads, load average {info['load_average_at_start']:.1f}")

    hessians = {name: correlated_hessian(cols, 2 * cols, seed=1, device=device) for name, (_, cols) in SHAPES.items()}

    timing = []
    print("\n| shape | rows x cols | group size | batched s/expert | loop s/expert | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, groups in plan.items():
        rows, cols = SHAPES[name]
        for G in groups:
            w, H = expert_problems(G, rows, cols, hessians[name], seed=G)
            batched, loop = time_group(w, H, device, args.repeats)
            del w, H
            timing.append({"shape": name, "rows": rows, "cols": cols, "group": G,
                           "batched_s_per_expert": batched, "loop_s_per_expert": loop})
            print(f"| {name} | {rows} x {cols} | {G} | {batched:.3f} | {loop:.3f} | {loop / batched:.2f}x |", flush=True)

    accuracy = []
    print("\n| shape | experts | method | rel. error tr(dW H dW^T)/tr(W H W^T) | zeros |")
    print("|---|---|---|---|---|")
    for name, E in error_plan.items():
        rows, cols = SHAPES[name]
        w, H = expert_problems(E, rows, cols, hessians[name], seed=100)
        for row in relative_errors(w, H):
            accuracy.append({"shape": name, "experts": E, **row})
            print(f"| {name} | {E} | {row['method']} | {row['rel_error']:.4f} | {row['zeros']:.1%} |", flush=True)
        del w, H

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "timing": timing, "accuracy": accuracy}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""Validation loss of the bundled reference model after compression, recipe by recipe.

Rows: the original model (bf16 checkpoint), round-to-nearest and GPTQ at ternary (QMoE's min/max
grid and our optimized grid; QMoE's pair codec and ours), 2-bit and 4-bit, GPTQ at two calibration
sizes. Every row is a full ``qmoe compress`` run in this process; bits per parameter are measured from
the written files (experts only, and the whole model), losses on the same held-out validation samples.

    python benchmarks/accuracy.py                 # full table (~10-20 min on 2 CPU cores)
    python benchmarks/accuracy.py --quick         # fewer rows and samples (~2 min)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qmoe.compress import CompressSettings, compress  # noqa: E402
from qmoe.stats import checkpoint_stats  # noqa: E402


def recipes(calibration_sizes, quick: bool):
    small, large = calibration_sizes
    rows = [
        ("RTN ternary, min/max grid", dict(bits="ternary", method="rtn", ternary_grid="minmax"), small),
        ("RTN ternary, optimized grid", dict(bits="ternary", method="rtn", ternary_grid="optimized"), small),
    ]
    for n in ((small,) if quick else (small, large)):
        rows += [
            (f"GPTQ ternary, min/max grid, QMoE codec (QMoE recipe), n={n}",
             dict(bits="ternary", method="gptq", ternary_grid="minmax", codec_mode="qmoe"), n),
            (f"GPTQ ternary, min/max grid, our codec, n={n}",
             dict(bits="ternary", method="gptq", ternary_grid="minmax"), n),
            (f"GPTQ ternary, optimized grid, our codec, n={n}",
             dict(bits="ternary", method="gptq", ternary_grid="optimized"), n),
            (f"GPTQ ternary, optimized grid (no sparsity floor), our codec, n={n}",
             dict(bits="ternary", method="gptq", ternary_grid="optimized", min_zero_fraction=0.0), n),
        ]
    if not quick:
        rows += [
            ("RTN 2-bit", dict(bits="2", method="rtn"), small),
            (f"GPTQ 2-bit, n={large}", dict(bits="2", method="gptq"), large),
            ("RTN 4-bit", dict(bits="4", method="rtn"), small),
            (f"GPTQ 4-bit, n={large}", dict(bits="4", method="gptq"), large),
        ]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="checkpoint (default: the bundled reference model)")
    ap.add_argument("--calibration", type=int, nargs=2, default=(32, 128), metavar=("SMALL", "LARGE"))
    ap.add_argument("--val-samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "accuracy.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.calibration, args.val_samples = (16, 16), 16

    rows = []
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, kw, n) in enumerate(recipes(args.calibration, args.quick)):
            out = os.path.join(tmp, f"run{i}")
            t0 = time.time()
            report = compress(args.source, out, CompressSettings(samples=n, val_samples=args.val_samples,
                                                                 seed=args.seed, **kw),
                              progress=False, log=lambda *a: None)
            stats = checkpoint_stats(out, decode=kw["bits"] == "ternary")
            sparsity = [layer["sparsity"] for layer in stats["layers"] if "sparsity" in layer]
            if baseline is None:
                baseline = report["loss_before"]
                rows.append({"recipe": "original (bf16 checkpoint)", "loss": baseline, "delta": 0.0,
                             "expert_bits": 16.0, "model_bits": 16.0, "sparsity": None, "seconds": None})
            rows.append({"recipe": name, "loss": report["loss_after"], "delta": report["loss_after"] - baseline,
                         "expert_bits": stats["expert_bits_per_param"], "model_bits": stats["bits_per_param"],
                         "sparsity": sum(sparsity) / len(sparsity) if sparsity else None,
                         "seconds": time.time() - t0, "settings": kw, "calibration_samples": n})
            print(f"  done: {name} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr)

    header = f"{'recipe':62s} {'loss':>7s} {'Δloss':>7s} {'bits/expert w':>13s} {'bits/param':>10s} {'zeros':>6s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        sp = "" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
        print(f"{r['recipe']:62s} {r['loss']:7.4f} {r['delta']:+7.4f} {r['expert_bits']:13.4f} "
              f"{r['model_bits']:10.4f} {sp:>6s}")
    qmoe_rows = [r for r in rows if "QMoE recipe" in r["recipe"]]
    for variant in ("min/max grid, our codec", "optimized grid, our codec"):  # the first is the default
        ours = [r for r in rows if variant in r["recipe"]]
        for q, o in zip(qmoe_rows, ours):
            ratio = o["delta"] / q["delta"] if q["delta"] else float("nan")
            print(f"GPTQ ternary, {variant} vs QMoE recipe at n={q['calibration_samples']}: loss increase "
                  f"ratio {ratio:.3f} (target <= 0.5), bits {o['expert_bits']:.4f} vs {q['expert_bits']:.4f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "val_samples": args.val_samples, "seed": args.seed}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Validation loss of the bundled reference model after compression, recipe by recipe.

Rows: round-to-nearest and GPTQ at ternary (QMoE's min/max grid and our optimized grid; QMoE's
pair codec and ours; GPTQ targets without and with compensation; per-layer plans, mixed-precision
and all-ternary, with ``--layer-bits``), 2-bit and 4-bit, GPTQ at two calibration sizes. Every row
is a full ``qmoe compress`` run in this process per seed; bits per parameter are measured from the
written files (experts only, and the whole model), losses on
held-out validation samples. A seed draws both the calibration and the validation samples, and a
row reports the mean over seeds: on this small model the loss increase of one draw varies by
20-40% between draws, more than some of the differences between recipes. KL(original ||
compressed) per validation token, less noisy, is reported next to it.

    python benchmarks/accuracy.py                 # full table, 3 seeds x 256 validation samples (~60 min, 2 cores)
    python benchmarks/accuracy.py --quick         # fewer rows and samples, one seed (~2 min)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
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
    gptq = dict(bits="ternary", method="gptq", ternary_grid="minmax")
    for n in ((small,) if quick else (small, large)):
        rows += [
            (f"{QMOE_RECIPE}, n={n}", dict(gptq, codec_mode="qmoe", compensate="none"), n),
            (f"GPTQ ternary, min/max grid, our codec, n={n}", dict(gptq, compensate="none"), n),
            (f"GPTQ ternary, min/max, our codec, compensate expert, n={n}", dict(gptq, compensate="expert"), n),
            (f"{OURS}, n={n}", dict(gptq, compensate="model"), n),
        ]
        accurate = dict(gptq, ternary_grid="optimized", min_zero_fraction=0.78, compensate="model")
        rows += [(f"{ACCURATE}, n={n}", accurate, n),
                 (f"{ACCURATE}, act order, n={n}", dict(accurate, act_order=True), n),
                 (f"{MIXED}, n={n}", dict(accurate, act_order=True, layer_bits=MIXED_PLAN), n),
                 (f"{TERNARY_PLAN_NAME}, n={n}",
                  dict(accurate, act_order=True, mask_sentinels=False, layer_bits=TERNARY_PLAN), n)]
    if not quick:
        rows += [
            ("RTN 2-bit", dict(bits="2", method="rtn"), small),
            (f"GPTQ 2-bit, compensate none, n={large}", dict(bits="2", method="gptq", compensate="none"), large),
            (f"GPTQ 2-bit, compensate model, n={large}", dict(bits="2", method="gptq", compensate="model"), large),
            ("RTN 4-bit", dict(bits="4", method="rtn"), small),
            (f"GPTQ 4-bit, compensate none, n={large}", dict(bits="4", method="gptq", compensate="none"), large),
            (f"GPTQ 4-bit, compensate model, n={large}", dict(bits="4", method="gptq", compensate="model"), large),
        ]
    return rows


QMOE_RECIPE = "GPTQ ternary, min/max grid, QMoE codec (QMoE recipe)"
OURS = "GPTQ ternary, min/max grid, our codec, compensate model (default)"
ACCURATE = "GPTQ ternary, optimized grid (floor 0.78), our codec, compensate model"
# Per-layer precision for this model, read off its per-layer KL attribution (layer_sensitivity.py) and
# the compression report's drift (benchmarks/RESULTS.md): decoder block 0's experts, 57% of the KL of
# the accuracy setting, get 2 bits; encoder blocks 1-3, under 3% of it, more zeros.
MIXED_PLAN = (r"^decoder\.block\.0\.=2", r"^encoder\.block\.[1-9]\d*\.=ternary@0.9")
MIXED = "mixed: decoder.block.0 2-bit, rest as accuracy setting (encoder.block.1-3 floor 0.9), act order"
# The same reading with ternary everywhere: fewer zeros (floor 0.72) in the decoder, where the KL is,
# paid for by more zeros in encoder blocks 1-3; the decoder positions that predict a sentinel, which
# the validation loss counts, also enter the Hessians.
TERNARY_PLAN = (r"^encoder\.block\.[1-9]\d*\.=ternary@0.9", r"^decoder\.=ternary@0.72")
TERNARY_PLAN_NAME = "all ternary, per-layer floors (encoder.block.1-3 0.9, decoder 0.72), act order, no sentinel mask"


def _mean_std(values):
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return m, sd


def run_recipe(source, name, kw, n, val_samples, seed, tmp):
    out = os.path.join(tmp, f"run-{abs(hash((name, seed)))}")
    t0 = time.time()
    report = compress(source, out, CompressSettings(samples=n, val_samples=val_samples, seed=seed, **kw),
                      progress=False, log=lambda *a: None)
    stats = checkpoint_stats(out, decode=kw["bits"] == "ternary")
    shutil.rmtree(out)
    sparsity = [layer["sparsity"] for layer in stats["layers"] if "sparsity" in layer]
    return {"before": report["loss_before"], "after": report["loss_after"],
            "delta": report["loss_after"] - report["loss_before"], "kl": report["kl"],
            "expert_bits": stats["expert_bits_per_param"], "model_bits": stats["bits_per_param"],
            "sparsity": sum(sparsity) / len(sparsity) if sparsity else None, "seconds": time.time() - t0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="checkpoint (default: the bundled reference model)")
    ap.add_argument("--calibration", type=int, nargs=2, default=(32, 128), metavar=("SMALL", "LARGE"))
    ap.add_argument("--val-samples", type=int, default=256)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                    help="each seed draws other calibration and validation samples; rows report the mean")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", default=None, help="only the recipes whose name matches this regular expression")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "accuracy.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.calibration, args.val_samples, args.seeds = (16, 16), 16, args.seeds[:1]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw, n in recipes(args.calibration, args.quick):
            if args.rows is not None and not re.search(args.rows, name):
                continue
            runs = [run_recipe(args.source, name, kw, n, args.val_samples, seed, tmp) for seed in args.seeds]
            delta, delta_sd = _mean_std([r["delta"] for r in runs])
            row = {"recipe": name, "delta": delta, "delta_std": delta_sd,
                   "kl": _mean_std([r["kl"] for r in runs])[0],
                   "loss": _mean_std([r["after"] for r in runs])[0],
                   "loss_before": _mean_std([r["before"] for r in runs])[0],
                   "expert_bits": _mean_std([r["expert_bits"] for r in runs])[0],
                   "model_bits": _mean_std([r["model_bits"] for r in runs])[0],
                   "sparsity": None if runs[0]["sparsity"] is None else _mean_std([r["sparsity"] for r in runs])[0],
                   "settings": kw, "calibration_samples": n, "runs": runs}
            rows.append(row)
            print(f"  done: {name} ({sum(r['seconds'] for r in runs):.0f} s)", file=sys.stderr)

    print(f"seeds {args.seeds}, {args.val_samples} validation samples per seed; loss and Δloss are means "
          f"(± sample std of Δloss over seeds)")
    w = max([26] + [len(r["recipe"]) for r in rows])
    header = (f"{'recipe':{w}s} {'loss':>7s} {'Δloss':>16s} {'KL':>8s} {'bits/expert w':>13s} {'bits/param':>10s} "
              f"{'zeros':>6s}")
    print(header)
    print("-" * len(header))
    print(f"{'original (bf16 checkpoint)':{w}s} {rows[0]['loss_before']:7.4f} {'':>16s} {'':>8s} {16:13.4f} "
          f"{16:10.4f}")
    for r in rows:
        sp = "" if r["sparsity"] is None else f"{r['sparsity']:.3f}"
        d = f"{r['delta']:+.4f} ± {r['delta_std']:.4f}"
        print(f"{r['recipe']:{w}s} {r['loss']:7.4f} {d:>16s} {r['kl']:8.5f} {r['expert_bits']:13.4f} "
              f"{r['model_bits']:10.4f} {sp:>6s}")
    qmoe_rows = [r for r in rows if r["recipe"].startswith(QMOE_RECIPE)]
    for label, prefix in (("default", OURS), ("accuracy setting", ACCURATE + ", n="),
                          ("accuracy setting + act order", ACCURATE + ", act order"),
                          ("mixed precision", MIXED + ", n="),
                          ("all-ternary plan", TERNARY_PLAN_NAME + ", n=")):
        for q, o in zip(qmoe_rows, [r for r in rows if r["recipe"].startswith(prefix)]):
            ratio = o["delta"] / q["delta"] if q["delta"] else float("nan")
            per_seed = [a["delta"] / b["delta"] for a, b in zip(o["runs"], q["runs"])]
            print(f"{label} vs QMoE recipe at n={q['calibration_samples']}: loss increase ratio {ratio:.3f} "
                  f"(per seed {', '.join(f'{x:.2f}' for x in per_seed)}; target <= 0.5), KL ratio "
                  f"{o['kl'] / q['kl']:.3f}, bits {o['expert_bits']:.4f} vs {q['expert_bits']:.4f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "val_samples": args.val_samples, "seeds": args.seeds}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""``qmoe stats``: where the bits of a compressed checkpoint go, measured from its files."""
from __future__ import annotations

import json
import math
import os
from typing import Dict

import numpy as np

from .storage import DICTIONARY_FILE, DICTIONARY_REF, REPORT, block_file, open_compressed

_COMPONENTS = {"codewords": "codewords", "row_offsets": "offsets", "expert_offsets": "offsets",
               "scales": "scales", "row_class": "row_class", "qweight": "codes", "scale": "scales",
               "zero": "scales", "dictionary_fingerprint": "header"}


def model_parameters(config) -> Dict[str, int]:
    """Parameter counts from the config alone: ``total`` and ``experts``."""
    total = experts = 0
    for block in config.block_names():
        if block == "lm_head" and config.tie_word_embeddings:
            continue
        for name, shape in config.block_tensor_shapes(block).items():
            n = math.prod(shape)
            total += n
            if ".mlp.experts." in name:
                experts += n
    return {"total": total, "experts": experts}


def _entropy(p0: float, pos: float, neg: float) -> float:
    return float(-sum(p * math.log2(p) for p in (p0, pos, neg) if p > 0))


def _compression_report(source: str) -> dict:
    path = os.path.join(source, REPORT)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def checkpoint_stats(source: str, decode: bool = True) -> dict:
    """Bits per parameter (whole model and experts, by component), per-layer sizes and, with
    ``decode``, per-layer sparsity and order-0 entropy of the ternary codes."""
    from . import codec

    ckpt = open_compressed(source)
    params = model_parameters(ckpt.config)
    files = ckpt.manifest["files"]
    # A built-in dictionary ships with qmoe (DICTIONARY_REF names it), like QMoE's static table.
    dict_bytes = files.get(DICTIONARY_FILE, {}).get("bytes", 0)
    components: Dict[str, int] = {}
    layers = []
    block_bytes = 0
    for name in ckpt.block_names():
        block_bytes += files[block_file(name)]["bytes"]
        weights = ckpt.read_block(name)
        for mlp, mats in weights.experts.items():
            for m, packed in mats.items():
                entry = {"layer": f"{mlp}.{m}", "kind": packed.kind, "experts": packed.num_experts,
                         "shape": [packed.rows, packed.cols]}
                nweights = packed.num_experts * packed.rows * packed.cols
                by = {}
                for k, t in packed.tensors.items():
                    b = t.numel() * t.element_size()
                    comp = _COMPONENTS.get(k, k)
                    by[comp] = by.get(comp, 0) + b
                    components[comp] = components.get(comp, 0) + b
                entry["bits_per_weight"] = 8.0 * sum(by.values()) / nweights
                entry["bits_by_component"] = {k: 8.0 * v / nweights for k, v in by.items()}
                if decode and packed.kind == "ternary":
                    counts = np.zeros(3, dtype=np.int64)
                    for e in range(packed.num_experts):
                        t = codec.decode(packed.encoded(e))
                        counts += np.bincount((t.astype(np.int64) + 1).ravel(), minlength=3)
                    neg, zero, pos = (counts / max(counts.sum(), 1)).tolist()
                    entry["sparsity"] = zero
                    entry["entropy_bits"] = _entropy(zero, pos, neg)
                layers.append(entry)
    expert_bytes = sum(components.values())
    experts = params["experts"]
    report = _compression_report(source)
    return {
        # Validation loss measured by the compression run (the report sidecar); None if absent.
        "loss": report.get("loss_after"),
        "loss_before": report.get("loss_before"),
        "checkpoint": source,
        "quantization_config": ckpt.quantization_config,
        "parameters": params["total"],
        "expert_parameters": experts,
        "bytes": block_bytes + dict_bytes,
        "bits_per_param": 8.0 * (block_bytes + dict_bytes) / params["total"],
        "expert_bits_per_param": 8.0 * (expert_bytes + dict_bytes) / experts if experts else None,
        "expert_bits_by_component": {**{k: 8.0 * v / experts for k, v in sorted(components.items())},
                                     "dictionary": 8.0 * dict_bytes / experts} if experts else {},
        "dictionary_bytes": dict_bytes,
        "dictionary": "built-in" if DICTIONARY_REF in files else ("stored" if dict_bytes else None),
        "layers": layers,
    }


def format_stats(s: dict) -> str:
    loss = "" if s["loss"] is None else f"; validation loss {s['loss_before']:.4f} -> {s['loss']:.4f}"
    lines = [f"{s['checkpoint']}: {s['parameters']:,} parameters in {s['bytes'] / 2**20:.2f} MiB{loss}",
             f"  bits/parameter: whole model {s['bits_per_param']:.4f}, experts "
             + ("n/a" if s["expert_bits_per_param"] is None else f"{s['expert_bits_per_param']:.4f}")]
    if s["expert_bits_by_component"]:
        lines.append("  expert bits by component: " + ", ".join(
            f"{k} {v:.4f}" for k, v in s["expert_bits_by_component"].items()))
    lines.append(f"  {'layer':48s} {'bits/w':>8s} {'sparsity':>9s} {'entropy':>8s}")
    for layer in s["layers"]:
        sp = layer.get("sparsity")
        en = layer.get("entropy_bits")
        lines.append(f"  {layer['layer']:48s} {layer['bits_per_weight']:8.4f} "
                     f"{'' if sp is None else format(sp, '9.4f'):>9s} {'' if en is None else format(en, '8.4f'):>8s}")
    return "\n".join(lines)


def plot_stats(s: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'qmoe[plot]'") from None
    names = [layer["layer"].replace(".layer.", ".").replace(".mlp", "") for layer in s["layers"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(names)), 4))
    ax.bar(x, [layer["bits_per_weight"] for layer in s["layers"]], color="tab:blue", label="bits/weight")
    ent = [layer.get("entropy_bits") for layer in s["layers"]]
    if all(e is not None for e in ent):
        ax.plot(x, ent, "k_", markersize=14, label="order-0 entropy")
    ax.set_ylabel("bits per weight")
    ax.set_xticks(x, names, rotation=90, fontsize=7)
    sp = [layer.get("sparsity") for layer in s["layers"]]
    if all(v is not None for v in sp):
        ax2 = ax.twinx()
        ax2.plot(x, sp, "o-", color="tab:red", label="sparsity")
        ax2.set_ylabel("fraction of zeros")
    ax.legend(loc="upper left")
    ax.set_title(f"{s['checkpoint']}: {s['bits_per_param']:.3f} bits/parameter overall")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""``qmoe push``: upload a compressed checkpoint with a generated model card."""
from __future__ import annotations

import json
import os

from .storage import atomic_write_bytes, open_compressed

CARD = "README.md"


def model_card(path: str) -> str:
    """A model card from the checkpoint's own config, manifest and compression report."""
    ckpt = open_compressed(path)
    q = ckpt.quantization_config
    report = {}
    report_path = os.path.join(path, "qmoe_report.json")
    if os.path.exists(report_path):
        with open(report_path) as f:
            report = json.load(f)
    from .stats import checkpoint_stats

    stats = checkpoint_stats(path, decode=False)
    settings = report.get("settings", {})
    cmd = ["qmoe compress", q.get("source", "SOURCE"), "--out OUT", f"--bits {q['bits']}", f"--method {q['method']}"]
    if q["bits"] == "ternary" or q.get("layer_bits"):
        cmd.append(f"--grid {q['grid']}")
    if q.get("grid") == "optimized":
        cmd.append(f"--min-zero-fraction {q['min_zero_fraction']}")
    cmd += [f"--layer-bits '{entry}'" for entry in q.get("layer_bits", [])]
    cal = q.get("calibration", {})
    cmd += [f"--samples {cal.get('samples')}", f"--seed {cal.get('seed')}"]
    if cal.get("data") not in (None, "bundled"):
        cmd.append(f"--data {cal['data']}")

    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    lines = [
        "---",
        "library_name: qmoe",
        "tags: [qmoe, mixture-of-experts, switch-transformers, quantization, sub-1-bit]",
        "---",
        "",
        f"# {os.path.basename(os.path.abspath(path))}",
        "",
        f"Compressed with [qmoe](https://pypi.org/project/qmoe/) from `{q.get('source')}`: every expert quantized "
        f"with {q['method'].upper()} to {q['bits']}"
        + (f" (grid: {q['grid']}), encoded with the `{q['codec']['mode']}` dictionary codec" if q.get("codec") else "")
        + ".",
        "",
        "| | value |",
        "|---|---|",
        f"| bits per parameter (whole model) | {stats['bits_per_param']:.4f} |",
        f"| bits per parameter (experts) | {fmt(stats['expert_bits_per_param'])} |",
        f"| validation loss before | {fmt(report.get('loss_before'))} |",
        f"| validation loss after | {fmt(report.get('loss_after'))} |",
        f"| calibration samples | {cal.get('samples')} (seed {cal.get('seed')}, data {cal.get('data')}) |",
        "",
        "Command used:",
        "",
        "```",
        " ".join(str(c) for c in cmd if c),
        "```",
        "",
        "Load it with `qmoe.load_compressed(\"<repo id>\")`, or run `qmoe eval <repo id>` / "
        "`qmoe generate <repo id> --prompt ...`.",
        "",
    ]
    if settings:
        lines += ["Full settings:", "", "```json", json.dumps(settings, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def push_checkpoint(path: str, repo_id: str, private: bool = False, dry_run: bool = False) -> str:
    """Validates ``path``, writes its model card, and uploads the folder to ``repo_id``."""
    card = model_card(path)  # validates the checkpoint (manifest, checksums) as a side effect
    atomic_write_bytes(os.path.join(path, CARD), card.encode())
    if dry_run:
        return os.path.join(path, CARD)
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=path, commit_message="Upload qmoe compressed checkpoint",
                             ignore_patterns=[".qmoe_work/*", "*.tmp.*"])
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"

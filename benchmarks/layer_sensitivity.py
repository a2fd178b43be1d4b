"""Which sparse layers' quantization costs the most: per-layer KL attribution of a compressed checkpoint.

For each sparse layer, the original model is evaluated with only that layer's experts replaced by the
compressed checkpoint's (dequantized exactly as stored), and the KL divergence ``KL(original ||
hybrid)`` per validation token and the loss increase are reported; then with every layer replaced
(the compressed model itself for a bf16 source; of other sources the checkpoint stores the dense
weights rounded to bf16, which the hybrids leave as they were), only the encoder's, and only the
decoder's. Single layers do not add
up to the whole: with ``--compensate model`` a layer's experts also absorb the drift of the layers
before them, which the hybrid does not have.

This is the slow, direct measurement (one full evaluation per layer, the whole dense model in memory:
small models only) behind the choice of a ``--layer-bits`` plan; ``qmoe compress`` reports the cheap,
streaming proxy, each sparse layer's residual-stream ``drift``, next to it.

    python benchmarks/layer_sensitivity.py COMPRESSED [--original SOURCE] [--samples 128] [--seed 100]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qmoe.data import collate, load_tokenizer, make_samples  # noqa: E402
from qmoe.model import load_switch  # noqa: E402
from qmoe.storage import open_compressed  # noqa: E402


def compressed_experts(path: str) -> dict:
    """``{mlp: {dense parameter name: float32 weight}}`` of every sparse layer, as stored."""
    ckpt = open_compressed(path)
    out = {}
    for block in ckpt.block_names():
        for mlp, mats in ckpt.read_block(block).experts.items():
            out[mlp] = {f"{mlp}.experts.expert_{e}.{m}.weight": packed.dequantize(e)
                        for m, packed in mats.items() for e in range(packed.num_experts)}
    return out


def log_probs(model, batches) -> list:
    outs = []
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"], b["decoder_input_ids"], b["attention_mask"],
                           b["decoder_attention_mask"]).logits.float()
            outs.append(F.log_softmax(logits, -1))
    return outs


def compare(reference: list, got: list, batches) -> tuple:
    """Mean KL(reference || got) and mean loss increase over the target tokens."""
    kl, dloss = [], []
    for lp, lq, b in zip(reference, got, batches):
        keep = b["labels"] != -100
        labels = b["labels"].clamp_min(0)[..., None]
        kl.append((lp.exp() * (lp - lq)).sum(-1)[keep])
        dloss.append((lp.gather(-1, labels) - lq.gather(-1, labels)).squeeze(-1)[keep])
    return torch.cat(kl).mean().item(), torch.cat(dloss).mean().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compressed", help="compressed checkpoint folder")
    ap.add_argument("--original", default=None, help="the dense source (default: the checkpoint's recorded source)")
    ap.add_argument("--samples", type=int, default=128, help="validation samples")
    ap.add_argument("--seed", type=int, default=100, help="seed of the validation samples")
    ap.add_argument("--sample-length", type=int, default=568)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "layer_sensitivity.json"))
    args = ap.parse_args(argv)

    source = args.original or open_compressed(args.compressed).quantization_config["source"]
    model = load_switch(source, dtype=torch.float32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = compressed_experts(args.compressed)
    tok = load_tokenizer(os.path.join(args.compressed))
    samples = make_samples(tok, None, args.samples, args.seed, "validation", args.sample_length)
    batches = [collate(samples[i:i + args.batch_size], tok.pad_id, model.config.decoder_start_token_id)
               for i in range(0, len(samples), args.batch_size)]
    reference = log_probs(model, batches)

    def hybrid(mlps) -> tuple:
        state = dict(original)
        for mlp in mlps:
            state.update(quantized[mlp])
        model.load_state_dict(state)
        try:
            return compare(reference, log_probs(model, batches), batches)
        finally:
            model.load_state_dict(original)

    layers = list(quantized)
    rows = [(mlp, *hybrid([mlp])) for mlp in layers]
    rows += [("all sparse layers (the compressed model)", *hybrid(layers)),
             ("encoder layers only", *hybrid([m for m in layers if m.startswith("encoder.")])),
             ("decoder layers only", *hybrid([m for m in layers if m.startswith("decoder.")]))]
    print(f"{args.compressed}: {args.samples} validation samples (seed {args.seed}), original {source}")
    print(f"{'experts replaced':44s} {'KL':>9s} {'Δloss':>9s}")
    for name, kl, dloss in rows:
        print(f"{name:44s} {kl:9.5f} {dloss:+9.5f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"compressed": args.compressed, "original": source, "samples": args.samples, "seed": args.seed,
                   "rows": [{"replaced": n, "kl": k, "delta_loss": d} for n, k, d in rows]}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

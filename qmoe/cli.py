"""The ``qmoe`` command line: compress, eval, generate, stats, plan, push."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .placement import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


# ----------------------------------------------------------------------------------------------
# compress
# ----------------------------------------------------------------------------------------------

def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a Switch checkpoint (default: the bundled model)",
                       description="Quantize every expert with batched GPTQ and encode it with the sub-1-bit "
                                   "codec, block by block. Rerunning the same command after an interruption "
                                   "resumes from the last finished block.")
    p.add_argument("source", nargs="?", default=None,
                   help="local checkpoint folder or Hub id (default: the bundled reference model)")
    p.add_argument("--out", required=True, help="output folder of the compressed checkpoint")
    p.add_argument("--bits", default="ternary", choices=["ternary", "2", "3", "4"])
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    p.add_argument("--grid", dest="ternary_grid", default="minmax", choices=["minmax", "optimized"],
                   help="ternary grid: QMoE's row min/max (default; lowest loss with GPTQ on the bundled "
                        "model) or the per-row error-optimal (a, b)")
    p.add_argument("--min-zero-fraction", type=float, default=0.85,
                   help="optimized grid: keep at least this fraction of each row at zero (bits vs error)")
    p.add_argument("--layer-bits", action="append", default=[], metavar="PATTERN=BITS[@FLOOR]",
                   help="per-layer precision (repeatable; the first match wins): the sparse layers whose "
                        "module name (e.g. decoder.block.0.layer.2.mlp) matches the regex PATTERN get BITS "
                        "(ternary, 2, 3, 4) and, for ternary with --grid optimized, the zero floor FLOOR")
    p.add_argument("--codec", dest="codec_mode", default="tunstall", choices=["tunstall", "qmoe"],
                   help="ternary codec dictionary: ours (tunstall) or QMoE's pair dictionary")
    p.add_argument("--samples", type=int, default=128, help="calibration samples")
    p.add_argument("--val-samples", type=int, default=32, help="validation samples for loss before/after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="calibration text: 'c4', a .txt/.jsonl/.json.gz file or folder "
                                                "(default: bundled text)")
    p.add_argument("--sample-length", type=int, default=568, help="tokens per sample before masking")
    p.add_argument("--expert-group", type=int, default=16, help="experts per batched GPTQ problem")
    p.add_argument("--group-size", dest="quant_group_size", type=int, default=None,
                   help="columns per quantization group (2/3/4-bit only)")
    p.add_argument("--damp", type=float, default=None, help="GPTQ dampening (default 0.1 ternary, 0.01 else)")
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--compensate", default="model", choices=["none", "expert", "model"],
                   help="GPTQ target: each matrix's own output (none, QMoE), the original expert's output "
                        "(expert: wo absorbs wi's error) or the original model's activations (model: also "
                        "earlier blocks' error; one more calibration stream)")
    p.add_argument("--no-mask-sentinels", dest="mask_sentinels", action="store_false",
                   help="let sentinel tokens into the Hessians")
    p.add_argument("--max-tokens-per-pass", type=int, default=1 << 16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--max-cpu-memory", type=_size, default=None,
                   help="activations kept in RAM (e.g. 64GiB); the rest spills to disk under --out")
    p.add_argument("--max-disk", type=_size, default=None,
                   help="Hub sources: delete each downloaded shard once consumed (bound on shard disk use)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compress)


def cmd_compress(args) -> int:
    import torch

    from .compress import CompressSettings, compress

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun every rank runs this command; ranks split each block's expert groups.
        import torch.distributed as dist

        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = f"cuda:{torch.cuda.current_device()}"
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    settings = CompressSettings(
        bits=args.bits, method=args.method, ternary_grid=args.ternary_grid,
        min_zero_fraction=args.min_zero_fraction, samples=args.samples,
        val_samples=args.val_samples, seed=args.seed, data=args.data, sample_length=args.sample_length,
        expert_group=args.expert_group, quant_group_size=args.quant_group_size, damp=args.damp,
        act_order=args.act_order, compensate=args.compensate, codec_mode=args.codec_mode,
        layer_bits=tuple(args.layer_bits),
        mask_sentinels=args.mask_sentinels,
        max_tokens_per_pass=args.max_tokens_per_pass, batch_size=args.batch_size, device=device,
        max_cpu_memory=args.max_cpu_memory, max_disk=args.max_disk)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    report = compress(args.source, args.out, settings, progress=not args.quiet, log=log,
                      overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        _print_json(report)
        return 0
    print(format_compress_report(report))
    return 0


def format_compress_report(r: dict) -> str:
    def fmt(x, spec=".4f"):
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"compressed {r['source']} -> {r['out']}",
        f"  bits/parameter   experts {fmt(r.get('expert_bits_per_param'))}   "
        f"whole model {fmt(r.get('model_bits_per_param'))}",
        f"  validation loss  before {fmt(r.get('loss_before'))}   after {fmt(r.get('loss_after'))}   "
        f"KL(original || compressed) {fmt(r.get('kl'), '.5f')} nats/token",
        f"  time {r['seconds']:.1f} s   peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB"
        + (f"   peak GPU {r['peak_gpu_bytes'] / 2**30:.2f} GiB" if r.get("peak_gpu_bytes") else ""),
    ]
    drift = {}
    for layer in r.get("layers", []):
        if "drift" in layer:
            stack, _, index = layer["block"].split(".")
            drift.setdefault(stack, []).append(f"{index}: {layer['drift_in']:.1e}->{layer['drift']:.1e}")
    if drift:
        lines.append("  residual-stream drift into -> out of each sparse layer (calibration, vs the original model): "
                     + "; ".join(f"{stack} {', '.join(values)}" for stack, values in drift.items()))
    stages = r.get("timings", {})
    if stages:
        slow = sorted(stages.items(), key=lambda kv: -kv[1])[:5]
        lines.append("  slowest stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in slow))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------

def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss of a dense or compressed checkpoint")
    p.add_argument("source", nargs="?", default=None,
                   help="compressed checkpoint folder, dense checkpoint folder or Hub id (default: bundled model)")
    p.add_argument("--data", default=None)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--sample-length", type=int, default=568)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", default="auto", help="devices for a compressed checkpoint (see qmoe plan)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--ideal-dense", action="store_true", help="compressed: run the ideal dense baseline")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def evaluate_source(source, data=None, samples=32, seed=0, batch_size=8, sample_length=568, devices="auto",
                    dtype=None, ideal_dense=False) -> dict:
    """Validation loss and bits/parameter of a dense or compressed checkpoint."""
    import torch

    from .data import bundled_model_path, collate, load_tokenizer, make_samples
    from .generation import evaluate_loss
    from .storage import is_compressed_checkpoint

    source = str(source) if source is not None else str(bundled_model_path())
    torch_dtype = None if dtype is None else getattr(torch, dtype)
    if is_compressed_checkpoint(source) or _is_hub_compressed(source):
        from .runtime import load_compressed
        from .stats import checkpoint_stats

        model = load_compressed(source, devices=devices, dtype=torch_dtype, ideal_dense=ideal_dense)
        tok = load_tokenizer(model.tokenizer_path)
        bits = checkpoint_stats(source, decode=False)["bits_per_param"]
        kind = "compressed"
    else:
        from .checkpoint import CheckpointReader
        from .model import load_switch

        reader = CheckpointReader(source)
        model = load_switch(source, dtype=torch_dtype or torch.float32)
        tok = load_tokenizer(os.path.dirname(reader.resolve_file("spiece.model")))
        bits = 8.0 * torch.empty((), dtype=reader.config.dtype).element_size()
        kind = "dense"
    smp = make_samples(tok, data, n=samples, seed=seed, split="validation", length=sample_length)
    batches = [collate(smp[i:i + batch_size], tok.pad_id, model.config.decoder_start_token_id)
               for i in range(0, len(smp), batch_size)]
    result = evaluate_loss(model, batches)
    result.update(source=source, kind=kind, samples=len(smp), bits_per_param=bits,
                  perplexity=math.exp(result["loss"]))
    return result


def _is_hub_compressed(source: str) -> bool:
    if os.path.exists(source) or source.count("/") != 1:
        return False
    try:
        from huggingface_hub import hf_hub_download

        from .storage import MANIFEST

        hf_hub_download(source, MANIFEST)
        return True
    except Exception:
        return False


def cmd_eval(args) -> int:
    r = evaluate_source(args.source, args.data, args.samples, args.seed, args.batch_size, args.sample_length,
                        args.devices, args.dtype, args.ideal_dense)
    if args.json:
        _print_json(r)
    else:
        print(f"{r['kind']} {r['source']}: loss {r['loss']:.4f} (perplexity {r['perplexity']:.2f}) over "
              f"{r['tokens']} tokens of {r['samples']} samples, {r['bits_per_param']:.4f} bits/parameter, "
              f"{r['seconds']:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------------
# generate, stats, plan, push
# ----------------------------------------------------------------------------------------------

def _add_generate(sub) -> None:
    from .generation import add_generate_arguments

    p = sub.add_parser("generate", help="generate text from a compressed checkpoint")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .generation import generate_cli

    generate_cli(args)
    return 0


def _add_stats(sub) -> None:
    p = sub.add_parser("stats", help="bits per parameter, sparsity and entropy of a compressed checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, help="draw bits and sparsity per layer to this PNG (needs matplotlib)")
    p.add_argument("--no-decode", action="store_true", help="sizes only: skip decoding for sparsity/entropy")
    p.set_defaults(func=cmd_stats)


def cmd_stats(args) -> int:
    from .stats import checkpoint_stats, format_stats, plot_stats

    s = checkpoint_stats(args.checkpoint, decode=not args.no_decode)
    if args.plot:
        plot_stats(s, args.plot)
    if args.json:
        _print_json(s)
    else:
        print(format_stats(s))
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="show how a compressed checkpoint would be placed on devices")
    p.add_argument("checkpoint")
    p.add_argument("--devices", default="auto", help="e.g. cuda:0,cuda:1=20GiB,cpu")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from .placement import format_plan, plan

    result = plan(args.checkpoint, args.devices)
    if args.json:
        _print_json(result)
    else:
        print(format_plan(result))
    return 0 if result.get("fits") else 1


def _add_push(sub) -> None:
    p = sub.add_parser("push", help="upload a compressed checkpoint to the Hugging Face Hub")
    p.add_argument("checkpoint")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="write the model card, upload nothing")
    p.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    from .hub import push_checkpoint

    url = push_checkpoint(args.checkpoint, args.repo_id, private=args.private, dry_run=args.dry_run)
    print(url)
    return 0


# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="qmoe", description="Sub-1-bit compression and inference for "
                                                              "Switch Transformer MoE models.")
    parser.add_argument("--version", action="version", version=f"qmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_compress, _add_eval, _add_generate, _add_stats, _add_plan, _add_push):
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as err:
        # Our errors name the file, tensor or setting at fault; a traceback adds nothing for users.
        if os.environ.get("QMOE_DEBUG"):
            raise
        print(f"qmoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

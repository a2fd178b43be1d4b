#!/usr/bin/env python
"""Generate from a compressed checkpoint with one process over all visible GPUs (pipeline placement).

Blocks are spread over the devices by the balanced memory planner (``qmoe plan``); hidden states
move between GPUs between blocks. The plan is printed before anything is loaded.

    python scripts/generate_multi_gpu.py CHECKPOINT --prompt "The capital of France is <extra_id_0>."
    python scripts/generate_multi_gpu.py CHECKPOINT --devices cuda:0=20GiB,cuda:1 --prompt ... --sample --top-p 0.9
    CUDA_VISIBLE_DEVICES=0,1,2,3 python scripts/generate_multi_gpu.py CHECKPOINT --plan-only

Without GPUs it runs on the CPU (``--devices cpu``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from qmoe.data import load_tokenizer
    from qmoe.generation import add_generate_arguments, generate_text
    from qmoe.placement import format_plan, format_bytes, plan
    from qmoe.runtime import load_compressed

    parser = add_generate_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
                                    require_prompt=False)
    parser.add_argument("--plan-only", action="store_true", help="print the placement and exit")
    args = parser.parse_args(argv)
    if not args.plan_only and not args.prompt:
        parser.error("--prompt is required unless --plan-only is given")

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    result = plan(args.checkpoint, args.devices, dense_dtype=dtype)
    print(format_plan(result), flush=True)
    if args.plan_only:
        return 0 if result["fits"] else 1

    start = time.perf_counter()
    model = load_compressed(args.checkpoint, devices=args.devices, dtype=dtype, ideal_dense=args.ideal_dense)
    print(f"loaded in {time.perf_counter() - start:.1f} s; resident: " + ", ".join(
        f"{dev} {format_bytes(n)}" for dev, n in model.memory_by_device().items()), flush=True)
    tok = load_tokenizer(model.tokenizer_path)
    start = time.perf_counter()
    texts = generate_text(model, tok, list(args.prompt), max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          stop_token_ids=args.stop)
    elapsed = time.perf_counter() - start
    for prompt, text in zip(args.prompt, texts):
        print(f"> {prompt}\n{text}")
    print(f"generated {len(texts)} x <= {args.max_new_tokens} tokens in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

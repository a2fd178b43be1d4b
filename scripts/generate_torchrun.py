#!/usr/bin/env python
"""Expert-parallel generation from a compressed checkpoint under ``torchrun`` (one or many nodes).

Every process holds the dense weights and a contiguous 1/world share of every layer's experts on
its own device (``cuda:LOCAL_RANK``, or the CPU without GPUs). All processes run the same tokens;
in each MoE layer a process computes its experts' tokens and a sum all-reduce (NCCL on GPUs, gloo on
the CPU) assembles the layer output, so every rank holds the same logits as a single process would.
Rank 0 prints the text.

    torchrun --nproc_per_node 8 scripts/generate_torchrun.py CHECKPOINT --prompt "..."
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        scripts/generate_torchrun.py CHECKPOINT --prompt "..."
    torchrun --nproc_per_node 2 scripts/generate_torchrun.py CHECKPOINT --devices cpu --prompt "..."   # gloo

``--json PATH`` writes rank 0's token ids and texts (used by the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from qmoe.data import load_tokenizer
    from qmoe.generation import add_generate_arguments, generate_text
    from qmoe.placement import format_bytes
    from qmoe.runtime import load_compressed

    parser = add_generate_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--json", default=None, help="rank 0 writes the generated texts here")
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("run me under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and args.devices != "cpu"
    if use_cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    else:
        device = "cpu"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        dtype = None if args.dtype is None else getattr(torch, args.dtype)
        start = time.perf_counter()
        model = load_compressed(args.checkpoint, devices=[device], dtype=dtype, ideal_dense=args.ideal_dense,
                                expert_shard=(rank, world))
        resident = sum(model.memory_by_device().values())
        print(f"[rank {rank}/{world}] {device}: loaded in {time.perf_counter() - start:.1f} s, "
              f"{format_bytes(resident)} resident", flush=True)
        tok = load_tokenizer(model.tokenizer_path)
        start = time.perf_counter()
        texts = generate_text(model, tok, list(args.prompt), max_new_tokens=args.max_new_tokens,
                              do_sample=args.sample, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stop_token_ids=args.stop)
        elapsed = time.perf_counter() - start
        if rank == 0:
            for prompt, text in zip(args.prompt, texts):
                print(f"> {prompt}\n{text}")
            print(f"generated in {elapsed:.2f} s over {world} processes")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"prompts": args.prompt, "texts": texts, "world_size": world}, f, indent=2)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end generation speed: compressed experts vs the paper's "ideal dense" baseline vs plain dense.

Each variant generates ``--new-tokens`` tokens (greedy, KV cache, no early stop) for a batch of
random prompts of ``--prompt-len`` tokens. Reported per variant (median of ``--repeats`` runs after
a warm-up, variants interleaved within each repeat so machine noise hits them alike):

* ``tok/s``: generated tokens per second of the whole call (encoder prefill included);
* ``ms/token``: decoder latency per step, ``(t(N tokens) - t(0 tokens)) / N`` (prefill excluded);
* ``vs ideal``: ms/token relative to the ideal dense run of the same process.

The ideal dense baseline (QMoE, section 6) lets every expert of a layer share one dense weight, so
the routed work is the real model's at the speed of uncompressed weights; ``compressed / ideal - 1``
is the runtime cost of compression (QMoE: < 5%; target here: 2% at batch 1).

Settings:

* ``cpu``: the bundled reference model (``qmoe.data.bundled_model_path()``) in float32, experts
  ternarized with QMoE's min/max round-to-nearest grid and encoded with the default dictionary
  (seeded random weights at the bundled config when the bundled weights are absent; the table
  says which). ``--checkpoint DIR`` instead loads a compressed checkpoint with ``load_compressed``
  (compressed and ``ideal_dense=True``), with ``--dense SOURCE`` as the plain dense model.
* ``gpu`` (CUDA and the qmoe kernel present): c2048-shaped synthetic layers (d_model 2080, d_ff 6144,
  30 heads of 64, vocab 32128, every block sparse, ``--gpu-blocks`` encoder and decoder blocks,
  ``--gpu-experts`` experts per layer) in bf16 with random ternary experts at P(0) = 0.885 (c2048's
  natural sparsity). A few distinct encoded matrices are replicated over the experts (encoding
  thousands of 12.8M-weight matrices takes minutes and changes nothing for timing: every expert
  keeps its own codeword copy in memory). Skipped with the reason printed without a GPU.

    python benchmarks/e2e.py [--quick] [--json PATH] [--batch 1 8] [--checkpoint DIR [--dense SOURCE]]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# numba's OpenMP worker threads (the codec's CPU kernels) busy-wait after each parallel region and
# starve PyTorch's small CPU ops: measured 25x slower decoding on a loaded 2-core machine. Passive
# waiting must be chosen before the OpenMP runtime loads, i.e. before torch and numba are imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from qmoe import codec, ops  # noqa: E402
from qmoe.config import SwitchConfig  # noqa: E402
from qmoe.generation import generate  # noqa: E402
from qmoe.model import build_skeleton, tie_embeddings  # noqa: E402
from qmoe.placement import format_bytes  # noqa: E402
from qmoe.runtime import CompressedExperts, IdealDenseExperts, PlacedModel, load_compressed  # noqa: E402
from qmoe.storage import PackedExperts  # noqa: E402

P_ZERO = 0.885
C2048_SHAPE = dict(d_model=2080, d_ff=6144, d_kv=64, num_heads=30, vocab_size=32128)
VARIANTS = ("dense", "ideal", "compressed")


# ------------------------------------------------------------------------------ expert encodings


def minmax_ternary(w: torch.Tensor):
    """QMoE's round-to-nearest ternary grid per row of w [rows, cols]: (int8 [rows, cols], float32
    scales [rows, 2] = (row min, row max)); above max/2 -> max, below min/2 -> min, else 0."""
    w = w.float().cpu()
    a, b = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    t = torch.zeros(w.shape, dtype=torch.int8)
    t[w > b[:, None] / 2] = 1
    t[w < a[:, None] / 2] = -1
    return t.numpy(), torch.stack([a, b], 1).numpy()


def random_ternary(rows: int, cols: int, rng: np.random.Generator):
    """i.i.d. ternary [rows, cols] at P(0) = 0.885 with equally likely signs; scales (-|N|, |N|)."""
    u = rng.random((rows, cols))
    t = np.where(u < P_ZERO, 0, np.where(u < (1 + P_ZERO) / 2, 1, -1)).astype(np.int8)
    s = np.abs(rng.normal(0.0, 0.02, (rows, 2)))
    s[:, 0] *= -1
    return t, s


# ------------------------------------------------------------------------------ models


def random_dense_model(config: SwitchConfig, device, dtype, seed: int, with_experts: bool) -> nn.Module:
    """A model with seeded random weights (std 1/sqrt(fan_in), norms 1) on ``device``.

    ``with_experts=False`` leaves every sparse layer's ``experts`` as an empty placeholder module
    (no memory), to be replaced by the caller.
    """
    model = build_skeleton(config)
    if not with_experts:
        for _, mlp in model.sparse_mlps():
            mlp.experts = nn.Module()
    model = model.to_empty(device=device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    tie_embeddings(model)
    return model.to(dtype).eval().requires_grad_(False)


def expert_variants(model, encoded, dictionary, device, dtype, keep_dense: bool) -> dict:
    """``{variant: {mlp name: experts module}}`` for the variants this run measures.

    ``encoded[mlp][m]``: list of EncodedMatrix per expert. "ideal" uses expert 0's decoded weights.
    """
    dict_tensors = ops.dictionary_tensors(dictionary, device)
    out = {v: {} for v in VARIANTS if v != "dense" or keep_dense}
    for name, mlp in model.sparse_mlps():
        if keep_dense:
            out["dense"][name] = mlp.experts
        packed = {m: PackedExperts.from_encoded(encoded[name][m], dictionary).to(device) for m in ("wi", "wo")}
        out["compressed"][name] = CompressedExperts(packed["wi"], packed["wo"], model.config.dense_act_fn,
                                                    dictionary_tensors=dict_tensors, where=f"{name}.experts")
        wi, wo = (torch.from_numpy(codec.dequantize(encoded[name][m][0])).to(device, dtype) for m in ("wi", "wo"))
        out["ideal"][name] = IdealDenseExperts(wi, wo, model.config.dense_act_fn)
    return out


def use_variant(model, modules: dict) -> None:
    for name, mlp in model.sparse_mlps():
        mlp.experts = modules[name]


# ------------------------------------------------------------------------------ timing


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(placed: PlacedModel, ids: torch.Tensor, new_tokens: int) -> float:
    _sync(placed.input_device)
    start = time.perf_counter()
    out = generate(placed, ids, max_new_tokens=new_tokens, stop_token_ids=[])
    _sync(placed.input_device)
    assert out.shape[1] == new_tokens + 1
    return time.perf_counter() - start


def measure(placed_by_variant: dict, switch, vocab: int, batches, new_tokens: int, repeats: int,
            prompt_len: int, seed: int) -> list:
    """Interleaved timing of every variant; ``switch(variant)`` makes it the active one."""
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(seed + batch)
        ids = torch.randint(3, vocab, (batch, prompt_len), generator=gen)
        full = {v: [] for v in placed_by_variant}
        prefill = {v: [] for v in placed_by_variant}
        for v, placed in placed_by_variant.items():  # warm-up: allocator, kernels, numba JIT
            switch(v)
            time_generate(placed, ids.to(placed.input_device), 2)
        for _ in range(repeats):
            for v, placed in placed_by_variant.items():
                switch(v)
                dev_ids = ids.to(placed.input_device)
                full[v].append(time_generate(placed, dev_ids, new_tokens))
                prefill[v].append(time_generate(placed, dev_ids, 0))
        ideal_ms = None
        for v in placed_by_variant:
            t_full, t_pre = statistics.median(full[v]), statistics.median(prefill[v])
            ms = max(t_full - t_pre, 0.0) / new_tokens * 1e3
            if v == "ideal":
                ideal_ms = ms
            rows.append({"variant": v, "batch": batch, "tokens_per_s": batch * new_tokens / t_full,
                         "ms_per_token": ms, "prefill_ms": t_pre * 1e3, "runs": repeats})
        for row in rows[-len(placed_by_variant):]:
            row["vs_ideal"] = row["ms_per_token"] / ideal_ms if ideal_ms else None
    return rows


# ------------------------------------------------------------------------------ settings


def cpu_setting(args) -> dict:
    device, dtype = "cpu", torch.float32
    if args.checkpoint:
        placed = {"ideal": load_compressed(args.checkpoint, devices=["cpu"], dtype=dtype, ideal_dense=True),
                  "compressed": load_compressed(args.checkpoint, devices=["cpu"], dtype=dtype)}
        if args.dense:
            from qmoe import load_switch

            placed = {"dense": PlacedModel(load_switch(args.dense, dtype=dtype)), **placed}
        rows = measure(placed, lambda v: None, placed["compressed"].config.vocab_size, args.batch, args.new_tokens,
                       args.repeats, args.prompt_len, args.seed)
        return {"setting": "cpu", "model": f"compressed checkpoint {args.checkpoint}", "dtype": "float32",
                "rows": rows}

    from qmoe.data import bundled_model_path

    path = bundled_model_path()
    config = SwitchConfig.from_json(path / "config.json")
    has_weights = any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json",
                                                     "pytorch_model.bin", "pytorch_model.bin.index.json"))
    if has_weights:
        from qmoe import load_switch

        model = load_switch(str(path), dtype=dtype).requires_grad_(False)
        what = f"bundled {path.name} (trained weights)"
    else:
        model = random_dense_model(config, device, dtype, args.seed, with_experts=True)
        what = f"bundled {path.name} config, random weights (bundled weights absent)"
    dictionary = codec.default_dictionary()
    encoded = {}
    for name, mlp in model.sparse_mlps():
        encoded[name] = {m: [codec.encode(*minmax_ternary(getattr(getattr(mlp.experts, f"expert_{e}"), m).weight),
                                          dictionary) for e in range(config.num_experts)] for m in ("wi", "wo")}
    modules = expert_variants(model, encoded, dictionary, device, dtype, keep_dense=True)
    placed = PlacedModel(model)
    rows = measure({v: placed for v in modules}, lambda v: use_variant(model, modules[v]), config.vocab_size,
                   args.batch, args.new_tokens, args.repeats, args.prompt_len, args.seed)
    return {"setting": "cpu", "model": what, "dtype": "float32", "threads": torch.get_num_threads(), "rows": rows}


def gpu_setting(args) -> dict:
    if not torch.cuda.is_available():
        return {"setting": "gpu", "skipped": "no CUDA device"}
    if not ops.cuda_available():
        return {"setting": "gpu", "skipped": "the qmoe CUDA extension is not built (pip install -e . with nvcc)"}
    return synthetic_setting(args, "cuda:0", torch.bfloat16, C2048_SHAPE)


def synthetic_setting(args, device: str, dtype: torch.dtype, shape: dict) -> dict:
    """Random ternary experts at c2048's sparsity in a model of ``shape`` (d_model, d_ff, d_kv,
    num_heads, vocab_size) on ``device``; the GPU setting uses the c2048 shape."""
    E, blocks = args.gpu_experts, args.gpu_blocks
    config = SwitchConfig(**shape, num_layers=blocks, num_decoder_layers=blocks, num_experts=E,
                          encoder_sparse_step=1, decoder_sparse_step=1, is_full_sparse=True,
                          tie_word_embeddings=False, torch_dtype="bfloat16",
                          relative_attention_num_buckets=32, relative_attention_max_distance=128)
    sparse_layers = 2 * blocks
    dense_bytes = sparse_layers * E * 2 * config.d_ff * config.d_model * 2
    free = torch.cuda.mem_get_info(device)[0] if torch.device(device).type == "cuda" else dense_bytes * 2
    keep_dense = dense_bytes < 0.6 * free
    model = random_dense_model(config, device, dtype, args.seed, with_experts=keep_dense)

    rng = np.random.default_rng(args.seed)
    dictionary = codec.default_dictionary()
    distinct = {m: [codec.encode(*random_ternary(*shape, rng), dictionary) for _ in range(args.gpu_distinct)]
                for m, shape in (("wi", (config.d_ff, config.d_model)), ("wo", (config.d_model, config.d_ff)))}
    encoded = {name: {m: [distinct[m][e % args.gpu_distinct] for e in range(E)] for m in ("wi", "wo")}
               for name, _ in model.sparse_mlps()}
    modules = expert_variants(model, encoded, dictionary, device, dtype, keep_dense=keep_dense)
    if keep_dense:
        # Plain dense experts hold the decoded weights of the same encodings (decoded once per distinct one).
        decoded = {id(enc): torch.from_numpy(codec.dequantize(enc)).to(device, dtype)
                   for m in ("wi", "wo") for enc in distinct[m]}
        for name, mlp in model.sparse_mlps():
            for m in ("wi", "wo"):
                for e in range(E):
                    getattr(getattr(mlp.experts, f"expert_{e}"), m).weight.copy_(decoded[id(encoded[name][m][e])])
        del decoded
    placed = PlacedModel(model)
    rows = measure({v: placed for v in modules}, lambda v: use_variant(model, modules[v]), config.vocab_size,
                   args.batch, args.new_tokens, args.repeats, args.prompt_len, args.seed)
    compressed_bytes = sum(b.numel() * b.element_size() for m in modules["compressed"].values()
                           for n, b in m.named_buffers() if not n.startswith("dict_"))
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return {"setting": "gpu" if name != "cpu" else "synthetic-cpu", "device": name,
            "dtype": str(dtype).replace("torch.", ""),
            "model": (f"synthetic d_model {shape['d_model']}, d_ff {shape['d_ff']}: {blocks}+{blocks} sparse "
                      f"blocks x {E} experts, P(0)={P_ZERO}"),
            "dense_experts": "measured" if keep_dense else f"skipped: {format_bytes(dense_bytes)} would not fit",
            "expert_bytes": {"dense_bf16": dense_bytes, "compressed": compressed_bytes}, "rows": rows}


def print_table(result: dict) -> None:
    print(f"\n== {result['setting']}: {result.get('model', '')}")
    if "skipped" in result:
        print(f"skipped: {result['skipped']}")
        return
    if "dense_experts" in result:
        print(f"plain dense: {result['dense_experts']}")
    print(f"{'variant':<12} {'batch':>5} {'tok/s':>10} {'ms/token':>10} {'prefill ms':>11} {'vs ideal':>9}")
    for r in result["rows"]:
        ratio = f"{r['vs_ideal']:.3f}" if r.get("vs_ideal") else "-"
        print(f"{r['variant']:<12} {r['batch']:>5} {r['tokens_per_s']:>10.1f} {r['ms_per_token']:>10.2f} "
              f"{r['prefill_ms']:>11.1f} {ratio:>9}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats (under a minute on CPU)")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "e2e.json"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="compressed checkpoint for the CPU setting")
    parser.add_argument("--dense", default=None, help="dense source (folder/Hub id) paired with --checkpoint")
    parser.add_argument("--gpu-experts", type=int, default=128)
    parser.add_argument("--gpu-blocks", type=int, default=2, help="encoder and decoder blocks each")
    parser.add_argument("--gpu-distinct", type=int, default=2, help="distinct encoded matrices per shape")
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1 keeps shared, oversubscribed machines from OpenMP spinning)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.new_tokens, args.repeats, args.batch = 16, 3, [1]
        args.gpu_experts = min(args.gpu_experts, 32)

    results = []
    if not args.skip_cpu:
        results.append(cpu_setting(args))
        print_table(results[-1])
    results.append(gpu_setting(args))
    print_table(results[-1])
    report = {"benchmark": "e2e", "argv": sys.argv[1:], "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "new_tokens": args.new_tokens, "repeats": args.repeats,
              "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

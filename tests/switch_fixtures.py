"""Tiny Switch Transformer checkpoints in the exact Hugging Face layouts, for tests and benchmarks.

* :func:`make_config` returns a tiny, *correct* ``config.json`` dict (what transformers needs to build
  the true architecture);
* :func:`reference_model` builds transformers' ``SwitchTransformersForConditionalGeneration`` from it
  with a fixed seed, the independent reference for equivalence tests;
* :func:`write_checkpoint` writes config, weights (sharded with an index, or single file; safetensors
  or PyTorch pickles) and a tokenizer, optionally with c2048's storage quirks.

Tokenizer: a small SentencePiece unigram model (``spiece.model``, ids pad=0, eos=1, unk=2 as in T5)
trained on a built-in text, plus ``tokenizer_config.json`` with ``extra_ids``: like T5, the
``<extra_id_N>`` sentinels are not in the SentencePiece model but appended after it, ``<extra_id_0>``
taking the last id (``sp_size + extra_ids - 1``).
"""
from __future__ import annotations

import copy
import io
import json
import os

import torch

TOKENIZER_PIECES = 100
TOKENIZER_EXTRA_IDS = 20
VOCAB_SIZE = 128  # >= TOKENIZER_PIECES + TOKENIZER_EXTRA_IDS, padded like T5's 32128

_BASE = {
    "architectures": ["SwitchTransformersForConditionalGeneration"],
    "model_type": "switch_transformers",
    "vocab_size": VOCAB_SIZE,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_heads": 4,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "num_sparse_encoder_layers": 2,
    "num_sparse_decoder_layers": 2,
    "num_experts": 4,
    "expert_capacity": 64,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 16,
    "layer_norm_epsilon": 1e-6,
    "router_dtype": "float32",
    "router_jitter_noise": 0.01,
    "router_bias": False,
    "dense_act_fn": "relu",
    "feed_forward_proj": "relu",
    "is_gated_act": False,
    "tie_word_embeddings": True,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "dropout_rate": 0.1,
    "torch_dtype": "float32",
}


def make_config(kind: str = "base", **overrides) -> dict:
    """Tiny HF ``config.json`` dict.

    kind: ``"base"`` (switch-base style: every other block sparse, tied embeddings, float32),
    ``"c2048"`` (all blocks sparse, untied lm_head, bfloat16, 3+3 blocks; the true architecture,
    :func:`write_checkpoint` adds c2048's config/storage quirks), ``"dense"`` (no sparse block).
    """
    cfg = copy.deepcopy(_BASE)
    if kind == "base":
        pass
    elif kind == "c2048":
        cfg.update(num_layers=3, num_decoder_layers=3, num_sparse_encoder_layers=3, num_sparse_decoder_layers=3,
                   tie_word_embeddings=False, torch_dtype="bfloat16", num_experts=8)
    elif kind == "dense":
        # Explicit zero steps: transformers' own fallback for zero sparse layers (step = num_layers)
        # still makes block 1 sparse.
        cfg.update(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=0, num_sparse_decoder_layers=0,
                   encoder_sparse_step=0, decoder_sparse_step=0)
    else:
        raise ValueError(f"unknown fixture kind {kind!r}")
    cfg.update(overrides)
    return cfg


def reference_model(config: dict, seed: int = 0, dtype: torch.dtype | None = None):
    """transformers' model for ``config`` with seeded random weights, in eval mode.

    ``dtype`` defaults to the config's ``torch_dtype``. Initialization runs in float32 (then casts),
    so the bf16 model holds the fp32 model's weights rounded.
    """
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    hf_config = SwitchTransformersConfig(**{k: v for k, v in config.items() if k != "torch_dtype"})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = SwitchTransformersForConditionalGeneration(hf_config).eval()
    dtype = dtype or getattr(torch, config.get("torch_dtype", "float32"))
    return model.to(dtype)


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor owning its memory (tied aliases become copies)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _shard_names(fmt: str, n: int) -> list[str]:
    if fmt == "safetensors":
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin" for i in range(n)]


def split_shards(state_dict: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    """Splits in state-dict order into ``shards`` groups of roughly equal bytes (a block may span
    shards, as in real checkpoints)."""
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    target = total / shards
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    acc = 0
    for name, t in state_dict.items():
        i = min(int(acc // target), shards - 1) if target > 0 else 0
        groups[i][name] = t
        acc += t.numel() * t.element_size()
    return groups


def write_weights(directory: str, state_dict: dict[str, torch.Tensor], fmt: str = "safetensors",
                  shards: int = 1) -> list[str]:
    """Writes ``state_dict`` as HF does: ``shards == 1`` gives ``model.safetensors`` /
    ``pytorch_model.bin``, more gives numbered shards plus ``*.index.json``. Returns the file names."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    os.makedirs(directory, exist_ok=True)
    groups = split_shards(state_dict, shards)
    names = ["model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"] if shards == 1 else \
        _shard_names(fmt, shards)
    weight_map = {}
    for file, group in zip(names, groups):
        path = os.path.join(directory, file)
        if fmt == "safetensors":
            from safetensors.torch import save_file

            save_file(group, path, metadata={"format": "pt"})
        else:
            torch.save(group, path)
        weight_map.update({k: file for k in group})
    if shards > 1:
        index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
        total = sum(t.numel() * t.element_size() for t in state_dict.values())
        with open(os.path.join(directory, index_name), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def apply_c2048_quirks(config: dict, state_dict: dict[str, torch.Tensor]):
    """c2048's published layout: ``is_full_sparse``, a wrong ``num_decoder_layers`` (fewer than the
    sparse decoder layers), no ``torch_dtype``, and ``shared.weight`` + ``decoder.lm_head.weight``."""
    cfg = dict(config)
    cfg["is_full_sparse"] = True
    cfg["num_decoder_layers"] = max(1, cfg["num_sparse_decoder_layers"] - 1)
    cfg.pop("torch_dtype", None)
    sd = {}
    for name, t in state_dict.items():
        if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            continue
        sd["decoder.lm_head.weight" if name == "lm_head.weight" else name] = t
    return cfg, sd


def write_checkpoint(directory: str, config: dict, state_dict: dict[str, torch.Tensor], fmt: str = "safetensors",
                     shards: int = 1, c2048_quirks: bool = False, tokenizer: bool = True) -> str:
    """Writes a full HF checkpoint folder and returns its path.

    ``state_dict``: transformers' state dict (:func:`hf_state_dict`). Like ``save_pretrained``, the
    safetensors layout omits the tied aliases (``encoder/decoder.embed_tokens.weight``, and
    ``lm_head.weight`` when tied); the .bin layout keeps them, as the old Google uploads do.
    """
    sd = dict(state_dict)
    if fmt == "safetensors":
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            sd.pop(alias, None)
        if config.get("tie_word_embeddings", True):
            sd.pop("lm_head.weight", None)
    cfg = dict(config)
    if c2048_quirks:
        cfg, sd = apply_c2048_quirks(cfg, sd)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    write_weights(directory, sd, fmt=fmt, shards=shards)
    if tokenizer:
        write_tokenizer(directory)
    return directory


_TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to one expert. "
    "Switch transformers replace the dense feed forward layer with sparse expert layers. "
    "Compression to ternary weights keeps most of the accuracy of the original model. "
    "The encoder reads the corrupted text and the decoder predicts the missing spans. "
    "Colossal clean crawled corpus gives web text in many different styles and topics. "
    "Numbers like 12, 345 and 6789 appear in prices, dates, scores, addresses and measurements. "
    "Weather reports mention rain, snow, wind, clouds, sunshine, temperature and humidity every morning. "
    "Cooking recipes list flour, sugar, butter, eggs, milk, salt, pepper, onions and garlic. "
    "Children play football, basketball, tennis, chess and video games after school on Friday. "
)
_SPIECE_BYTES: bytes | None = None


def tokenizer_model_bytes() -> bytes:
    """Serialized SentencePiece unigram model (trained once per process)."""
    global _SPIECE_BYTES
    if _SPIECE_BYTES is None:
        import sentencepiece as spm

        buf = io.BytesIO()
        lines = [s.strip() + "." for s in _TOKENIZER_TEXT.split(".") if s.strip()] * 20
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, vocab_size=TOKENIZER_PIECES, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=True,
            num_threads=1, minloglevel=2,
        )
        _SPIECE_BYTES = buf.getvalue()
    return _SPIECE_BYTES


def write_tokenizer(directory: str) -> None:
    """``spiece.model`` + ``tokenizer_config.json`` (T5 conventions, ``extra_ids`` sentinels)."""
    with open(os.path.join(directory, "spiece.model"), "wb") as f:
        f.write(tokenizer_model_bytes())
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "T5Tokenizer", "extra_ids": TOKENIZER_EXTRA_IDS, "eos_token": "</s>",
                   "pad_token": "<pad>", "unk_token": "<unk>", "model_max_length": 512}, f, indent=2)

"""Generation with a KV cache, evaluation loss, and the helpers behind ``qmoe generate`` / ``qmoe eval``.

Decoding runs the encoder once, then one decoder token per step:

* self-attention keys/values of every decoder block are appended to a preallocated cache
  ([B, H, max_len, d_kv] per block, on the block's device); the step attends to positions 0..t;
* cross-attention keys/values of the encoder output are computed once per block before the first
  step;
* the relative position bias is computed once per distance ([H, max_len]); step t reads the
  distances t..0 of its keys 0..t, exactly the values the uncached decoder gives query t.

Every operation is the one :class:`qmoe.model.SwitchBlock` runs on that token (same modules, same
dtypes, same order), so greedy decoding with the cache equals re-running the decoder on the whole
prefix (``tests/test_generation.py`` checks it).

Token choice: greedy (``do_sample=False``) or sampling from ``softmax(logits / temperature)`` after
top-k and top-p (nucleus) filtering, drawn with a seeded CPU generator so a seed gives the same text
on any device. A sequence stops after emitting any of ``stop_token_ids`` (default: EOS) and is padded
afterwards; generation ends when all sequences stopped or after ``max_new_tokens``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from typing import Dict, Iterable, List, Sequence

import torch
import torch.nn.functional as F

from .model import Attention, SwitchForConditionalGeneration, relative_position_bucket

__all__ = ["generate", "filter_logits", "choose_tokens", "evaluate_loss", "generate_text",
           "add_generate_arguments", "add_eval_arguments", "generate_cli", "eval_cli"]


def _as_placed(model):
    from .runtime import PlacedModel

    if isinstance(model, PlacedModel):
        return model
    if isinstance(model, SwitchForConditionalGeneration):
        return PlacedModel(model)
    raise TypeError(f"expected a PlacedModel or SwitchForConditionalGeneration, got {type(model).__name__}")


def _heads(t: torch.Tensor, attn: Attention) -> torch.Tensor:
    """[B, T, H * d_kv] -> [B, H, T, d_kv]."""
    return t.view(t.shape[0], -1, attn.n_heads, attn.d_kv).transpose(1, 2)


def _attend(attn: Attention, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:meth:`Attention.forward` for queries ``x`` [B, q, d_model] over cached ``k``, ``v``
    [B, H, K, d_kv], with ``bias`` broadcastable to [B, H, q, K]. Returns [B, q, d_model]."""
    B, q_len, _ = x.shape
    q = _heads(attn.q(x), attn)  # [B, H, q, d_kv]
    scores = torch.matmul(q, k.transpose(3, 2)) + bias  # [B, H, q, K]
    weights = F.softmax(scores.float(), dim=-1).type_as(scores)
    out = torch.matmul(weights, v).transpose(1, 2).reshape(B, q_len, attn.n_heads * attn.d_kv)
    return attn.o(out)


class DecoderCache:
    """Per-block self-attention K/V caches, cross-attention K/V and biases for one generation call.

    ``encoder_hidden``: [B, S, d_model]; ``encoder_mask``: [B, S] or None; ``max_len``: decoder
    positions to hold (start token included).
    """

    def __init__(self, placed, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor | None, max_len: int):
        decoder = placed.model.decoder
        cfg = placed.config
        B, S, _ = encoder_hidden.shape
        dtype = encoder_hidden.dtype
        self.length = 0
        self.self_k: List[torch.Tensor] = []
        self.self_v: List[torch.Tensor] = []
        self.cross_k: List[torch.Tensor] = []
        self.cross_v: List[torch.Tensor] = []
        table = decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # [buckets, H]
        # The decoder's bias depends only on the distance t - j >= 0 between query t and key j, so
        # one row per distance serves every step: O(H * max_len) instead of O(H * max_len^2).
        distance = torch.arange(max_len, device=table.device)
        bucket = relative_position_bucket(-distance, bidirectional=False, num_buckets=table.shape[0],
                                          max_distance=cfg.relative_attention_max_distance)
        bias_by_distance = F.embedding(bucket, table).t().to(dtype)  # [H, max_len]
        cross_bias = decoder.cross_attention_bias(
            None if encoder_mask is None else encoder_mask.to(table.device), B, S, dtype, table.device)
        self.bias_by_distance: Dict[torch.device, torch.Tensor] = {}  # [H, max_len]
        self.cross_bias: Dict[torch.device, torch.Tensor] = {}  # [B, 1, 1, S]
        encoder_on: Dict[torch.device, torch.Tensor] = {}
        for i, block in enumerate(decoder.block):
            dev = placed.block_device(f"decoder.block.{i}")
            if dev not in encoder_on:
                encoder_on[dev] = encoder_hidden.to(dev)
                self.bias_by_distance[dev] = bias_by_distance.to(dev)
                self.cross_bias[dev] = cross_bias.to(dev)
            cross = block.layer[1].EncDecAttention
            self.cross_k.append(_heads(cross.k(encoder_on[dev]), cross))  # [B, H, S, d_kv]
            self.cross_v.append(_heads(cross.v(encoder_on[dev]), cross))
            shape = (B, cfg.num_heads, max_len, cfg.d_kv)
            self.self_k.append(torch.empty(shape, dtype=dtype, device=dev))
            self.self_v.append(torch.empty(shape, dtype=dtype, device=dev))

    def step(self, placed, token_ids: torch.Tensor) -> torch.Tensor:
        """Feeds one token per sequence (``token_ids`` [B]) and returns the next-token logits
        [B, vocab] (on the lm_head's device)."""
        t = self.length
        if t >= self.self_k[0].shape[2]:
            raise ValueError(f"the decoder cache holds {self.self_k[0].shape[2]} positions; step {t} exceeds it")
        hidden = placed.embed(token_ids[:, None])  # [B, 1, d_model]
        for i, block in enumerate(placed.model.decoder.block):
            dev = placed.block_device(f"decoder.block.{i}")
            hidden = hidden.to(dev)
            self_layer, cross_layer = block.layer[0], block.layer[1]
            attn = self_layer.SelfAttention
            normed = self_layer.layer_norm(hidden)
            self.self_k[i][:, :, t] = _heads(attn.k(normed), attn)[:, :, 0]
            self.self_v[i][:, :, t] = _heads(attn.v(normed), attn)[:, :, 0]
            bias = self.bias_by_distance[dev][:, :t + 1].flip(-1)[None, :, None, :]  # [1, H, 1, t+1], key j at t - j
            hidden = hidden + _attend(attn, normed, self.self_k[i][:, :, :t + 1], self.self_v[i][:, :, :t + 1], bias)
            hidden = hidden + _attend(cross_layer.EncDecAttention, cross_layer.layer_norm(hidden),
                                      self.cross_k[i], self.cross_v[i], self.cross_bias[dev])
            hidden = block.layer[-1](hidden)
        self.length = t + 1
        final = placed.model.decoder.final_layer_norm
        hidden = final(hidden.to(placed.block_device("decoder.final_layer_norm")))
        return placed.project(hidden)[:, 0]


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Sampling distribution's logits: float32 [B, vocab] divided by ``temperature``; outside the
    ``top_k`` largest and outside the smallest set of most probable tokens whose probability reaches
    ``top_p`` they are ``-inf``. The most probable token always survives."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if top_k < logits.shape[-1]:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens more probable than it already reach top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] int64 from logits [B, vocab]: argmax, or a draw from :func:`filter_logits`
    (on the CPU with ``generator``, so a seed reproduces across devices)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits.cpu(), temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_token_ids: Sequence[int] | int | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Generates continuations of ``input_ids`` [B, S] int64 (``attention_mask`` [B, S], 1 = token).

    ``model``: a :class:`qmoe.runtime.PlacedModel` or a dense ``SwitchForConditionalGeneration``.
    Returns [B, 1 + n] int64 on the CPU: the decoder start token, then up to ``max_new_tokens``
    tokens; a sequence that emitted a stop token (default: the config's EOS) is padded with
    ``pad_token_id`` afterwards. ``use_cache=False`` re-runs the decoder on the whole prefix every
    step (the reference the cached path must equal).
    """
    placed = _as_placed(model)
    cfg = placed.config
    if placed.dtype == torch.float16:
        raise ValueError("generation supports float32 and bfloat16 models (float16 T5 needs overflow clamping)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids "
                         f"{tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be non-negative, got {max_new_tokens}")
    if stop_token_ids is None:
        stop_token_ids = [] if cfg.eos_token_id is None else [cfg.eos_token_id]
    elif isinstance(stop_token_ids, int):
        stop_token_ids = [stop_token_ids]
    stop = torch.tensor(list(stop_token_ids), dtype=torch.long)
    generator = None
    if do_sample:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    B = input_ids.shape[0]
    encoder_hidden = placed.encode(input_ids, attention_mask)
    out = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool)
    cache = DecoderCache(placed, encoder_hidden, attention_mask, max_new_tokens + 1) if use_cache else None
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = cache.step(placed, out[:, -1])
        else:
            logits = placed.decode(out, encoder_hidden, attention_mask)[:, -1]  # [B, vocab]
        nxt = choose_tokens(logits, do_sample, temperature, top_k, top_p, generator).cpu()
        nxt = nxt.masked_fill(finished, cfg.pad_token_id)
        out = torch.cat([out, nxt[:, None]], dim=1)
        finished |= torch.isin(nxt, stop)
        if bool(finished.all()):
            break
    return out


@torch.no_grad()
def evaluate_loss(model, batches: Iterable[dict]) -> dict:
    """Token-weighted mean cross-entropy over batches from :func:`qmoe.data.collate` (keys
    ``input_ids``, ``attention_mask``, ``decoder_input_ids``, ``decoder_attention_mask``, ``labels``;
    labels -100 are ignored). Returns ``{"loss", "tokens", "batches", "seconds"}``."""
    placed = _as_placed(model)
    total, tokens, n_batches = 0.0, 0, 0
    start = time.perf_counter()
    for batch in batches:
        logits = placed(batch["input_ids"], batch["decoder_input_ids"], batch.get("attention_mask"),
                        batch.get("decoder_attention_mask")).logits
        labels = batch["labels"].to(logits.device)
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        tokens += int((labels != -100).sum())
        n_batches += 1
    if tokens == 0:
        raise ValueError("evaluation data holds no labelled tokens")
    return {"loss": total / tokens, "tokens": tokens, "batches": n_batches, "seconds": time.perf_counter() - start}


def generate_text(model, tokenizer, prompt: str | Sequence[str], max_new_tokens: int = 32, **kwargs) -> str | List[str]:
    """Tokenizes ``prompt`` (a string or a list of strings; EOS appended as in T5 inputs), generates
    and decodes. ``tokenizer``: :class:`qmoe.data.Tokenizer`; ``kwargs`` as in :func:`generate`."""
    placed = _as_placed(model)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    encoded = [tokenizer.encode(p) + [tokenizer.eos_id] for p in prompts]
    length = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), length), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(encoded):
        ids[b, :len(e)] = torch.tensor(e)
        mask[b, :len(e)] = 1
    out = generate(placed, ids.to(placed.input_device), attention_mask=mask.to(placed.input_device),
                   max_new_tokens=max_new_tokens, **kwargs)
    texts = [tokenizer.decode(row[1:]) for row in out]
    return texts[0] if isinstance(prompt, str) else texts


# ---------------------------------------------------------------------------------------- CLI helpers


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="compressed checkpoint folder or Hub id")
    parser.add_argument("--devices", default="auto",
                        help="comma-separated devices, optionally with budgets (cuda:0,cuda:1=20GiB,cpu); "
                             "default: all visible GPUs, else the CPU")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="runtime dtype (default: bfloat16 on GPUs, float32 when a block is on the CPU)")
    parser.add_argument("--ideal-dense", action="store_true",
                        help="run the ideal dense baseline (all experts of a layer share one dense weight)")


def add_generate_arguments(parser: argparse.ArgumentParser, require_prompt: bool = True) -> argparse.ArgumentParser:
    """Arguments of ``qmoe generate`` (read by :func:`generate_cli`)."""
    _add_load_arguments(parser)
    parser.add_argument("--prompt", action="append", required=require_prompt,
                        help="input text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", type=int, action="append", default=None,
                        help="stop token id (repeatable; default EOS)")
    return parser


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``qmoe eval`` (read by :func:`eval_cli`)."""
    _add_load_arguments(parser)
    parser.add_argument("--data", default=None, help="text source: None = bundled text, 'c4', or a path")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--length", type=int, default=568,
                        help="tokens per window before span corruption (568 gives ~512 encoder tokens)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result as JSON to this path")
    return parser


def _load(args):
    from .runtime import load_compressed

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    return load_compressed(args.checkpoint, devices=args.devices, dtype=dtype, ideal_dense=args.ideal_dense)


def _tokenizer(model):
    from .data import load_tokenizer

    if model.tokenizer_path is None:
        raise ValueError(f"{model.checkpoint}: the checkpoint carries no tokenizer (spiece.model)")
    return load_tokenizer(model.tokenizer_path)


def generate_cli(args: argparse.Namespace) -> List[str]:
    """``qmoe generate``: prints and returns one continuation per ``--prompt``."""
    model = _load(args)
    texts = generate_text(model, _tokenizer(model), list(args.prompt), max_new_tokens=args.max_new_tokens,
                          do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, stop_token_ids=args.stop)
    for prompt, text in zip(args.prompt, texts):
        print(f"> {prompt}\n{text}")
    return texts


def eval_cli(args: argparse.Namespace) -> dict:
    """``qmoe eval``: validation loss on span-corrupted samples (the calibration recipe, validation
    split); prints and returns the result dict of :func:`evaluate_loss`."""
    from .data import collate, make_samples

    model = _load(args)
    tok = _tokenizer(model)
    samples = make_samples(tok, args.data, n=args.samples, seed=args.seed, split="validation", length=args.length)
    batches = [collate(samples[i:i + args.batch_size], tok.pad_id, model.config.decoder_start_token_id)
               for i in range(0, len(samples), args.batch_size)]
    result = evaluate_loss(model, batches)
    result.update(checkpoint=str(args.checkpoint), samples=len(samples), perplexity=math.exp(result["loss"]))
    print(f"loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f}) over {result['tokens']} tokens "
          f"of {len(samples)} samples in {result['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result

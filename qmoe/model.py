"""Switch Transformer (encoder-decoder MoE) with transformers-compatible state-dict names.

Numerics follow transformers' ``SwitchTransformersForConditionalGeneration`` (eager attention, the
pinned version in the ``test`` extra) operation by operation, so logits agree to rounding and greedy
generations agree exactly:

* T5 attention without the 1/sqrt(d) scaling, relative position bias from block 0 of each stack,
  softmax in float32;
* RMS layer norm with the variance in float32;
* Top-1 router in float32 (``router_dtype``): softmax probabilities are rounded to the activation
  dtype before the argmax and before scaling the expert output, exactly as transformers does;
* tied models scale the decoder output by ``d_model ** -0.5`` before the lm_head, untied ones do not.

The model is built so that the compression pipeline and the runtime can hold one block at a time:

* block names (``shared``, ``encoder.block.3``, ``decoder.final_layer_norm``, ``lm_head``; see
  :meth:`qmoe.config.SwitchConfig.block_names`) are module paths, so
  ``model.get_submodule(name)`` is the block's module;
* :func:`build_skeleton` builds the model on the meta device (no memory), :func:`materialize`
  assigns one block's tensors, :func:`free` returns a block to meta;
* a block runs alone given precomputed attention biases (:meth:`SwitchStack.self_attention_bias`,
  :meth:`SwitchStack.cross_attention_bias`); the relative position bias needs only the tiny
  ``relative_attention_bias`` table of block 0, which can be passed in explicitly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .config import SwitchConfig

__all__ = [
    "SwitchForConditionalGeneration", "SwitchStack", "SwitchBlock", "SparseMLP", "DenseExperts",
    "DenseMLP", "Router", "Attention", "RMSNorm", "Seq2SeqOutput", "MaterializeError",
    "build_skeleton", "materialize", "free", "tie_embeddings", "load_switch", "relative_position_bucket",
    "relative_position_bias",
]

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class MaterializeError(ValueError):
    """Tensors handed to :func:`materialize` do not match the module (missing, extra, mis-shaped)."""


@dataclasses.dataclass
class Seq2SeqOutput:
    """Model output. ``logits``: [B, T_dec, vocab]; ``loss``: scalar float32 when labels were given;
    ``encoder_last_hidden_state``: [B, T_enc, d_model]."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None


# ---------------------------------------------------------------------------- small layers


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction; the variance is accumulated in float32."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)  # [..., 1]
        x = x * torch.rsqrt(variance + self.eps)  # promoted to float32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class DenseMLP(nn.Module):
    """Non-gated feed-forward: ``wo(act(wi(x)))``; wi: [d_ff, d_model], wo: [d_model, d_ff]."""

    def __init__(self, d_model: int, d_ff: int, act: str):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.act_name = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ACTIVATIONS[self.act_name](self.wi(x))
        # transformers casts the activation to wo's dtype (matters for mixed-precision checkpoints).
        return self.wo(h.to(self.wo.weight.dtype))


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5 bucketing of ``memory_position - query_position`` (int64 tensor, any shape) into
    ``[0, num_buckets)``: half the buckets are exact small distances, the rest logarithmic up to
    ``max_distance``; the encoder (bidirectional) splits the buckets by sign, the decoder sees only
    the past."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) for distance 0 is -inf here, but those positions take the is_small branch.
    large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


def relative_position_bias(table: torch.Tensor, query_length: int, key_length: int, bidirectional: bool,
                           max_distance: int) -> torch.Tensor:
    """Relative position bias [1, H, query_length, key_length] from a block-0 bias ``table``
    [num_buckets, H]; query i sits at position i, key j at position j."""
    device = table.device
    context = torch.arange(query_length, dtype=torch.long, device=device)[:, None]
    memory = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
    bucket = relative_position_bucket(memory - context, bidirectional, table.shape[0], max_distance)  # [q, k]
    return F.embedding(bucket, table).permute(2, 0, 1).unsqueeze(0)  # [1, H, q, k]


class Attention(nn.Module):
    """T5 multi-head attention (self or cross), no score scaling; ``bias`` carries the relative
    position bias and the masks, already combined."""

    def __init__(self, config: SwitchConfig, has_relative_attention_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.n_heads, self.d_kv = config.num_heads, config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, key_value_states: torch.Tensor | None = None):
        """x: [B, q, d_model]; bias: broadcastable to [B, H, q, k]; key_value_states: [B, k, d_model]
        for cross-attention. Returns [B, q, d_model]."""
        B, q_len, _ = x.shape
        kv = x if key_value_states is None else key_value_states

        def heads(t):
            return t.view(B, -1, self.n_heads, self.d_kv).transpose(1, 2)  # [B, H, T, d_kv]

        q, k, v = heads(self.q(x)), heads(self.k(kv)), heads(self.v(kv))
        scores = torch.matmul(q, k.transpose(3, 2))  # [B, H, q, k]
        scores = scores + bias
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(weights, v)  # [B, H, q, d_kv]
        out = out.transpose(1, 2).reshape(B, q_len, self.n_heads * self.d_kv)
        return self.o(out)


class SelfAttentionLayer(nn.Module):
    def __init__(self, config: SwitchConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = Attention(config, has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class CrossAttentionLayer(nn.Module):
    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.EncDecAttention = Attention(config, has_relative_attention_bias=False)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x, bias, encoder_hidden_states):
        return x + self.EncDecAttention(self.layer_norm(x), bias, key_value_states=encoder_hidden_states)


# ---------------------------------------------------------------------------- mixture of experts


class Router(nn.Module):
    """Top-1 router: ``classifier`` Linear(d_model -> E), evaluated in ``router_dtype``."""

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.classifier = nn.Linear(config.d_model, config.num_experts, bias=config.router_bias)
        self.dtype = config.router_torch_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, d_model] -> router logits [N, E] in ``router_dtype``."""
        w = self.classifier.weight.to(self.dtype)
        b = None if self.classifier.bias is None else self.classifier.bias.to(self.dtype)
        return F.linear(x.to(self.dtype), w, b)


class DenseExperts(nn.Module):
    """Uncompressed experts ``expert_{j}`` (each a :class:`DenseMLP`), called on expert-sorted tokens.

    This is the swappable experts interface (ARCHITECTURE.md): ``forward(x_sorted, expert_offsets)``
    where ``x_sorted`` [T, d_model] holds tokens grouped by expert and expert ``e`` owns rows
    ``expert_offsets[e]:expert_offsets[e + 1]`` (``expert_offsets``: [E + 1] int64, on any device).
    Returns [T, d_model] in the input dtype.
    """

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.num_experts = config.num_experts
        for j in range(config.num_experts):
            self.add_module(f"expert_{j}", DenseMLP(config.d_model, config.d_ff, config.dense_act_fn))

    def forward(self, x_sorted: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        offsets = expert_offsets.tolist()
        if (len(offsets) != self.num_experts + 1 or offsets[0] != 0 or offsets[-1] != x_sorted.shape[0]
                or any(b < a for a, b in zip(offsets, offsets[1:]))):
            raise ValueError(f"expert_offsets must be {self.num_experts + 1} non-decreasing values from 0 to "
                             f"{x_sorted.shape[0]} (the token count), got {offsets}")
        out = torch.empty_like(x_sorted)
        for e in range(self.num_experts):
            lo, hi = offsets[e], offsets[e + 1]
            if hi > lo:
                out[lo:hi] = getattr(self, f"expert_{e}")(x_sorted[lo:hi])
        return out


class SparseMLP(nn.Module):
    """Switch feed-forward: Top-1 routing, experts on expert-sorted tokens, output scaled by the
    router probability.

    ``capacity``: tokens each expert accepts per sequence (transformers' ``expert_capacity``, counted
    in sequence order); later tokens are dropped and their feed-forward output is zero, so they pass
    through the residual unchanged. ``None`` (the default, used for evaluation) drops nothing.
    """

    def __init__(self, config: SwitchConfig, capacity: int | None = None):
        super().__init__()
        self.num_experts = config.num_experts
        self.router = Router(config)
        self.experts = DenseExperts(config)
        self.capacity = capacity

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: [N, d_model] -> (expert_index [N] int64, router_prob [N] float32).

        The softmax runs in ``router_dtype``; like transformers, its probabilities are rounded to the
        activation dtype before the argmax, so bf16 models route exactly as transformers routes them.
        ``router_prob`` holds that rounded top-1 probability.
        """
        logits = self.router(hidden)  # [N, E]
        probs = F.softmax(logits, dim=-1, dtype=self.router.dtype).to(hidden.dtype)  # [N, E]
        expert_index = probs.argmax(dim=-1)  # first maximum on ties, as in transformers
        router_prob = probs.gather(1, expert_index[:, None]).squeeze(1)
        return expert_index, router_prob.to(torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, S, d_model] -> [B, S, d_model]."""
        B, S, d = hidden.shape
        x = hidden.reshape(B * S, d)
        expert_index, router_prob = self.route(x)  # [N], [N]
        if self.capacity is not None:
            one_hot = F.one_hot(expert_index.view(B, S), self.num_experts)  # [B, S, E]
            priority = (one_hot.cumsum(dim=1) * one_hot).sum(-1).view(-1)  # 1-based rank within its expert
            token_ids = torch.nonzero(priority <= self.capacity).squeeze(1)
        else:
            token_ids = torch.arange(B * S, device=x.device)
        kept_experts = expert_index[token_ids]
        order = torch.argsort(kept_experts, stable=True)
        token_ids = token_ids[order]  # tokens grouped by expert, sequence order within an expert
        counts = torch.bincount(kept_experts, minlength=self.num_experts)
        expert_offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=x.device)
        expert_offsets[1:] = torch.cumsum(counts, 0)
        y_sorted = self.experts(x[token_ids], expert_offsets)  # [T, d]
        y = torch.zeros_like(x)
        y[token_ids] = y_sorted
        # Product of two bf16 values is exact in float32, so this equals transformers' bf16 multiply.
        y = (y.float() * router_prob.to(hidden.dtype).float()[:, None]).to(hidden.dtype)
        return y.view(B, S, d)


class FeedForwardLayer(nn.Module):
    def __init__(self, config: SwitchConfig, is_sparse: bool):
        super().__init__()
        self.mlp = SparseMLP(config) if is_sparse else DenseMLP(config.d_model, config.d_ff, config.dense_act_fn)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x):
        return x + self.mlp(self.layer_norm(x))


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    # T5 activations overflow float16; transformers clamps infinities after every sub-layer.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class SwitchBlock(nn.Module):
    """One transformer block: ``layer[0]`` self-attention, ``layer[1]`` cross-attention (decoder
    only), ``layer[-1]`` feed-forward (dense or sparse)."""

    def __init__(self, config: SwitchConfig, is_decoder: bool, index: int):
        super().__init__()
        self.is_decoder = is_decoder
        self.is_sparse = config.is_sparse("decoder" if is_decoder else "encoder", index)
        self.layer = nn.ModuleList([SelfAttentionLayer(config, has_relative_attention_bias=index == 0)])
        if is_decoder:
            self.layer.append(CrossAttentionLayer(config))
        self.layer.append(FeedForwardLayer(config, self.is_sparse))

    def forward(self, hidden: torch.Tensor, self_bias: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                cross_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Runs the block alone.

        hidden: [B, T, d_model]; self_bias: [B or 1, H, T, T] from
        :meth:`SwitchStack.self_attention_bias`; for decoder blocks ``encoder_hidden_states``
        [B, S, d_model] and ``cross_bias`` [B or 1, 1, 1, S] from
        :meth:`SwitchStack.cross_attention_bias`. Returns [B, T, d_model].
        """
        hidden = _clamp_fp16(self.layer[0](hidden, self_bias))
        if self.is_decoder:
            if encoder_hidden_states is None or cross_bias is None:
                raise ValueError("decoder blocks need encoder_hidden_states and cross_bias")
            hidden = _clamp_fp16(self.layer[1](hidden, cross_bias, encoder_hidden_states))
        return _clamp_fp16(self.layer[-1](hidden))


class SwitchStack(nn.Module):
    """Encoder or decoder: ``block`` (ModuleList of :class:`SwitchBlock`) and ``final_layer_norm``.

    Token embeddings live in the top-level model (``shared``); a stack maps embedded tokens to
    normalized hidden states.
    """

    def __init__(self, config: SwitchConfig, is_decoder: bool):
        super().__init__()
        self.config = config
        self.is_decoder = is_decoder
        n = config.num_blocks("decoder" if is_decoder else "encoder")
        self.block = nn.ModuleList([SwitchBlock(config, is_decoder, i) for i in range(n)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def position_bias(self, query_length: int, key_length: int,
                      table: torch.Tensor | None = None) -> torch.Tensor:
        """Relative position bias [1, H, query_length, key_length] shared by all blocks of the stack.

        ``table`` [num_buckets, H] defaults to block 0's ``relative_attention_bias.weight``; pass it
        explicitly to run a later block while block 0 is not materialized.
        """
        if table is None:
            table = self.block[0].layer[0].SelfAttention.relative_attention_bias.weight
            if table.is_meta:
                raise ValueError("block 0 is not materialized; pass its relative_attention_bias table")
        return relative_position_bias(table, query_length, key_length, bidirectional=not self.is_decoder,
                                      max_distance=self.config.relative_attention_max_distance)

    def self_attention_bias(self, query_length: int, attention_mask: torch.Tensor | None = None,
                            dtype: torch.dtype | None = None, table: torch.Tensor | None = None
                            ) -> torch.Tensor:
        """Position bias plus masks for self-attention: [B or 1, H, q, q] in ``dtype``.

        ``attention_mask``: [B, q] with 1 for real tokens, 0 for padding (None: no padding). The
        decoder adds the causal mask. Masked positions get ``finfo(dtype).min`` as in transformers.
        """
        bias = self.position_bias(query_length, query_length, table)
        dtype = dtype or bias.dtype
        device = bias.device
        min_value = torch.finfo(dtype).min
        if self.is_decoder:
            pos = torch.arange(query_length, device=device)
            masked = (pos[None, :] > pos[:, None])[None, None]  # [1, 1, q, q]
            if attention_mask is not None:
                masked = masked | (attention_mask[:, None, None, :] == 0)  # [B, 1, q, q]
            mask = torch.zeros(masked.shape, dtype=dtype, device=device).masked_fill(masked, min_value)
        elif attention_mask is not None:
            mask = (1.0 - attention_mask[:, None, None, :].to(dtype)) * min_value  # [B, 1, 1, q]
        else:
            return bias.to(dtype)
        return bias + mask

    @staticmethod
    def cross_attention_bias(encoder_attention_mask: torch.Tensor | None, batch_size: int, key_length: int,
                             dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Mask for decoder cross-attention: [B, 1, 1, S] (0 for real tokens, finfo.min for padding)."""
        if encoder_attention_mask is None:
            return torch.zeros(batch_size, 1, 1, key_length, dtype=dtype, device=device)
        return (1.0 - encoder_attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: embedded tokens [B, T, d_model] -> final-normed hidden states [B, T, d_model]."""
        B, T, _ = hidden.shape
        self_bias = self.self_attention_bias(T, attention_mask, dtype=hidden.dtype)
        cross_bias = None
        if self.is_decoder:
            cross_bias = self.cross_attention_bias(encoder_attention_mask, B, encoder_hidden_states.shape[1],
                                                   hidden.dtype, hidden.device)
        for block in self.block:
            hidden = block(hidden, self_bias, encoder_hidden_states, cross_bias)
        return self.final_layer_norm(hidden)


# ---------------------------------------------------------------------------- full model


class SwitchForConditionalGeneration(nn.Module):
    """Switch Transformer with state-dict names equal to transformers'
    ``SwitchTransformersForConditionalGeneration`` (minus the ``encoder/decoder.embed_tokens``
    aliases of ``shared.weight``)."""

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = SwitchStack(config, is_decoder=False)
        self.decoder = SwitchStack(config, is_decoder=True)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def sparse_mlps(self) -> list[tuple[str, SparseMLP]]:
        """(module path, SparseMLP) for every sparse block, in execution order."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, SparseMLP)]

    def set_expert_capacity(self, capacity: int | None) -> None:
        """Sets the per-sequence expert capacity of every sparse layer (None: no token dropping)."""
        for _, mlp in self.sparse_mlps():
            mlp.capacity = capacity

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, S] int64 -> encoder output [B, S, d_model]."""
        return self.encoder(self.shared(input_ids), attention_mask)

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
               encoder_attention_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """decoder_input_ids: [B, T] -> logits [B, T, vocab]."""
        hidden = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, encoder_hidden_states,
                              encoder_attention_mask)
        return self.project(hidden)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final decoder hidden states [B, T, d_model] -> logits [B, T, vocab]."""
        if self.config.tie_word_embeddings:
            # Mesh-TensorFlow rescale for tied embeddings; untied models (c2048) skip it.
            hidden = hidden * (self.config.d_model ** -0.5)
        return self.lm_head(hidden)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forcing decoder inputs from labels [B, T] (-100 becomes pad)."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Seq2SeqOutput:
        """input_ids: [B, S] int64; decoder_input_ids: [B, T] (default: ``shift_right(labels)``);
        masks: [B, S] / [B, T] with 1 for real tokens; labels: [B, T] with -100 for ignored positions.

        ``loss`` is the mean token cross-entropy over labels != -100, computed in float32.
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        encoder_hidden = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        return Seq2SeqOutput(logits=logits, loss=loss, encoder_last_hidden_state=encoder_hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding without a KV cache (every step re-runs the decoder).

        Returns [B, 1 + n] int64 starting with ``decoder_start_token_id``, like transformers'
        ``generate``; once a sequence emits ``eos_token_id`` (default: the config's) it is padded
        with ``pad_token_id``, and decoding stops when every sequence has finished.
        """
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        encoder_hidden = self.encode(input_ids, attention_mask)
        B = input_ids.shape[0]
        out = torch.full((B, 1), self.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.decode(out, encoder_hidden, attention_mask)[:, -1]  # [B, vocab]
            nxt = logits.argmax(dim=-1).masked_fill(finished, self.config.pad_token_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if eos is not None:
                finished |= nxt == eos
                if bool(finished.all()):
                    break
        return out


# ---------------------------------------------------------------------------- meta skeleton


def build_skeleton(config: SwitchConfig) -> SwitchForConditionalGeneration:
    """The full model on the meta device: structure and names only, no memory."""
    with torch.device("meta"):
        model = SwitchForConditionalGeneration(config)
    return model.eval()


def materialize(module: nn.Module, tensors: Mapping[str, torch.Tensor], device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None, prefix: str = "") -> nn.Module:
    """Assigns ``tensors`` to ``module``'s parameters (``load_state_dict(assign=True)``).

    ``tensors`` must hold exactly the module's state dict: names relative to ``module``, or full
    model names starting with ``prefix + "."`` (``prefix`` is the block name, e.g.
    ``"encoder.block.3"``). Floating tensors are moved to ``device`` and cast to ``dtype`` (None:
    keep their dtype). Raises :class:`MaterializeError` naming missing, unexpected or mis-shaped
    tensors. Returns ``module``.
    """
    expected = {name: p for name, p in module.state_dict(keep_vars=True).items()}
    if prefix and not prefix.endswith("."):
        prefix = prefix + "."
    relative = {}
    unexpected = []
    for name, t in tensors.items():
        rel = name[len(prefix):] if prefix and name.startswith(prefix) else name
        if prefix and name.startswith(prefix) and rel in expected:
            relative[rel] = t
        elif name in expected and name not in relative:
            relative[name] = t
        else:
            unexpected.append(name)
    missing = sorted(set(expected) - set(relative))
    where = prefix[:-1] if prefix else type(module).__name__
    if missing or unexpected:
        raise MaterializeError(f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                               f"unexpected tensors {sorted(unexpected)[:8]}")
    state = {}
    for name, t in relative.items():
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise MaterializeError(f"{prefix}{name}: shape {tuple(t.shape)}, expected {want}")
        cast = dtype if (dtype is not None and t.is_floating_point()) else None
        state[name] = t.to(device=device, dtype=cast)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def free(module: nn.Module) -> nn.Module:
    """Returns ``module``'s parameters to the meta device, releasing their memory."""
    return module.to(device="meta")


def tie_embeddings(model: SwitchForConditionalGeneration) -> None:
    """Shares ``shared.weight`` as ``lm_head.weight`` in tied models (one copy in memory)."""
    if model.config.tie_word_embeddings and not model.shared.weight.is_meta:
        model.lm_head.weight = model.shared.weight


def load_switch(source, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                revision: str | None = None, cache_dir: str | None = None) -> SwitchForConditionalGeneration:
    """Loads a whole dense Switch model (for checkpoints that fit in memory) in eval mode.

    ``source``: local folder or Hub id (``google/switch-base-8``); ``dtype`` None keeps the
    checkpoint's dtype (``config.torch_dtype``, with the c2048/base-128 quirks resolved). Blocks are
    read one at a time through :class:`qmoe.checkpoint.CheckpointReader`.
    """
    from .checkpoint import CheckpointReader

    reader = CheckpointReader(source, revision=revision, cache_dir=cache_dir)
    model = build_skeleton(reader.config)
    dtype = dtype or reader.config.dtype
    for name in reader.block_names():
        if name == "lm_head" and reader.config.tie_word_embeddings:
            continue
        materialize(model.get_submodule(name), reader.read_block(name), device=device, dtype=dtype, prefix=name)
    tie_embeddings(model)
    return model.eval()

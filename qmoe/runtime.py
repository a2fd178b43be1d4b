"""Inference from a compressed checkpoint: experts stay compressed on their device, blocks are spread
over devices by memory, hidden states hop between devices between blocks.

``load_compressed(path)`` builds the model of :mod:`qmoe.model` on the meta device, then for every
block (``shared``, ``encoder.block.N``, ..., ``lm_head``) reads its file, assigns the dense tensors on
the block's device in the runtime dtype and replaces each sparse layer's ``experts`` by
:class:`CompressedExperts`, which keeps the stored layer layout on the device and multiplies with
the grouped op of :mod:`qmoe.ops` (one call per matrix per layer: ``wi``, activation, ``wo``).
Routing, the expert sort and the router-probability scaling are the model's own
(:class:`qmoe.model.SparseMLP`), so the compressed model differs from the dense model only in how
an expert's product is computed.

Two alternatives to the compressed experts measure what compression costs:

* :class:`IdealDenseExperts` (``ideal_dense=True``): the QMoE paper's "ideal" baseline. All experts
  of a layer share one dense weight (expert 0's, decoded), so the same routed work runs as two dense
  matmuls per layer in roughly the memory of the compressed model.
* the plain dense model (:func:`qmoe.load_switch` wrapped by :class:`PlacedModel`) where it fits.

Expert parallelism (``expert_shard=(rank, world_size)``, used by ``scripts/generate_torchrun.py``):
each process holds the dense weights and a contiguous range of every layer's experts; all processes
see the same tokens, each computes the outputs of its own experts' tokens and zeros elsewhere, and a
sum all-reduce assembles the layer output. Adding zeros is exact, so the result equals one process.

Runtime dtype: bf16 when every block sits on a GPU; float32 when any block is on the CPU, where
PyTorch's bf16 matmuls are several times slower than float32 ones (pass ``dtype`` to override).
"""
from __future__ import annotations

import os
from typing import Dict, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import SwitchConfig
from .model import (ACTIVATIONS, Seq2SeqOutput, SwitchForConditionalGeneration, build_skeleton,
                    materialize)
from .placement import (DEFAULT_HEADROOM, PlacementError, default_dense_dtype, dictionary_memory, format_plan,
                        parse_devices, plan_blocks, validate_device_map)
from .storage import PackedExperts, StorageError, open_compressed, unpack_int_codes

__all__ = ["load_compressed", "PlacedModel", "CompressedExperts", "IdealDenseExperts", "CompressedModelError",
           "shard_range"]

_RUNTIME_DTYPES = (torch.float32, torch.bfloat16)


class CompressedModelError(ValueError):
    """A compressed checkpoint that does not fit the model it describes, or an unusable runtime option."""


def shard_range(num_experts: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous expert range ``[lo, hi)`` of ``rank`` when ``num_experts`` are split over
    ``world_size`` processes (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise CompressedModelError(f"rank {rank} outside [0, {world_size})")
    return rank * num_experts // world_size, (rank + 1) * num_experts // world_size


def _slice_packed(packed: PackedExperts, lo: int, hi: int) -> PackedExperts:
    """Experts ``lo:hi`` of a packed matrix as a packed matrix of its own (offsets rebased)."""
    t = packed.tensors
    if packed.kind == "ternary":
        eo = t["expert_offsets"]
        start, stop = int(eo[lo]), int(eo[hi])
        # Per-matrix entries (the dictionary fingerprint) carry over; per-expert arrays are cut.
        tensors = {**t, "codewords": t["codewords"][start:stop].clone(),
                   "expert_offsets": (eo[lo:hi + 1] - start).clone(),
                   "row_offsets": t["row_offsets"][lo:hi].clone(),
                   "row_class": t["row_class"][lo:hi].clone(),
                   "scales": t["scales"][lo:hi].clone()}
    else:
        tensors = {k: v[lo:hi].clone() for k, v in t.items()}
    return PackedExperts(packed.kind, packed.bits, hi - lo, packed.rows, packed.cols, tensors, packed.dictionary)


def _dequantize_int(tensors: Mapping[str, torch.Tensor], e: int, bits: int, cols: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """Expert ``e`` of an integer-packed matrix, decoded on its own device: [rows, cols] in ``dtype``.

    ``w = (code - zero) * scale`` with per-row groups of ``ceil(cols / groups)`` columns, computed in
    float32 (as :meth:`PackedExperts.dequantize` does) and then cast.
    """
    qweight, scale, zero = tensors["qweight"][e], tensors["scale"][e], tensors["zero"][e]
    codes = unpack_int_codes(qweight, bits, cols).float()  # [rows, cols]
    groups = scale.shape[-1]
    col_group = torch.arange(cols, device=qweight.device) // -(-cols // groups)  # [cols]
    w = (codes - zero.float()[:, col_group]) * scale.float()[:, col_group]
    return w.to(dtype)


class CompressedExperts(nn.Module):
    """All experts of one sparse layer in their stored (compressed) layout, on one device.

    Implements the swappable experts call of :mod:`qmoe.model`:
    ``forward(x_sorted [T, d_model], expert_offsets [E+1] int64) -> [T, d_model]`` on tokens sorted
    by expert. Ternary matrices run through the grouped op of :mod:`qmoe.ops` (CUDA kernel on a GPU,
    the codec's CPU reference on the CPU), one call for ``wi`` and one for ``wo``, with the
    checkpoint's dictionary as :func:`qmoe.ops.dictionary_tensors` on the same device; integer (2-4 bit)
    matrices are decoded per expert that received tokens and multiplied densely.

    ``expert_range``: the experts ``[lo, hi)`` this module holds (expert parallelism); outputs of other
    experts' tokens are zero here and are summed in by an all-reduce over ``process_group``.
    The packed tensors are non-persistent buffers, so ``.to(device)`` moves them and the model's
    state dict (dense weights only) stays what :func:`qmoe.model.materialize` expects.
    """

    def __init__(self, wi: PackedExperts, wo: PackedExperts, activation: str,
                 dictionary_tensors: Mapping[str, torch.Tensor] | None = None,
                 expert_range: Tuple[int, int] | None = None, process_group=None, where: str = "experts"):
        super().__init__()
        if wi.kind != wo.kind or wi.bits != wo.bits:
            raise CompressedModelError(f"{where}: wi is {wi.kind}/{wi.bits} bits but wo is {wo.kind}/{wo.bits} bits")
        if wi.num_experts != wo.num_experts or (wi.rows, wi.cols) != (wo.cols, wo.rows):
            raise CompressedModelError(f"{where}: wi [{wi.num_experts} x {wi.rows} x {wi.cols}] and wo "
                                       f"[{wo.num_experts} x {wo.rows} x {wo.cols}] do not form an FFN")
        self.where = where
        self.kind, self.bits = wi.kind, wi.bits
        self.num_experts = wi.num_experts
        self.d_model, self.d_ff = wi.cols, wi.rows
        self.act = ACTIVATIONS[activation]
        self.expert_range = expert_range or (0, self.num_experts)
        self.process_group = process_group
        lo, hi = self.expert_range
        if not 0 <= lo <= hi <= self.num_experts:
            raise CompressedModelError(f"{where}: expert range {self.expert_range} outside [0, {self.num_experts}]")
        if (lo, hi) != (0, self.num_experts):
            wi, wo = _slice_packed(wi, lo, hi), _slice_packed(wo, lo, hi)
        self.shapes = {"wi": (wi.rows, wi.cols), "wo": (wo.rows, wo.cols)}
        for m, packed in (("wi", wi), ("wo", wo)):
            for k, v in packed.tensors.items():
                self.register_buffer(f"{m}_{k}", v, persistent=False)
        if self.kind == "ternary":
            if dictionary_tensors is None:
                raise CompressedModelError(f"{where}: ternary experts need the checkpoint's dictionary")
            # The same tensors are registered in every layer on a device: one copy in memory.
            for k, v in dictionary_tensors.items():
                self.register_buffer(f"dict_{k}", v, persistent=False)
        elif self.kind != "int":
            raise CompressedModelError(f"{where}: unknown expert packing {self.kind!r}")

    def _tensors(self, prefix: str) -> Dict[str, torch.Tensor]:
        """Buffers ``{prefix}_{key}`` as ``{key: tensor}`` (``prefix``: wi, wo or dict)."""
        n = len(prefix) + 1
        return {name[n:]: buf for name, buf in self._buffers.items() if name.startswith(prefix + "_")}

    def _matmul(self, m: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [T, cols] sorted by (local) expert, offsets [E_local + 1] -> [T, rows] = x_e @ W_e^T."""
        rows, cols = self.shapes[m]
        if self.kind == "ternary":
            from . import ops

            return ops.grouped_ternary_matmul(x, offsets, self._tensors(m), self._tensors("dict"))
        tensors = self._tensors(m)
        out = x.new_empty(x.shape[0], rows)
        bounds = offsets.tolist()
        for e in range(len(bounds) - 1):
            a, b = bounds[e], bounds[e + 1]
            if b > a:
                out[a:b] = F.linear(x[a:b], _dequantize_int(tensors, e, self.bits, cols, x.dtype))
        return out

    def forward(self, x_sorted: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        """x_sorted: [T, d_model]; expert_offsets: [E+1] int64 -> [T, d_model] in x's dtype."""
        lo, hi = self.expert_range
        if (lo, hi) == (0, self.num_experts):
            h = self.act(self._matmul("wi", x_sorted, expert_offsets))  # [T, d_ff]
            return self._matmul("wo", h, expert_offsets)
        # Expert parallelism: this process owns tokens a:b (contiguous, as tokens are expert-sorted).
        offsets = expert_offsets[lo:hi + 1].to(x_sorted.device)
        a, b = int(offsets[0]), int(offsets[-1])
        out = torch.zeros_like(x_sorted)
        if b > a:
            local = offsets - a
            h = self.act(self._matmul("wi", x_sorted[a:b], local))
            out[a:b] = self._matmul("wo", h, local)
        torch.distributed.all_reduce(out, group=self.process_group)
        return out


class IdealDenseExperts(nn.Module):
    """The paper's "ideal" uncompressed baseline: every expert of the layer uses one dense weight.

    ``wi``: [d_ff, d_model], ``wo``: [d_model, d_ff] (expert 0's decoded weights). The call runs the
    layer's routed tokens through two dense matmuls, i.e. the work of the real layer at the speed of
    dense weights, without the memory of E dense experts.
    """

    def __init__(self, wi: torch.Tensor, wo: torch.Tensor, activation: str):
        super().__init__()
        self.register_buffer("wi", wi, persistent=False)
        self.register_buffer("wo", wo, persistent=False)
        self.act = ACTIVATIONS[activation]

    def forward(self, x_sorted: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(F.linear(x_sorted, self.wi)), self.wo)


class PlacedModel(nn.Module):
    """A Switch model whose blocks live on (possibly) different devices.

    ``model``: :class:`qmoe.model.SwitchForConditionalGeneration` with every block materialized on
    the device ``device_map[block]`` gives. Hidden states move to a block's device before it runs;
    attention biases and encoder states are moved once per device and reused by its blocks.

    Calls: ``forward(input_ids, decoder_input_ids=None, attention_mask=None,
    decoder_attention_mask=None, labels=None) -> Seq2SeqOutput`` (same meaning as the dense model's),
    ``encode``, ``decode``, and ``generate(...)`` (KV-cached; :func:`qmoe.generation.generate`).
    """

    def __init__(self, model: SwitchForConditionalGeneration, device_map: Mapping[str, str] | None = None,
                 checkpoint: str | None = None, tokenizer_path: str | None = None):
        super().__init__()
        self.model = model
        self.config: SwitchConfig = model.config
        if device_map is None:
            device = str(model.shared.weight.device)
            device_map = {name: device for name in self.config.block_names()}
        self.device_map = validate_device_map(device_map, self.config.block_names())
        self.checkpoint = checkpoint
        self.tokenizer_path = tokenizer_path

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def input_device(self) -> torch.device:
        """Device of the token embeddings, where ``input_ids`` are best created."""
        return torch.device(self.device_map["shared"])

    def devices(self) -> list[str]:
        """Distinct devices in execution order."""
        return list(dict.fromkeys(self.device_map.values()))

    def block_device(self, block: str) -> torch.device:
        return torch.device(self.device_map[block])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] (any device) -> embeddings [B, T, d_model] on the ``shared`` device."""
        return self.model.shared(ids.to(self.input_device))

    def run_stack(self, stack: str, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  encoder_hidden_states: torch.Tensor | None = None,
                  encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Runs ``encoder`` or ``decoder`` (blocks + final norm) across devices.

        hidden: [B, T, d_model] embedded tokens; masks [B, T] / [B, S] with 1 on real tokens.
        Returns the final-normed hidden states [B, T, d_model] on the final norm's device.
        """
        module = getattr(self.model, stack)
        B, T, _ = hidden.shape
        dev0 = self.block_device(f"{stack}.block.0")
        mask = None if attention_mask is None else attention_mask.to(dev0)
        self_bias = module.self_attention_bias(T, mask, dtype=hidden.dtype)  # on dev0
        cross_bias = None
        if stack == "decoder":
            cross_bias = module.cross_attention_bias(
                None if encoder_attention_mask is None else encoder_attention_mask.to(dev0),
                B, encoder_hidden_states.shape[1], hidden.dtype, dev0)
        per_device: Dict[torch.device, tuple] = {}
        for i, block in enumerate(module.block):
            dev = self.block_device(f"{stack}.block.{i}")
            if dev not in per_device:
                per_device[dev] = (self_bias.to(dev),
                                   None if encoder_hidden_states is None else encoder_hidden_states.to(dev),
                                   None if cross_bias is None else cross_bias.to(dev))
            sb, enc, cb = per_device[dev]
            hidden = block(hidden.to(dev), sb, enc, cb)
        return module.final_layer_norm(hidden.to(self.block_device(f"{stack}.final_layer_norm")))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S] int64 -> encoder output [B, S, d_model]."""
        return self.run_stack("encoder", self.embed(input_ids), attention_mask)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final decoder states [B, T, d_model] -> logits [B, T, vocab] on the lm_head's device."""
        return self.model.project(hidden.to(self.block_device("lm_head")))

    def decode(self, decoder_input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
               encoder_attention_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """decoder_input_ids [B, T] -> logits [B, T, vocab] (no cache; see :mod:`qmoe.generation`)."""
        hidden = self.run_stack("decoder", self.embed(decoder_input_ids), decoder_attention_mask,
                                encoder_hidden_states, encoder_attention_mask)
        return self.project(hidden)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Seq2SeqOutput:
        """Same contract as :meth:`SwitchForConditionalGeneration.forward`; ``loss`` is the mean
        float32 cross-entropy over labels != -100."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids or labels")
            decoder_input_ids = self.model.shift_right(labels)
        encoder_hidden = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, encoder_hidden, attention_mask, decoder_attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                   labels.to(logits.device).reshape(-1), ignore_index=-100)
        return Seq2SeqOutput(logits=logits, loss=loss, encoder_last_hidden_state=encoder_hidden)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """KV-cached generation; keyword arguments as in :func:`qmoe.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)

    def memory_by_device(self) -> Dict[str, int]:
        """Bytes of parameters and buffers resident on each device."""
        out: Dict[str, int] = {}
        seen = set()
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            if t.is_meta or id(t) in seen:
                continue
            seen.add(id(t))
            out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
        return out


def _experts_for(mlp_name: str, mats: Mapping[str, PackedExperts], config: SwitchConfig, device: torch.device,
                 dtype: torch.dtype, ideal_dense: bool, expert_shard, process_group,
                 dictionary_tensors) -> nn.Module:
    """The experts module replacing ``mlp_name``'s dense experts; checks the packed shapes first."""
    if set(mats) != {"wi", "wo"}:
        raise CompressedModelError(f"{mlp_name}: the checkpoint stores expert matrices {sorted(mats)}, "
                                   "expected wi and wo")
    want = {"wi": (config.d_ff, config.d_model), "wo": (config.d_model, config.d_ff)}
    for m, packed in mats.items():
        if packed.num_experts != config.num_experts or (packed.rows, packed.cols) != want[m]:
            raise CompressedModelError(f"{mlp_name}.experts.{m}: {packed.num_experts} experts of "
                                       f"{packed.rows}x{packed.cols}, config says {config.num_experts} of "
                                       f"{want[m][0]}x{want[m][1]}")
    if ideal_dense:
        wi, wo = (mats[m].dequantize(0).to(device, dtype) for m in ("wi", "wo"))  # expert 0, float32 decode
        return IdealDenseExperts(wi, wo, config.dense_act_fn)
    expert_range = None if expert_shard is None else shard_range(config.num_experts, *expert_shard)
    wi, wo = mats["wi"].to(device), mats["wo"].to(device)
    return CompressedExperts(wi, wo, config.dense_act_fn, dictionary_tensors=dictionary_tensors,
                             expert_range=expert_range, process_group=process_group,
                             where=f"{mlp_name}.experts").to(device)


def load_compressed(source: str | os.PathLike, devices: Sequence[str] | str | None = None,
                    device_map: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
                    ideal_dense: bool = False, expert_shard: Tuple[int, int] | None = None,
                    process_group=None, headroom: float = DEFAULT_HEADROOM, verify: bool = True,
                    revision: str | None = None) -> PlacedModel:
    """Loads a compressed checkpoint (folder or Hub id) for inference.

    ``devices``: list like ``["cuda:0", "cuda:1=20GiB"]``, ``"auto"``/None (all visible GPUs, else
    the CPU); blocks are placed by the balanced planner of :mod:`qmoe.placement`, and a model that
    does not fit raises :class:`qmoe.placement.PlacementError` with the plan. ``device_map``: an
    explicit ``{block: device}`` for every block instead. ``dtype``: runtime dtype of the dense
    weights and activations (bf16 or float32; default in the module docstring).
    ``ideal_dense``: build the paper's ideal dense baseline instead of compressed experts.
    ``expert_shard=(rank, world_size)``: keep only this rank's experts (expert parallelism; needs an
    initialized ``torch.distributed`` and ``process_group``, default the world). ``verify``: check
    file checksums against the manifest. Files are safetensors and JSON only; nothing is unpickled.
    """
    source = os.fspath(source)
    if device_map is not None and devices not in (None, "auto"):
        raise CompressedModelError("pass devices (planned placement) or device_map (explicit), not both")
    ckpt = open_compressed(source, revision=revision, verify=verify)
    config = ckpt.config
    stored = ckpt.block_names()
    expected = config.block_names()
    needed = [b for b in expected if not (b == "lm_head" and config.tie_word_embeddings and b not in stored)]
    if [b for b in stored if b in expected] != [b for b in expected if b in stored] or set(needed) - set(stored) \
            or set(stored) - set(expected):
        raise StorageError(f"{source}: blocks {stored} do not match the config's {expected}")

    if device_map is None:
        budgets = parse_devices(devices, headroom)
        plan_dtype = dtype or default_dense_dtype([b.device for b in budgets])
        lo, hi = (0, config.num_experts) if expert_shard is None else shard_range(config.num_experts, *expert_shard)
        result = plan_blocks(config, {b: ckpt.block_bytes(b) for b in stored}, budgets, plan_dtype,
                             dictionary_bytes=0 if ideal_dense else dictionary_memory(ckpt),
                             expert_fraction=max(hi - lo, 1) / config.num_experts)
        if not result["fits"]:
            raise PlacementError(f"{source}: the model does not fit on the given devices\n{format_plan(result)}")
        device_map = result["device_map"]
    device_map = validate_device_map(device_map, expected)
    dtype = dtype or default_dense_dtype(list(device_map.values()))
    if dtype not in _RUNTIME_DTYPES:
        raise CompressedModelError(f"runtime dtype must be float32 or bfloat16, got {dtype}")
    if expert_shard is not None and not torch.distributed.is_initialized():
        raise CompressedModelError("expert_shard needs torch.distributed initialized "
                                   "(see scripts/generate_torchrun.py)")

    model = build_skeleton(config)
    sparse = dict(model.sparse_mlps())
    dictionary_on: Dict[torch.device, Dict[str, torch.Tensor]] = {}
    for block in needed:
        device = torch.device(device_map[block])
        weights = ckpt.read_block(block)
        module = model.get_submodule(block)
        block_mlps = {n for n in sparse if n.startswith(block + ".")}
        if set(weights.experts) != block_mlps:
            raise CompressedModelError(f"{source}: block {block} stores experts for {sorted(weights.experts)}, "
                                       f"the config has sparse layers {sorted(block_mlps)}")
        for mlp_name, mats in weights.experts.items():
            dictionary_tensors = None
            if any(p.kind == "ternary" for p in mats.values()) and not ideal_dense:
                # "cpu" and "cpu:0" are one memory: one copy (the ops' CPU path also caches the
                # decoded dictionary by tensor identity, so a second copy would thrash that cache).
                key = torch.device("cpu") if device.type == "cpu" else device
                if key not in dictionary_on:
                    from . import ops

                    dictionary_on[key] = ops.dictionary_tensors(ckpt.dictionary, device)
                dictionary_tensors = dictionary_on[key]
            sparse[mlp_name].experts = _experts_for(mlp_name, mats, config, device, dtype, ideal_dense,
                                                    expert_shard, process_group, dictionary_tensors)
        materialize(module, weights.dense, device=device, dtype=dtype, prefix=block)
    if config.tie_word_embeddings and "lm_head" not in stored:
        shared = model.shared.weight
        lm_device = torch.device(device_map["lm_head"])
        model.lm_head.weight = shared if shared.device == lm_device else nn.Parameter(shared.detach().to(lm_device))
    model.eval().requires_grad_(False)
    return PlacedModel(model, device_map, checkpoint=source, tokenizer_path=ckpt.tokenizer_path)

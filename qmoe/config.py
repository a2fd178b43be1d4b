"""Switch Transformer configuration: Hub ``config.json`` -> validated :class:`SwitchConfig`.

Field names follow transformers' ``SwitchTransformersConfig`` so that ``to_dict()`` writes a
``config.json`` that transformers reads back. The published Google checkpoints need a few fixes,
applied by :meth:`SwitchConfig.from_dict` (see ``/work/shared/REFERENCE.md`` section 5):

* **switch-c-2048** says ``num_decoder_layers: 12`` although the model has 15 decoder blocks, all sparse
  (``is_full_sparse``). transformers derives the decoder's sparse step as ``12 // 15 == 0`` and builds
  a dense decoder. We take the block count from the sparse-layer count (and, when a checkpoint index is
  known, from the tensor names; :meth:`SwitchConfig.from_checkpoint_index`) and use sparse step 1.
* c2048's config has no ``torch_dtype``; its weights are bfloat16. Other checkpoints without the key
  (switch-base-128) store float32.
* c2048 stores its output projection as ``decoder.lm_head.weight``, untied from ``shared.weight``.
  Untied models apply the lm_head without the ``d_model ** -0.5`` rescale that tied T5 models use.

Block names (the unit of streaming, compression and placement; ARCHITECTURE.md) are produced here so
that the checkpoint reader, the model and the pipeline agree on them without importing each other.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Iterable

import torch

__all__ = ["SwitchConfig", "ConfigError", "block_of_tensor"]

_SUPPORTED_ARCHITECTURES = ("SwitchTransformersForConditionalGeneration",)
_SUPPORTED_MODEL_TYPES = ("switch_transformers",)
_SUPPORTED_ACTIVATIONS = ("relu", "gelu", "gelu_new")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_DERIVED_KEYS = ("architectures", "model_type", "num_sparse_encoder_layers", "num_sparse_decoder_layers")

_BLOCK_RE = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.")


class ConfigError(ValueError):
    """A config.json that does not describe a Switch Transformer this package can run."""


@dataclasses.dataclass
class SwitchConfig:
    """Architecture of a Switch Transformer encoder-decoder (transformers field names).

    Sparse blocks: block ``i`` of a stack is a mixture-of-experts block when ``i % step == 1`` or
    ``step == 1`` (transformers' rule), where ``step`` is ``encoder_sparse_step`` /
    ``decoder_sparse_step``; step 0 means no sparse block.
    """

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_heads: int = 12
    num_layers: int = 12
    num_decoder_layers: int = 12
    num_experts: int = 8
    expert_capacity: int = 64
    encoder_sparse_step: int = 2
    decoder_sparse_step: int = 2
    is_full_sparse: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True
    decoder_start_token_id: int = 0
    pad_token_id: int = 0
    eos_token_id: int = 1
    router_dtype: str = "float32"
    router_bias: bool = False
    router_jitter_noise: float = 0.0
    torch_dtype: str = "float32"
    dense_act_fn: str = "relu"
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "SwitchConfig":
        """Builds a config from a Hub ``config.json`` dict, fixing the known checkpoint quirks.

        ``source`` names the file in error messages. Raises :class:`ConfigError` for other
        architectures, gated activations, or inconsistent sizes.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        archs = d.get("architectures")
        model_type = d.get("model_type")
        if archs is not None and not any(a in _SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"{source}: unknown architecture {archs}; qmoe supports {list(_SUPPORTED_ARCHITECTURES)}"
            )
        if model_type is not None and model_type not in _SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: unknown model_type {model_type!r}; qmoe supports {list(_SUPPORTED_MODEL_TYPES)}"
            )
        if archs is None and model_type is None:
            raise ConfigError(f"{source}: neither 'architectures' nor 'model_type' is set; not a Switch config")
        if d.get("is_gated_act") or str(d.get("feed_forward_proj", "relu")).startswith("gated-"):
            raise ConfigError(f"{source}: gated feed-forward layers are not part of Switch Transformers")

        field_names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kw: dict[str, Any] = {k: d[k] for k in field_names if k in d}
        # Derived keys are rewritten by to_dict(); everything else unknown is kept verbatim.
        extra = {k: v for k, v in d.items() if k not in field_names and k not in _DERIVED_KEYS}

        num_layers = int(d.get("num_layers", cls.num_layers))
        num_decoder_layers = d.get("num_decoder_layers")
        num_decoder_layers = num_layers if num_decoder_layers is None else int(num_decoder_layers)
        full_sparse = bool(d.get("is_full_sparse", False))
        n_sparse_enc = d.get("num_sparse_encoder_layers")
        n_sparse_dec = d.get("num_sparse_decoder_layers")

        if full_sparse:
            # c2048: every block is sparse, so the sparse-layer counts are the block counts; its
            # num_decoder_layers (12) is wrong while num_sparse_decoder_layers (15) is right.
            if n_sparse_enc is not None and int(n_sparse_enc) > num_layers:
                num_layers = int(n_sparse_enc)
            if n_sparse_dec is not None and int(n_sparse_dec) > num_decoder_layers:
                num_decoder_layers = int(n_sparse_dec)
            kw["encoder_sparse_step"] = 1
            kw["decoder_sparse_step"] = 1
        else:
            # transformers recomputes the steps from the sparse-layer counts, then lets explicit
            # *_sparse_step keys override them; mirror that order.
            for stack, n_blocks, n_sparse in (("encoder", num_layers, n_sparse_enc),
                                               ("decoder", num_decoder_layers, n_sparse_dec)):
                key = f"{stack}_sparse_step"
                if key in d:
                    kw[key] = int(d[key])
                elif n_sparse is not None:
                    kw[key] = n_blocks // int(n_sparse) if int(n_sparse) > 0 else n_blocks
        kw["num_layers"] = num_layers
        kw["num_decoder_layers"] = num_decoder_layers
        kw["is_full_sparse"] = full_sparse

        if "torch_dtype" not in d or d["torch_dtype"] is None:
            # c2048 (the only full-sparse release) omits torch_dtype and stores bfloat16;
            # base-128 and friends store float32.
            kw["torch_dtype"] = "bfloat16" if full_sparse else "float32"
        if "dense_act_fn" not in d and "feed_forward_proj" in d:
            kw["dense_act_fn"] = d["feed_forward_proj"]
        try:
            cfg = cls(**kw, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: invalid value: {e}") from None
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "SwitchConfig":
        """Reads a ``config.json`` file; errors name the file."""
        path = os.fspath(path)
        try:
            with open(path, "r", encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    @classmethod
    def from_checkpoint_index(cls, config_dict: dict, tensor_names: Iterable[str],
                              source: str = "config") -> "SwitchConfig":
        """Builds a config and corrects it from the tensor names a checkpoint actually stores.

        The block counts come from the highest ``encoder.block.N`` / ``decoder.block.N`` index in
        ``tensor_names`` (this is what fixes c2048's ``num_decoder_layers``); a stored
        ``decoder.lm_head.weight`` (the c2048 layout) marks the lm_head as untied. Sparse steps are
        re-derived from which blocks carry a router when the stored layout disagrees with the config.
        """
        d = dict(config_dict)
        names = list(tensor_names)
        max_block = {"encoder": -1, "decoder": -1}
        sparse_blocks: dict[str, set[int]] = {"encoder": set(), "decoder": set()}
        for name in names:
            m = _BLOCK_RE.match(name)
            if m:
                stack, idx = m.group(1), int(m.group(2))
                max_block[stack] = max(max_block[stack], idx)
                if ".mlp.router." in name:
                    sparse_blocks[stack].add(idx)
        if max_block["encoder"] >= 0:
            d["num_layers"] = max_block["encoder"] + 1
        if max_block["decoder"] >= 0:
            d["num_decoder_layers"] = max_block["decoder"] + 1
        if any(n == "decoder.lm_head.weight" for n in names):
            d["tie_word_embeddings"] = False
        cfg = cls.from_dict(d, source=source)
        for stack in ("encoder", "decoder"):
            if max_block[stack] < 0:
                continue
            stored = sparse_blocks[stack]
            expected = {i for i in range(cfg.num_blocks(stack)) if cfg.is_sparse(stack, i)}
            if stored != expected:
                step = _infer_sparse_step(stored, cfg.num_blocks(stack))
                if step is None:
                    raise ConfigError(
                        f"{source}: the checkpoint's sparse {stack} blocks {sorted(stored)} match no "
                        f"sparse step (block i is sparse when i % step == 1 or step == 1)"
                    )
                setattr(cfg, f"{stack}_sparse_step", step)
        return cfg

    # ------------------------------------------------------------------ validation / export

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the first inconsistent field."""
        positive = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_experts",
                    "relative_attention_num_buckets", "relative_attention_max_distance")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("num_layers", "num_decoder_layers", "encoder_sparse_step", "decoder_sparse_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if self.torch_dtype not in _DTYPES:
            raise ConfigError(f"torch_dtype must be one of {sorted(_DTYPES)}, got {self.torch_dtype!r}")
        if self.router_dtype not in _DTYPES:
            raise ConfigError(f"router_dtype must be one of {sorted(_DTYPES)}, got {self.router_dtype!r}")
        if self.dense_act_fn not in _SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"dense_act_fn must be one of {list(_SUPPORTED_ACTIVATIONS)}, "
                              f"got {self.dense_act_fn!r}")
        if self.expert_capacity is not None and (not isinstance(self.expert_capacity, int)
                                                 or self.expert_capacity <= 0):
            raise ConfigError(f"expert_capacity must be a positive integer, got {self.expert_capacity!r}")

    def to_dict(self) -> dict:
        """HF-compatible ``config.json`` dict; ``from_dict(to_dict())`` gives an equal config.

        The sparse-layer counts are written as transformers expects them, and the explicit
        ``*_sparse_step`` keys pin the layout for readers that recompute the steps.
        """
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                d[f.name] = getattr(self, f.name)
        d["architectures"] = list(_SUPPORTED_ARCHITECTURES)
        d["model_type"] = _SUPPORTED_MODEL_TYPES[0]
        d["num_sparse_encoder_layers"] = sum(self.is_sparse("encoder", i) for i in range(self.num_layers))
        d["num_sparse_decoder_layers"] = sum(self.is_sparse("decoder", i)
                                             for i in range(self.num_decoder_layers))
        return d

    # ------------------------------------------------------------------ layout

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the checkpoint weights."""
        return _DTYPES[self.torch_dtype]

    @property
    def router_torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.router_dtype]

    def num_blocks(self, stack: str) -> int:
        """Number of transformer blocks in ``stack`` ("encoder" or "decoder")."""
        if stack == "encoder":
            return self.num_layers
        if stack == "decoder":
            return self.num_decoder_layers
        raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")

    def is_sparse(self, stack: str, index: int) -> bool:
        """Whether block ``index`` of ``stack`` has a mixture-of-experts feed-forward layer."""
        n = self.num_blocks(stack)
        if not 0 <= index < n:
            raise IndexError(f"{stack} block index {index} out of range [0, {n})")
        step = self.encoder_sparse_step if stack == "encoder" else self.decoder_sparse_step
        if step <= 0:
            return False
        return step == 1 or index % step == 1

    def block_names(self) -> list[str]:
        """Blocks in execution order (ARCHITECTURE.md): shared, encoder blocks, encoder norm,
        decoder blocks, decoder norm, lm_head."""
        names = ["shared"]
        names += [f"encoder.block.{i}" for i in range(self.num_layers)]
        names.append("encoder.final_layer_norm")
        names += [f"decoder.block.{i}" for i in range(self.num_decoder_layers)]
        names.append("decoder.final_layer_norm")
        names.append("lm_head")
        return names

    def block_tensor_shapes(self, block: str) -> dict[str, tuple[int, ...]]:
        """Tensor names (transformers state-dict names) and shapes that make up ``block``."""
        d, inner, ff, E = self.d_model, self.num_heads * self.d_kv, self.d_ff, self.num_experts
        if block == "shared":
            return {"shared.weight": (self.vocab_size, d)}
        if block == "lm_head":
            return {"lm_head.weight": (self.vocab_size, d)}
        if block in ("encoder.final_layer_norm", "decoder.final_layer_norm"):
            return {f"{block}.weight": (d,)}
        m = re.fullmatch(r"(encoder|decoder)\.block\.(\d+)", block)
        if m is None:
            raise ValueError(f"unknown block name {block!r}; expected one of shared, "
                             f"encoder.block.N, encoder.final_layer_norm, decoder.block.N, "
                             f"decoder.final_layer_norm, lm_head")
        stack, idx = m.group(1), int(m.group(2))
        if idx >= self.num_blocks(stack):
            raise ValueError(f"block {block!r} out of range: the {stack} has {self.num_blocks(stack)} blocks")
        p = f"{block}.layer"
        shapes: dict[str, tuple[int, ...]] = {}

        def attention(prefix: str, relative: bool):
            for proj in ("q", "k", "v"):
                shapes[f"{prefix}.{proj}.weight"] = (inner, d)
            shapes[f"{prefix}.o.weight"] = (d, inner)
            if relative:
                shapes[f"{prefix}.relative_attention_bias.weight"] = (self.relative_attention_num_buckets,
                                                                      self.num_heads)

        attention(f"{p}.0.SelfAttention", relative=idx == 0)
        shapes[f"{p}.0.layer_norm.weight"] = (d,)
        ff_layer = 1
        if stack == "decoder":
            attention(f"{p}.1.EncDecAttention", relative=False)
            shapes[f"{p}.1.layer_norm.weight"] = (d,)
            ff_layer = 2
        mlp = f"{p}.{ff_layer}.mlp"
        if self.is_sparse(stack, idx):
            shapes[f"{mlp}.router.classifier.weight"] = (E, d)
            if self.router_bias:
                shapes[f"{mlp}.router.classifier.bias"] = (E,)
            for j in range(E):
                shapes[f"{mlp}.experts.expert_{j}.wi.weight"] = (ff, d)
                shapes[f"{mlp}.experts.expert_{j}.wo.weight"] = (d, ff)
        else:
            shapes[f"{mlp}.wi.weight"] = (ff, d)
            shapes[f"{mlp}.wo.weight"] = (d, ff)
        shapes[f"{p}.{ff_layer}.layer_norm.weight"] = (d,)
        return shapes


def block_of_tensor(name: str) -> str | None:
    """Block name that owns the (normalized) tensor ``name``, or None for a name outside the model."""
    if name == "shared.weight":
        return "shared"
    if name == "lm_head.weight":
        return "lm_head"
    m = _BLOCK_RE.match(name)
    if m:
        return f"{m.group(1)}.block.{m.group(2)}"
    for stack in ("encoder", "decoder"):
        if name == f"{stack}.final_layer_norm.weight":
            return f"{stack}.final_layer_norm"
    return None


def _infer_sparse_step(sparse: set[int], n_blocks: int) -> int | None:
    """Smallest step reproducing the set of sparse block indices, or None when none does."""
    if not sparse:
        return 0
    for step in range(1, n_blocks + 1):
        if {i for i in range(n_blocks) if step == 1 or i % step == 1} == sparse:
            return step
    return None

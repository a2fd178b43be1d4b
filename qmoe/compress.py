"""The compression pipeline: checkpoint in, compressed checkpoint out, one block at a time.

Data flow per block (encoder blocks first, then decoder blocks)::

    reader.read_block ─► dense part materialized ─► attention over all calibration samples
         ─► (sparse) RMS-norm, route every token ─► per expert group:
               Hessian of wi from the group's own tokens ─► batched GPTQ(wi) ─► codes
               Hessian of wo from relu(X Wi_q^T)      ─► batched GPTQ(wo) ─► codes
               (targets: the original model's outputs for the same tokens, see ``compensate``)
               tokens pushed through the *quantized* experts ─► block output
         ─► codec encode ─► block file written atomically ─► journal entry

Up to four streams of samples flow through the model: the calibration samples through the quantized
model (so later blocks calibrate on what the compressed model will see) and, with
``compensate="model"`` (the default), once more through the original model, whose activations are
the targets GPTQ aims for (:func:`~qmoe.gptq.compensated_target`); and the validation samples twice,
through the original and through the quantized model, which gives the validation loss before and
after compression in the same single pass over the checkpoint. With the reference stream, the
report also records how far the quantized residual stream has drifted from the original entering
and leaving each sparse layer, which tells where a per-layer precision (``layer_bits``) pays.

Memory: activations live in :class:`~qmoe.activations.ActivationStore` buffers on the CPU (spilled to
disk past ``max_cpu_memory``); only the current block, one batch of samples and one expert group sit
on the compute device. Crash safety: after each block its file, the activation stores and a journal
entry are committed atomically; a rerun of the same command resumes after the last committed block
and writes byte-identical files. Under ``torchrun`` ranks split the expert groups of every block and
broadcast their results, so the output equals a single process's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .activations import ActivationStore, MemoryBudget
from .checkpoint import CheckpointReader
from .config import SwitchConfig
from .data import Sample, load_tokenizer, make_samples
from .gptq import compensated_target, gptq_quantize
from .model import ACTIVATIONS, build_skeleton, materialize
from .quant import Grid, make_grid
from . import storage

WORK_DIR = ".qmoe_work"
JOURNAL = "journal.json"
PIPELINE_VERSION = 2  # 2: compensated GPTQ targets (a second calibration stream)


class CompressError(RuntimeError):
    """The compression run cannot proceed (bad settings, refused resume, budget exceeded)."""


@dataclass
class CompressSettings:
    """Everything that determines the compressed output (and a few knobs that do not)."""

    bits: str = "ternary"  # "ternary" | "2" | "3" | "4"
    method: str = "gptq"  # "gptq" | "rtn"
    # "minmax" (QMoE's rule) | "optimized" (per-row error optimum). On the bundled model GPTQ with
    # min/max gives the lower loss (benchmarks/RESULTS.md); the optimized grid wins under RTN.
    ternary_grid: str = "minmax"
    # Optimized grid only: levels keep at least this fraction of each row at zero under rounding.
    # The codec pays per nonzero, so the unconstrained error optimum (~50% zeros) costs ~1.5x the bits.
    min_zero_fraction: float = 0.85
    samples: int = 128
    val_samples: int = 32
    seed: int = 0
    data: Optional[str] = None  # None: bundled text; "c4"; or a path
    sample_length: int = 568  # tokens before masking (~512 after)
    expert_group: int = 16  # experts solved as one batched GPTQ problem
    quant_group_size: Optional[int] = None  # columns per grid group (integer grids only)
    damp: Optional[float] = None
    gptq_block_size: int = 128
    act_order: bool = False
    # GPTQ's target (see qmoe.gptq.compensated_target): "none" reproduces each matrix's own output on
    # the inputs it sees (QMoE); "expert" makes wo compensate wi's error (its target is the original
    # expert's output); "model" also compensates the error of earlier blocks by targeting the
    # original model's activations, carried by a second calibration stream through the original model.
    compensate: str = "model"
    # Per-layer precision overrides, "PATTERN=BITS" or "PATTERN=ternary@FLOOR" (see parse_layer_bits):
    # the first PATTERN (a regex, re.search) that matches a sparse MLP's module name, e.g.
    # "decoder.block.0.layer.2.mlp", sets that layer's bits (and optimized-grid zero floor).
    layer_bits: Tuple[str, ...] = ()
    codec_mode: str = "tunstall"  # "tunstall" | "qmoe"
    mask_sentinels: bool = True
    max_tokens_per_pass: int = 1 << 16  # token cap per Hessian pass; more tokens take extra passes
    batch_size: int = 8
    device: str = "cpu"
    # Do not change the output:
    max_cpu_memory: Optional[int] = None  # bytes of activations kept in RAM; the rest spills to disk
    max_disk: Optional[int] = None  # bytes of downloaded shards kept at once (Hub sources)

    OUTPUT_NEUTRAL = ("max_cpu_memory", "max_disk")

    def validate(self) -> None:
        if self.bits not in ("ternary", "2", "3", "4"):
            raise CompressError(f"--bits must be ternary, 2, 3 or 4, not {self.bits!r}")
        if self.method not in ("gptq", "rtn"):
            raise CompressError(f"--method must be gptq or rtn, not {self.method!r}")
        if self.ternary_grid not in ("optimized", "minmax"):
            raise CompressError(f"--grid must be optimized or minmax, not {self.ternary_grid!r}")
        if self.compensate not in ("none", "expert", "model"):
            raise CompressError(f"--compensate must be none, expert or model, not {self.compensate!r}")
        if self.codec_mode not in ("tunstall", "qmoe"):
            raise CompressError(f"--codec must be tunstall or qmoe, not {self.codec_mode!r}")
        if not 0.0 <= self.min_zero_fraction < 1.0:
            raise CompressError(f"--min-zero-fraction must be in [0, 1), not {self.min_zero_fraction}")
        if self.samples < 1 or self.val_samples < 0:
            raise CompressError("--samples must be >= 1 and --val-samples >= 0")
        if self.bits == "ternary" and self.quant_group_size is not None:
            raise CompressError("ternary grids are per row (the codec stores one scale pair per row)")
        if isinstance(self.layer_bits, str):
            raise CompressError("layer_bits must be a sequence of 'PATTERN=BITS' strings, not one string")
        for entry in self.layer_bits:
            _, bits, floor = parse_layer_bits(entry)
            if floor is not None and self.ternary_grid != "optimized":
                raise CompressError(f"--layer-bits {entry!r}: a zero floor needs --grid optimized")
            if bits == "ternary" and self.quant_group_size is not None:
                raise CompressError(f"--layer-bits {entry!r}: ternary grids are per row, not grouped")
        if self.expert_group < 1 or self.batch_size < 1 or self.max_tokens_per_pass < 1:
            raise CompressError("--expert-group, --batch-size and --max-tokens-per-pass must be positive")

    def precision(self, module: str) -> "LayerPrecision":
        """The precision of the sparse MLP ``module`` (e.g. ``"decoder.block.0.layer.2.mlp"``)."""
        for entry in self.layer_bits:
            pattern, bits, floor = parse_layer_bits(entry)
            if re.search(pattern, module):
                return self._precision(bits, floor)
        return self.default_precision()

    def default_precision(self) -> "LayerPrecision":
        """The precision of the layers that no ``layer_bits`` entry matches."""
        return self._precision(self.bits, None)

    def _precision(self, bits: str, floor: Optional[float]) -> "LayerPrecision":
        if bits != "ternary" or self.ternary_grid != "optimized":
            return LayerPrecision(bits, 0.0)
        return LayerPrecision(bits, self.min_zero_fraction if floor is None else floor)

    def fingerprint(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_bits"] = list(self.layer_bits)
        for k in self.OUTPUT_NEUTRAL:
            d.pop(k)
        d["device"] = torch.device(self.device).type
        return d


@dataclass(frozen=True)
class LayerPrecision:
    """What one sparse layer's experts are quantized to."""

    bits: str  # "ternary" | "2" | "3" | "4"
    min_zero_fraction: float = 0.0  # optimized ternary grid only: its zero floor (0 otherwise)

    @property
    def quant_bits(self):
        return "ternary" if self.bits == "ternary" else int(self.bits)


def parse_layer_bits(entry: str) -> Tuple[str, str, Optional[float]]:
    """``"PATTERN=BITS"`` or ``"PATTERN=ternary@FLOOR"`` -> ``(PATTERN, BITS, FLOOR or None)``.

    ``PATTERN`` is a regular expression searched in the sparse MLP's module name; ``BITS`` is
    ``ternary``, 2, 3 or 4; ``FLOOR`` (ternary only) overrides ``--min-zero-fraction`` for the layer.
    Raises :class:`CompressError` naming what is wrong.
    """
    pattern, sep, spec = str(entry).rpartition("=")
    if not sep or not pattern:
        raise CompressError(f"--layer-bits {entry!r}: expected PATTERN=BITS, e.g. 'decoder\\.block\\.0\\.=2'")
    try:
        re.compile(pattern)
    except re.error as e:
        raise CompressError(f"--layer-bits {entry!r}: bad regular expression: {e}") from None
    bits, at, floor_text = spec.partition("@")
    if bits not in ("ternary", "2", "3", "4"):
        raise CompressError(f"--layer-bits {entry!r}: bits must be ternary, 2, 3 or 4, not {bits!r}")
    if not at:
        return pattern, bits, None
    if bits != "ternary":
        raise CompressError(f"--layer-bits {entry!r}: only ternary layers take a zero floor (@FLOOR)")
    try:
        floor = float(floor_text)
    except ValueError:
        floor = -1.0
    if not 0.0 <= floor < 1.0:
        raise CompressError(f"--layer-bits {entry!r}: the zero floor must be a number in [0, 1), not {floor_text!r}")
    return pattern, bits, floor


# ----------------------------------------------------------------------------------------------
# Sample streams
# ----------------------------------------------------------------------------------------------

# The calibration samples through the original model, for GPTQ targets with --compensate model.
REFERENCE_STREAM = "calibration-original"


@dataclass
class Stream:
    """One set of samples flowing through one version of the model (original or quantized)."""

    name: str
    samples: List[Sample]
    quantized: bool
    hessian: bool  # contributes to Hessians (calibration)
    hidden: Optional[ActivationStore] = None  # current hidden states of the stack being processed
    encoder_out: Optional[ActivationStore] = None  # final encoder states (decoder stage)

    def lengths(self, decoder: bool) -> List[int]:
        return [int((s.labels if decoder else s.input_ids).numel()) for s in self.samples]

    def token_ids(self, decoder: bool, start_id: int = 0) -> torch.Tensor:
        """Input token ids of every sample, concatenated like the stores' rows (decoder: the labels
        shifted right behind ``start_id``)."""
        if not decoder:
            return torch.cat([s.input_ids for s in self.samples])
        return torch.cat([torch.cat([s.labels.new_full((1,), start_id), s.labels[:-1]]) for s in self.samples])


def _hessian_mask(stream: Stream, decoder: bool, tokenizer, enabled: bool) -> torch.Tensor:
    """Tokens allowed into Hessians: not encoder sentinels; in the decoder not the position that
    predicts a sentinel (the one just before it in the input), following the paper."""
    n = sum(stream.lengths(decoder))
    if not enabled:
        return torch.ones(n, dtype=torch.bool)
    if not decoder:
        return ~tokenizer.is_sentinel(stream.token_ids(False))
    labels = torch.cat([s.labels for s in stream.samples])
    return ~tokenizer.is_sentinel(labels)


# ----------------------------------------------------------------------------------------------
# Journal
# ----------------------------------------------------------------------------------------------

class Journal:
    """Which blocks are committed, and where the activations after the last one live."""

    def __init__(self, out_dir: str, fingerprint: dict, rank: int):
        self.work = os.path.join(out_dir, WORK_DIR)
        self.path = os.path.join(self.work, JOURNAL)
        self.rank = rank
        self.fingerprint = fingerprint
        self.done: List[dict] = []
        self.states: Dict[str, str] = {}
        self.extra: dict = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                saved = json.load(f)
            diffs = _diff(saved.get("fingerprint", {}), fingerprint)
            if diffs:
                raise CompressError(
                    f"{out_dir} holds an unfinished run with other inputs, refusing to resume: "
                    + "; ".join(diffs) + ". Use another --out, or --overwrite to start over.")
            self.done = saved["done"]
            self.states = saved["states"]
            self.extra = saved.get("extra", {})

    @property
    def done_blocks(self) -> List[str]:
        return [d["block"] for d in self.done]

    def commit(self, entry: dict, states: Dict[str, str], extra: dict) -> None:
        self.done.append(entry)
        old = set(self.states.values())
        self.states = dict(states)
        self.extra = extra
        if self.rank == 0:
            storage.atomic_write_json(self.path, {"fingerprint": self.fingerprint, "done": self.done,
                                                  "states": self.states, "extra": self.extra})
            for path in old - set(states.values()):
                for p in (path, path + ".json"):
                    if os.path.exists(p):
                        os.remove(p)


def _diff(saved: dict, now: dict, prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k} was {a!r}, now {b!r}")
    return out


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------

class Dist:
    """Rank bookkeeping; a single process is world size 1."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1
        backend = self.dist.get_backend() if self.dist else "gloo"
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def broadcast(self, tensors: List[torch.Tensor], src: int) -> List[torch.Tensor]:
        """Broadcasts tensors (shapes known to every rank) from ``src``; returns CPU tensors."""
        if self.dist is None:
            return tensors
        out = []
        for t in tensors:
            buf = t.to(self.comm_device).contiguous()
            self.dist.broadcast(buf, src)
            out.append(buf.cpu())
        return out

    def barrier(self):
        if self.dist is not None:
            self.dist.barrier()


# ----------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------

def _bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


def _stored_grid(grid: Grid) -> Grid:
    """The grid exactly as the checkpoint stores it (bf16 scales, uint8 zero points)."""
    r = lambda t: None if t is None else _bf16_round(t)  # noqa: E731
    return Grid(grid.kind, grid.bits, r(grid.lo), r(grid.hi), r(grid.scale),
                None if grid.zero is None else grid.zero.round(), grid.group_size, grid.cols)


def _fault_point(point: str, block: str) -> None:
    """Test hook: ``QMOE_FAULT=<point>:<block>`` SIGKILLs the process there (crash-safety tests)."""
    spec = os.environ.get("QMOE_FAULT")
    if spec and spec == f"{point}:{block}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Compressor:
    def __init__(self, source: Optional[str], out_dir: str, settings: CompressSettings,
                 progress: bool = True, log=print, overwrite: bool = False):
        from .data import bundled_model_path

        settings.validate()
        self.settings = s = settings
        self.source = str(source) if source is not None else str(bundled_model_path())
        self.out_dir = out_dir
        self.log = log
        self.progress = progress
        self.dist = Dist()
        self.device = torch.device(s.device)
        self.compute_dtype = torch.float32
        self.timings: Dict[str, float] = {}

        if self.dist.rank == 0:
            if overwrite:
                storage.remove_checkpoint_files(out_dir)
                shutil.rmtree(os.path.join(out_dir, WORK_DIR), ignore_errors=True)
            elif (os.path.exists(os.path.join(out_dir, storage.MANIFEST))
                  and not os.path.exists(os.path.join(out_dir, WORK_DIR))):
                raise CompressError(f"{out_dir} already holds a finished compressed checkpoint; "
                                    "pass --overwrite to replace it")
        self.dist.barrier()

        self.reader = CheckpointReader(self.source, on_shard_done=self._shard_done)
        self.config: SwitchConfig = self.reader.config
        self.tokenizer = load_tokenizer(os.path.dirname(self.reader.resolve_file("spiece.model")))
        t0 = time.time()
        calib = make_samples(self.tokenizer, s.data, s.samples, s.seed, "calibration", s.sample_length)
        val = make_samples(self.tokenizer, s.data, s.val_samples, s.seed, "validation", s.sample_length) \
            if s.val_samples else []
        self.timings["data"] = time.time() - t0
        self.streams = [Stream("calibration", calib, quantized=True, hessian=True)]
        if s.method == "gptq" and s.compensate == "model":  # the same samples through the original model
            self.streams += [Stream(REFERENCE_STREAM, calib, quantized=False, hessian=False)]
        if val:
            self.streams += [Stream("validation-original", val, quantized=False, hessian=False),
                             Stream("validation-quantized", val, quantized=True, hessian=False)]
        self.journal = Journal(out_dir, self._fingerprint(calib, val), self.dist.rank)
        self.budget = MemoryBudget(s.max_cpu_memory, os.path.join(out_dir, WORK_DIR, "spill"),
                                   pin=self.device.type == "cuda")
        self.skeleton = build_skeleton(self.config)
        ternary = s.bits == "ternary" or any(parse_layer_bits(e)[1] == "ternary" for e in s.layer_bits)
        self.dictionary = self._dictionary() if ternary else None
        self.report_layers: List[dict] = list(self.journal.extra.get("layers", []))
        self._embedding: Optional[torch.Tensor] = None
        self._bias_tables: Dict[str, torch.Tensor] = {}
        self._store_serial = 0
        self._act = ACTIVATIONS[self.config.dense_act_fn]

    # -- setup helpers ----------------------------------------------------------------------
    def _fingerprint(self, calib, val) -> dict:
        h = hashlib.sha256()
        for smp in list(calib) + list(val):
            h.update(smp.input_ids.numpy().tobytes())
            h.update(smp.labels.numpy().tobytes())
        src = {"source": self.source, "index_file": self.reader.index_file}
        index_path = self.reader.resolve_file(self.reader.index_file) if self.reader.sharded else None
        if index_path:
            src["index_sha256"] = storage.sha256_file(index_path)
        return {"pipeline_version": PIPELINE_VERSION, "source": src, "settings": self.settings.fingerprint(),
                "data_sha256": h.hexdigest()}

    def _dictionary(self):
        from . import codec

        return codec.qmoe_dictionary() if self.settings.codec_mode == "qmoe" else codec.default_dictionary()

    def _shard_done(self, path: str) -> None:
        """Deletes a downloaded Hub shard once every block stored in it was read (``--max-disk``)."""
        if self.reader.is_local or self.settings.max_disk is None or self.dist.rank != 0:
            return
        real = os.path.realpath(path)
        for p in {path, real}:
            if os.path.lexists(p):
                os.remove(p)

    def _check_disk_budget(self, block: str) -> None:
        if self.reader.is_local or self.settings.max_disk is None:
            return
        need = self.reader.block_bytes(block)
        if need > self.settings.max_disk:
            raise CompressError(f"block {block} needs {need / 1e9:.1f} GB of shards but --max-disk is "
                                f"{self.settings.max_disk / 1e9:.1f} GB")

    # -- stores -----------------------------------------------------------------------------
    def _new_store(self, stream: Stream, what: str, decoder: bool) -> ActivationStore:
        self._store_serial += 1
        return self.budget.new_store(f"rank{self.dist.rank}-{stream.name}-{what}-{self._store_serial}.bin",
                                     stream.lengths(decoder),
                                     self.config.d_model, self.compute_dtype)

    def _commit_states(self, block_index: int) -> Dict[str, str]:
        states = {}
        base = os.path.join(self.out_dir, WORK_DIR, "states")
        os.makedirs(base, exist_ok=True)
        for st in self.streams:
            for what in ("hidden", "encoder_out"):
                store = getattr(st, what)
                if store is None:
                    continue
                path = os.path.join(base, f"{block_index:04d}-{st.name}-{what}.bin")
                if self.dist.rank == 0:
                    path = store.commit(path)  # an unchanged store keeps its earlier file
                elif store.committed_path is not None and not store._dirty:
                    path = store.committed_path
                else:
                    store.committed_path, store._dirty = path, False  # rank 0 writes the same contents
                states[f"{st.name}/{what}"] = path
        self.dist.barrier()
        return states

    def _restore_states(self) -> None:
        for st in self.streams:
            for what in ("hidden", "encoder_out"):
                path = self.journal.states.get(f"{st.name}/{what}")
                if path is None:
                    continue
                need = os.path.getsize(path)
                in_memory = self.budget.limit is None or self.budget.in_memory + need <= self.budget.limit
                store = ActivationStore.open(path, in_memory=in_memory, pin=self.budget.pin,
                                             work_path=os.path.join(self.budget.spill_dir,
                                                                    f"rank{self.dist.rank}-{st.name}-{what}.bin"))
                if in_memory:
                    self.budget.in_memory += store.nbytes
                setattr(st, what, store)

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        t_start = time.time()
        blocks = self.reader.block_names()
        done = self.journal.done_blocks
        if done != blocks[:len(done)]:
            raise CompressError(f"journal lists blocks {done} that do not match the checkpoint's order")
        for entry in self.journal.done:
            if entry["file"] is None:
                continue
            path = os.path.join(self.out_dir, entry["file"])
            if self.dist.rank == 0 and (not os.path.exists(path) or storage.sha256_file(path) != entry["sha256"]):
                raise CompressError(f"{path}: committed block file is missing or changed since it was written; "
                                    "rerun with --overwrite")
        if done:
            self.log(f"resuming after block {done[-1]} ({len(done)}/{len(blocks)} blocks done)")
            for name in done:  # their shards are no longer needed for them (--max-disk)
                self.reader.mark_consumed(name)
            self._restore_states()
        self._prepare_shared_tensors(done)

        iterator = blocks[len(done):]
        bar = _progress(iterator, self.progress and self.dist.rank == 0, "blocks", len(blocks), len(done))
        for name in bar:
            index = blocks.index(name)
            self._check_disk_budget(name)
            t0 = time.time()
            entry = self._process_block(name)
            _fault_point("after-block-file", name)
            self.timings[name] = time.time() - t0
            states = self._commit_states(index)
            _fault_point("after-states", name)
            self.journal.commit(entry, states, {"layers": self.report_layers,
                                                "losses": getattr(self, "_losses", None)})
            _fault_point("after-journal", name)
        return self._finish(time.time() - t_start)

    def _prepare_shared_tensors(self, done: List[str]) -> None:
        """Embeddings and the relative-attention tables are needed again later: keep them at hand."""
        if "shared" in done:
            self._embedding = self.reader.read_block("shared")["shared.weight"].to(self.compute_dtype).clone()
        for stack in ("encoder", "decoder"):
            if f"{stack}.block.0" in done:
                key = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
                self._bias_tables[stack] = self.reader.read_block(f"{stack}.block.0")[key].to(
                    self.compute_dtype).clone()

    # -- per block --------------------------------------------------------------------------
    def _process_block(self, name: str) -> dict:
        tensors = self.reader.read_block(name)
        dense: Dict[str, torch.Tensor] = {}
        experts: Dict[str, Dict[str, storage.PackedExperts]] = {}
        if name == "shared":
            self._embedding = tensors["shared.weight"].to(self.compute_dtype).clone()
            self._embed_stack(decoder=False)
            dense = dict(tensors)
        elif name.endswith("final_layer_norm"):
            self._final_norm(name, tensors)
            dense = dict(tensors)
        elif name == "lm_head":
            tied = self.config.tie_word_embeddings
            self._losses = self._validation_losses(None if tied else tensors["lm_head.weight"])
            if tied:  # the head is the embedding: storing it again would count its bytes twice
                return {"block": name, "file": None, "sha256": None}
            dense = dict(tensors)
        else:
            stack, _, idx = name.split(".")
            if int(idx) == 0:
                key = f"{name}.layer.0.SelfAttention.relative_attention_bias.weight"
                self._bias_tables[stack] = tensors[key].to(self.compute_dtype).clone()
                if stack == "decoder":
                    self._embed_stack(decoder=True)
            dense, experts = self._transformer_block(name, tensors)
        sha = "" if self.dist.rank else storage.write_block(self.out_dir, name, dense, experts)
        return {"block": name, "file": storage.block_file(name), "sha256": sha}

    def _embed_stack(self, decoder: bool) -> None:
        emb_ref = self._embedding
        emb_q = _bf16_round(emb_ref)
        for st in self.streams:
            store = self._new_store(st, "hidden", decoder)
            ids = st.token_ids(decoder, self.config.decoder_start_token_id)
            table = emb_q if st.quantized else emb_ref
            chunk = 1 << 15
            for i in range(0, len(ids), chunk):
                store.write_rows(i, table[ids[i:i + chunk]])
            if decoder:
                st.encoder_out = st.hidden  # the encoder's normed output, kept for cross-attention
            elif st.hidden is not None:
                self.budget.release(st.hidden)
            st.hidden = store

    @torch.no_grad()
    def _final_norm(self, name: str, tensors: Dict[str, torch.Tensor]) -> None:
        stack = name.split(".")[0]
        norm = self.skeleton.get_submodule(name)
        for st in self.streams:
            weights = {k: (_bf16_round(v.float()) if st.quantized else v).to(self.compute_dtype)
                       for k, v in tensors.items()}
            module = materialize(norm.__class__(self.config.d_model, self.config.layer_norm_epsilon)
                                 .to("meta"), weights, device=self.device, dtype=self.compute_dtype, prefix=name)
            out = self._new_store(st, "normed", stack == "decoder")
            chunk = 1 << 14
            for i in range(0, st.hidden.num_tokens, chunk):
                rows = st.hidden.read_rows(i, min(i + chunk, st.hidden.num_tokens)).to(self.device)
                out.write_rows(i, module(rows))
            self.budget.release(st.hidden)
            st.hidden = out

    @torch.no_grad()
    def _validation_losses(self, lm_head: Optional[torch.Tensor]) -> Optional[dict]:
        """Mean next-token loss of each validation stream, and the mean per-token KL divergence
        ``KL(original || quantized)`` of the two streams' predictions under key ``"kl"``: a direct
        measure of how far compression moved the model, with less sampling noise than the
        difference of two losses."""
        weight_ref = self._embedding if lm_head is None else lm_head.to(self.compute_dtype)
        streams = {st.name: st for st in self.streams}
        if "validation-original" not in streams:
            return None
        orig, quant = streams["validation-original"], streams["validation-quantized"]
        weights = {orig.name: weight_ref.to(self.device), quant.name: _bf16_round(weight_ref).to(self.device)}
        labels = torch.cat([smp.labels for smp in orig.samples])
        totals = {orig.name: 0.0, quant.name: 0.0, "kl": 0.0}
        chunk = 4096
        for i in range(0, len(labels), chunk):
            j = min(i + chunk, len(labels))
            logp = {}
            for st in (orig, quant):
                h = st.hidden.read_rows(i, j).to(self.device)
                if self.config.tie_word_embeddings:
                    h = h * (self.config.d_model ** -0.5)
                logp[st.name] = F.log_softmax((h @ weights[st.name].T).float(), dim=-1)
                totals[st.name] += F.nll_loss(logp[st.name], labels[i:j].to(self.device), reduction="sum").item()
            totals["kl"] += F.kl_div(logp[quant.name], logp[orig.name], log_target=True, reduction="sum").item()
        return {k: v / max(len(labels), 1) for k, v in totals.items()}

    def _block_weights(self, name: str, tensors: Dict[str, torch.Tensor], quantized: bool):
        """The block's dense part materialized for one stream (experts stay on the meta device)."""
        block = self.skeleton.get_submodule(name)
        dense = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
        if quantized:
            dense = {k: _bf16_round(v.float()) for k, v in dense.items()}
        import copy

        module = copy.deepcopy(block)  # a fresh meta copy; the skeleton itself stays empty
        ffn = module.layer[-1]
        if block.is_sparse:
            experts = ffn.mlp.experts
            ffn.mlp.experts = torch.nn.Identity()
            materialize(module, dense, device=self.device, dtype=self.compute_dtype, prefix=name)
            ffn.mlp.experts = experts
        else:
            materialize(module, dense, device=self.device, dtype=self.compute_dtype, prefix=name)
        return module

    def _transformer_block(self, name: str, tensors: Dict[str, torch.Tensor]):
        stack, _, idx = name.split(".")
        decoder = stack == "decoder"
        sparse = self.config.is_sparse(stack, int(idx))
        modules = {q: self._block_weights(name, tensors, q) for q in {st.quantized for st in self.streams}}
        routes = {}
        outputs = {}
        for st in self.streams:
            out, route = self._attention_pass(modules[st.quantized], st, decoder, sparse)
            outputs[st.name] = out
            routes[st.name] = route
        experts = {}
        if sparse:
            mlp = f"{name}.layer.{len(modules[True].layer) - 1}.mlp"
            experts[mlp] = self._compress_experts(name, mlp, tensors, modules, routes, outputs, decoder)
        for st in self.streams:
            self.budget.release(st.hidden)
            st.hidden = outputs[st.name]
        dense = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
        return dense, experts

    def _attention_pass(self, block, st: Stream, decoder: bool, sparse: bool):
        """Runs every sample through the block (dense) or up to the router (sparse).

        Returns the output store (for sparse blocks: the residual stream before the expert FFN) and,
        for sparse blocks, ``(normed, expert_index, router_prob)``: the FFN input store and the
        routing of every token.
        """
        out = self._new_store(st, "hidden", decoder)
        normed = self._new_store(st, "ffn_in", decoder) if sparse else None
        expert_index = torch.empty(out.num_tokens, dtype=torch.int64) if sparse else None
        router_prob = torch.empty(out.num_tokens, dtype=torch.float32) if sparse else None
        stack_module = self.skeleton.decoder if decoder else self.skeleton.encoder
        table = self._bias_tables["decoder" if decoder else "encoder"].to(self.device)
        n = len(st.samples)
        bs = self.settings.batch_size
        with torch.no_grad():
            for i0 in range(0, n, bs):
                i1 = min(n, i0 + bs)
                xs = st.hidden.read_samples(i0, i1)
                x, mask = _pad(xs, self.device)
                self_bias = stack_module.self_attention_bias(x.shape[1], mask, dtype=self.compute_dtype,
                                                             table=table)
                h = block.layer[0](x, self_bias)
                if decoder:
                    enc, enc_mask = _pad(st.encoder_out.read_samples(i0, i1), self.device)
                    cross = stack_module.cross_attention_bias(enc_mask, x.shape[0], enc.shape[1],
                                                              self.compute_dtype, self.device)
                    h = block.layer[1](h, cross, enc)
                ffn = block.layer[-1]
                if not sparse:
                    h = ffn(h)
                rows = _unpad(h, mask)
                start = int(out.offsets[i0])
                out.write_rows(start, rows)
                if sparse:
                    z = ffn.layer_norm(rows)
                    normed.write_rows(start, z)
                    e, p = ffn.mlp.route(z)
                    expert_index[start:start + len(rows)] = e.cpu()
                    router_prob[start:start + len(rows)] = p.cpu()
        return out, (normed, expert_index, router_prob) if sparse else None

    # -- experts ----------------------------------------------------------------------------
    def _compress_experts(self, name, mlp, tensors, modules, routes, outputs, decoder):
        s = self.settings
        prec = s.precision(mlp)
        E = self.config.num_experts
        calib = self.streams[0]
        masks = {calib.name: _hessian_mask(calib, decoder, self.tokenizer, s.mask_sentinels)}
        order = {}  # stream -> (token ids sorted by expert, expert offsets [E+1])
        for st in self.streams:
            e_idx = routes[st.name][1]
            perm = torch.argsort(e_idx, stable=True)
            offs = torch.zeros(E + 1, dtype=torch.int64)
            offs[1:] = torch.cumsum(torch.bincount(e_idx, minlength=E), 0)
            order[st.name] = (perm, offs)
        groups = [list(range(g, min(E, g + s.expert_group))) for g in range(0, E, s.expert_group)]
        codes = {"wi": [None] * E, "wo": [None] * E}
        grids = {"wi": [None] * E, "wo": [None] * E}
        stats = {"fallback": [], "no_tokens": [], "loss_wi": [0.0] * E, "loss_wo": [0.0] * E}
        calib_counts = order[calib.name][1].diff()
        if REFERENCE_STREAM in outputs:  # the residual stream entering the experts
            stats["drift_in"] = self._drift(outputs[calib.name], outputs[REFERENCE_STREAM])
        bar = _progress(range(0, len(groups), self.dist.world), self.progress and self.dist.rank == 0,
                        f"{name} expert groups", len(groups), 0, leave=False)
        for round_start in bar:
            round_groups = list(range(round_start, min(len(groups), round_start + self.dist.world)))
            results = {}
            for gi in round_groups:
                if gi % self.dist.world == self.dist.rank:
                    results[gi] = self._expert_group(mlp, groups[gi], tensors, routes, order, masks, outputs, prec)
            if round_start == 0:
                _fault_point("mid-block", name)
            for gi in round_groups:
                res = self._share_group_result(results.get(gi), groups[gi], order, gi % self.dist.world, prec)
                for m in ("wi", "wo"):
                    for j, e in enumerate(groups[gi]):
                        codes[m][e] = res[m]["codes"][j]
                        grids[m][e] = (res[m]["p"][j], res[m]["q"][j])
                        stats[f"loss_{m}"][e] = float(res[m]["loss"][j])
                for j, e in enumerate(groups[gi]):
                    if bool(res["fallback"][j]):
                        stats["fallback"].append(e)
                for st in self.streams:
                    perm, offs = order[st.name]
                    lo, hi = int(offs[groups[gi][0]]), int(offs[groups[gi][-1] + 1])
                    if hi > lo:
                        outputs[st.name].scatter(perm[lo:hi], res["out"][st.name])
        stats["no_tokens"] = [e for e in range(E) if int(calib_counts[e]) == 0]
        if REFERENCE_STREAM in outputs:
            stats["drift"] = self._drift(outputs[calib.name], outputs[REFERENCE_STREAM])
        for st in self.streams:
            self.budget.release(routes[st.name][0])
        packed = {m: self._pack(codes[m], grids[m], prec) for m in ("wi", "wo")}
        self._layer_report(name, mlp, codes, packed, stats, calib_counts, prec)
        return packed

    def _drift(self, quantized: ActivationStore, original: ActivationStore) -> float:
        """``sum ||q - o||^2 / sum ||o||^2`` over the calibration tokens of two streams' residual states.

        How far the quantized model's residual stream has moved from the original model's, entering a
        sparse layer's experts (``drift_in``) and leaving the block (``drift``): the rise from one to
        the other is what quantizing this layer's experts costs (after they compensated what they
        could), the information ``layer_bits`` needs.
        """
        err = ref = 0.0
        rows = quantized.num_tokens
        step = max(1, (1 << 22) // max(1, quantized.width))  # 16 MB of float32 per read
        for r0 in range(0, rows, step):
            q = quantized.read_rows(r0, min(rows, r0 + step)).float()
            o = original.read_rows(r0, min(rows, r0 + step)).float()
            err += float((q - o).square().sum(dtype=torch.float64))
            ref += float(o.square().sum(dtype=torch.float64))
        return err / ref if ref > 0 else 0.0

    def _expert_weights(self, mlp: str, m: str, experts: List[int], tensors) -> torch.Tensor:
        return torch.stack([tensors[f"{mlp}.experts.expert_{e}.{m}.weight"] for e in experts]).to(
            self.device, torch.float32)

    def _gather_group(self, st: Stream, routes, order, experts: List[int]):
        """Tokens routed to ``experts``: FFN inputs [n, d], expert of each [n], router prob [n]."""
        perm, offs = order[st.name]
        lo, hi = int(offs[experts[0]]), int(offs[experts[-1] + 1])
        idx = perm[lo:hi]
        normed, e_idx, prob = routes[st.name]
        return idx, normed.gather(idx), e_idx[idx], prob[idx], offs[experts[0]:experts[-1] + 2] - lo

    def _moment(self, local_offs: torch.Tensor, keep: torch.Tensor, G: int, width: int,
                left, right=None) -> torch.Tensor:
        """``2 A_e^T B_e / n_e`` over each expert's kept tokens, in passes of bounded size.

        ``left(j, rows)`` gives the ``[len(rows), width]`` float32 features ``A`` of group expert
        ``j``'s token rows on the compute device, ``right`` the features ``B`` (None: ``B = A``,
        the Hessian).
        """
        M = torch.zeros(G, width, width, device=self.device)
        n = torch.zeros(G)
        cap = self.settings.max_tokens_per_pass
        for j in range(G):
            lo, hi = int(local_offs[j]), int(local_offs[j + 1])
            rows = torch.nonzero(keep[lo:hi]).squeeze(1) + lo
            for c in range(0, len(rows), cap):  # extra passes beyond the token cap
                a = left(j, rows[c:c + cap])
                b = a if right is None else right(j, rows[c:c + cap])
                M[j] += 2.0 * (a.T @ b)
            n[j] = len(rows)
        return M / n.clamp(min=1).to(self.device)[:, None, None]

    def _quantize(self, w: torch.Tensor, H: Optional[torch.Tensor], names: List[str], prec: LayerPrecision):
        s = self.settings
        if s.method == "gptq":
            res = gptq_quantize(w, H, bits=prec.quant_bits, ternary_grid=s.ternary_grid, damp=s.damp,
                                block_size=s.gptq_block_size, act_order=s.act_order,
                                group_size=s.quant_group_size, names=names,
                                min_zero_fraction=prec.min_zero_fraction)
            grid, codes, loss, fallback = res.grid, res.codes, res.loss, res.fallback
        else:
            grid = make_grid(w, bits=prec.quant_bits, ternary_grid=s.ternary_grid, group_size=s.quant_group_size,
                             min_zero_fraction=prec.min_zero_fraction)
            codes = grid.codes(w)
            loss = torch.zeros(w.shape[0])
            fallback = torch.zeros(w.shape[0], dtype=torch.bool)
        stored = _stored_grid(grid)
        return codes, stored, stored.dequantize(codes), loss, fallback

    def _expert_group(self, mlp, experts, tensors, routes, order, masks, outputs, prec: LayerPrecision):
        s = self.settings
        G = len(experts)
        calib = self.streams[0]
        idx, x, _, prob, local = self._gather_group(calib, routes, order, experts)
        keep = masks[calib.name][idx]
        names = [f"{mlp}.experts.expert_{e}" for e in experts]
        result = {}
        gptq = s.method == "gptq"
        compensate = s.compensate if gptq else "none"
        with torch.no_grad():
            inputs = lambda j, r: x[r].to(self.device, torch.float32)  # noqa: E731
            # The same tokens' expert inputs in the original model (the streams share their samples).
            ref_inputs = inputs
            if compensate == "model":
                x_ref = routes[REFERENCE_STREAM][0].gather(idx)
                ref_inputs = lambda j, r: x_ref[r].to(self.device, torch.float32)  # noqa: E731
            w_in = self._expert_weights(mlp, "wi", experts, tensors)  # [G, d_ff, d]
            d, d_ff = w_in.shape[2], w_in.shape[1]
            # Ridge targets shrink weakly spanned directions towards zero, which lowered KL and bits at
            # ternary but is a bias larger than the quantization error at 2-4 bits (benchmarks/RESULTS.md):
            # integer grids, and experts with fewer calibration tokens than a matrix has columns (whose
            # unseen directions would be zeroed), are anchored at W instead (compensated_target).
            tokens = torch.stack([keep[int(local[j]):int(local[j + 1])].sum() for j in range(G)])
            anchor_all = prec.bits != "ternary"
            H_in = self._moment(local, keep, G, d, inputs) if gptq else None
            target = w_in
            if compensate == "model":
                target = compensated_target(w_in, H_in, self._moment(local, keep, G, d, inputs, ref_inputs),
                                            anchored=(tokens < d) | anchor_all)
            c_in, g_in, q_in, loss_in, fb_in = self._quantize(target, H_in, [n + ".wi" for n in names], prec)
            del H_in, target
            w_out = self._expert_weights(mlp, "wo", experts, tensors)  # [G, d, d_ff]
            H_out, target = None, w_out
            if gptq:
                hidden = lambda j, r: self._act(inputs(j, r) @ q_in[j].T)  # noqa: E731
                H_out = self._moment(local, keep, G, d_ff, hidden)
                if compensate != "none":  # target: the original expert's hidden activations
                    ref_hidden = lambda j, r: self._act(ref_inputs(j, r) @ w_in[j].T)  # noqa: E731
                    target = compensated_target(w_out, H_out, self._moment(local, keep, G, d_ff, hidden, ref_hidden),
                                                anchored=(tokens < d_ff) | anchor_all)
            c_out, g_out, q_out, loss_out, fb_out = self._quantize(target, H_out, [n + ".wo" for n in names], prec)
            del H_out, target
            outs = {}
            for st in self.streams:
                if st is calib:
                    s_idx, s_x, s_prob, s_local = idx, x, prob, local
                else:
                    s_idx, s_x, _, s_prob, s_local = self._gather_group(st, routes, order, experts)
                wi, wo = (q_in, q_out) if st.quantized else (w_in, w_out)
                resid = outputs[st.name].gather(s_idx)
                y = torch.empty_like(resid)
                for j in range(G):
                    lo, hi = int(s_local[j]), int(s_local[j + 1])
                    if hi > lo:
                        xe = s_x[lo:hi].to(self.device)
                        ye = self._act(xe @ wi[j].T) @ wo[j].T
                        y[lo:hi] = (ye * s_prob[lo:hi, None].to(self.device)).cpu()
                outs[st.name] = resid + y
        for m, c, g, l in (("wi", c_in, g_in, loss_in), ("wo", c_out, g_out, loss_out)):
            p, q = (g.lo, g.hi) if g.kind == "ternary" else (g.scale, g.zero)
            result[m] = {"codes": c.cpu(), "p": p.cpu(), "q": q.cpu(), "loss": l.cpu()}
        result["fallback"] = (fb_in | fb_out).cpu()
        result["out"] = outs
        return result

    def _share_group_result(self, res, experts, order, owner: int, prec: LayerPrecision):
        """Makes the owner rank's group result known to every rank (identity for one process)."""
        if self.dist.world == 1:
            return res
        G, d, f = len(experts), self.config.d_model, self.config.d_ff
        code_dtype = torch.int8 if prec.bits == "ternary" else torch.uint8
        # Grid parameters are [G, rows] or [G, rows, groups] as make_grid decides; the owner says which.
        grid_shapes = torch.zeros(2, 4, dtype=torch.int64)  # per matrix: ndim, then the shape
        if res is not None:
            for i, m in enumerate(("wi", "wo")):
                shape = res[m]["p"].shape
                grid_shapes[i, 0] = len(shape)
                grid_shapes[i, 1:1 + len(shape)] = torch.tensor(shape)
        grid_shapes = self.dist.broadcast([grid_shapes], owner)[0]
        if res is None:
            code_shapes = {"wi": (G, f, d), "wo": (G, d, f)}
            res = {}
            for i, m in enumerate(("wi", "wo")):
                grid_shape = tuple(grid_shapes[i, 1:1 + int(grid_shapes[i, 0])].tolist())
                res[m] = {"codes": torch.empty(code_shapes[m], dtype=code_dtype), "p": torch.empty(grid_shape),
                          "q": torch.empty(grid_shape), "loss": torch.empty(G)}
            res["fallback"] = torch.empty(G, dtype=torch.bool)
            res["out"] = {}
            for st in self.streams:
                _, offs = order[st.name]
                n = int(offs[experts[-1] + 1] - offs[experts[0]])
                res["out"][st.name] = torch.empty(n, d, dtype=self.compute_dtype)
        flat = [res[m][k] for m in ("wi", "wo") for k in ("codes", "p", "q", "loss")]
        flat += [res["fallback"].to(torch.uint8)] + [res["out"][st.name] for st in self.streams]
        flat = self.dist.broadcast(flat, owner)
        k = 0
        for m in ("wi", "wo"):
            for key in ("codes", "p", "q", "loss"):
                res[m][key] = flat[k]
                k += 1
        res["fallback"] = flat[k].bool()
        for j, st in enumerate(self.streams):
            res["out"][st.name] = flat[k + 1 + j]
        return res

    def _pack(self, codes: List[torch.Tensor], grids: List, prec: LayerPrecision) -> storage.PackedExperts:
        if prec.bits == "ternary":
            from . import codec

            encoded = []
            for c, (lo, hi) in zip(codes, grids):
                scales = torch.stack([lo, hi], -1).numpy().astype(np.float32)  # [rows, 2]
                encoded.append(codec.encode(c.numpy().astype(np.int8), scales=scales, dictionary=self.dictionary))
            return storage.PackedExperts.from_encoded(encoded, self.dictionary)
        scale = torch.stack([g[0] for g in grids])
        zero = torch.stack([g[1] for g in grids])
        return storage.PackedExperts.from_int_codes(torch.stack(codes), scale, zero, int(prec.bits))

    def _layer_report(self, name, mlp, codes, packed, stats, counts, prec: LayerPrecision) -> None:
        weights = sum(c.numel() for c in codes["wi"]) + sum(c.numel() for c in codes["wo"])
        entry = {"block": name, "mlp": mlp, "bits": prec.bits, "weights": weights,
                 "bytes": sum(p.nbytes for p in packed.values()),
                 "fallback_experts": sorted(set(stats["fallback"])), "experts_without_tokens": stats["no_tokens"],
                 "tokens_per_expert": {"min": int(counts.min()), "max": int(counts.max()),
                                       "mean": float(counts.float().mean())},
                 "gptq_loss_wi": float(np.mean(stats["loss_wi"])), "gptq_loss_wo": float(np.mean(stats["loss_wo"]))}
        if "drift" in stats:
            entry["drift_in"], entry["drift"] = stats["drift_in"], stats["drift"]
        if prec.bits == "ternary":
            entry["min_zero_fraction"] = prec.min_zero_fraction
            zeros = sum(int((c == 0).sum()) for m in ("wi", "wo") for c in codes[m])
            entry["sparsity"] = zeros / weights
            p0 = entry["sparsity"]
            pos = sum(int((c > 0).sum()) for m in ("wi", "wo") for c in codes[m]) / weights
            neg = 1.0 - p0 - pos
            entry["entropy_bits"] = float(-sum(p * np.log2(p) for p in (p0, pos, neg) if p > 0))
        entry["bits_per_weight"] = 8.0 * entry["bytes"] / weights
        if stats["no_tokens"] and self.dist.rank == 0:
            self.log(f"{mlp}: {len(stats['no_tokens'])} experts received no calibration tokens and were "
                     f"rounded to nearest: {stats['no_tokens'][:16]}")
        self.report_layers.append(entry)

    # -- finish -----------------------------------------------------------------------------
    def _finish(self, seconds: float) -> dict:
        s = self.settings
        losses = self.journal.extra.get("losses") or getattr(self, "_losses", None) or {}
        quant_cfg = {
            "quant_method": "qmoe", "format_version": storage.FORMAT_VERSION,
            "bits": s.bits, "method": s.method,
            "grid": s.ternary_grid if self.dictionary is not None else "asymmetric",
            "min_zero_fraction": s.default_precision().min_zero_fraction,
            "layer_bits": list(s.layer_bits),
            "group_size": s.quant_group_size,
            "codec": None if self.dictionary is None else {"mode": self.dictionary.mode, "version": 1},
            "calibration": {"samples": s.samples, "validation_samples": s.val_samples, "seed": s.seed,
                            "data": s.data or "bundled", "sample_length": s.sample_length,
                            "mask_sentinels": s.mask_sentinels, "damp": s.damp, "expert_group": s.expert_group,
                            "act_order": s.act_order, "compensate": s.compensate if s.method == "gptq" else None},
            "source": self.source,
        }
        expert_weights = sum(layer["weights"] for layer in self.report_layers)
        expert_bytes = sum(layer["bytes"] for layer in self.report_layers)
        settings = {k: v for k, v in dataclasses.asdict(s).items() if k not in s.OUTPUT_NEUTRAL}
        report = {"source": self.source, "out": self.out_dir, "settings": settings,
                  "loss_before": losses.get("validation-original"), "loss_after": losses.get("validation-quantized"),
                  "kl": losses.get("kl"),
                  "expert_weights": expert_weights,
                  "expert_bits_per_param": 8.0 * expert_bytes / expert_weights if expert_weights else None,
                  "seconds": seconds, "timings": self.timings, "peak_rss_bytes": _rss_bytes(),
                  "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                  "layers": self.report_layers}
        if self.dist.rank == 0:
            if self.dictionary is not None:
                storage.write_dictionary(self.out_dir, self.dictionary, builtin=self.settings.codec_mode)
            config = self.config.to_dict()
            config["quantization_config"] = quant_cfg
            storage.atomic_write_json(os.path.join(self.out_dir, "config.json"), config)
            storage.copy_tokenizer(os.path.dirname(self.reader.resolve_file("spiece.model")), self.out_dir)
            storage.atomic_write_json(os.path.join(self.out_dir, storage.REPORT),
                                      {k: v for k, v in report.items() if k not in ("timings", "seconds",
                                                                                    "peak_rss_bytes",
                                                                                    "peak_gpu_bytes", "out")})
            _fault_point("before-manifest", "all")
            stored = [e["block"] for e in self.journal.done if e["file"] is not None]
            manifest = storage.write_manifest(self.out_dir, stored)
            total_bytes = sum(f["bytes"] for rel, f in manifest["files"].items() if rel.startswith("blocks/")
                              or rel == storage.DICTIONARY_FILE)
            from .stats import model_parameters

            report["model_bits_per_param"] = 8.0 * total_bytes / model_parameters(self.config)["total"]
            shutil.rmtree(os.path.join(self.out_dir, WORK_DIR), ignore_errors=True)
        self.dist.barrier()
        return report


def _pad(xs: List[torch.Tensor], device) -> tuple:
    """Per-sample [len_i, d] tensors -> padded [B, L, d] on ``device`` and mask [B, L] (1 = real)."""
    L = max(x.shape[0] for x in xs)
    d = xs[0].shape[1]
    out = torch.zeros(len(xs), L, d, dtype=xs[0].dtype)
    mask = torch.zeros(len(xs), L, dtype=torch.int64)
    for b, x in enumerate(xs):
        out[b, :len(x)] = x
        mask[b, :len(x)] = 1
    return out.to(device), mask.to(device)


def _unpad(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return h[mask.bool()].cpu()


def _progress(iterable, enabled: bool, desc: str, total: int, initial: int, leave: bool = True):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, dynamic_ncols=True)


def compress(source: Optional[str], out_dir: str, settings: Optional[CompressSettings] = None,
             progress: bool = True, log=print, overwrite: bool = False) -> dict:
    """Compresses ``source`` (local folder or Hub id; None = the bundled model) into ``out_dir``.

    Returns a report dict: validation loss before/after, bits per parameter, timings, peak memory.
    """
    return Compressor(source, out_dir, settings or CompressSettings(), progress=progress, log=log,
                      overwrite=overwrite).run()

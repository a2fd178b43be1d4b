"""The compressed checkpoint on disk: layout, atomic writes, checksums, validated reads.

A compressed checkpoint is a folder (or a Hub repository with the same files)::

    config.json              model config (quirks already fixed) + ``quantization_config``
    qmoe_manifest.json       format version, block order, every file's size and sha256
    dictionary.safetensors   codec dictionary shared by all ternary matrices (if any layer is ternary), or
    dictionary.json          a reference to a built-in dictionary by name and sha256 fingerprint
    blocks/<block>.safetensors   one file per block, in execution order
    spiece.model, ...        tokenizer files copied from the source

A block file holds the block's dense (non-expert) tensors in bf16 under their transformers names, and
for every sparse MLP and each of its matrices (``wi``, ``wo``) the experts of that layer packed so that
one kernel launch can address all of them (``codec/FORMAT.md``, "layer layout")::

    <mlp>.experts.<m>.codewords       uint16 [n]          all experts' codewords, expert-major
    <mlp>.experts.<m>.expert_offsets  int64  [E+1]        start of each expert in ``codewords``
    <mlp>.experts.<m>.row_offsets     int32  [E, rows+1]  per-row offsets relative to the expert start
    <mlp>.experts.<m>.row_class       uint8  [E, rows]    dictionary class of each row
    <mlp>.experts.<m>.scales          bf16   [E, rows, 2] (a, b): -1 -> a, 0 -> 0, +1 -> b
    <mlp>.experts.<m>.dictionary_fingerprint  uint8 [32]  sha256 of the dictionary the codes need

Integer (2/3/4-bit) experts store ``qweight`` uint8 [E, rows, ceil(cols * bits / 8)] (little-endian bit
packing along a row), ``scale`` bf16 [E, rows, groups] and ``zero`` uint8 [E, rows, groups];
``w = (code - zero) * scale``. The safetensors header metadata ``qmoe.experts`` (JSON) lists every
packed matrix with its kind, bits, expert count and shape, so a reader never guesses. Sparse layers may
differ in kind and bits (``qmoe compress --layer-bits``; ``quantization_config`` records ``bits``, the
default, and the ``layer_bits`` overrides), but a layer's ``wi`` and ``wo`` always share both.

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a torn file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
from safetensors import safe_open

from .config import SwitchConfig

FORMAT_VERSION = 1
MANIFEST = "qmoe_manifest.json"
DICTIONARY_FILE = "dictionary.safetensors"
DICTIONARY_REF = "dictionary.json"
# Informational sidecars, not part of the checksummed checkpoint: the compression report (its GPTQ
# error diagnostics are float sums whose last bits follow the thread count) and the model card.
REPORT = "qmoe_report.json"
BLOCK_DIR = "blocks"
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
EXPERT_MATRICES = ("wi", "wo")


class StorageError(ValueError):
    """A compressed checkpoint is missing, corrupt or inconsistent."""


# ----------------------------------------------------------------------------------------------
# Atomic file writes
# ----------------------------------------------------------------------------------------------

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Writes ``data`` to ``path`` atomically (temp file, fsync, rename); returns its sha256."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)
    return hashlib.sha256(data).hexdigest()


def atomic_write_json(path: str, obj) -> str:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


def serialize_safetensors(tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """safetensors bytes with a canonical header (sorted keys), so equal inputs give equal bytes.

    The reference serializer orders its JSON header by hash map iteration, which differs between
    processes; resumed runs must reproduce files byte for byte, hence this small writer.
    """
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} cannot be stored in safetensors")
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def atomic_save_safetensors(path: str, tensors: Dict[str, torch.Tensor],
                            metadata: Optional[Dict[str, str]] = None) -> str:
    """Serializes tensors canonically (see :func:`serialize_safetensors`) and writes atomically."""
    return atomic_write_bytes(path, serialize_safetensors(tensors, metadata))


def sha256_file(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(chunk)
            if not buf:
                return h.hexdigest()
            h.update(buf)


# ----------------------------------------------------------------------------------------------
# Packed experts of one MoE matrix
# ----------------------------------------------------------------------------------------------

def _bf16(x) -> torch.Tensor:
    return torch.as_tensor(x).to(torch.bfloat16)


def pack_int_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer codes [..., cols] (0 <= code < 2^bits) into uint8 [..., ceil(cols*bits/8)].

    Code j of a row occupies bits [j*bits, (j+1)*bits) of the row's little-endian bit string.
    """
    if bits not in (2, 3, 4):
        raise ValueError(f"integer packing supports 2, 3 or 4 bits, got {bits}")
    codes = codes.to(torch.int64)
    *lead, cols = codes.shape
    bit_idx = torch.arange(bits, dtype=torch.int64)
    bitstream = ((codes.unsqueeze(-1) >> bit_idx) & 1).reshape(*lead, cols * bits)  # [..., cols*bits]
    nbytes = (cols * bits + 7) // 8
    pad = nbytes * 8 - cols * bits
    if pad:
        bitstream = torch.nn.functional.pad(bitstream, (0, pad))
    weights = (1 << torch.arange(8, dtype=torch.int64))
    return (bitstream.reshape(*lead, nbytes, 8) * weights).sum(-1).to(torch.uint8)


def unpack_int_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int_codes`: uint8 [..., nbytes] -> int64 codes [..., cols]."""
    *lead, nbytes = packed.shape
    bitstream = ((packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1)
    bitstream = bitstream.reshape(*lead, nbytes * 8)[..., : cols * bits].reshape(*lead, cols, bits)
    return (bitstream << torch.arange(bits, device=packed.device)).sum(-1)


@dataclass
class PackedExperts:
    """All experts of one MoE matrix (``wi`` or ``wo``) of one layer, in the stored layout.

    ``kind`` is ``"ternary"`` (codec layer layout; needs ``dictionary``) or ``"int"`` (bit-packed
    asymmetric integer codes). ``tensors`` holds the arrays named in the module docstring.
    """

    kind: str
    bits: int  # 0 for ternary
    num_experts: int
    rows: int
    cols: int
    tensors: Dict[str, torch.Tensor]
    dictionary: object = None  # qmoe.codec.Dictionary for ternary matrices

    TERNARY_KEYS = ("codewords", "expert_offsets", "row_offsets", "row_class", "scales", "dictionary_fingerprint")
    INT_KEYS = ("qweight", "scale", "zero")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_encoded(cls, encoded: List, dictionary) -> "PackedExperts":
        """Packs a list of ``qmoe.codec.EncodedMatrix`` (one per expert, equal shapes)."""
        from . import codec

        if not encoded:
            raise ValueError("cannot pack an empty list of experts")
        layer = codec.pack_layer(encoded)
        rows, cols = encoded[0].rows, encoded[0].cols
        tensors = {
            "codewords": torch.from_numpy(np.ascontiguousarray(layer["codewords"], dtype=np.uint16).copy()),
            "expert_offsets": torch.from_numpy(np.asarray(layer["expert_offsets"], dtype=np.int64).copy()),
            "row_offsets": torch.from_numpy(
                np.asarray(layer["row_offsets"]).astype(np.int64).astype(np.int32)),
            "row_class": torch.from_numpy(np.asarray(layer["row_class"], dtype=np.uint8).copy()),
            "scales": torch.from_numpy(
                np.ascontiguousarray(layer["scales"], dtype=np.uint16).view(np.int16).copy()
            ).view(torch.bfloat16),
            "dictionary_fingerprint": torch.from_numpy(
                np.asarray(layer["dictionary_fingerprint"], dtype=np.uint8).copy()),
        }
        return cls("ternary", 0, len(encoded), rows, cols, tensors, dictionary)

    @classmethod
    def from_int_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                       bits: int) -> "PackedExperts":
        """codes uint8 [E, rows, cols]; scale, zero [E, rows] or [E, rows, groups]."""
        num_experts, rows, cols = codes.shape
        if scale.dim() == 2:
            scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
        tensors = {
            "qweight": pack_int_codes(codes, bits),
            "scale": _bf16(scale).contiguous(),
            "zero": torch.as_tensor(zero).round().to(torch.uint8).contiguous(),
        }
        return cls("int", bits, num_experts, rows, cols, tensors)

    # -- serialization -----------------------------------------------------------------------
    def describe(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "num_experts": self.num_experts,
                "rows": self.rows, "cols": self.cols}

    def to_tensors(self, prefix: str) -> Dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": v for k, v in self.tensors.items()}

    @classmethod
    def from_tensors(cls, prefix: str, desc: dict, tensors: Dict[str, torch.Tensor], dictionary,
                     where: str = "") -> "PackedExperts":
        kind = desc.get("kind")
        keys = cls.TERNARY_KEYS if kind == "ternary" else cls.INT_KEYS if kind == "int" else None
        if keys is None:
            raise StorageError(f"{where}: unknown expert packing kind {kind!r} for {prefix}")
        missing = [k for k in keys if f"{prefix}.{k}" not in tensors]
        if missing:
            raise StorageError(f"{where}: {prefix} lacks tensors {missing}")
        packed = cls(kind, int(desc["bits"]), int(desc["num_experts"]), int(desc["rows"]),
                     int(desc["cols"]), {k: tensors[f"{prefix}.{k}"] for k in keys}, dictionary)
        packed.validate(f"{where}: {prefix}")
        return packed

    def validate(self, where: str) -> None:
        """Checks shapes, dtypes and offsets; the codec validates the streams themselves."""
        E, R, C, t = self.num_experts, self.rows, self.cols, self.tensors

        def expect(name, dtype, shape):
            x = t[name]
            if x.dtype != dtype or tuple(x.shape) != tuple(shape):
                raise StorageError(f"{where}.{name}: expected {dtype} {list(shape)}, "
                                   f"found {x.dtype} {list(x.shape)}")

        if self.kind == "ternary":
            if self.dictionary is None:
                raise StorageError(f"{where}: ternary experts need the checkpoint's dictionary")
            n = t["codewords"].numel()
            expect("codewords", torch.uint16, (n,))
            expect("expert_offsets", torch.int64, (E + 1,))
            expect("row_offsets", torch.int32, (E, R + 1))
            expect("row_class", torch.uint8, (E, R))
            expect("scales", torch.bfloat16, (E, R, 2))
            expect("dictionary_fingerprint", torch.uint8, (32,))
            if bytes(t["dictionary_fingerprint"].tolist()).hex() != self.dictionary.fingerprint:
                raise StorageError(f"{where}: encoded with another dictionary than the checkpoint's "
                                   f"{DICTIONARY_FILE}")
            eo = t["expert_offsets"]
            if eo[0].item() != 0 or eo[-1].item() != n or bool((eo[1:] < eo[:-1]).any()):
                raise StorageError(f"{where}.expert_offsets: must rise from 0 to {n} codewords")
            ro = t["row_offsets"].to(torch.int64)
            lengths = eo[1:] - eo[:-1]
            if bool((ro[:, 0] != 0).any()) or bool((ro[:, -1] != lengths).any()):
                raise StorageError(f"{where}.row_offsets: each expert's offsets must run from 0 to "
                                   "its codeword count")
        else:
            groups = t["scale"].shape[-1] if t["scale"].dim() == 3 else -1
            expect("qweight", torch.uint8, (E, R, (C * self.bits + 7) // 8))
            expect("scale", torch.bfloat16, (E, R, groups))
            expect("zero", torch.uint8, (E, R, groups))
            if groups < 1 or groups > C:
                raise StorageError(f"{where}.scale: {groups} groups for {C} columns")
            if int(t["zero"].max()) >= (1 << self.bits) if t["zero"].numel() else False:
                raise StorageError(f"{where}.zero: zero point outside 0..{(1 << self.bits) - 1}")

    # -- use ---------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors.values())

    def to(self, device) -> "PackedExperts":
        return PackedExperts(self.kind, self.bits, self.num_experts, self.rows, self.cols,
                             {k: v.to(device) for k, v in self.tensors.items()}, self.dictionary)

    def encoded(self, e: int):
        """Expert ``e`` as a ``qmoe.codec.EncodedMatrix`` (ternary only)."""
        from . import codec

        if self.kind != "ternary":
            raise ValueError("only ternary experts have a codec stream")
        layer = {k: v.cpu().numpy() if v.dtype not in (torch.bfloat16, torch.uint16)
                 else v.cpu().view(torch.int16).numpy().view(np.uint16)
                 for k, v in self.tensors.items()}
        layer["row_offsets"] = layer["row_offsets"].astype(np.uint32)
        layer["shape"] = np.array([self.rows, self.cols], dtype=np.int64)
        return codec.unpack_expert(layer, e, dictionary=self.dictionary)

    def dequantize(self, e: int) -> torch.Tensor:
        """Expert ``e``'s weight, float32 [rows, cols], exactly as stored."""
        if self.kind == "ternary":
            from . import codec

            return torch.from_numpy(codec.dequantize(self.encoded(e)))
        t = self.tensors
        codes = unpack_int_codes(t["qweight"][e].cpu(), self.bits, self.cols).float()  # [R, C]
        groups = t["scale"].shape[-1]
        group_size = -(-self.cols // groups)
        col_group = torch.arange(self.cols) // group_size  # [C]
        scale = t["scale"][e].cpu().float()[:, col_group]
        zero = t["zero"][e].cpu().float()[:, col_group]
        return (codes - zero) * scale

    def dequantize_all(self) -> torch.Tensor:
        return torch.stack([self.dequantize(e) for e in range(self.num_experts)])


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint
# ----------------------------------------------------------------------------------------------

def block_file(block_name: str) -> str:
    return f"{BLOCK_DIR}/{block_name}.safetensors"


def write_block(out_dir: str, block_name: str, dense: Dict[str, torch.Tensor],
                experts: Dict[str, Dict[str, PackedExperts]]) -> str:
    """Writes one block file atomically; returns its sha256.

    ``dense`` maps transformers tensor names to tensors (stored bf16); ``experts`` maps an MLP prefix
    (``encoder.block.1.layer.1.mlp``) to ``{"wi": PackedExperts, "wo": PackedExperts}``.
    """
    tensors = {name: _bf16(t) if t.is_floating_point() else t for name, t in dense.items()}
    desc = {}
    for mlp, mats in experts.items():
        for m, packed in mats.items():
            prefix = f"{mlp}.experts.{m}"
            desc[prefix] = packed.describe()
            tensors.update(packed.to_tensors(prefix))
    meta = {"qmoe.format_version": str(FORMAT_VERSION), "qmoe.block": block_name,
            "qmoe.experts": json.dumps(desc, sort_keys=True)}
    return atomic_save_safetensors(os.path.join(out_dir, block_file(block_name)), tensors, meta)


BUILTIN_DICTIONARIES = {"tunstall": "default_dictionary", "qmoe": "qmoe_dictionary"}


def builtin_dictionary(name: str):
    from . import codec

    if name not in BUILTIN_DICTIONARIES:
        raise StorageError(f"unknown built-in dictionary {name!r}; known: {sorted(BUILTIN_DICTIONARIES)}")
    return getattr(codec, BUILTIN_DICTIONARIES[name])()


def write_dictionary(out_dir: str, dictionary, builtin: Optional[str] = None) -> str:
    """Stores the codec dictionary. A built-in dictionary (rebuilt deterministically by qmoe itself,
    like QMoE's static table) is stored as a reference with its fingerprint, so it costs no bits; any
    other (fitted) dictionary is stored whole."""
    if builtin is not None:
        if builtin_dictionary(builtin).fingerprint != dictionary.fingerprint:
            raise ValueError(f"dictionary is not the built-in {builtin!r} dictionary")
        return atomic_write_json(os.path.join(out_dir, DICTIONARY_REF),
                                 {"builtin": builtin, "fingerprint": dictionary.fingerprint})
    arrays, metadata = dictionary.to_tensors()  # numpy arrays + {"qmoe_codec": JSON string}
    meta = {"qmoe.format_version": str(FORMAT_VERSION), **metadata}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    return atomic_save_safetensors(os.path.join(out_dir, DICTIONARY_FILE), tensors, meta)


def copy_tokenizer(src_dir: str, out_dir: str) -> List[str]:
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            with open(src, "rb") as f:
                atomic_write_bytes(os.path.join(out_dir, name), f.read())
            copied.append(name)
    return copied


def write_manifest(out_dir: str, block_names: Iterable[str], extra: Optional[dict] = None) -> dict:
    """Hashes every file of the checkpoint (not the report and model card) and writes
    ``qmoe_manifest.json`` last."""
    files = {}
    for root, _, names in os.walk(out_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, out_dir)
            if rel in (MANIFEST, REPORT, "README.md") or rel.startswith(".") or ".tmp." in name:
                continue
            files[rel] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
    manifest = {"format": "qmoe", "format_version": FORMAT_VERSION, "blocks": list(block_names),
                "files": dict(sorted(files.items()))}
    if extra:
        manifest.update(extra)
    atomic_write_json(os.path.join(out_dir, MANIFEST), manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint
# ----------------------------------------------------------------------------------------------

@dataclass
class BlockWeights:
    name: str
    dense: Dict[str, torch.Tensor]
    experts: Dict[str, Dict[str, PackedExperts]] = field(default_factory=dict)


class CompressedCheckpoint:
    """A validated compressed checkpoint (local folder, or Hub id fetched file by file)."""

    def __init__(self, source: str, revision: Optional[str] = None, verify: bool = True):
        self.source = source
        self._revision = revision
        self._local = os.path.isdir(source)
        self.verify = verify
        manifest_path = self._fetch(MANIFEST)
        try:
            with open(manifest_path) as f:
                self.manifest = json.load(f)
        except json.JSONDecodeError as err:
            raise StorageError(f"{manifest_path}: not valid JSON ({err})") from None
        if self.manifest.get("format") != "qmoe":
            raise StorageError(f"{manifest_path}: not a qmoe checkpoint manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StorageError(f"{manifest_path}: format version {self.manifest.get('format_version')} "
                               f"is not supported (this qmoe reads version {FORMAT_VERSION})")
        with open(self._fetch_checked("config.json")) as f:
            config_dict = json.load(f)
        self.quantization_config = config_dict.get("quantization_config")
        if not self.quantization_config or self.quantization_config.get("quant_method") != "qmoe":
            raise StorageError(f"{source}/config.json: no qmoe quantization_config")
        self.config = SwitchConfig.from_dict(config_dict)
        self._dictionary = None

    # -- files -------------------------------------------------------------------------------
    def _fetch(self, rel: str) -> str:
        if self._local:
            path = os.path.join(self.source, rel)
            if not os.path.exists(path):
                raise StorageError(f"{path}: missing from the compressed checkpoint")
            return path
        from huggingface_hub import hf_hub_download

        return hf_hub_download(self.source, rel, revision=self._revision)

    def _fetch_checked(self, rel: str) -> str:
        entry = self.manifest["files"].get(rel)
        if entry is None:
            raise StorageError(f"{self.source}: manifest does not list {rel}")
        path = self._fetch(rel)
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise StorageError(f"{path}: {size} bytes, manifest says {entry['bytes']} (truncated or replaced)")
        if self.verify and sha256_file(path) != entry["sha256"]:
            raise StorageError(f"{path}: sha256 mismatch with the manifest (corrupt file)")
        return path

    def file_path(self, rel: str) -> str:
        return self._fetch_checked(rel)

    @property
    def tokenizer_path(self) -> Optional[str]:
        if "spiece.model" not in self.manifest["files"]:
            return None
        return os.path.dirname(self._fetch_checked("spiece.model"))

    @property
    def dictionary(self):
        if self._dictionary is None and DICTIONARY_REF in self.manifest["files"]:
            with open(self._fetch_checked(DICTIONARY_REF)) as f:
                ref = json.load(f)
            dictionary = builtin_dictionary(ref.get("builtin"))
            if dictionary.fingerprint != ref.get("fingerprint"):
                raise StorageError(f"{self.source}/{DICTIONARY_REF}: built-in dictionary {ref.get('builtin')!r} "
                                   f"of this qmoe has fingerprint {dictionary.fingerprint[:16]}..., the checkpoint "
                                   f"needs {str(ref.get('fingerprint'))[:16]}...")
            self._dictionary = dictionary
        if self._dictionary is None and DICTIONARY_FILE in self.manifest["files"]:
            from . import codec

            path = self._fetch_checked(DICTIONARY_FILE)
            with safe_open(path, "np") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            self._dictionary = codec.Dictionary.from_tensors(tensors, meta)
        return self._dictionary

    # -- blocks ------------------------------------------------------------------------------
    def block_names(self) -> List[str]:
        return list(self.manifest["blocks"])

    def block_bytes(self, name: str) -> int:
        return self.manifest["files"][block_file(name)]["bytes"]

    def read_block(self, name: str, device="cpu") -> BlockWeights:
        if name not in self.manifest["blocks"]:
            raise StorageError(f"{self.source}: no block {name!r}")
        path = self._fetch_checked(block_file(name))
        try:
            with safe_open(path, "pt", device="cpu") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise StorageError(f"{path}: unreadable safetensors file ({err})") from None
        if meta.get("qmoe.block") != name:
            raise StorageError(f"{path}: holds block {meta.get('qmoe.block')!r}, expected {name!r}")
        desc = json.loads(meta.get("qmoe.experts", "{}"))
        experts: Dict[str, Dict[str, PackedExperts]] = {}
        used = set()
        for prefix, d in desc.items():
            dictionary = self.dictionary if d.get("kind") == "ternary" else None
            packed = PackedExperts.from_tensors(prefix, d, tensors, dictionary, where=path)
            mlp, m = prefix.rsplit(".experts.", 1)
            experts.setdefault(mlp, {})[m] = packed.to(device)
            used.update(f"{prefix}.{k}" for k in packed.tensors)
        dense = {k: v.to(device) for k, v in tensors.items() if k not in used}
        return BlockWeights(name, dense, experts)


def open_compressed(source: str, revision: Optional[str] = None, verify: bool = True) -> CompressedCheckpoint:
    """Opens a compressed checkpoint folder or Hub repository; validates manifest and config."""
    return CompressedCheckpoint(source, revision=revision, verify=verify)


def is_compressed_checkpoint(source: str) -> bool:
    return os.path.isdir(source) and os.path.exists(os.path.join(source, MANIFEST))


def remove_checkpoint_files(out_dir: str) -> None:
    """Deletes what a compressed checkpoint consists of (never other files in ``out_dir``)."""
    for name in (MANIFEST, "config.json", DICTIONARY_FILE, DICTIONARY_REF, "qmoe_report.json", "README.md",
                 *TOKENIZER_FILES):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)
    shutil.rmtree(os.path.join(out_dir, BLOCK_DIR), ignore_errors=True)

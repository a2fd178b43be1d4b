"""Streaming reader for Hugging Face Switch Transformer checkpoints, one block at a time.

A checkpoint is a folder (local, or a Hub repository) with ``config.json`` and one of

* ``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors`` shards,
* ``model.safetensors``,
* ``pytorch_model.bin.index.json`` + ``pytorch_model-0000k-of-0000n.bin`` shards (c2048: 364 of them),
* ``pytorch_model.bin``.

:class:`CheckpointReader` maps every stored tensor to its block (ARCHITECTURE.md) and reads one block
at a time. Memory stays near one block because nothing is cached between blocks:

* ``.safetensors`` shards are opened with ``safe_open`` and ``.bin`` shards with
  ``torch.load(mmap=True, weights_only=True)`` afresh for every block. Both return tensors that are
  views of a private (copy-on-write) file mapping, so only the pages of the tensors actually touched
  become resident, and the mapping is released when the caller drops the block's tensors.
* Reading with a ``dtype`` or ``device`` different from the stored one copies, so that block's peak
  is its mapped pages plus the copy.

Hub ids are served through ``huggingface_hub.hf_hub_download``, one file at a time on first need
(config, index, then each shard when a block asks for it), honouring ``HF_HUB_OFFLINE`` and the
local cache. ``on_shard_done(path)`` is called once every block stored in a shard has been read, so
the compression pipeline can delete downloaded shards to bound disk use.

Storage quirks are normalized to transformers' state-dict names: ``decoder.lm_head.weight`` (c2048)
becomes ``lm_head.weight``; the ``encoder/decoder.embed_tokens.weight`` aliases of ``shared.weight``
are dropped; tied models read ``shared.weight`` again as ``lm_head.weight``.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections import defaultdict
from typing import Callable, Iterator

import torch

from .config import ConfigError, SwitchConfig, block_of_tensor

__all__ = ["CheckpointReader", "CheckpointError", "LAYOUTS"]

# Probed in this order: safetensors is preferred when a repository has both.
LAYOUTS = (
    ("model.safetensors.index.json", "safetensors", True),
    ("model.safetensors", "safetensors", False),
    ("pytorch_model.bin.index.json", "bin", True),
    ("pytorch_model.bin", "bin", False),
)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as the config describes; the message names file and tensor."""


class CheckpointReader:
    """Block-by-block reader of a Switch Transformer checkpoint.

    Args:
        source: local folder or Hub repository id (``google/switch-c-2048``).
        revision, cache_dir: passed to ``hf_hub_download`` for Hub ids.
        on_shard_done: called with the local path of a shard once every block stored in it has
            been read (for Hub files this is the cache snapshot path, a symlink into ``blobs/``).

    Attributes:
        config: :class:`SwitchConfig`, corrected from the stored tensor names (c2048 quirks).
        layout: ``"safetensors"`` or ``"bin"``; ``sharded``: whether an index file was used.
        index_file: the index (or single weights) file name inside the checkpoint.
    """

    def __init__(self, source: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
                 on_shard_done: Callable[[str], None] | None = None):
        self.source = os.fspath(source)
        self.revision = revision
        self.cache_dir = cache_dir
        self.on_shard_done = on_shard_done
        self.is_local = os.path.isdir(self.source)
        if not self.is_local and not _HUB_ID_RE.match(self.source):
            raise CheckpointError(f"{self.source}: not a local folder and not a Hub repository id (owner/name)")

        config_path = self.resolve_file("config.json")
        try:
            with open(config_path, "r", encoding="utf-8") as f:
                config_dict = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None

        self.index_file, self.layout, self.sharded, index_path = self._find_layout()
        stored = self._read_weight_map(index_path)  # stored name -> file name
        try:
            self.config = SwitchConfig.from_checkpoint_index(config_dict, stored.keys(), source=config_path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self._sources = self._map_blocks(stored)  # block -> {hf name: (file, stored name)}
        self._pending: dict[str, set[str]] = defaultdict(set)  # file -> blocks not yet read
        for block, tensors in self._sources.items():
            for file, _ in tensors.values():
                self._pending[file].add(block)

    # ------------------------------------------------------------------ files

    def resolve_file(self, filename: str, missing_ok: bool = False) -> str | None:
        """Local path of ``filename`` inside the checkpoint, downloading it from the Hub if needed.

        A file the checkpoint does not have raises :class:`CheckpointError`, or returns None with
        ``missing_ok``; download failures (network, authentication) always raise.
        """
        if os.path.isabs(filename) or ".." in filename.replace("\\", "/").split("/"):
            raise CheckpointError(f"{self.source}: refusing file name {filename!r} outside the checkpoint")
        if self.is_local:
            path = os.path.join(self.source, filename)
            if os.path.isfile(path):
                return path
            if missing_ok:
                return None
            raise CheckpointError(f"{path}: file missing from the checkpoint")
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES",
                                                                                                "TRUE")
        try:
            return hf_hub_download(self.source, filename, revision=self.revision, cache_dir=self.cache_dir,
                                   local_files_only=offline)
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:
            if missing_ok:
                return None
            where = "in the local cache (offline mode)" if offline else "on the Hub"
            raise CheckpointError(f"{self.source}/{filename}: not found {where}: {e}") from None
        except Exception as e:  # network, authentication, missing repository
            raise CheckpointError(f"{self.source}/{filename}: download failed: {e}") from None

    def _find_layout(self):
        for filename, layout, sharded in LAYOUTS:
            path = self.resolve_file(filename, missing_ok=True)
            if path is not None:
                return filename, layout, sharded, path
        names = ", ".join(f for f, _, _ in LAYOUTS)
        raise CheckpointError(f"{self.source}: no weights found (looked for {names})")

    def _read_weight_map(self, path: str) -> dict[str, str]:
        if not self.sharded:
            return {name: self.index_file for name in self._list_single_file(path)}
        try:
            with open(path, "r", encoding="utf-8") as f:
                index = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{path}: expected an object with a 'weight_map' of tensor name -> shard file")
        suffix = ".safetensors" if self.layout == "safetensors" else ".bin"
        for name, file in weight_map.items():
            if not file.endswith(suffix):
                raise CheckpointError(f"{path}: tensor {name} maps to {file!r}, not a {suffix} shard")
        return dict(weight_map)

    def _list_single_file(self, path: str) -> list[str]:
        if self.layout == "safetensors":
            from safetensors import safe_open

            try:
                with safe_open(path, framework="pt") as f:
                    return list(f.keys())
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None
        return list(self._load_bin(path).keys())

    # ------------------------------------------------------------------ name mapping

    def _map_blocks(self, stored: dict[str, str]) -> dict[str, dict[str, tuple[str, str]]]:
        cfg = self.config
        normalized: dict[str, tuple[str, str]] = {}
        for name, file in stored.items():
            if name in _EMBED_ALIASES:
                continue
            hf_name = "lm_head.weight" if name == "decoder.lm_head.weight" else name
            normalized[hf_name] = (file, name)
        if "shared.weight" not in normalized:
            for alias in _EMBED_ALIASES:
                if alias in stored:
                    normalized["shared.weight"] = (stored[alias], alias)
                    break
        if cfg.tie_word_embeddings and "shared.weight" in normalized:
            normalized["lm_head.weight"] = normalized["shared.weight"]

        sources: dict[str, dict[str, tuple[str, str]]] = {}
        for block in cfg.block_names():
            sources[block] = {}
            for name in cfg.block_tensor_shapes(block):
                if name not in normalized:
                    raise CheckpointError(f"{self.source}/{self.index_file}: no tensor {name} (block {block}); "
                                          f"the checkpoint does not match its config.json")
                sources[block][name] = normalized.pop(name)
        if normalized:
            extra = sorted(normalized)
            raise CheckpointError(
                f"{self.source}/{self.index_file}: tensors not in the model described by config.json: "
                f"{extra[:5]}{' ...' if len(extra) > 5 else ''} (e.g. {normalized[extra[0]][0]}: {extra[0]}, "
                f"block {block_of_tensor(extra[0])}); num_experts={cfg.num_experts}, "
                f"num_layers={cfg.num_layers}, num_decoder_layers={cfg.num_decoder_layers}"
            )
        return sources

    # ------------------------------------------------------------------ public queries

    def block_names(self) -> list[str]:
        """Blocks in execution order (see :meth:`SwitchConfig.block_names`)."""
        return self.config.block_names()

    def tensor_names(self, block: str) -> list[str]:
        """Normalized (transformers) names of the tensors that make up ``block``."""
        return list(self._block(block))

    def files_for_block(self, block: str) -> list[str]:
        """Checkpoint files (names relative to the checkpoint) holding ``block``'s tensors."""
        return sorted({file for file, _ in self._block(block).values()})

    def shard_consumers(self) -> dict[str, set[str]]:
        """File -> blocks stored in it that have not been read yet."""
        return {file: set(blocks) for file, blocks in self._pending.items() if blocks}

    def block_bytes(self, block: str) -> int:
        """Bytes of ``block``'s tensors in the storage dtype."""
        item = torch.empty((), dtype=self.config.dtype).element_size()
        return sum(_numel(s) * item for s in self.config.block_tensor_shapes(block).values())

    @property
    def total_bytes(self) -> int:
        """Bytes of all stored model tensors (a tied lm_head counts once, as ``shared``)."""
        blocks = [b for b in self.block_names() if not (b == "lm_head" and self.config.tie_word_embeddings)]
        return sum(self.block_bytes(b) for b in blocks)

    def _block(self, block: str) -> dict[str, tuple[str, str]]:
        try:
            return self._sources[block]
        except KeyError:
            raise CheckpointError(f"{self.source}: unknown block {block!r}; blocks are "
                                  f"{self.block_names()[:3]} ... {self.block_names()[-2:]}") from None

    # ------------------------------------------------------------------ reading

    def read_block(self, block: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Exactly ``block``'s tensors, keyed by transformers names.

        With the default ``device="cpu", dtype=None`` the tensors are zero-copy views of the
        checkpoint files (private copy-on-write mappings: writing changes only this process's copy).
        Any one surviving tensor keeps its shard's mapping, and every page of it touched so far,
        resident: drop all of a block's tensors to release it. Shape and dtype are checked against
        the config; errors name the file and the tensor.
        """
        sources = self._block(block)
        shapes = self.config.block_tensor_shapes(block)
        by_file: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for name, (file, stored_name) in sources.items():
            by_file[file].append((name, stored_name))
        out: dict[str, torch.Tensor] = {}
        for file, names in by_file.items():
            path = self.resolve_file(file)
            for name, tensor in self._read_from_file(path, names):
                self._check(path, name, tensor, shapes[name])
                if dtype is not None or torch.device(device) != torch.device("cpu"):
                    tensor = tensor.to(device=device, dtype=dtype)
                out[name] = tensor
        for file in by_file:
            pending = self._pending[file]
            pending.discard(block)
            if not pending and self.on_shard_done is not None:
                self.on_shard_done(self.resolve_file(file))
        return {name: out[name] for name in shapes}

    def mark_consumed(self, block: str) -> None:
        """Records ``block`` as read without reading it (a resumed run skips finished blocks), so
        ``on_shard_done`` fires for shards once their remaining blocks are read."""
        for file in self.files_for_block(block):
            pending = self._pending[file]
            pending.discard(block)
            if not pending and self.on_shard_done is not None and (self.is_local or self._cached(file)):
                self.on_shard_done(self.resolve_file(file))

    def _cached(self, file: str) -> bool:
        """Whether a Hub file is already in the local cache (so reporting it done downloads nothing)."""
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(self.source, file, cache_dir=self.cache_dir,
                                                 revision=self.revision), str)

    def iter_blocks(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
                    ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Yields ``(block_name, tensors)`` for every block in execution order. Drop each block's
        tensors before asking for the next to keep memory at one block."""
        for block in self.block_names():
            yield block, self.read_block(block, device=device, dtype=dtype)

    def _read_from_file(self, path: str, names: list[tuple[str, str]]):
        if self.layout == "safetensors":
            from safetensors import safe_open

            try:
                handle = safe_open(path, framework="pt")
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None
            with handle as f:
                present = set(f.keys())
                for name, stored_name in names:
                    if stored_name not in present:
                        raise CheckpointError(f"{path}: tensor {stored_name} is named by the index but absent "
                                              f"from the file")
                    try:
                        tensor = f.get_tensor(stored_name)
                    except Exception as e:
                        raise CheckpointError(f"{path}: tensor {stored_name} unreadable: {e}") from None
                    yield name, tensor
        else:
            state = self._load_bin(path)
            for name, stored_name in names:
                if stored_name not in state:
                    raise CheckpointError(f"{path}: tensor {stored_name} is named by the index but absent from "
                                          f"the file")
                yield name, state[stored_name]

    @staticmethod
    def _load_bin(path: str) -> dict[str, torch.Tensor]:
        """torch.load by memory map, accepting only a flat dict of tensors."""
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: refusing to load: the pickle holds objects other than plain tensors "
                                  f"({str(e).splitlines()[0]})") from None
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable PyTorch file (truncated or corrupt?): {e}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: refusing to load: expected a dict of tensors, got {type(state).__name__}")
        for key, value in state.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: refusing to load: entry {key!r} is a {type(value).__name__}, "
                                      f"not a tensor")
        return state

    def _check(self, path: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                                  f"{tuple(shape)}")
        if tensor.dtype != self.config.dtype:
            raise CheckpointError(f"{path}: tensor {name} has dtype {tensor.dtype}, the checkpoint's dtype is "
                                  f"{self.config.dtype} (torch_dtype={self.config.torch_dtype})")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

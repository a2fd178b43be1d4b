"""Tokenizer loading, T5 span corruption, and calibration/validation sample sources.

The calibration recipe follows QMoE (REFERENCE.md section 3): documents are tokenized, concatenated
and cut into windows of ``length`` = 568 tokens (T5's packing), and each window is span-corrupted
with 15% noise in spans of mean length 3. The encoder input keeps the unmasked tokens with one
sentinel per masked span and ends with EOS (568 - 85 + 28 + 1 = 512 tokens); the target lists each
sentinel followed by the tokens it hides, then EOS (85 + 28 + 1 = 114 tokens).

Sources (``make_samples(source=...)``):

* ``None``: the text bundled in ``qmoe/assets/text/`` (Python documentation and license texts; see
  the README there). The bundled reference model was trained on its calibration split.
* ``"c4"``: the paper's C4 shards through the ``datasets`` library: calibration from
  ``en/c4-train.00000-of-01024`` and ``00001``, validation from ``en/c4-validation.00000-of-00008``.
* a path: a ``.txt`` file (documents separated by blank lines), a ``.jsonl`` / ``.jsonl.gz`` /
  ``.json.gz`` file with one JSON object with a ``"text"`` field per line (the C4 shard layout),
  or a folder searched recursively for such files.

Calibration and validation never share a document: C4 uses its own train/validation shards, every
other source assigns each document to a split by a hash of its text (identical documents therefore
land in the same split).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "Tokenizer",
    "Sample",
    "load_tokenizer",
    "load_documents",
    "make_samples",
    "span_corrupt",
    "collate",
    "bundled_model_path",
    "bundled_text_path",
    "VALIDATION_FRACTION",
]

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = "switch-mini-8"
BUNDLED_TEXT = "text/python-docs.jsonl.gz"

#: Share of documents (by text hash) that a file or folder source assigns to the validation split.
VALIDATION_FRACTION = 0.1

SPLITS = ("calibration", "validation")
C4_REPO = "allenai/c4"
C4_FILES = {
    "calibration": ["en/c4-train.00000-of-01024.json.gz", "en/c4-train.00001-of-01024.json.gz"],
    "validation": ["en/c4-validation.00000-of-00008.json.gz"],
}
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".json.gz")

_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")


def bundled_model_path() -> Path:
    """Folder of the reference Switch model shipped inside the package (HF layout + spiece.model)."""
    path = ASSETS / BUNDLED_MODEL
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the bundled reference model is missing from this installation "
                                f"(expected config.json, model.safetensors, spiece.model there)")
    return path


def bundled_text_path() -> Path:
    """The bundled text (gzip JSON lines, one ``{"text", "source"}`` document per line)."""
    path = ASSETS / BUNDLED_TEXT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundled calibration text is missing from this installation")
    return path


# ---------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A T5-style SentencePiece tokenizer: pad 0, EOS 1, UNK 2, then the SentencePiece pieces, then
    ``extra_ids`` sentinels at the top of the id range.

    As in T5, ``<extra_id_0>`` is the highest id (``vocab_size - 1``) and ``<extra_id_{k-1}>`` the
    lowest sentinel (``first_sentinel_id``); the sentinels are not SentencePiece pieces. A model's
    embedding table may be larger than ``vocab_size`` (T5 pads 32100 to 32128); those rows are never
    produced by the tokenizer.
    """

    def __init__(self, model_file: str | os.PathLike, extra_ids: int = 100):
        import sentencepiece

        model_file = os.fspath(model_file)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a readable SentencePiece model ({e})") from None
        if not isinstance(extra_ids, int) or extra_ids < 0:
            raise ValueError(f"{model_file}: extra_ids must be a non-negative integer, got {extra_ids!r}")
        self.model_file = model_file
        self.extra_ids = extra_ids
        self.piece_count = self.sp.GetPieceSize()
        self.vocab_size = self.piece_count + extra_ids
        self.first_sentinel_id = self.piece_count
        self.pad_id = self.sp.pad_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        if self.pad_id < 0 or self.eos_id < 0:
            raise ValueError(f"{model_file}: the SentencePiece model defines no pad or EOS piece "
                             f"(pad_id={self.pad_id}, eos_id={self.eos_id}); T5 tokenizers need both")

    def sentinel_id(self, i: int) -> int:
        """Id of ``<extra_id_i>`` (T5 layout: ``vocab_size - 1 - i``)."""
        if not 0 <= i < self.extra_ids:
            raise ValueError(f"sentinel index {i} out of range: {self.model_file} has {self.extra_ids} sentinels")
        return self.vocab_size - 1 - i

    def is_sentinel(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor, same shape as the integer tensor ``ids``: which ids are ``<extra_id_N>``."""
        return (ids >= self.first_sentinel_id) & (ids < self.vocab_size)

    def encode(self, text: str, parse_sentinels: bool = True) -> list[int]:
        """Token ids of ``text`` without EOS. Literal ``<extra_id_N>`` markers become sentinel ids
        (as in transformers' T5Tokenizer) unless ``parse_sentinels`` is False, which is how corpus
        text is encoded so that a document quoting a marker cannot inject a sentinel."""
        if not parse_sentinels:
            return self.sp.EncodeAsIds(text)
        ids: list[int] = []
        pos = 0
        for m in _SENTINEL_RE.finditer(text):
            if m.start() > pos:
                ids += self.sp.EncodeAsIds(text[pos:m.start()])
            ids.append(self.sentinel_id(int(m.group(1))))
            pos = m.end()
        if pos < len(text):
            ids += self.sp.EncodeAsIds(text[pos:])
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``; sentinels print as ``<extra_id_N>``, pad and EOS are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        pieces: list[str] = []
        run: list[int] = []
        for t in ids:
            t = int(t)
            if not 0 <= t < self.vocab_size:
                raise ValueError(f"token id {t} out of range [0, {self.vocab_size}) for {self.model_file}")
            if t >= self.first_sentinel_id:
                self._flush(run, pieces)
                run = []
                pieces.append(f"<extra_id_{self.vocab_size - 1 - t}>")
            elif t not in (self.pad_id, self.eos_id):
                run.append(t)
        self._flush(run, pieces)
        return "".join(pieces)

    def _flush(self, run: list[int], pieces: list[str]) -> None:
        if not run:
            return
        text = self.sp.DecodeIds(run)
        # SentencePiece drops the word-boundary space at the start of a decoded run; keep it when
        # the run follows a sentinel, so "a <extra_id_0> b" does not print as "a<extra_id_0>b".
        if pieces and self.sp.IdToPiece(run[0]).startswith("\u2581"):
            text = " " + text
        pieces.append(text)

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_file!r}, vocab_size={self.vocab_size}, extra_ids={self.extra_ids})"


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Loads a T5-style tokenizer from a model folder with ``spiece.model`` (or the file itself).

    ``path`` None loads the bundled reference model's tokenizer. The sentinel count comes from the
    folder's ``tokenizer_config.json`` (``extra_ids``) when present, else 100 as in T5.
    """
    path = bundled_model_path() if path is None else Path(path)
    model_file = path / "spiece.model" if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: no SentencePiece model (spiece.model) found")
    extra_ids = 100
    config_file = model_file.parent / "tokenizer_config.json"
    if config_file.is_file():
        try:
            extra_ids = json.loads(config_file.read_text(encoding="utf-8")).get("extra_ids", 100)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file}: not valid JSON ({e})") from None
    return Tokenizer(model_file, extra_ids=extra_ids)


# ---------------------------------------------------------------------------------------- documents


def _split_of(text: str) -> str:
    # blake2b is stable across processes and platforms (unlike hash()); the first 8 bytes are a
    # uniform 64-bit integer, so the validation share converges to VALIDATION_FRACTION.
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return "validation" if h < VALIDATION_FRACTION * 2.0 ** 64 else "calibration"


def _read_jsonl(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
                yield record["text"]
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path}: corrupt gzip file ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def _read_txt(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    for doc in re.split(r"\n\s*\n", text):
        doc = doc.strip()
        if doc:
            yield doc


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise ValueError(f"{path}: folder holds no {', '.join(TEXT_SUFFIXES)} files")
        return files
    if not path.exists():
        raise FileNotFoundError(f"{path}: calibration text source not found")
    if not path.name.endswith(TEXT_SUFFIXES):
        raise ValueError(f"{path}: unsupported text file; expected one of {', '.join(TEXT_SUFFIXES)}")
    return [path]


def load_documents(source: str | os.PathLike | None = None, split: str = "calibration") -> list[str]:
    """All documents of ``split`` in a file or folder source (None = bundled text), in file order.

    Documents are assigned to a split by a hash of their text (see :data:`VALIDATION_FRACTION`).
    Not for ``"c4"``, which is streamed by :func:`make_samples`.
    """
    _check_split(split)
    if source == "c4":
        raise ValueError("load_documents reads files; C4 is streamed by make_samples(source='c4')")
    path = bundled_text_path() if source is None else Path(source)
    docs = []
    for f in _files_of(path):
        reader = _read_txt if f.name.endswith(".txt") else _read_jsonl
        docs += [d for d in reader(f) if d.strip() and _split_of(d) == split]
    return docs


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _c4_documents(split: str, seed: int) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ImportError("source='c4' needs the `datasets` package (pip install datasets) and access to "
                          "the Hugging Face Hub; or pass local C4 .json.gz shards as a path") from None
    ds = datasets.load_dataset(C4_REPO, data_files={split: C4_FILES[split]}, split=split, streaming=True)
    for record in ds.shuffle(seed=seed, buffer_size=10_000):
        yield record["text"]


def _file_documents(source: str | os.PathLike | None, split: str, rng: np.random.Generator) -> Iterator[str]:
    docs = load_documents(source, split)
    if not docs:
        raise ValueError(f"{source or bundled_text_path()}: no documents in the {split} split")
    # Endless: every pass visits the documents in a fresh seeded order, so n may exceed one pass.
    while True:
        for i in rng.permutation(len(docs)):
            yield docs[i]


# ---------------------------------------------------------------------------------- span corruption


@dataclasses.dataclass
class Sample:
    """One span-corrupted example.

    ``input_ids``: int64 [L_in], unmasked tokens with one sentinel per masked span, ending with EOS.
    ``labels``: int64 [L_out], ``<extra_id_0> span0 <extra_id_1> span1 ... EOS``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths (int64 [num_segments], all >= 1, summing to num_items) of a uniformly random split of
    ``num_items`` items into ``num_segments`` non-empty runs (T5's ``_random_segmentation``)."""
    # Choose num_segments - 1 distinct cut points among the num_items - 1 gaps between items.
    cuts = np.sort(rng.choice(num_items - 1, size=num_segments - 1, replace=False)) + 1
    bounds = np.concatenate([[0], cuts, [num_items]])
    return np.diff(bounds)


def span_corrupt(tokens: Sequence[int], tok: Tokenizer, rng: np.random.Generator,
                 noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> Sample:
    """T5 span corruption of one window of token ids (no EOS in ``tokens``).

    round(L * noise_density) tokens are masked in round(noise / mean_noise_span_length) spans; noise
    and non-noise runs alternate starting with non-noise, with uniformly random run lengths, exactly as
    T5's ``random_spans_noise_mask``.
    """
    length = len(tokens)
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    num_nonnoise = length - num_noise
    num_spans = min(num_spans, num_noise, num_nonnoise)
    if num_spans > tok.extra_ids:
        raise ValueError(f"a window of {length} tokens needs {num_spans} sentinels but the tokenizer has "
                         f"{tok.extra_ids}; use a shorter length")
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)

    tokens = list(tokens)
    inputs: list[int] = []
    labels: list[int] = []
    pos = 0
    for k in range(num_spans):
        inputs += tokens[pos:pos + nonnoise_lengths[k]]
        pos += nonnoise_lengths[k]
        sentinel = tok.sentinel_id(k)
        inputs.append(sentinel)
        labels.append(sentinel)
        labels += tokens[pos:pos + noise_lengths[k]]
        pos += noise_lengths[k]
    inputs.append(tok.eos_id)
    labels.append(tok.eos_id)
    return Sample(torch.tensor(inputs, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64))


def make_samples(tok: Tokenizer, source: str | os.PathLike | None = None, n: int = 128, seed: int = 0,
                 split: str = "calibration", length: int = 568, *, noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0) -> list[Sample]:
    """``n`` span-corrupted samples of ``split``, deterministic for ``seed``.

    Documents (seeded order) are tokenized, concatenated and cut into windows of ``length`` tokens;
    each window is span-corrupted. ``source``: None (bundled text), ``"c4"``, or a path (module
    docstring). A file source smaller than ``n * length`` tokens is revisited in a new order, so
    windows differ but may share text with earlier ones; they never leave their split.
    """
    _check_split(split)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an integer >= 2, got {length!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    docs = _c4_documents(split, seed) if source == "c4" else _file_documents(source, split, rng)
    samples: list[Sample] = []
    buffer: list[int] = []
    while len(samples) < n:
        try:
            doc = next(docs)
        except StopIteration:
            raise ValueError(f"{source}: the {split} split ran out after {len(samples)} of {n} samples") from None
        buffer += tok.encode(doc, parse_sentinels=False)
        while len(buffer) >= length and len(samples) < n:
            window, buffer = buffer[:length], buffer[length:]
            samples.append(span_corrupt(window, tok, rng, noise_density, mean_noise_span_length))
    return samples


def collate(samples: Sequence[Sample], pad_id: int, decoder_start_token_id: int | None = None) -> dict:
    """Pads samples into a batch for a T5-style encoder-decoder.

    Returns int64 tensors ``input_ids`` / ``attention_mask`` [B, L_in] (right-padded with ``pad_id``,
    mask 1 on real tokens), ``labels`` [B, L_out] (-100 on padding, ignored by the loss),
    ``decoder_input_ids`` [B, L_out] (labels shifted right, starting with ``decoder_start_token_id``,
    which defaults to ``pad_id`` as in T5) and ``decoder_attention_mask`` [B, L_out].
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    start = pad_id if decoder_start_token_id is None else decoder_start_token_id
    B = len(samples)
    L_in = max(s.input_ids.numel() for s in samples)
    L_out = max(s.labels.numel() for s in samples)
    input_ids = torch.full((B, L_in), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((B, L_in), dtype=torch.int64)
    labels = torch.full((B, L_out), -100, dtype=torch.int64)
    decoder_input_ids = torch.full((B, L_out), pad_id, dtype=torch.int64)
    decoder_attention_mask = torch.zeros((B, L_out), dtype=torch.int64)
    for b, s in enumerate(samples):
        if s.input_ids.dim() != 1 or s.labels.dim() != 1 or s.labels.numel() == 0:
            raise ValueError(f"sample {b}: input_ids and labels must be non-empty 1-D tensors, got shapes "
                             f"{tuple(s.input_ids.shape)} and {tuple(s.labels.shape)}")
        n_in, n_out = s.input_ids.numel(), s.labels.numel()
        input_ids[b, :n_in] = s.input_ids
        attention_mask[b, :n_in] = 1
        labels[b, :n_out] = s.labels
        decoder_input_ids[b, 0] = start
        decoder_input_ids[b, 1:n_out] = s.labels[:-1]
        decoder_attention_mask[b, :n_out] = 1
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask, labels=labels)

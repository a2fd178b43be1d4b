"""Tokenizer, T5 span corruption, sample sources and splits (qmoe.data).

References: transformers' ``T5Tokenizer`` for token ids and the sentinel layout; a plain re-merge
of encoder input and target for span corruption; documents read back with json/gzip for sources.
"""
import gzip
import json
import math

import numpy as np
import pytest
import torch

from qmoe import data
from qmoe.data import Sample, bundled_model_path, collate, load_documents, load_tokenizer, make_samples, span_corrupt


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(bundled_model_path())


def reconstruct(sample: Sample, tok) -> list[int]:
    """The original window: each sentinel in the input replaced by the tokens following the same
    sentinel in the target (textbook inverse of T5 span corruption)."""
    labels = sample.labels.tolist()
    assert labels[-1] == tok.eos_id
    spans, current = {}, None
    for t in labels[:-1]:
        if tok.first_sentinel_id <= t < tok.vocab_size:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    inputs = sample.input_ids.tolist()
    assert inputs[-1] == tok.eos_id
    for t in inputs[:-1]:
        out += spans.pop(t) if t in spans else [t]
    assert not spans, "every target span must have a sentinel in the input"
    return out


def noise_mask(sample: Sample, tok) -> list[bool]:
    mask = []
    labels = sample.labels.tolist()[:-1]
    span_len = {}
    current = None
    for t in labels:
        if tok.first_sentinel_id <= t < tok.vocab_size:
            current = t
            span_len[t] = 0
        else:
            span_len[current] += 1
    for t in sample.input_ids.tolist()[:-1]:
        mask += [True] * span_len[t] if t in span_len else [False]
    return mask


# ------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_transformers_t5_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.T5Tokenizer.from_pretrained(str(bundled_model_path()), legacy=True)
    assert len(ref) == tok.vocab_size
    for i in (0, 1, 57, 99):
        assert ref.convert_tokens_to_ids(f"<extra_id_{i}>") == tok.sentinel_id(i)
    assert tok.sentinel_id(0) == tok.vocab_size - 1  # T5: <extra_id_0> is the highest id
    assert tok.first_sentinel_id == tok.sentinel_id(99)
    assert (ref.eos_token_id, ref.pad_token_id) == (tok.eos_id, tok.pad_id)
    texts = load_documents(split="validation")[:40] + ["def f(x):\n    return x ** 2  # <extra_id_3> and <extra_id_0>!"]
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False)


def test_tokenizer_round_trip(tok):
    texts = ["The quick brown fox jumps over the lazy dog.",
             "Return a new list containing all items from the iterable in ascending order.",
             "x = [i * 2 for i in range(10)]; print(x[3:])"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.eos_id not in ids and not tok.is_sentinel(torch.tensor(ids)).any()
        assert tok.decode(ids) == text
        assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    ids = tok.encode("a list <extra_id_0> sorted <extra_id_1>")
    assert ids.count(tok.sentinel_id(0)) == 1 and ids.count(tok.sentinel_id(1)) == 1
    assert tok.decode(ids) == "a list<extra_id_0> sorted<extra_id_1>"


def test_tokenizer_sentinels_and_errors(tok):
    ids = torch.arange(tok.vocab_size + 5)
    expected = torch.tensor([tok.first_sentinel_id <= i < tok.vocab_size for i in range(tok.vocab_size + 5)])
    assert torch.equal(tok.is_sentinel(ids), expected)
    assert int(tok.is_sentinel(ids).sum()) == 100
    with pytest.raises(ValueError, match="sentinel index 100"):
        tok.sentinel_id(100)
    with pytest.raises(ValueError, match="token id 2100"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_tokenizer(bundled_model_path().parent / "no-such-model")


# ------------------------------------------------------------------------------- span corruption


def test_span_corruption_format_and_statistics(tok):
    samples = make_samples(tok, n=64, seed=3, split="calibration")
    # 568 tokens: 85 noise tokens (round(0.15 * 568)) in 28 spans (round(85 / 3)).
    noise_frac, span_lengths, position_noise = [], [], np.zeros(568)
    for s in samples:
        assert s.input_ids.dtype == torch.int64 and s.labels.dtype == torch.int64
        window = reconstruct(s, tok)
        assert len(window) == 568
        assert not tok.is_sentinel(torch.tensor(window)).any() and tok.eos_id not in window
        in_sentinels = s.input_ids[tok.is_sentinel(s.input_ids)].tolist()
        out_sentinels = s.labels[tok.is_sentinel(s.labels)].tolist()
        assert in_sentinels == out_sentinels == [tok.sentinel_id(k) for k in range(28)]
        assert s.labels[0] == tok.sentinel_id(0)
        assert s.input_ids.numel() == 568 - 85 + 28 + 1 == 512
        assert s.labels.numel() == 85 + 28 + 1
        mask = noise_mask(s, tok)
        assert len(mask) == 568 and not mask[0] and mask[-1]  # T5: starts with text, ends with a span
        noise_frac.append(sum(mask) / 568)
        position_noise += mask
        runs = [len(r) for r in "".join("x" if m else " " for m in mask).split()]
        span_lengths += runs
        assert len(runs) == 28 and min(runs) >= 1
    assert np.mean(noise_frac) == pytest.approx(0.15, abs=0.002)
    assert np.mean(span_lengths) == pytest.approx(3.0, abs=0.1)
    # Spans are spread over the whole window, not bunched: every eighth of it holds ~15% noise.
    interior = np.array([c.mean() for c in np.array_split(position_noise[1:-1], 8)]) / len(samples)
    assert np.all(np.abs(interior - 0.15) < 0.04), interior


def test_span_lengths_follow_uniform_segmentation(tok):
    """T5 draws span lengths as a uniformly random composition of 85 into 28 positive parts, so a
    span's length L has P(L = k) = C(85 - k - 1, 26) / C(84, 27)."""
    rng = np.random.default_rng(0)
    lengths = np.concatenate([data._random_segmentation(85, 28, rng) for _ in range(4000)])
    assert lengths.sum() == 85 * 4000
    for k in (1, 2, 3, 5, 8):
        p = math.comb(85 - k - 1, 26) / math.comb(84, 27)
        assert np.mean(lengths == k) == pytest.approx(p, abs=0.01), k


def test_span_corruption_is_deterministic_for_a_seed(tok):
    a = make_samples(tok, n=6, seed=11)
    b = make_samples(tok, n=6, seed=11)
    c = make_samples(tok, n=6, seed=12)
    assert all(torch.equal(x.input_ids, y.input_ids) and torch.equal(x.labels, y.labels) for x, y in zip(a, b))
    assert not any(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, c))


def test_span_corrupt_short_and_invalid(tok):
    rng = np.random.default_rng(0)
    s = span_corrupt([10, 11, 12, 13, 14, 15, 16, 17, 18, 19], tok, rng)
    assert reconstruct(s, tok) == list(range(10, 20))
    assert s.labels.tolist()[0] == tok.sentinel_id(0)
    with pytest.raises(ValueError, match="needs 105 sentinels"):
        span_corrupt([10] * 2100, tok, rng)  # 315 noise tokens in 105 spans; T5 has 100 sentinels
    with pytest.raises(ValueError, match="at least 2 tokens"):
        span_corrupt([5], tok, rng)


# ------------------------------------------------------------------------------------ collate


def test_collate_pads_and_shifts(tok):
    rng = np.random.default_rng(1)
    samples = [span_corrupt(list(range(10, 10 + n)), tok, rng) for n in (40, 13, 90)]
    batch = collate(samples, tok.pad_id)
    B, L_in, L_out = 3, max(s.input_ids.numel() for s in samples), max(s.labels.numel() for s in samples)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (B, L_in)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == batch["decoder_attention_mask"].shape == (B, L_out)
    for b, s in enumerate(samples):
        n_in, n_out = s.input_ids.numel(), s.labels.numel()
        assert batch["input_ids"][b, :n_in].tolist() == s.input_ids.tolist()
        assert batch["input_ids"][b, n_in:].eq(tok.pad_id).all()
        assert batch["attention_mask"][b].tolist() == [1] * n_in + [0] * (L_in - n_in)
        assert batch["labels"][b].tolist() == s.labels.tolist() + [-100] * (L_out - n_out)
        assert batch["decoder_input_ids"][b, :n_out].tolist() == [tok.pad_id] + s.labels.tolist()[:-1]
        assert batch["decoder_attention_mask"][b].tolist() == [1] * n_out + [0] * (L_out - n_out)
    with pytest.raises(ValueError, match="at least one sample"):
        collate([], tok.pad_id)


# ------------------------------------------------------------------------------ sources and splits


def test_bundled_splits_are_disjoint_by_document(tok):
    with gzip.open(data.bundled_text_path(), "rt", encoding="utf-8") as f:
        everything = [json.loads(line)["text"] for line in f]
    cal = load_documents(split="calibration")
    val = load_documents(split="validation")
    assert not set(cal) & set(val)
    assert sorted(cal + val) == sorted(everything)
    assert 0.05 < len(val) / len(everything) < 0.15


def test_samples_stay_inside_their_split(tok, tmp_path):
    # Every document is a run of words tagged with its document number, so each window tells which
    # documents it came from.
    path = tmp_path / "tagged.jsonl"
    with open(path, "w") as f:
        for k in range(300):
            f.write(json.dumps({"text": " ".join(f"doc{k} word" for _ in range(40))}) + "\n")
    splits = {}
    for split in data.SPLITS:
        allowed = {int(d.split()[0][3:]) for d in load_documents(path, split)}
        seen = set()
        for s in make_samples(tok, path, n=30, seed=5, split=split, length=200):
            words = tok.decode(reconstruct(s, tok)).split()[1:-1]  # the ends may be cut mid-word
            seen |= {int(w[3:]) for w in words if w.startswith("doc")}
        assert seen and seen <= allowed, split
        splits[split] = allowed
    assert not splits["calibration"] & splits["validation"]
    assert len(splits["calibration"]) + len(splits["validation"]) == 300


def test_file_sources(tok, tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph of a text file.\nStill first.\n\n\nSecond paragraph.\n")
    with gzip.open(tmp_path / "b.json.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "A C4-style record.", "url": "x"}) + "\n\n")
        f.write(json.dumps({"text": "Another record."}) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "Plain JSON lines."}) + "\n")
    (tmp_path / "ignored.csv").write_text("not,text\n")
    expected = {"First paragraph of a text file.\nStill first.", "Second paragraph.", "A C4-style record.",
                "Another record.", "Plain JSON lines."}
    found = set(load_documents(tmp_path, "calibration")) | set(load_documents(tmp_path, "validation"))
    assert found == expected
    assert set(load_documents(tmp_path / "a.txt", "calibration")) | set(
        load_documents(tmp_path / "a.txt", "validation")) == {"First paragraph of a text file.\nStill first.",
                                                             "Second paragraph."}


def test_source_errors(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        load_documents(bad)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"nofield.jsonl:1: .*'text' field"):
        load_documents(nofield)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unsupported text file"):
        load_documents(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_documents(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_documents(tmp_path / "empty")
    broken = tmp_path / "broken.json.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match="broken.json.gz"):
        load_documents(broken)
    with pytest.raises(ValueError, match="split must be one of"):
        make_samples(tok, n=1, split="train")
    one = tmp_path / "one.txt"
    one.write_text("just one short paragraph")
    split = data._split_of("just one short paragraph")
    other = "validation" if split == "calibration" else "calibration"
    with pytest.raises(ValueError, match=f"no documents in the {other} split"):
        make_samples(tok, one, n=1, split=other)


def test_c4_without_datasets_is_a_clear_error(tok):
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed; C4 streaming needs the network")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="datasets"):
        make_samples(tok, "c4", n=1)


def test_corpus_text_cannot_inject_sentinels(tok, tmp_path):
    path = tmp_path / "markers.txt"
    path.write_text("\n\n".join(f"Paragraph {k} quotes <extra_id_0> and <extra_id_7> literally." for k in range(200)))
    split = "calibration" if load_documents(path, "calibration") else "validation"
    for s in make_samples(tok, path, n=4, seed=0, split=split, length=100):
        window = torch.tensor(reconstruct(s, tok))
        assert not tok.is_sentinel(window).any()
        assert "<extra_id_0>" in tok.decode(window)  # the marker survives as plain text pieces

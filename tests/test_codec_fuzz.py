"""Fuzzing the codec's validation: thousands of random corruptions of encoded matrices and dictionaries.

Every corrupted input must either raise CodecError or, when the corruption still leaves a valid
stream, decode to the right shape and agree with a plain bounds-checked decoder written here. The
slow variant reruns the fuzz in a subprocess with numba bounds checking on, so an out-of-bounds read
inside a kernel would raise instead of passing silently.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qmoe import codec
from qmoe.codec import CodecError

ITERATIONS = 3000


def _base_matrix():
    rng = np.random.default_rng(42)
    rows = [np.where(rng.random(70) < p0, 0, rng.choice([-1, 1], 70)) for p0 in (0.0, 0.5, 0.885, 0.97, 1.0)]
    rows += [np.zeros(70), np.ones(70), -np.ones(70)]
    return np.array(rows, dtype=np.int8)


def _plain_decode(enc):
    """FORMAT.md 6.1 with every index checked; returns None where the spec says the stream is invalid."""
    d = enc.dictionary
    out = np.zeros((enc.rows, enc.cols), np.int8)
    offsets = enc.row_offsets.astype(np.int64)
    for r in range(enc.rows):
        k = int(enc.row_class[r])
        if k >= d.num_classes:
            return None
        symbols = []
        for i in range(offsets[r], offsets[r + 1]):
            c = int(enc.codewords[i])
            if c >= d.entry_count[k] or len(symbols) >= enc.cols:
                return None
            nz, neg = int(d.entry_nonzero[k, c]), int(d.entry_negative[k, c])
            symbols += [0 if not (nz >> b) & 1 else (-1 if (neg >> b) & 1 else 1) for b in range(d.entry_length[k, c])]
        if len(symbols) < enc.cols:
            return None
        out[r] = symbols[: enc.cols]
    return out


def _corrupt(enc, rng):
    """A randomly corrupted copy of enc (the dictionary is shared, never modified)."""
    fields = dict(rows=enc.rows, cols=enc.cols, codewords=enc.codewords.copy(), row_offsets=enc.row_offsets.copy(),
                  row_class=enc.row_class.copy(), scales=enc.scales.copy(), dictionary=enc.dictionary)
    kind = rng.integers(10)
    if kind == 0 and fields["codewords"].size:
        i = rng.integers(fields["codewords"].size)
        fields["codewords"][i] ^= np.uint16(1 << rng.integers(16))
    elif kind == 1:
        i = rng.integers(fields["row_offsets"].size)
        fields["row_offsets"][i] ^= np.uint32(1 << rng.integers(32))
    elif kind == 2 and fields["row_class"].size:
        i = rng.integers(fields["row_class"].size)
        fields["row_class"][i] ^= np.uint8(1 << rng.integers(8))
    elif kind == 3 and fields["scales"].size:
        flat = fields["scales"].reshape(-1)
        flat[rng.integers(flat.size)] ^= np.uint16(1 << rng.integers(16))
    elif kind == 4:
        fields["codewords"] = fields["codewords"][: rng.integers(fields["codewords"].size + 1)]
    elif kind == 5:
        extra = rng.integers(0, 65536, rng.integers(1, 5)).astype(np.uint16)
        fields["codewords"] = np.concatenate([fields["codewords"], extra])
        fields["row_offsets"][-1] += extra.size if rng.random() < 0.5 else 0
    elif kind == 6:
        fields["cols"] = int(rng.integers(0, 2 * enc.cols + 2))
    elif kind == 7:
        fields["rows"] = int(rng.integers(0, enc.rows + 3))
    elif kind == 8:
        name = ("codewords", "row_offsets", "row_class", "scales")[rng.integers(4)]
        a = fields[name]
        fields[name] = (a.astype(np.int64), a.reshape(1, -1), a[:-1] if a.size else a, a.astype(np.float32))[rng.integers(4)]
    else:
        n = int(rng.integers(enc.rows, 4 * enc.rows + 1))
        fields["codewords"] = rng.integers(0, 65536, n).astype(np.uint16)
        cuts = np.sort(rng.integers(0, n + 1, enc.rows - 1))
        fields["row_offsets"] = np.concatenate([[0], cuts, [n]]).astype(np.uint32)
    return codec.EncodedMatrix(**fields)


def _check_one(enc):
    """Raises AssertionError if enc is handled wrongly; returns whether it was rejected."""
    try:
        out = codec.decode(enc)
    except CodecError:
        for fn in (codec.validate, codec.dequantize, lambda e: codec.matmul(np.ones((1, max(1, e.cols)), np.float32), e)):
            try:
                fn(enc)
            except CodecError:
                continue
            except ValueError as exc:  # matmul's shape check may fire first
                assert "columns" in str(exc)
                continue
            raise AssertionError("decode rejected a stream that another entry point accepted")
        return True
    assert out.shape == (enc.rows, enc.cols) and out.dtype == np.int8
    reference = _plain_decode(enc)
    assert reference is not None, "decoded a stream the spec calls invalid"
    np.testing.assert_array_equal(out, reference)
    y = codec.matmul(np.ones((2, enc.cols), np.float32), enc)
    np.testing.assert_allclose(y[0], codec.dequantize(enc).sum(axis=1), rtol=1e-5, atol=1e-4)
    return False


@pytest.mark.parametrize("dict_name", ["default", "qmoe"])
def test_random_matrix_corruptions_raise_or_decode_correctly(dict_name, iterations=ITERATIONS):
    d = codec.default_dictionary() if dict_name == "default" else codec.qmoe_dictionary()
    t = _base_matrix()
    enc = codec.encode(t, dictionary=d)
    assert not _check_one(enc)
    rng = np.random.default_rng(0 if dict_name == "default" else 1)
    rejected = sum(_check_one(_corrupt(enc, rng)) for _ in range(iterations))
    # Most corruptions must be caught; some (a flipped codeword that is still a valid entry, a scale
    # bit that keeps a <= 0 <= b) are legitimately valid streams.
    assert 0.5 * iterations < rejected < iterations


def test_random_dictionary_corruptions_raise_or_give_a_valid_dictionary():
    d = codec.default_dictionary()
    tensors, metadata = d.to_tensors()
    meta = json.loads(metadata["qmoe_codec"])
    del meta["fingerprint"]
    t = _base_matrix()
    rng = np.random.default_rng(2)
    rejected = 0
    for _ in range(300):
        name = ("entry_length", "entry_nonzero", "entry_negative", "entry_count")[rng.integers(4)]
        corrupted = dict(tensors)
        a = tensors[name].copy()
        flat = a.reshape(-1)
        # Bias half the flips towards the used slots of class 0, where entries are dense.
        i = rng.integers(flat.size) if rng.random() < 0.5 else rng.integers(min(flat.size, 65535))
        bits = 8 * a.dtype.itemsize
        flat[i] ^= np.array(1, dtype=a.dtype) << np.array(rng.integers(bits), dtype=a.dtype)
        corrupted[name] = a
        try:
            loaded = codec.Dictionary.from_tensors(corrupted, json.dumps(meta))
        except CodecError:
            rejected += 1
            continue
        assert loaded.fingerprint != d.fingerprint
        enc = codec.EncodedMatrix(t.shape[0], t.shape[1], *(getattr(codec.encode(t), f) for f in
                                  ("codewords", "row_offsets", "row_class", "scales")), loaded)
        _check_one(enc)
        try:
            np.testing.assert_array_equal(codec.decode(codec.encode(t, dictionary=loaded)), t)
        except CodecError as exc:
            assert "complete" in str(exc)  # a tunstall class that lost its tree shape cannot encode
    assert rejected > 150


@pytest.mark.slow
def test_fuzz_under_numba_bounds_checking(tmp_path):
    """Reruns a shorter fuzz with NUMBA_BOUNDSCHECK=1 (fresh compile cache): an out-of-bounds access in
    any kernel would raise IndexError there and fail this test."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import test_codec_fuzz as f\n"
        "f.test_random_matrix_corruptions_raise_or_decode_correctly('default', iterations=800)\n"
        "f.test_random_matrix_corruptions_raise_or_decode_correctly('qmoe', iterations=800)\n"
    )
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=dict(env, PYTHONPATH=root),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

"""Codec (codec/FORMAT.md): exact round trips, encoder/decoder vs plain reference implementations
written here from the spec, dictionary construction vs textbook Tunstall, matmul vs dense, validation
errors, layer packing, bit accounting, and golden vectors that pin the format byte for byte.

Regenerate the golden vectors (only after a deliberate format change, bumping FORMAT_VERSION):
``python tests/test_codec.py --write-golden``.
"""

import functools
import json
import pathlib
import sys

import numpy as np
import pytest
import torch

from qmoe import codec
from qmoe.codec import CodecError

GOLDEN = pathlib.Path(__file__).parent / "data" / "codec_golden"


def _iid(rows, cols, p0, seed=0, p_neg=None):
    """i.i.d. ternary int8 [rows, cols]: P(0) = p0, P(-1) = p_neg (default: half the rest)."""
    p_neg = (1 - p0) / 2 if p_neg is None else p_neg
    u = np.random.default_rng(seed).random((rows, cols))
    t = np.zeros((rows, cols), dtype=np.int8)
    t[u < p_neg] = -1
    t[u >= p_neg + p0] = 1
    return t


def _edge_matrices():
    """Awkward shapes and rows: one column, odd widths, all-zero/all-nonzero rows, long zero runs."""
    cases = {
        "no_rows": np.zeros((0, 5), np.int8),
        "one_by_one_zero": np.zeros((1, 1), np.int8),
        "one_by_one_neg": -np.ones((1, 1), np.int8),
        "one_column": _iid(9, 1, 0.5, seed=1),
        "odd_width": _iid(5, 7, 0.7, seed=2),
        "all_zero_long": np.zeros((3, 1000), np.int8),
        "all_plus": np.ones((2, 65), np.int8),
        "all_minus": -np.ones((2, 130), np.int8),
        "alternating": np.tile(np.array([1, -1, 0], np.int8), (4, 33))[:, :97],
    }
    mixed = _iid(12, 301, 0.885, seed=3)
    mixed[0] = 0
    mixed[1] = 1
    mixed[2, ::2] = -1
    mixed[3, :] = _iid(1, 301, 0.3, seed=4)
    cases["mixed_rows"] = mixed
    return cases


DICTIONARIES = {"default": codec.default_dictionary, "qmoe": codec.qmoe_dictionary}


def _symbols(d, k, c):
    length = int(d.entry_length[k, c])
    nz, neg = int(d.entry_nonzero[k, c]), int(d.entry_negative[k, c])
    return tuple(0 if not (nz >> i) & 1 else (-1 if (neg >> i) & 1 else 1) for i in range(length))


@functools.lru_cache(maxsize=None)
def _entry_maps(d):
    """Per class: {(length, nonzero mask, negative mask): codeword}, i.e. each entry's symbol run as
    three integers (built with zip, as the Python per-entry loop is slow for 8 x 65535 entries)."""
    return [dict(zip(zip(d.entry_length[k].tolist(), d.entry_nonzero[k].tolist(), d.entry_negative[k].tolist()),
                     range(int(d.entry_count[k]))))
            for k in range(d.num_classes)]


def _key(symbols):
    """A symbol run as the (length, nonzero mask, negative mask) key of _entry_maps."""
    return (len(symbols), sum(1 << i for i, s in enumerate(symbols) if s),
            sum(1 << i for i, s in enumerate(symbols) if s < 0))


def _reference_decode(enc):
    """FORMAT.md 6.1 written plainly: expand every codeword, keep the first cols symbols."""
    out = np.zeros((enc.rows, enc.cols), np.int8)
    for r in range(enc.rows):
        k = int(enc.row_class[r])
        symbols = []
        for c in enc.codewords[enc.row_offsets[r]: enc.row_offsets[r + 1]]:
            symbols.extend(_symbols(enc.dictionary, k, int(c)))
        out[r] = symbols[: enc.cols]
    return out


def _reference_encode(t, d, maps):
    """FORMAT.md 3.1/3.4 written plainly: returns (codewords, row_offsets, row_class)."""
    codewords, offsets, classes = [], [0], []
    for row in t.tolist():
        if d.mode == "tunstall":
            n = np.array([row.count(-1), row.count(0), row.count(1)], dtype=np.float64)
            cost = -np.log2(d.class_probabilities)
            k = min(range(d.num_classes), key=lambda k: (n[0] * cost[k, 0] + n[1] * cost[k, 1] + n[2] * cost[k, 2], k))
            prefix, i = [], 0
            while i < len(row) or prefix:
                prefix.append(row[i] if i < len(row) else 0)  # virtual zeros finish the last walk
                i += 1
                if _key(prefix) in maps[k]:
                    codewords.append(maps[k][_key(prefix)])
                    prefix = []
            classes.append(k)
        else:
            seq = row + [0] * (len(row) % 2)
            i = 0
            while i < len(seq):
                best = max(n for n in range(2, 29, 2) if i + n <= len(seq) and _key(seq[i: i + n]) in maps[0])
                codewords.append(maps[0][_key(seq[i: i + best])])
                i += best
            classes.append(0)
        offsets.append(len(codewords))
    return codewords, offsets, classes


# ---------------------------------------------------------------- round trips and reference agreement


@pytest.mark.parametrize("dict_name", DICTIONARIES)
@pytest.mark.parametrize("case", list(_edge_matrices()))
def test_edge_cases_round_trip_and_match_reference_encoder(dict_name, case):
    d = DICTIONARIES[dict_name]()
    t = _edge_matrices()[case]
    enc = codec.encode(t, dictionary=d)
    assert enc.shape == t.shape
    np.testing.assert_array_equal(codec.decode(enc), t)
    np.testing.assert_array_equal(_reference_decode(enc), t)
    codewords, offsets, classes = _reference_encode(t, d, _entry_maps(d) if t.size else None)
    np.testing.assert_array_equal(enc.codewords, np.array(codewords, np.uint16))
    np.testing.assert_array_equal(enc.row_offsets, np.array(offsets, np.uint32))
    np.testing.assert_array_equal(enc.row_class, np.array(classes, np.uint8))
    assert enc.nbytes == 2 * len(codewords) + 4 * (t.shape[0] + 1) + t.shape[0] + 4 * t.shape[0]


@pytest.mark.parametrize("dict_name", DICTIONARIES)
def test_large_random_round_trip_with_varying_sparsity(dict_name):
    d = DICTIONARIES[dict_name]()
    rng = np.random.default_rng(5)
    rows = [_iid(1, 2049, p0, seed=i) for i, p0 in enumerate(rng.uniform(0.3, 0.99, 400))]
    t = np.concatenate(rows)
    enc = codec.encode(t, dictionary=d)
    np.testing.assert_array_equal(codec.decode(enc), t)
    if d.mode == "tunstall":
        assert len(set(enc.row_class.tolist())) >= 6  # rows of different sparsity use different classes


@pytest.mark.slow
@pytest.mark.parametrize("dict_name", DICTIONARIES)
@pytest.mark.parametrize("shape", [(2080, 6144), (6144, 2080)])
def test_c2048_expert_shapes_round_trip(dict_name, shape):
    t = np.concatenate([_iid(shape[0] // 2, shape[1], 0.885, seed=16), _iid(shape[0] // 2, shape[1], 0.55, seed=17)])
    enc = codec.encode(t, dictionary=DICTIONARIES[dict_name]())
    np.testing.assert_array_equal(codec.decode(enc), t)
    x = np.random.default_rng(18).standard_normal((3, shape[1])).astype(np.float32)
    np.testing.assert_allclose(codec.matmul(x, enc), x.astype(np.float64) @ t.T, rtol=1e-5, atol=1e-3)


def test_exact_class_selection_is_never_longer_and_round_trips():
    rng = np.random.default_rng(6)
    t = np.concatenate([_iid(1, 777, p0, seed=i) for i, p0 in enumerate(rng.uniform(0.5, 0.97, 200))])
    estimate = codec.encode(t)
    exact = codec.encode(t, class_selection="exact")
    np.testing.assert_array_equal(codec.decode(exact), t)
    per_row_estimate = np.diff(estimate.row_offsets.astype(np.int64))
    per_row_exact = np.diff(exact.row_offsets.astype(np.int64))
    assert np.all(per_row_exact <= per_row_estimate)
    # Exact means the minimum over every class: check rows against single-class dictionaries.
    d = codec.default_dictionary()
    sample = np.arange(0, 200, 13)
    lengths = np.empty((d.num_classes, sample.shape[0]), np.int64)
    for k in range(d.num_classes):
        single = codec.Dictionary("tunstall", d.entry_length[k:k + 1], d.entry_nonzero[k:k + 1],
                                  d.entry_negative[k:k + 1], d.entry_count[k:k + 1], d.class_probabilities[k:k + 1])
        lengths[k] = np.diff(codec.encode(t[sample], dictionary=single).row_offsets.astype(np.int64))
    np.testing.assert_array_equal(per_row_exact[sample], lengths.min(axis=0))
    np.testing.assert_array_equal(exact.row_class[sample], lengths.argmin(axis=0))


def test_torch_and_noncontiguous_input():
    t = _iid(20, 64, 0.8, seed=7)
    enc_np = codec.encode(t[:, ::2])
    enc_torch = codec.encode(torch.from_numpy(t)[:, ::2])
    np.testing.assert_array_equal(enc_np.codewords, enc_torch.codewords)
    np.testing.assert_array_equal(codec.decode(enc_torch), t[:, ::2])


@pytest.mark.parametrize("bad", [
    np.zeros((3, 4), np.int16),
    np.zeros(5, np.int8),
    np.zeros((3, 0), np.int8),
])
def test_encode_rejects_wrong_dtype_and_shape(bad):
    with pytest.raises(ValueError):
        codec.encode(bad)


@pytest.mark.parametrize("dict_name", DICTIONARIES)
@pytest.mark.parametrize("value", [2, -2, 127, -128])
def test_encode_rejects_values_outside_ternary_naming_the_row(dict_name, value):
    t = np.zeros((9, 10), np.int8)
    t[6, 3] = value
    with pytest.raises(ValueError, match="row 6"):
        codec.encode(t, dictionary=DICTIONARIES[dict_name]())


# ---------------------------------------------------------------- dictionaries


def _textbook_tunstall(p, leaves_wanted, max_length):
    """Tunstall written plainly: expand the most probable expandable leaf (first created on ties)."""
    leaves = [(p[s + 1], i, (s,)) for i, s in enumerate((-1, 0, 1))]
    created = 3
    while len(leaves) + 2 <= leaves_wanted:
        expandable = [leaf for leaf in leaves if len(leaf[2]) < max_length and sum(x != 0 for x in leaf[2]) < 32]
        best = max(expandable, key=lambda leaf: (leaf[0], -leaf[1]))
        leaves.remove(best)
        for s in (-1, 0, 1):
            leaves.append((best[0] * p[s + 1], created, best[2] + (s,)))
            created += 1
    leaves.sort(key=lambda leaf: (-leaf[0], leaf[1]))
    return [leaf[2] for leaf in leaves]


@pytest.mark.parametrize("p,leaves,max_length", [
    ((0.0575, 0.885, 0.0575), 41, 64),
    ((0.2, 0.5, 0.3), 101, 64),
    ((0.01, 0.98, 0.01), 61, 6),
])
def test_tunstall_class_matches_textbook(p, leaves, max_length):
    length, nonzero, negative, count = codec.tunstall_class(p, leaves, max_length)
    d = codec.Dictionary("tunstall", length[None], nonzero[None], negative[None], [count], [p])
    assert [_symbols(d, 0, c) for c in range(count)] == _textbook_tunstall(p, leaves, max_length)


def test_default_dictionary_is_a_complete_tunstall_code_with_expected_rate():
    d = codec.default_dictionary()
    assert d.mode == "tunstall" and d.num_classes == len(codec.DEFAULT_CLASS_ZERO_PROBABILITIES)
    assert np.all(d.entry_count == 65535)
    k = int(np.argmin(np.abs(d.class_probabilities[:, 1] - 0.885)))
    p = d.class_probabilities[k]
    count = int(d.entry_count[k])
    n_neg = np.array([bin(int(x)).count("1") for x in d.entry_negative[k, :count]])
    n_nz = np.array([bin(int(x)).count("1") for x in d.entry_nonzero[k, :count]])
    lengths = d.entry_length[k, :count].astype(np.int64)
    leaf_prob = p[0] ** n_neg * p[2] ** (n_nz - n_neg) * p[1] ** (lengths - n_nz)
    # Complete prefix-free tree: leaf probabilities sum to 1 (Kraft equality for a parse tree).
    assert abs(leaf_prob.sum() - 1.0) < 1e-9
    assert np.all(np.diff(leaf_prob) <= 1e-18)  # codewords in decreasing probability
    assert lengths.max() == 64 and n_nz.max() <= 32
    # Expected symbols per codeword is sum(P(leaf) * length); the encoder must achieve 16 / E[L]
    # bits per symbol on a long i.i.d. row of the design distribution (only row ends differ).
    expected_bits = 16.0 / float((leaf_prob * lengths).sum())
    entropy = -float((p * np.log2(p)).sum())
    assert entropy < expected_bits < 1.045 * entropy
    t = _iid(64, 20000, p[1], seed=8)
    enc = codec.encode(t)
    measured = 16.0 * enc.codewords.shape[0] / t.size
    assert abs(measured - expected_bits) < 0.006


def test_qmoe_dictionary_matches_published_construction():
    d = codec.qmoe_dictionary()
    assert d.mode == "qmoe-pairs" and d.num_classes == 1 and d.entry_count[0] == 65536
    maps = {_symbols(d, 0, c) for c in range(65536)}
    assert len(maps) == 65536
    lengths = d.entry_length[0].astype(np.int64)
    assert lengths.min() == 2 and lengths.max() == 28 and np.all(lengths % 2 == 0)
    for seq in list(maps)[:: 997]:  # prefix-closed over pairs
        for cut in range(2, len(seq), 2):
            assert seq[:cut] in maps
    p = {-1: 0.0575, 0: 0.885, 1: 0.0575}
    probs = [np.prod([p[s] for s in _symbols(d, 0, c)]) for c in range(0, 65536, 101)]
    assert np.all(np.diff(probs) <= 1e-15)
    # Published figure (REFERENCE.md 4): ~0.736-0.739 bits/weight for the codewords at P(0) = 0.885.
    t = _iid(200, 6144, 0.885, seed=9)
    bits = 16.0 * codec.encode(t, dictionary=d).codewords.shape[0] / t.size
    assert 0.725 < bits < 0.75


def test_fit_dictionary_recovers_mixture_and_beats_default_on_it():
    low = _iid(150, 800, 0.62, seed=10)
    high = _iid(150, 800, 0.97, seed=11, p_neg=0.02)
    sample = np.concatenate([low, high])
    fitted = codec.fit_dictionary([low, torch.from_numpy(high)], classes=2)
    assert fitted.num_classes == 2
    np.testing.assert_allclose(fitted.class_probabilities[0], [0.19, 0.62, 0.19], atol=0.01)
    np.testing.assert_allclose(fitted.class_probabilities[1], [0.02, 0.97, 0.01], atol=0.01)
    enc = codec.encode(sample, dictionary=fitted)
    np.testing.assert_array_equal(codec.decode(enc), sample)
    np.testing.assert_array_equal(enc.row_class, [0] * 150 + [1] * 150)
    assert enc.codewords.shape[0] < codec.encode(sample).codewords.shape[0]


def test_fit_dictionary_errors():
    with pytest.raises(ValueError):
        codec.fit_dictionary([])
    with pytest.raises(ValueError, match="outside"):
        codec.fit_dictionary(np.full((2, 2), 3, np.int8))
    with pytest.raises(ValueError):
        codec.fit_dictionary(np.zeros((2, 2), np.int8), classes=17)


def test_dictionary_safetensors_round_trip_and_fingerprint(tmp_path):
    from safetensors.numpy import load_file

    d = codec.default_dictionary()
    path = tmp_path / "dictionary.safetensors"
    d.save(path)
    loaded = codec.Dictionary.load(path)
    assert loaded.fingerprint == d.fingerprint and loaded.mode == d.mode
    np.testing.assert_array_equal(loaded.entry_nonzero, d.entry_nonzero)
    np.testing.assert_array_equal(loaded.encoder_tables(), d.encoder_tables())
    # torch reads the masks as int64 views of the same bits.
    tensors, metadata = d.to_tensors()
    assert tensors["entry_nonzero"].dtype == np.int64
    from_torch = codec.Dictionary.from_tensors({k: torch.from_numpy(v) for k, v in tensors.items()}, metadata)
    assert from_torch.fingerprint == d.fingerprint
    assert set(load_file(str(path))) == {"entry_length", "entry_nonzero", "entry_negative", "entry_count"}


def _tensor_copy(d):
    tensors, metadata = d.to_tensors()
    return {k: v.copy() for k, v in tensors.items()}, json.loads(metadata["qmoe_codec"])


@pytest.mark.parametrize("corrupt,match", [
    (lambda t, m: m.update(format_version=2), "format_version"),
    (lambda t, m: m.update(fingerprint="00" * 32), "fingerprint"),
    (lambda t, m: t.pop("entry_count"), "missing"),
    (lambda t, m: t.__setitem__("entry_length", t["entry_length"].astype(np.int16)), "dtype"),
    (lambda t, m: t["entry_length"].__setitem__((0, 5), 65), "length"),
    (lambda t, m: t["entry_length"].__setitem__((0, 5), 0), "length"),
    (lambda t, m: t["entry_negative"].__setitem__((0, 0), 1 << 40), "negative"),
    (lambda t, m: t["entry_nonzero"].__setitem__((0, 0), -1), "beyond its length|nonzero"),
    (lambda t, m: t["entry_length"].__setitem__((0, 65535), 3), "not all zero"),
    (lambda t, m: t["entry_count"].__setitem__(0, 0), "entry_count"),
])
def test_dictionary_load_rejects_corruption(corrupt, match):
    tensors, metadata = _tensor_copy(codec.default_dictionary())
    metadata.pop("fingerprint") if match != "fingerprint" else None
    corrupt(tensors, metadata)
    with pytest.raises(CodecError, match=match):
        codec.Dictionary.from_tensors(tensors, json.dumps(metadata))


def test_tunstall_tables_that_are_not_a_complete_tree_cannot_encode_but_decode():
    d = codec.default_dictionary()
    # Drop entry 0's last slot-holder: the tree loses a leaf, so it is no longer complete.
    length, nz, neg, count = (d.entry_length[:1].copy(), d.entry_nonzero[:1].copy(),
                              d.entry_negative[:1].copy(), d.entry_count[:1].copy())
    last = int(count[0]) - 1
    length[0, last] = nz[0, last] = neg[0, last] = 0
    count[0] = last
    broken = codec.Dictionary("tunstall", length, nz, neg, count, d.class_probabilities[:1])
    with pytest.raises(CodecError, match="complete"):
        codec.encode(np.zeros((1, 4), np.int8), dictionary=broken)


# ---------------------------------------------------------------- scales, dequantize, matmul


def test_scales_are_bf16_and_dequantize_uses_them():
    t = _iid(30, 50, 0.6, seed=12)
    rng = np.random.default_rng(13)
    scales = np.stack([-rng.random(30), rng.random(30)], axis=1).astype(np.float32)
    scales[0] = (0.0, 0.0)
    scales[1] = (-0.0, 3.0)
    enc = codec.encode(t, scales=scales)
    bf16 = torch.from_numpy(scales).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(enc.scales_float(), bf16)
    expected = np.where(t < 0, bf16[:, :1], np.where(t > 0, bf16[:, 1:], 0.0)).astype(np.float32)
    np.testing.assert_array_equal(codec.dequantize(enc), expected)
    default = codec.encode(t)
    np.testing.assert_array_equal(codec.dequantize(default), t.astype(np.float32))
    torch_scales = torch.from_numpy(scales).to(torch.bfloat16)
    np.testing.assert_array_equal(codec.encode(t, scales=torch_scales).scales, enc.scales)


@pytest.mark.parametrize("scales,match", [
    (np.zeros((3, 3), np.float32), "shape"),
    (np.array([[0.5, 1.0]] * 3, np.float32), "row 0"),
    (np.array([[-1.0, 1.0], [-1.0, -0.5], [-1.0, 1.0]], np.float32), "row 1"),
    (np.array([[-1.0, 1.0], [-1.0, 1.0], [-np.inf, 1.0]], np.float32), "row 2"),
    (np.array([[-1.0, 1.0], [-1.0, 1.0], [-1.0, 3.4e38]], np.float32), "row 2"),  # inf in bf16
])
def test_bad_scales_raise(scales, match):
    with pytest.raises(ValueError, match=match):
        codec.encode(np.zeros((3, 4), np.int8), scales=scales)


@pytest.mark.parametrize("dict_name", DICTIONARIES)
# The last shape is large enough to run on numba's thread pool (codec/_parallel.py); the others
# run serially.
@pytest.mark.parametrize("rows,cols,tokens", [(0, 5, 3), (1, 1, 1), (7, 3, 2), (37, 118, 1), (64, 301, 5),
                                              (600, 2000, 4)])
def test_matmul_matches_dense_matmul_of_decoded_weights(dict_name, rows, cols, tokens):
    t = _iid(rows, cols, 0.8, seed=rows + cols)
    rng = np.random.default_rng(14)
    scales = np.stack([-rng.random(rows), rng.random(rows)], axis=1)
    enc = codec.encode(t, scales=scales, dictionary=DICTIONARIES[dict_name]())
    w = codec.dequantize(enc).astype(np.float64)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    y = codec.matmul(x, enc)
    assert y.shape == (tokens, rows) and y.dtype == np.float32
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5 * np.sqrt(cols))
    xb = torch.from_numpy(x).to(torch.bfloat16)
    yb = codec.matmul(xb, enc)
    assert isinstance(yb, torch.Tensor) and yb.dtype == torch.float32
    np.testing.assert_allclose(yb.numpy(), xb.double().numpy() @ w.T, rtol=1e-5, atol=1e-5 * np.sqrt(cols))


def test_matmul_rejects_wrong_input():
    enc = codec.encode(np.zeros((2, 4), np.int8))
    with pytest.raises(ValueError, match="columns"):
        codec.matmul(np.zeros((1, 5), np.float32), enc)
    with pytest.raises(ValueError):
        codec.matmul(np.zeros((1, 4), np.int32), enc)
    with pytest.raises(ValueError):
        codec.matmul(torch.zeros(4), enc)


# ---------------------------------------------------------------- validation, layers, bits


def _valid():
    t = _iid(6, 90, 0.85, seed=15)
    return t, codec.encode(t)


def _replace(enc, **fields):
    values = dict(rows=enc.rows, cols=enc.cols, codewords=enc.codewords.copy(), row_offsets=enc.row_offsets.copy(),
                  row_class=enc.row_class.copy(), scales=enc.scales.copy(), dictionary=enc.dictionary)
    values.update(fields)
    return codec.EncodedMatrix(**values)


def test_validate_names_what_is_wrong():
    t, enc = _valid()
    codec.validate(enc)
    off = enc.row_offsets.copy()
    off[3], off[4] = off[4], off[3]
    with pytest.raises(CodecError, match="row 3: row_offsets"):
        codec.validate(_replace(enc, row_offsets=off))
    off = enc.row_offsets.copy()
    off[-1] += 1
    with pytest.raises(CodecError, match=r"row_offsets\[6\]"):
        codec.validate(_replace(enc, row_offsets=off))
    cls = enc.row_class.copy()
    cls[2] = 8
    with pytest.raises(CodecError, match="row 2: row_class 8"):
        codec.validate(_replace(enc, row_class=cls))
    cw = enc.codewords.copy()
    cw[enc.row_offsets[4]] = 65535  # the unused slot of a tunstall class
    with pytest.raises(CodecError, match=f"row 4: codeword {enc.row_offsets[4]}"):
        codec.validate(_replace(enc, codewords=cw))
    with pytest.raises(CodecError, match="cover fewer"):
        codec.validate(_replace(enc, cols=enc.cols + 200))
    with pytest.raises(CodecError, match="past the row end"):
        codec.validate(_replace(enc, cols=3))
    with pytest.raises(CodecError, match="dtype"):
        codec.validate(_replace(enc, row_offsets=enc.row_offsets.astype(np.int64)))
    with pytest.raises(CodecError, match="shape"):
        codec.validate(_replace(enc, scales=enc.scales[:5]))
    sc = enc.scales.copy()
    sc[5, 1] = 0xFFC0  # bf16 NaN
    with pytest.raises(CodecError, match="row 5: scales"):
        codec.validate(_replace(enc, scales=sc))
    with pytest.raises(CodecError, match="cols >= 1"):
        codec.validate(_replace(enc, cols=0))
    for fn in (codec.decode, codec.dequantize):
        with pytest.raises(CodecError):
            fn(_replace(enc, codewords=enc.codewords[:-1]))


def test_pack_layer_and_unpack_expert_round_trip():
    d = codec.default_dictionary()
    experts = [_iid(10, 33, p0, seed=i) for i, p0 in enumerate((0.5, 0.9, 0.99))]
    encoded = [codec.encode(t) for t in experts]
    layer = codec.pack_layer(encoded)
    assert layer["row_offsets"].shape == (3, 11) and layer["scales"].shape == (3, 10, 2)
    assert layer["expert_offsets"].tolist() == [0] + np.cumsum([e.codewords.shape[0] for e in encoded]).tolist()
    for e, t in enumerate(experts):
        back = codec.unpack_expert(layer, e, d)
        np.testing.assert_array_equal(codec.decode(back), t)
        np.testing.assert_array_equal(back.codewords, encoded[e].codewords)
    with pytest.raises(CodecError, match="out of range"):
        codec.unpack_expert(layer, 3)
    with pytest.raises(CodecError, match="dictionary"):
        codec.unpack_expert(layer, 0, codec.qmoe_dictionary())
    broken = dict(layer, expert_offsets=layer["expert_offsets"] + np.array([0, 1, 0, 0]))
    with pytest.raises(CodecError):
        codec.unpack_expert(broken, 0)
    with pytest.raises(ValueError, match="shape"):
        codec.pack_layer([encoded[0], codec.encode(_iid(10, 34, 0.9))])
    with pytest.raises(ValueError, match="dictionary"):
        codec.pack_layer([encoded[0], codec.encode(experts[1], dictionary=codec.qmoe_dictionary())])


def test_bits_report_adds_up_to_nbytes():
    encoded = [codec.encode(_iid(40, 123, 0.885, seed=i)) for i in range(3)]
    report = codec.bits_report(encoded, dictionary_amortized_over=0)
    weights = 3 * 40 * 123
    assert report["weights"] == weights
    assert report["dictionary"] == 0.0
    assert report["total"] == pytest.approx(8 * sum(e.nbytes for e in encoded) / weights)
    assert report["row_offsets"] == pytest.approx(8 * 3 * 41 * 4 / weights)
    with_dict = codec.bits_report(encoded[0], dictionary_amortized_over=10**9)
    assert with_dict["dictionary"] == pytest.approx(8 * codec.default_dictionary().nbytes / 1e9)


# ---------------------------------------------------------------- golden vectors


def _golden_matrix():
    """A fixed 7 x 45 ternary matrix with varied rows (also stored in the golden file)."""
    t = _iid(7, 45, 0.8, seed=2024)
    t[0] = 0
    t[1] = 1
    t[2, ::3] = -1
    t[3] = _iid(1, 45, 0.3, seed=7)
    return t


TINY_SLOTS = 16


def _tiny_dictionary():
    """Two small tunstall classes; stored whole in the golden file, so it pins the table layout."""
    classes = [codec.tunstall_class((0.1, 0.8, 0.1), 15, 6), codec.tunstall_class((0.3, 0.3, 0.4), 9, 6)]
    return codec.Dictionary("tunstall", np.stack([c[0] for c in classes]), np.stack([c[1] for c in classes]),
                            np.stack([c[2] for c in classes]), [c[3] for c in classes],
                            [(0.1, 0.8, 0.1), (0.3, 0.3, 0.4)], max_length=6)


def _golden_encodings():
    t = _golden_matrix()
    scales = np.stack([-np.linspace(0.0, 1.5, 7), np.linspace(0.25, 2.0, 7)], axis=1)
    return t, {name: codec.encode(t, scales=scales, dictionary=d)
               for name, d in (("tiny", _tiny_dictionary()), ("qmoe", codec.qmoe_dictionary()),
                               ("default", codec.default_dictionary()))}


def _write_golden():
    from safetensors.numpy import save_file

    t, encodings = _golden_encodings()
    tensors = {"ternary": t}
    meta = {"format_version": codec.FORMAT_VERSION, "shape": list(t.shape), "fingerprints": {}}
    for name, enc in encodings.items():
        for field in ("codewords", "row_offsets", "row_class", "scales"):
            tensors[f"{name}.{field}"] = getattr(enc, field)
        meta["fingerprints"][name] = enc.dictionary.fingerprint
    tiny, tiny_meta = _tiny_dictionary().to_tensors()
    # Only the first TINY_SLOTS slots are used; the rest are zero and restored on load.
    tensors.update({f"tiny_dictionary.{k}": v if v.ndim == 1 else np.ascontiguousarray(v[:, :TINY_SLOTS])
                    for k, v in tiny.items()})
    meta["tiny_dictionary"] = json.loads(tiny_meta["qmoe_codec"])
    GOLDEN.parent.mkdir(exist_ok=True)
    save_file(tensors, str(GOLDEN) + ".safetensors")
    pathlib.Path(str(GOLDEN) + ".json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def test_golden_vectors_byte_for_byte():
    from safetensors.numpy import load_file

    stored = load_file(str(GOLDEN) + ".safetensors")
    meta = json.loads(pathlib.Path(str(GOLDEN) + ".json").read_text())
    assert meta["format_version"] == codec.FORMAT_VERSION
    t, encodings = _golden_encodings()
    np.testing.assert_array_equal(stored["ternary"], t)
    tiny_tensors = {k.split(".", 1)[1]: v for k, v in stored.items() if k.startswith("tiny_dictionary.")}
    for name in ("entry_length", "entry_nonzero", "entry_negative"):
        tiny_tensors[name] = np.pad(tiny_tensors[name], ((0, 0), (0, 65536 - TINY_SLOTS)))
    tiny = codec.Dictionary.from_tensors(tiny_tensors, meta["tiny_dictionary"])
    assert tiny.fingerprint == _tiny_dictionary().fingerprint
    for name, enc in encodings.items():
        assert enc.dictionary.fingerprint == meta["fingerprints"][name], f"{name} dictionary drifted"
        for field in ("codewords", "row_offsets", "row_class", "scales"):
            a, b = stored[f"{name}.{field}"], getattr(enc, field)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{name}.{field} drifted"
        dictionary = tiny if name == "tiny" else enc.dictionary
        from_file = codec.EncodedMatrix(7, 45, stored[f"{name}.codewords"], stored[f"{name}.row_offsets"],
                                        stored[f"{name}.row_class"], stored[f"{name}.scales"], dictionary)
        np.testing.assert_array_equal(codec.decode(from_file), stored["ternary"])


if __name__ == "__main__" and "--write-golden" in sys.argv:
    _write_golden()

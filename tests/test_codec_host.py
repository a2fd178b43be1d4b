"""The kernel's shared decode header (codec/qmoe_codec.h), built for the host as qmoe._codec_host,
checked against qmoe.codec's decoder, dense matmul and plain-Python definitions of the format."""

import numpy as np
import pytest

from qmoe import codec, ops
from qmoe.codec.dictionary import tunstall_dictionary

host = pytest.importorskip("qmoe._codec_host", reason="native extension not built (pip install -e .)")


@pytest.fixture(scope="module")
def dictionary():
    # Small classes (4095 entries) build in a fraction of a second and still have long, overshooting
    # entries in the sparse class and many short ones in the dense class.
    return tunstall_dictionary([[0.05, 0.90, 0.05], [0.2, 0.6, 0.2], [0.4, 0.2, 0.4]], max_entries=4095)


def random_ternary(rng, rows, cols):
    """Rows of different sparsity, so the encoder picks different classes."""
    p_zero = rng.uniform(0.3, 0.97, size=(rows, 1))
    u = rng.random((rows, cols))
    w = np.where(u < p_zero, 0, np.where(rng.random((rows, cols)) < 0.5, -1, 1))
    return w.astype(np.int8)


def random_scales(rng, rows):
    a = -rng.uniform(0.01, 1.0, rows)
    b = rng.uniform(0.01, 1.0, rows)
    return np.stack([a, b], axis=1).astype(np.float32)


def plain_pext(nonzero, negative):
    """Signs of the nonzeros, compacted in symbol order: bit i = sign of the i-th nonzero."""
    signs, rank = 0, 0
    for bit in range(64):
        if (nonzero >> bit) & 1:
            signs |= ((negative >> bit) & 1) << rank
            rank += 1
    return signs


def random_entries(rng, n):
    """Random valid entries (length 1..64, <= 32 nonzeros, negative a subset of nonzero)."""
    length = rng.integers(1, 65, size=n).astype(np.uint8)
    nonzero = np.zeros(n, dtype=np.uint64)
    negative = np.zeros(n, dtype=np.uint64)
    for i in range(n):
        k = int(rng.integers(0, min(32, int(length[i])) + 1))
        bits = rng.choice(int(length[i]), size=k, replace=False)
        for bit in bits:
            nonzero[i] |= np.uint64(1) << np.uint64(bit)
            if rng.random() < 0.5:
                negative[i] |= np.uint64(1) << np.uint64(bit)
    return length, nonzero, negative


def test_pack_entry_matches_plain_pext_and_ops_pack_dictionary():
    rng = np.random.default_rng(0)
    length, nonzero, negative = (np.zeros((1, 1 << 16), dtype=d) for d in (np.uint8, np.uint64, np.uint64))
    n = 3000
    length[0, :n], nonzero[0, :n], negative[0, :n] = random_entries(rng, n)
    # Edge entries: all 64 symbols, 32 nonzeros at the top (all negative); one symbol.
    top = np.uint64(0xFFFFFFFF00000000)
    length[0, n], nonzero[0, n], negative[0, n] = 64, top, top
    length[0, n + 1], nonzero[0, n + 1], negative[0, n + 1] = 1, 1, 0

    from_header = host.pack_entries(length, nonzero, negative)  # int64 [1, 65536, 2]
    from_ops = ops.pack_dictionary(length, nonzero, negative)
    np.testing.assert_array_equal(from_header, from_ops)

    words = from_header.view(np.uint64)
    for i in list(range(0, n, 97)) + [n, n + 1]:
        assert int(words[0, i, 0]) == int(nonzero[0, i])
        assert int(words[0, i, 1]) & 0xFFFFFFFF == plain_pext(int(nonzero[0, i]), int(negative[0, i]))
        assert int(words[0, i, 1]) >> 32 == int(length[0, i])


def test_entry_is_valid_matches_the_format_rules():
    def rule(length, nonzero, negative):  # FORMAT.md 2.1 invariant 2, written out
        return (1 <= length <= 64 and nonzero >> length == 0 and negative & ~nonzero == 0
                and bin(nonzero).count("1") <= 32)

    cases = [(1, 0, 0), (1, 1, 1), (0, 0, 0), (65, 0, 0), (3, 0b1000, 0), (3, 0b101, 0b010), (64, (1 << 64) - 1, 0),
             (64, (1 << 32) - 1, (1 << 32) - 1), (64, (1 << 33) - 1, 0), (40, 1 << 39, 1 << 39), (40, 1 << 40, 0)]
    length = np.array([c[0] for c in cases], dtype=np.uint8)
    nonzero = np.array([c[1] for c in cases], dtype=np.uint64)
    negative = np.array([c[2] for c in cases], dtype=np.uint64)
    got = host.entry_is_valid(length, nonzero, negative)
    assert got.tolist() == [rule(*c) for c in cases]


def packed(dictionary):
    return ops.pack_dictionary(dictionary.entry_length, dictionary.entry_nonzero, dictionary.entry_negative)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 5), (5, 64), (4, 65), (118, 300), (6, 2080)])
def test_decode_rows_equals_codec_decode(dictionary, rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    enc = codec.encode(random_ternary(rng, rows, cols), dictionary=dictionary)
    decoded, symbols, valid = host.decode_rows(enc.codewords, enc.row_offsets, enc.row_class, packed(dictionary), cols)
    np.testing.assert_array_equal(decoded, codec.decode(enc))
    assert valid.all()
    # Every row covered, and only its last codeword overshoots (FORMAT.md 2.2 invariant 4).
    for r in range(rows):
        row_lengths = dictionary.entry_length[enc.row_class[r], enc.codewords[enc.row_offsets[r]:enc.row_offsets[r + 1]]]
        assert symbols[r] == int(row_lengths.astype(np.int64).sum())
        assert symbols[r] >= cols > symbols[r] - int(row_lengths[-1])


@pytest.mark.parametrize("tile", [1, 7, 64, 128, 5000])
def test_tiled_decode_equals_codec_decode(dictionary, tile):
    # The tensor-core path decodes window by window, re-expanding codewords that straddle a window edge.
    rng = np.random.default_rng(tile)
    rows, cols = 23, 517
    enc = codec.encode(random_ternary(rng, rows, cols), dictionary=dictionary)
    decoded = host.decode_rows_tiled(enc.codewords, enc.row_offsets, enc.row_class, packed(dictionary), cols, tile)
    np.testing.assert_array_equal(decoded, codec.decode(enc))


@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 17])
def test_row_dot_equals_dense_matmul(dictionary, tokens):
    rng = np.random.default_rng(tokens)
    rows, cols = 37, 517
    scales = random_scales(rng, rows)
    enc = codec.encode(random_ternary(rng, rows, cols), scales=scales, dictionary=dictionary)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    y = host.row_dot(x, enc.codewords, enc.row_offsets, enc.row_class, enc.scales_float(), packed(dictionary), cols)
    dense = codec.dequantize(enc).astype(np.float64)  # [rows, cols]
    np.testing.assert_allclose(y, x.astype(np.float64) @ dense.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, codec.matmul(x, enc), rtol=1e-5, atol=1e-5)


def test_corrupt_row_offsets_are_clamped_not_read(dictionary):
    rng = np.random.default_rng(7)
    rows, cols = 4, 200
    enc = codec.encode(random_ternary(rng, rows, cols), dictionary=dictionary)
    good, _, _ = host.decode_rows(enc.codewords, enc.row_offsets, enc.row_class, packed(dictionary), cols)
    offsets = enc.row_offsets.copy()
    offsets[2] = offsets[1] - 1  # row 1 runs backwards (row 2 then starts early but stays in bounds)
    offsets[4] = offsets[4] + 10_000  # row 3 points past the stream
    decoded, _, valid = host.decode_rows(enc.codewords, offsets, enc.row_class, packed(dictionary), cols)
    assert valid.tolist() == [True, False, True, False]
    assert not decoded[~valid].any()  # invalid rows decode to zeros
    np.testing.assert_array_equal(decoded[0], good[0])


def test_bad_class_and_empty_matrix(dictionary):
    table = packed(dictionary)
    with pytest.raises(ValueError, match=r"row_class\[0\] = 9"):
        host.decode_rows(np.zeros(1, np.uint16), np.array([0, 1], np.uint32), np.array([9], np.uint8), table, 4)
    decoded, symbols, valid = host.decode_rows(np.zeros(0, np.uint16), np.zeros(1, np.uint32), np.zeros(0, np.uint8),
                                               table, 5)
    assert decoded.shape == (0, 5) and symbols.shape == (0,) and valid.shape == (0,)


def test_decode_rows_with_the_qmoe_pair_dictionary():
    # Pair-mode entries (runs of 2..28 symbols, odd widths padded) against the codec's decoder.
    dictionary = codec.qmoe_dictionary()
    rng = np.random.default_rng(11)
    rows, cols = 9, 777
    enc = codec.encode(random_ternary(rng, rows, cols), dictionary=dictionary)
    decoded, _, valid = host.decode_rows(enc.codewords, enc.row_offsets, enc.row_class, packed(dictionary), cols)
    assert valid.all()
    np.testing.assert_array_equal(decoded, codec.decode(enc))

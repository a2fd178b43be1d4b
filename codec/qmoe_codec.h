// Shared decode logic for the qmoe dictionary codec (see codec/FORMAT.md, normative).
//
// Everything here is `__host__ __device__` and header-only, so the CUDA kernels in cuda/ and the host
// test build (cuda/host_binding.cpp -> qmoe._codec_host) run the very same arithmetic: a CPU test of
// this header is a test of the kernel's decode.
//
// Format recap (FORMAT.md is authoritative):
//   * A dictionary has K classes of 65536 entries. Entry i of class k expands to `length` ternary
//     symbols (1..64): bit j of `nonzero` (LSB = first symbol) marks a nonzero symbol, bit j of
//     `negative` (a subset of `nonzero`) marks it as -1. popcount(nonzero) <= 32.
//   * A matrix row r is the concatenation of the expansions of codewords
//     codewords[row_offsets[r] : row_offsets[r+1]] in dictionary class row_class[r], cut to `cols`
//     symbols (only the last codeword may overshoot). Symbol -1 means scales[r][0] (a <= 0), +1 means
//     scales[r][1] (b >= 0), 0 means 0.
//
// For the GPU an entry is repacked once into 16 bytes (`PackedEntry`): the nonzero mask, the signs of
// the nonzeros squeezed together (bit j = sign of the j-th nonzero, which fits 32 bits because an entry
// has at most 32 nonzeros) and the length. One aligned 16-byte load then fetches a whole entry.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define QMOE_HD __host__ __device__ __forceinline__
#else
#define QMOE_HD inline
#endif

// Unrolling is for the device pass only; host compilers warn about the unknown pragma.
#if defined(__CUDA_ARCH__)
#define QMOE_UNROLL _Pragma("unroll")
#else
#define QMOE_UNROLL
#endif

namespace qmoe {

constexpr int kEntriesPerClass = 65536;  // 16-bit codewords
constexpr int kMaxEntryLength = 64;      // symbols per entry
constexpr int kMaxEntryNonzeros = 32;    // nonzero symbols per entry

// One dictionary entry as the decoder reads it. 16 bytes, 16-byte aligned; the Python side builds it
// as int64 pairs [nonzero, signs | length << 32] (little endian), see qmoe.ops.pack_dictionary.
struct alignas(16) PackedEntry {
  uint64_t nonzero;  // bit j set: symbol j is nonzero
  uint32_t signs;    // bit i set: the i-th nonzero (in symbol order) is -1
  uint32_t length;   // symbols in the expansion, 1..64 (0 marks an unused dictionary slot)
};

QMOE_HD int popcount64(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return __popcll(v);
#else
  return __builtin_popcountll(v);
#endif
}

// Index of the lowest set bit; v must be nonzero.
QMOE_HD int lowest_bit64(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(v)) - 1;
#else
  return __builtin_ctzll(v);
#endif
}

// Mask of the low `n` bits, n in 0..64 (a plain shift by 64 is undefined).
QMOE_HD uint64_t low_mask64(int n) { return n >= 64 ? ~0ull : ((1ull << n) - 1ull); }

// True when (length, nonzero, negative) is a well-formed entry: 1 <= length <= 64, no mask bit at or
// beyond `length`, negative a subset of nonzero, at most 32 nonzeros.
QMOE_HD bool entry_is_valid(uint32_t length, uint64_t nonzero, uint64_t negative) {
  if (length < 1 || length > static_cast<uint32_t>(kMaxEntryLength)) return false;
  if ((nonzero & ~low_mask64(static_cast<int>(length))) != 0) return false;
  if ((negative & ~nonzero) != 0) return false;
  return popcount64(nonzero) <= kMaxEntryNonzeros;
}

// Packs one entry (a software PEXT of `negative` by `nonzero`). The entry must satisfy entry_is_valid.
QMOE_HD PackedEntry pack_entry(uint32_t length, uint64_t nonzero, uint64_t negative) {
  uint32_t signs = 0;
  int rank = 0;
  for (uint64_t m = nonzero; m != 0; m &= m - 1, ++rank) {
    if ((negative >> lowest_bit64(m)) & 1ull) signs |= 1u << rank;
  }
  PackedEntry e;
  e.nonzero = nonzero;
  e.signs = signs;
  e.length = length;
  return e;
}

// Calls f(col, is_negative) for every nonzero symbol of `e` whose column, first_col + position, lies
// in [col_begin, col_end). Symbols beyond col_end are the overshoot of a row's last codeword (or belong
// to the next tile) and are skipped; symbols before col_begin were handled by an earlier tile.
template <class F>
QMOE_HD void for_each_nonzero(const PackedEntry& e, int64_t first_col, int64_t col_begin, int64_t col_end,
                              F&& f) {
  uint64_t m = e.nonzero;
  uint32_t signs = e.signs;
  while (m != 0) {
    const int64_t col = first_col + lowest_bit64(m);
    if (col >= col_end) break;  // positions only grow from here
    if (col >= col_begin) f(col, (signs & 1u) != 0);
    m &= m - 1;
    signs >>= 1;
  }
}

// The codeword range of one row, after checking it against the stream it indexes.
struct RowRange {
  int64_t begin;  // first codeword (absolute index into the stream)
  int64_t end;    // one past the last codeword
  bool valid;     // false: offsets decrease or point outside [0, stream_length]
};

// Row-validation arithmetic: row r's codewords are [base + offsets[r], base + offsets[r+1]). A range
// that runs backwards or past the stream is reported invalid and clamped to empty, so a decoder fed a
// corrupt matrix never reads outside the codeword stream.
QMOE_HD RowRange row_range(const uint32_t* offsets, int64_t r, int64_t base, int64_t stream_length) {
  const int64_t lo = base + static_cast<int64_t>(offsets[r]);
  const int64_t hi = base + static_cast<int64_t>(offsets[r + 1]);
  RowRange out;
  out.valid = lo <= hi && lo >= 0 && hi <= stream_length;
  out.begin = out.valid ? lo : 0;
  out.end = out.valid ? hi : 0;
  return out;
}

// Scalar decode of one row into out[0:cols] as -1/0/+1. `table` is the row's dictionary class
// (kEntriesPerClass packed entries). Returns the number of symbols the codewords expand to before the
// cut, so the caller can check the row is complete (>= cols) and that only the last codeword overshoots
// (symbols - last codeword's length < cols); out is zero wherever the row runs short.
QMOE_HD int64_t decode_row(const uint16_t* codewords, RowRange range, const PackedEntry* table, int64_t cols,
                           int8_t* out) {
  for (int64_t c = 0; c < cols; ++c) out[c] = 0;
  int64_t col = 0;
  for (int64_t i = range.begin; i < range.end; ++i) {
    const PackedEntry e = table[codewords[i]];
    for_each_nonzero(e, col, 0, cols, [&](int64_t c, bool negative) { out[c] = negative ? -1 : 1; });
    col += e.length;
  }
  return col;
}

// A row's decode position for tiled decoding: the next codeword to expand, its first column and its
// entry (already fetched). Tiles are visited left to right; see decode_window.
struct RowCursor {
  int64_t index;
  int64_t col;
  PackedEntry current;
};

// Starts a cursor at the row's first codeword. `load(i)` returns the entry of codeword i.
template <class Load>
QMOE_HD RowCursor row_cursor(RowRange range, Load&& load) {
  RowCursor c;
  c.index = range.begin;
  c.col = 0;
  c.current = PackedEntry{0, 0, 0};
  if (range.begin < range.end) c.current = load(range.begin);
  return c;
}

// Expands the row's symbols in columns [k0, k_end) (k0 = the previous window's k_end, or 0), calling
// emit(col, is_negative) for each nonzero, and advances the cursor. A codeword that reaches past k_end
// stays at the cursor and is expanded again by the next window, which keeps only its remaining columns.
// The next codeword's entry is fetched before the current one is expanded, so on the GPU its load
// latency overlaps the expansion. Entries of length 0 (unused slots, only in corrupt data) still advance.
template <class Load, class Emit>
QMOE_HD void decode_window(RowCursor& c, RowRange range, int64_t k0, int64_t k_end, Load&& load, Emit&& emit) {
  while (c.index < range.end && c.col < k_end) {
    PackedEntry next{0, 0, 0};
    if (c.index + 1 < range.end) next = load(c.index + 1);
    for_each_nonzero(c.current, c.col, k0, k_end, emit);
    if (c.col + c.current.length > k_end) break;
    c.col += c.current.length;
    ++c.index;
    c.current = next;
  }
}

// Dot products of one row with n_tokens activation vectors, split by sign: pos[t] += sum of x[t][c]
// over +1 symbols, neg[t] += sum over -1 symbols, for the symbols of entry `e` starting at column
// first_col (cut at cols). The row's output is then a * neg + b * pos. `load(t, c)` returns x[t][c] as
// float; kTokens is the register-array size, n_tokens <= kTokens the live count.
template <int kTokens, class Load>
QMOE_HD void accumulate_entry(const PackedEntry& e, int64_t first_col, int64_t cols, int n_tokens, Load&& load,
                              float (&pos)[kTokens], float (&neg)[kTokens]) {
  for_each_nonzero(e, first_col, 0, cols, [&](int64_t c, bool negative) {
QMOE_UNROLL
    for (int t = 0; t < kTokens; ++t) {
      if (t < n_tokens) {
        const float v = load(t, c);
        if (negative) {
          neg[t] += v;
        } else {
          pos[t] += v;
        }
      }
    }
  });
}

// Scalar reference of a whole row's dot products (the host build's per-row product; the kernel runs the
// same accumulate_entry warp-parallel). Writes y[t] = a * neg[t] + b * pos[t] for t < n_tokens.
template <int kTokens, class Load>
QMOE_HD void row_dot(const uint16_t* codewords, RowRange range, const PackedEntry* table, int64_t cols, float a,
                     float b, int n_tokens, Load&& load, float* y) {
  float pos[kTokens];
  float neg[kTokens];
  for (int t = 0; t < kTokens; ++t) pos[t] = neg[t] = 0.0f;
  int64_t col = 0;
  for (int64_t i = range.begin; i < range.end && col < cols; ++i) {
    const PackedEntry e = table[codewords[i]];
    accumulate_entry<kTokens>(e, col, cols, n_tokens, load, pos, neg);
    col += e.length;
  }
  for (int t = 0; t < n_tokens; ++t) y[t] = a * neg[t] + b * pos[t];
}

}  // namespace qmoe

// Decode+GEMM for qmoe's dictionary-coded ternary weights: y = x @ W^T for every expert of a MoE layer in
// one call, W never materialised in global memory.
//
// Three kernels, all launched on the caller's stream without any host synchronisation (CUDA-graph safe):
//
// 1. build_work_items: one block reads token_offsets and writes two compact work lists, skipping experts
//    without tokens. Experts with few tokens get GEMV items of up to kTokens tokens; experts with at
//    least kTileMinTokens tokens get tile items of up to kTileTokens tokens. A lone expert without
//    tensor-core work (a single matrix) skips it: gemv_kernel derives its items from the token count.
// 2. gemv_kernel (few tokens per expert): one warp per weight row. Each lane fetches one codeword's
//    16-byte dictionary entry; a warp prefix sum of entry lengths gives each lane its first column; the
//    lane then walks only its entry's nonzeros, adding x[t][col] into a positive or a negative sum for
//    all kTokens tokens of the item at once (one decode serves them all). The row result is
//    a * S_neg + b * S_pos, fp32 throughout. When a block's warps each cover several rows, x is staged
//    in shared memory transposed, [col][token], so a nonzero's kTokens activations sit together.
// 3. tile_kernel (many tokens per expert): a block owns kTileRows weight rows and kTileTokens tokens. It
//    walks K in kTileK-wide chunks: each thread decodes its own row's chunk into a shared-memory tile of
//    scaled bf16/fp16 values (a, 0, b), then tensor cores (wmma m16n16k16, fp32 accumulate) multiply the
//    token tile by it, so one decode is amortised over up to kTileTokens tokens.
//
// The decode arithmetic (entry expansion, column cut, row ranges, per-entry dot products) is the shared
// header codec/qmoe_codec.h, which the host test build runs against qmoe.codec's decoder.
//
// Corrupt inputs never cause out-of-bounds reads: expert and row codeword ranges are checked against the
// stream and classes against the dictionary (such rows produce zeros), and token_offsets that do not
// partition the tokens make all of y zero. Validating the format is the loader's job (qmoe.codec, and
// the CPU implementation of the op): reporting from here would need a host synchronisation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdio>
#include <type_traits>

#include "qmoe_codec.h"
#include "ternary_gemm.h"

namespace {

using qmoe::PackedEntry;

constexpr unsigned kFullMask = 0xffffffffu;

// GEMV path.
constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int64_t kMaxStageBytes = 48 * 1024;  // x staging without the >48 KiB opt-in
constexpr int64_t kStageMinRowsPerWarp = 4;     // stage x only when each warp reuses it this often
constexpr int kBatchRounds = 8;                 // codeword rounds fetched at once (256 codewords ~ 6K columns)

// Tile path. 64 rows x 64 tokens keeps both bf16 tiles plus padding at 34 KiB of static shared memory.
constexpr int kTileRows = 64;                 // weight rows per block, one decoding thread each
constexpr int kTileThreads = kTileRows;       // two warps; warp w multiplies rows [32w, 32w + 32)
constexpr int kTileTokens = 64;               // tokens per tile item
constexpr int kTileK = 128;                   // columns decoded per step
constexpr int kTilePad = 8;                   // keeps wmma rows 16-byte aligned and spreads banks
constexpr int kTileLd = kTileK + kTilePad;    // leading dimension of the x and W tiles (elements)
constexpr int kTileOutLd = kTileRows + 4;     // leading dimension of the fp32 output tile
// Experts with this many tokens use tensor cores; below it the GEMV path does less work per token.
constexpr int kTileMinTokens = 16;

struct WorkItem {
  int32_t expert;
  int32_t n_tokens;
  int64_t token_start;
};
static_assert(sizeof(WorkItem) == 16, "WorkItem is 16 bytes");

// Everything about the compressed layer, shared by both GEMM kernels.
struct Layer {
  const uint16_t* codewords;
  int64_t n_codewords;
  const int64_t* expert_offsets;
  const uint32_t* row_offsets;
  const uint8_t* row_class;
  const __nv_bfloat16* scales;
  const PackedEntry* entries;
  int num_classes;
  int64_t rows;
  int64_t cols;
};

// One row's decode state: its codeword range, dictionary class table and scales.
struct RowSource {
  qmoe::RowRange range;
  const PackedEntry* table;
  float a;  // value of -1
  float b;  // value of +1
};

__device__ __forceinline__ RowSource row_source(const Layer& L, int64_t expert, int64_t r) {
  int64_t base = L.expert_offsets[expert];
  int64_t limit = L.expert_offsets[expert + 1];
  if (!(0 <= base && base <= limit && limit <= L.n_codewords)) base = limit = 0;  // corrupt expert: empty
  RowSource s;
  s.range = qmoe::row_range(L.row_offsets + expert * (L.rows + 1), r, base, limit);
  const int cls = L.row_class[expert * L.rows + r];
  if (cls >= L.num_classes) s.range.begin = s.range.end = 0;
  s.table = L.entries + static_cast<int64_t>(cls < L.num_classes ? cls : 0) * qmoe::kEntriesPerClass;
  const __nv_bfloat16* ab = L.scales + 2 * (expert * L.rows + r);
  s.a = __bfloat162float(ab[0]);
  s.b = __bfloat162float(ab[1]);
  return s;
}

// The dictionary is read-only and small enough to stay in L2 (1 MiB per class): one 16-byte read-only
// load per codeword.
__device__ __forceinline__ PackedEntry load_entry(const PackedEntry* table, uint16_t codeword) {
  const ulonglong2 v = __ldg(reinterpret_cast<const ulonglong2*>(table + codeword));
  PackedEntry e;
  e.nonzero = v.x;
  e.signs = static_cast<uint32_t>(v.y);
  e.length = static_cast<uint32_t>(v.y >> 32);
  return e;
}

template <class T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Splits every expert's token range into work items. A single block: E is at most a few thousand and the
// kernel runs once per layer call, so a block-wide shared-memory counter beats a multi-block scan.
//
// counts[2] is set when token_offsets is not a valid partition of the tokens (0 first, total last,
// non-decreasing): then no items are emitted and gemv_kernel zero-fills y, so malformed offsets give a
// defined all-zero result rather than unwritten memory, without a memset on every (valid) call.
__global__ void build_work_items(const int64_t* token_offsets, int64_t num_experts, int64_t total_tokens,
                                 int gemv_tokens, int tile_min_tokens, WorkItem* gemv_items, int gemv_capacity,
                                 WorkItem* tile_items, int tile_capacity, int* counts) {
  __shared__ int n_gemv;
  __shared__ int n_tile;
  if (threadIdx.x == 0) {
    n_gemv = 0;
    n_tile = 0;
  }
  int bad = threadIdx.x == 0 && (token_offsets[0] != 0 || token_offsets[num_experts] != total_tokens);
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) bad |= token_offsets[e] > token_offsets[e + 1];
  if (__syncthreads_or(bad)) {
    if (threadIdx.x == 0) {
      counts[0] = 0;
      counts[1] = 0;
      counts[2] = 1;
    }
    return;
  }
  for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) {
    const int64_t start = token_offsets[e];
    const int64_t end = token_offsets[e + 1];
    if (start == end) continue;  // expert without tokens
    const int64_t n = end - start;
    const bool tile = n >= tile_min_tokens;
    const int per_item = tile ? kTileTokens : gemv_tokens;
    const int k = static_cast<int>((n + per_item - 1) / per_item);
    const int first = atomicAdd(tile ? &n_tile : &n_gemv, k);
    WorkItem* items = tile ? tile_items : gemv_items;
    const int capacity = tile ? tile_capacity : gemv_capacity;
    for (int i = 0; i < k && first + i < capacity; ++i) {
      WorkItem w;
      w.expert = static_cast<int32_t>(e);
      w.token_start = start + static_cast<int64_t>(i) * per_item;
      w.n_tokens = static_cast<int32_t>(min(static_cast<int64_t>(per_item), end - w.token_start));
      items[first + i] = w;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    counts[0] = min(n_gemv, gemv_capacity);
    counts[1] = min(n_tile, tile_capacity);
    counts[2] = 0;
  }
}

// Where gemv_kernel finds its work items: the list build_work_items wrote or, for a lone expert with no
// tensor-core work (a single matrix), computed in place, which saves the builder's launch at batch 1.
struct GemvWork {
  const WorkItem* items;         // list mode: the GEMV list ...
  const int* counts;             // ... and the builder's counts
  const int64_t* token_offsets;  // direct mode: [2], must be {0, total_tokens}
  int64_t total_tokens;
  bool direct;
};

// GEMV path; see the file comment. Work unit = (item, block of rows_per_block rows), grid-stride so the
// grid can be sized before the number of items (known only on the device) is.
template <class T, int kTokens>
__global__ void __launch_bounds__(kGemvThreads, 2)
    gemv_kernel(const T* __restrict__ x, T* __restrict__ y, Layer L, GemvWork work, int64_t rows_per_block,
                bool stage_x) {
  const bool malformed = work.direct
                             ? (work.token_offsets[0] != 0 || work.token_offsets[1] != work.total_tokens)
                             : work.counts[2] != 0;
  if (malformed) {  // token_offsets do not partition the tokens: define y as zeros (see build_work_items)
    const int64_t n = work.total_tokens * L.rows;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      y[i] = from_float<T>(0.0f);
    }
    return;
  }
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* x_stage = reinterpret_cast<T*>(smem_raw);  // [cols][kTokens]
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row_blocks = (L.rows + rows_per_block - 1) / rows_per_block;
  const int64_t n_items = work.direct ? (work.total_tokens + kTokens - 1) / kTokens : work.counts[0];
  const int64_t units = n_items * row_blocks;

  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    WorkItem item;
    if (work.direct) {
      item.expert = 0;
      item.token_start = unit / row_blocks * kTokens;
      item.n_tokens = static_cast<int32_t>(min(static_cast<int64_t>(kTokens), work.total_tokens - item.token_start));
    } else {
      item = work.items[unit / row_blocks];
    }
    const int64_t row_begin = (unit % row_blocks) * rows_per_block;
    const int64_t row_end = min(L.rows, row_begin + rows_per_block);
    const T* x_item = x + item.token_start * L.cols;

    // Generic addressing: the same loads read the staged copy or, for rows too long to stage, global x.
    const T* xs = x_item;
    int64_t ld_token = L.cols;
    int64_t ld_col = 1;
    if (stage_x) {
      __syncthreads();  // the previous unit's warps are done reading the stage
      for (int t = 0; t < item.n_tokens; ++t) {
        for (int64_t c = threadIdx.x; c < L.cols; c += kGemvThreads) x_stage[c * kTokens + t] = x_item[t * L.cols + c];
      }
      __syncthreads();
      xs = x_stage;
      ld_token = 1;
      ld_col = kTokens;
    }
    auto load = [&](int t, int64_t c) { return to_float(xs[t * ld_token + c * ld_col]); };

    for (int64_t r = row_begin + warp; r < row_end; r += kGemvWarps) {
      const RowSource src = row_source(L, item.expert, r);
      float pos[kTokens];
      float neg[kTokens];
#pragma unroll
      for (int t = 0; t < kTokens; ++t) pos[t] = neg[t] = 0.0f;

      // Rounds of 32 codewords, one per lane. The codewords of kBatchRounds rounds are fetched together
      // (independent loads: the row pays DRAM latency once per batch, not once per round), and each round
      // prefetches the next round's dictionary entry so its L2 latency overlaps the round's work.
      int64_t col = 0;  // first column of the current round; warp-uniform
      for (int64_t batch = src.range.begin; batch < src.range.end && col < L.cols; batch += 32 * kBatchRounds) {
        uint16_t cw[kBatchRounds];
#pragma unroll
        for (int j = 0; j < kBatchRounds; ++j) {
          const int64_t idx = batch + 32 * j + lane;
          cw[j] = idx < src.range.end ? L.codewords[idx] : uint16_t{0};
        }
        PackedEntry e{0, 0, 0};
        if (batch + lane < src.range.end) e = load_entry(src.table, cw[0]);
#pragma unroll
        for (int j = 0; j < kBatchRounds; ++j) {
          if (batch + 32 * j >= src.range.end || col >= L.cols) break;  // warp-uniform
          PackedEntry next{0, 0, 0};
          const int jn = j + 1 < kBatchRounds ? j + 1 : j;
          if (j + 1 < kBatchRounds && batch + 32 * jn + lane < src.range.end) next = load_entry(src.table, cw[jn]);
          int end_col = static_cast<int>(e.length);  // inclusive prefix sum of lengths over the lanes
#pragma unroll
          for (int d = 1; d < 32; d <<= 1) {
            const int v = __shfl_up_sync(kFullMask, end_col, d);
            if (lane >= d) end_col += v;
          }
          qmoe::accumulate_entry<kTokens>(e, col + end_col - static_cast<int>(e.length), L.cols, item.n_tokens,
                                          load, pos, neg);
          col += __shfl_sync(kFullMask, end_col, 31);
          e = next;
        }
      }

#pragma unroll
      for (int t = 0; t < kTokens; ++t) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
          pos[t] += __shfl_xor_sync(kFullMask, pos[t], off);
          neg[t] += __shfl_xor_sync(kFullMask, neg[t], off);
        }
      }
      if (lane == 0) {
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          if (t < item.n_tokens) y[(item.token_start + t) * L.rows + r] = from_float<T>(src.a * neg[t] + src.b * pos[t]);
        }
      }
    }
  }
}

// Tile path; see the file comment. Work unit = (item of <= kTileTokens tokens, block of kTileRows rows).
template <class T>
__global__ void __launch_bounds__(kTileThreads)
    tile_kernel(const T* __restrict__ x, T* __restrict__ y, Layer L, const WorkItem* __restrict__ items,
                const int* __restrict__ counts) {
  namespace wmma = nvcuda::wmma;
  constexpr int kXTileBytes = kTileTokens * kTileLd * sizeof(T);
  constexpr int kWTileBytes = kTileRows * kTileLd * sizeof(T);
  static_assert(kTileTokens * kTileOutLd * sizeof(float) <= kXTileBytes + kWTileBytes,
                "the output tile aliases the input tiles");
  static_assert(kXTileBytes % 128 == 0 && kWTileBytes % 16 == 0, "tile alignment");
  __shared__ __align__(128) unsigned char smem[kXTileBytes + kWTileBytes];
  T* x_tile = reinterpret_cast<T*>(smem);                 // [kTileTokens][kTileLd]
  T* w_tile = reinterpret_cast<T*>(smem + kXTileBytes);   // [kTileRows][kTileLd], row-major = W^T col-major
  float* out_tile = reinterpret_cast<float*>(smem);       // [kTileTokens][kTileOutLd], after the K loop

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t row_blocks = (L.rows + kTileRows - 1) / kTileRows;
  const int64_t units = static_cast<int64_t>(counts[1]) * row_blocks;

  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const WorkItem item = items[unit / row_blocks];
    const int64_t row_base = (unit % row_blocks) * kTileRows;
    const int64_t my_row = row_base + tid;

    RowSource src{{0, 0, false}, L.entries, 0.0f, 0.0f};
    if (my_row < L.rows) src = row_source(L, item.expert, my_row);
    const T value_neg = from_float<T>(src.a);
    const T value_pos = from_float<T>(src.b);
    auto load = [&](int64_t i) { return load_entry(src.table, L.codewords[i]); };
    qmoe::RowCursor cursor = qmoe::row_cursor(src.range, load);  // carried across K steps

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTileTokens / 16][2];
#pragma unroll
    for (int m = 0; m < kTileTokens / 16; ++m) {
      wmma::fill_fragment(acc[m][0], 0.0f);
      wmma::fill_fragment(acc[m][1], 0.0f);
    }

    for (int64_t k0 = 0; k0 < L.cols; k0 += kTileK) {
      const int64_t k_end = min(L.cols, k0 + kTileK);
      __syncthreads();  // previous step's (or unit's) tensor-core reads of both tiles are done

      // Zero the W tile (the decode writes only nonzeros) and load the token tile, zero-padded.
      uint4* w_words = reinterpret_cast<uint4*>(w_tile);
      for (int i = tid; i < kWTileBytes / 16; i += kTileThreads) w_words[i] = make_uint4(0, 0, 0, 0);
      for (int t = 0; t < kTileTokens; ++t) {
        const bool live = t < item.n_tokens;
        for (int c = tid; c < kTileK; c += kTileThreads) {
          x_tile[t * kTileLd + c] = (live && k0 + c < k_end) ? x[(item.token_start + t) * L.cols + k0 + c]
                                                             : from_float<T>(0.0f);
        }
      }
      __syncthreads();

      // Scatter this row's nonzeros in [k0, k_end) into the zeroed tile row.
      T* w_row = w_tile + tid * kTileLd;
      qmoe::decode_window(cursor, src.range, k0, k_end, load,
                          [&](int64_t c, bool negative) { w_row[c - k0] = negative ? value_neg : value_pos; });
      __syncthreads();

#pragma unroll
      for (int kk = 0; kk < kTileK; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
        wmma::load_matrix_sync(b[0], w_tile + (warp * 32) * kTileLd + kk, kTileLd);
        wmma::load_matrix_sync(b[1], w_tile + (warp * 32 + 16) * kTileLd + kk, kTileLd);
#pragma unroll
        for (int m = 0; m < kTileTokens / 16; ++m) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::load_matrix_sync(a, x_tile + (m * 16) * kTileLd + kk, kTileLd);
          wmma::mma_sync(acc[m][0], a, b[0], acc[m][0]);
          wmma::mma_sync(acc[m][1], a, b[1], acc[m][1]);
        }
      }
    }

    __syncthreads();  // all tensor-core reads done before the output tile overwrites the inputs
#pragma unroll
    for (int m = 0; m < kTileTokens / 16; ++m) {
      wmma::store_matrix_sync(out_tile + (m * 16) * kTileOutLd + warp * 32, acc[m][0], kTileOutLd, wmma::mem_row_major);
      wmma::store_matrix_sync(out_tile + (m * 16) * kTileOutLd + warp * 32 + 16, acc[m][1], kTileOutLd,
                              wmma::mem_row_major);
    }
    __syncthreads();
    if (my_row < L.rows) {
      for (int t = 0; t < item.n_tokens; ++t) {
        y[(item.token_start + t) * L.rows + my_row] = from_float<T>(out_tile[t * kTileOutLd + tid]);
      }
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------------

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Tokens per GEMV item: the smallest power of two covering the mean tokens of an active expert, so a
// batch-1 product does not pay for 8 token slots and a layer with 4-6 tokens per expert decodes once.
int gemv_tokens_for(int64_t num_experts, int64_t total_tokens) {
  const int64_t active = std::max<int64_t>(1, std::min(num_experts, total_tokens));
  const int64_t mean = (total_tokens + active - 1) / active;
  return mean <= 1 ? 1 : mean <= 2 ? 2 : mean <= 4 ? 4 : 8;
}

struct Workspace {
  int* counts;  // [3]: GEMV items, tile items, token_offsets-invalid flag
  WorkItem* gemv_items;
  int gemv_capacity;
  WorkItem* tile_items;
  int tile_capacity;
  int64_t bytes;
};

// Every item holds at least one token, so total_tokens bounds the GEMV list; an expert on the tile path
// has n >= kTileMinTokens tokens and ceil(n / kTileTokens) <= n / kTileMinTokens items, so
// total_tokens / kTileMinTokens bounds the tile list.
Workspace plan_workspace(void* base, int64_t total_tokens) {
  Workspace w;
  const int64_t gemv_capacity = total_tokens;
  const int64_t tile_capacity = total_tokens / kTileMinTokens;
  char* p = static_cast<char*>(base);
  w.counts = reinterpret_cast<int*>(p);
  w.gemv_items = reinterpret_cast<WorkItem*>(p + 16);
  w.gemv_capacity = static_cast<int>(gemv_capacity);
  w.tile_items = w.gemv_items + gemv_capacity;
  w.tile_capacity = static_cast<int>(tile_capacity);
  w.bytes = 16 + static_cast<int64_t>(sizeof(WorkItem)) * (gemv_capacity + tile_capacity);
  return w;
}

int set_error(char* error, int64_t error_len, const char* fmt, const char* detail) {
  if (error != nullptr && error_len > 0) snprintf(error, static_cast<size_t>(error_len), fmt, detail);
  return 1;
}

int check_cuda(cudaError_t status, const char* what, char* error, int64_t error_len) {
  if (status == cudaSuccess) return 0;
  char buf[256];
  snprintf(buf, sizeof(buf), "%s: %s", what, cudaGetErrorString(status));
  return set_error(error, error_len, "qmoe CUDA kernel: %s", buf);
}

// Blocks for a grid-stride kernel: enough to fill every SM at the achievable occupancy, never more than
// there are work units.
template <class Kernel>
int grid_for(Kernel kernel, int threads, size_t smem, int sms, int64_t max_units) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess || per_sm < 1) {
    per_sm = 1;
  }
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_units, static_cast<int64_t>(per_sm) * sms)));
}

template <class T, int kTokens>
cudaError_t launch_gemv(const QmoeGroupedArgs& a, const Layer& L, const Workspace& w, bool direct, int sms,
                        cudaStream_t stream) {
  // Items are known only on the device; an upper bound sizes rows per block so that a lone expert still
  // spreads over every SM while a full layer gets longer blocks that reuse their staged x.
  // (sum over experts of ceil(n_e / kTokens) <= total / kTokens + E.)
  const int64_t max_items = direct ? (a.total_tokens + kTokens - 1) / kTokens
                                   : std::min<int64_t>(w.gemv_capacity, a.total_tokens / kTokens + a.num_experts);
  const int64_t expected_items = std::max<int64_t>(1, std::min<int64_t>(max_items, a.num_experts));
  const int64_t wanted_row_blocks = std::max<int64_t>(1, 4 * static_cast<int64_t>(sms) / expected_items);
  const int64_t rows_per_block =
      round_up(std::max<int64_t>(kGemvWarps, (L.rows + wanted_row_blocks - 1) / wanted_row_blocks), kGemvWarps);
  // Staging x costs a block-wide load and barrier before any decode starts; it pays off only when the
  // block's warps reuse it over several rows each. A block of one row per warp (a lone expert spread over
  // the GPU, as at batch 1) gathers straight from global memory, where x stays L1/L2-resident anyway.
  const int64_t stage_bytes = L.cols * kTokens * static_cast<int64_t>(sizeof(T));
  const bool stage_x = stage_bytes <= kMaxStageBytes && rows_per_block >= kStageMinRowsPerWarp * kGemvWarps;
  const size_t smem = stage_x ? static_cast<size_t>(stage_bytes) : 0;
  const int64_t max_units = max_items * ((L.rows + rows_per_block - 1) / rows_per_block);
  auto kernel = gemv_kernel<T, kTokens>;
  const int grid = grid_for(kernel, kGemvThreads, smem, sms, max_units);
  GemvWork work;
  work.items = w.gemv_items;
  work.counts = w.counts;
  work.token_offsets = a.token_offsets;
  work.total_tokens = a.total_tokens;
  work.direct = direct;
  kernel<<<grid, kGemvThreads, smem, stream>>>(static_cast<const T*>(a.x), static_cast<T*>(a.y), L, work,
                                              rows_per_block, stage_x);
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_paths(const QmoeGroupedArgs& a, const Layer& L, const Workspace& w, int gemv_tokens,
                         bool use_tiles, bool direct, int sms, cudaStream_t stream) {
  cudaError_t status = cudaSuccess;
  switch (gemv_tokens) {
    case 1: status = launch_gemv<T, 1>(a, L, w, direct, sms, stream); break;
    case 2: status = launch_gemv<T, 2>(a, L, w, direct, sms, stream); break;
    case 4: status = launch_gemv<T, 4>(a, L, w, direct, sms, stream); break;
    default: status = launch_gemv<T, 8>(a, L, w, direct, sms, stream); break;
  }
  if (status != cudaSuccess || !use_tiles) return status;
  if constexpr (!std::is_same<T, float>::value) {
    const int64_t max_units = static_cast<int64_t>(w.tile_capacity) * ((L.rows + kTileRows - 1) / kTileRows);
    auto kernel = tile_kernel<T>;
    const int grid = grid_for(kernel, kTileThreads, 0, sms, max_units);
    kernel<<<grid, kTileThreads, 0, stream>>>(static_cast<const T*>(a.x), static_cast<T*>(a.y), L, w.tile_items,
                                             w.counts);
    status = cudaGetLastError();
  }
  return status;
}

}  // namespace

extern "C" int64_t qmoe_grouped_workspace_bytes(int64_t num_experts, int64_t total_tokens) {
  (void)num_experts;  // the bound depends on tokens only; kept in the ABI so it may tighten later
  return plan_workspace(nullptr, std::max<int64_t>(0, total_tokens)).bytes;
}

extern "C" int qmoe_grouped_matmul(const QmoeGroupedArgs* args, char* error, int64_t error_len) {
  if (args == nullptr) return set_error(error, error_len, "qmoe CUDA kernel: %s", "null argument block");
  const QmoeGroupedArgs& a = *args;
  const int64_t kIntMax = 2147483647;
  if (a.dtype != QMOE_BF16 && a.dtype != QMOE_FP16 && a.dtype != QMOE_FP32) {
    return set_error(error, error_len, "qmoe CUDA kernel: %s", "dtype must be bf16, fp16 or fp32");
  }
  if (a.path != QMOE_PATH_AUTO && a.path != QMOE_PATH_GEMV && a.path != QMOE_PATH_TILE) {
    return set_error(error, error_len, "qmoe CUDA kernel: %s", "path must be 0 (auto), 1 (gemv) or 2 (tile)");
  }
  if (a.rows < 0 || a.cols < 0 || a.rows > kIntMax || a.cols > kIntMax) {
    return set_error(error, error_len, "qmoe CUDA kernel: %s", "rows and cols must lie in [0, 2^31)");
  }
  if (a.num_experts < 1 || a.num_experts > kIntMax || a.total_tokens < 0 || a.total_tokens > kIntMax / 4) {
    return set_error(error, error_len, "qmoe CUDA kernel: %s",
                     "need 1 <= num_experts < 2^31 and 0 <= total_tokens < 2^29");
  }
  if (a.num_classes < 1 || a.num_classes > 256) {
    return set_error(error, error_len, "qmoe CUDA kernel: %s", "num_classes must lie in [1, 256]");
  }
  if (reinterpret_cast<uintptr_t>(a.entries) % 16 != 0) {
    return set_error(error, error_len, "qmoe CUDA kernel: %s", "packed dictionary must be 16-byte aligned");
  }
  if (a.total_tokens == 0 || a.rows == 0) return 0;

  const Workspace w = plan_workspace(a.workspace, a.total_tokens);
  if (a.workspace == nullptr || a.workspace_bytes < w.bytes) {
    return set_error(error, error_len, "qmoe CUDA kernel: %s", "workspace smaller than qmoe_grouped_workspace_bytes");
  }
  if (check_cuda(cudaSetDevice(a.device), "cudaSetDevice", error, error_len)) return 1;
  int sms = 0;
  if (check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, a.device), "SM count", error,
                 error_len)) {
    return 1;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);

  Layer L;
  L.codewords = a.codewords;
  L.n_codewords = a.n_codewords;
  L.expert_offsets = a.expert_offsets;
  L.row_offsets = a.row_offsets;
  L.row_class = a.row_class;
  L.scales = reinterpret_cast<const __nv_bfloat16*>(a.scales);
  L.entries = static_cast<const PackedEntry*>(a.entries);
  L.num_classes = static_cast<int>(a.num_classes);
  L.rows = a.rows;
  L.cols = a.cols;

  const int gemv_tokens = gemv_tokens_for(a.num_experts, a.total_tokens);
  // Each tile unit decodes kTileRows rows with one thread per row: slow alone, fast in numbers. With
  // fewer units than can fill the GPU (a single matrix at batch <= 64 has only rows / 64 of them), the
  // GEMV path's warp-parallel decode wins even though it decodes once per kTokens tokens. fp32 has no
  // 16-bit tensor-core path here, so all its experts take the GEMV path.
  const int64_t tile_units = a.total_tokens / kTileTokens * ((a.rows + kTileRows - 1) / kTileRows);
  const bool tiles_pay = a.path == QMOE_PATH_TILE || (a.path == QMOE_PATH_AUTO && tile_units >= 2 * sms);
  const bool use_tiles = a.dtype != QMOE_FP32 && a.total_tokens >= kTileMinTokens && tiles_pay;
  // A lone expert without tensor-core work needs no work list: gemv_kernel derives its items itself.
  const bool direct = a.num_experts == 1 && !use_tiles;
  if (!direct) {
    const int tile_min = use_tiles ? kTileMinTokens : static_cast<int>(kIntMax);
    build_work_items<<<1, 1024, 0, stream>>>(a.token_offsets, a.num_experts, a.total_tokens, gemv_tokens, tile_min,
                                             w.gemv_items, w.gemv_capacity, w.tile_items, w.tile_capacity, w.counts);
    if (check_cuda(cudaGetLastError(), "work-list launch", error, error_len)) return 1;
  }

  cudaError_t status = cudaSuccess;
  switch (a.dtype) {
    case QMOE_BF16: status = launch_paths<__nv_bfloat16>(a, L, w, gemv_tokens, use_tiles, direct, sms, stream); break;
    case QMOE_FP16: status = launch_paths<__half>(a, L, w, gemv_tokens, use_tiles, direct, sms, stream); break;
    default: status = launch_paths<float>(a, L, w, gemv_tokens, false, direct, sms, stream); break;
  }
  return check_cuda(status, "GEMM launch", error, error_len);
}

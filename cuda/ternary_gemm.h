// C ABI of the qmoe CUDA decode+GEMM (cuda/ternary_gemm.cu).
//
// Plain C types only, so cuda/binding.cpp compiles with the host C++ compiler and no CUDA or torch
// headers: tensors cross as raw device pointers, the stream as an opaque pointer (a cudaStream_t).
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum QmoeDtype { QMOE_BF16 = 0, QMOE_FP16 = 1, QMOE_FP32 = 2 };

// Which kernel serves experts with many tokens. AUTO decides from the shape; the others exist so tests
// and benchmarks can exercise and compare both paths on any shape.
enum QmoePath { QMOE_PATH_AUTO = 0, QMOE_PATH_GEMV = 1, QMOE_PATH_TILE = 2 };

// y[t] = x[t] @ W_e^T for every token t in expert e's range token_offsets[e]:token_offsets[e+1], for all
// experts of one layer, in one call (tokens sorted by expert). Layer layout (codec/FORMAT.md):
// codewords of all experts concatenated, expert e's at [expert_offsets[e], expert_offsets[e+1]); its row
// offsets relative to that start.
typedef struct QmoeGroupedArgs {
  const void* x;                  // [total_tokens, cols] of `dtype`, row-major, sorted by expert
  void* y;                        // [total_tokens, rows] of `dtype`, row-major (written)
  int32_t dtype;                  // QmoeDtype
  int64_t total_tokens;
  const int64_t* token_offsets;   // [num_experts + 1] token range per expert
  int64_t num_experts;
  const uint16_t* codewords;      // [n_codewords]
  int64_t n_codewords;
  const int64_t* expert_offsets;  // [num_experts + 1] into codewords
  const uint32_t* row_offsets;    // [num_experts, rows + 1], relative to the expert's first codeword
  const uint8_t* row_class;       // [num_experts, rows] dictionary class per row
  const uint16_t* scales;         // bf16 bits [num_experts, rows, 2]: (a, b) per row
  const void* entries;            // qmoe::PackedEntry [num_classes * 65536], 16-byte aligned
  int64_t num_classes;
  int64_t rows;
  int64_t cols;
  void* workspace;                // device scratch of qmoe_grouped_workspace_bytes(...) bytes
  int64_t workspace_bytes;
  int32_t path;                   // QmoePath
  int32_t device;                 // CUDA device ordinal the pointers live on
  void* stream;                   // cudaStream_t to launch on
} QmoeGroupedArgs;

// Device scratch bytes qmoe_grouped_matmul needs for this many experts and tokens.
int64_t qmoe_grouped_workspace_bytes(int64_t num_experts, int64_t total_tokens);

// Launches the grouped product asynchronously on args->stream. Returns 0 on success; otherwise writes a
// message (NUL-terminated, at most error_len bytes) and returns nonzero. Never synchronizes.
int qmoe_grouped_matmul(const QmoeGroupedArgs* args, char* error, int64_t error_len);

#ifdef __cplusplus
}
#endif

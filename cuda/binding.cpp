// qmoe._cuda: Python entry points of the CUDA decode+GEMM (cuda/ternary_gemm.cu).
//
// Deliberately free of torch and CUDA headers: tensors arrive as raw device pointers (Python ints from
// Tensor.data_ptr()) and the stream as an int (torch.cuda.Stream.cuda_stream), so the extension builds
// against any torch, CPU-only ones included. Importing it does not initialise CUDA; only a call does.
// qmoe/ops.py owns the shape/dtype checks and the torch.library registration.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ternary_gemm.h"

namespace py = pybind11;

namespace {

template <class T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "qmoe CUDA decode+GEMM over raw device pointers; use qmoe.ops, not this module directly.";

  m.def("workspace_bytes", &qmoe_grouped_workspace_bytes, py::arg("num_experts"), py::arg("total_tokens"),
        "Device scratch bytes grouped_matmul needs for this many experts and tokens.");

  m.def(
      "grouped_matmul",
      [](std::uintptr_t x, std::uintptr_t y, int dtype, int64_t total_tokens, std::uintptr_t token_offsets,
         int64_t num_experts, std::uintptr_t codewords, int64_t n_codewords, std::uintptr_t expert_offsets,
         std::uintptr_t row_offsets, std::uintptr_t row_class, std::uintptr_t scales, std::uintptr_t entries,
         int64_t num_classes, int64_t rows, int64_t cols, std::uintptr_t workspace, int64_t workspace_bytes,
         int path, int device, std::uintptr_t stream) {
        QmoeGroupedArgs args;
        args.x = ptr<const void>(x);
        args.y = ptr<void>(y);
        args.dtype = dtype;
        args.total_tokens = total_tokens;
        args.token_offsets = ptr<const int64_t>(token_offsets);
        args.num_experts = num_experts;
        args.codewords = ptr<const uint16_t>(codewords);
        args.n_codewords = n_codewords;
        args.expert_offsets = ptr<const int64_t>(expert_offsets);
        args.row_offsets = ptr<const uint32_t>(row_offsets);
        args.row_class = ptr<const uint8_t>(row_class);
        args.scales = ptr<const uint16_t>(scales);
        args.entries = ptr<const void>(entries);
        args.num_classes = num_classes;
        args.rows = rows;
        args.cols = cols;
        args.workspace = ptr<void>(workspace);
        args.workspace_bytes = workspace_bytes;
        args.path = path;
        args.device = device;
        args.stream = ptr<void>(stream);
        char error[512] = {0};
        int status = 0;
        {
          py::gil_scoped_release release;  // launches are asynchronous, but device setup may take a while
          status = qmoe_grouped_matmul(&args, error, sizeof(error));
        }
        if (status != 0) throw std::runtime_error(error);
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("total_tokens"), py::arg("token_offsets"),
      py::arg("num_experts"), py::arg("codewords"), py::arg("n_codewords"), py::arg("expert_offsets"),
      py::arg("row_offsets"), py::arg("row_class"), py::arg("scales"), py::arg("entries"), py::arg("num_classes"),
      py::arg("rows"), py::arg("cols"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("path"), py::arg("device"),
      py::arg("stream"),
      "Launches y = x @ W_e^T for all experts of a layer (see cuda/ternary_gemm.h for the layout).\n\n"
      "All tensor arguments are device addresses; dtype 0 = bf16, 1 = fp16, 2 = fp32; path 0 = auto, "
      "1 = GEMV only, 2 = tensor-core tiles for every expert with >= 16 tokens; stream is a "
      "cudaStream_t as int. Raises RuntimeError with the CUDA error on failure.");
}

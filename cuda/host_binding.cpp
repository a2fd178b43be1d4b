// qmoe._codec_host: the shared decode header codec/qmoe_codec.h compiled for the CPU.
//
// It exists for tests: decoding and row dot products here run exactly the functions the CUDA kernels
// run, so comparing them with qmoe.codec.decode on a machine without a GPU checks the kernel's decode
// logic. Arrays are numpy, C-contiguous; see each function's docstring for dtypes and shapes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "qmoe_codec.h"

namespace py = pybind11;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

// A packed table is int64 [K, 65536, 2], the layout of qmoe::PackedEntry.
const qmoe::PackedEntry* packed_table(const Array<int64_t>& packed, int64_t* num_classes) {
  require(packed.ndim() == 3 && packed.shape(1) == qmoe::kEntriesPerClass && packed.shape(2) == 2,
          "packed dictionary: expected int64 [K, 65536, 2], got ndim " + std::to_string(packed.ndim()));
  static_assert(sizeof(qmoe::PackedEntry) == 2 * sizeof(int64_t), "PackedEntry must be two int64 words");
  *num_classes = packed.shape(0);
  return reinterpret_cast<const qmoe::PackedEntry*>(packed.data());
}

struct MatrixView {
  const uint16_t* codewords;
  int64_t n_codewords;
  const uint32_t* row_offsets;
  const uint8_t* row_class;
  int64_t rows;
};

MatrixView matrix_view(const Array<uint16_t>& codewords, const Array<uint32_t>& row_offsets,
                       const Array<uint8_t>& row_class, int64_t num_classes) {
  require(codewords.ndim() == 1, "codewords: expected uint16 [n]");
  require(row_offsets.ndim() == 1 && row_offsets.shape(0) >= 1, "row_offsets: expected uint32 [rows + 1]");
  const int64_t rows = row_offsets.shape(0) - 1;
  require(row_class.ndim() == 1 && row_class.shape(0) == rows,
          "row_class: expected uint8 [" + std::to_string(rows) + "], got " + std::to_string(row_class.size()));
  for (int64_t r = 0; r < rows; ++r) {
    require(row_class.data()[r] < num_classes, "row_class[" + std::to_string(r) + "] = " +
                                                   std::to_string(row_class.data()[r]) + " but the dictionary has " +
                                                   std::to_string(num_classes) + " classes");
  }
  return {codewords.data(), codewords.shape(0), row_offsets.data(), row_class.data(), rows};
}

}  // namespace

PYBIND11_MODULE(_codec_host, m) {
  m.doc() = "Host build of codec/qmoe_codec.h (the CUDA kernels' decode logic), for tests.";

  m.def(
      "pack_entries",
      [](Array<uint8_t> length, Array<uint64_t> nonzero, Array<uint64_t> negative) {
        require(length.ndim() == 2 && length.shape(1) == qmoe::kEntriesPerClass,
                "entry_length: expected uint8 [K, 65536]");
        require(nonzero.ndim() == 2 && nonzero.shape(0) == length.shape(0) && nonzero.shape(1) == length.shape(1),
                "entry_nonzero: expected uint64 [K, 65536] like entry_length");
        require(negative.ndim() == 2 && negative.shape(0) == length.shape(0) &&
                    negative.shape(1) == length.shape(1),
                "entry_negative: expected uint64 [K, 65536] like entry_length");
        const int64_t n = length.size();
        Array<int64_t> out({length.shape(0), static_cast<py::ssize_t>(qmoe::kEntriesPerClass), py::ssize_t{2}});
        auto* dst = reinterpret_cast<qmoe::PackedEntry*>(out.mutable_data());
        for (int64_t i = 0; i < n; ++i) {
          dst[i] = qmoe::pack_entry(length.data()[i], nonzero.data()[i], negative.data()[i]);
        }
        return out;
      },
      py::arg("entry_length"), py::arg("entry_nonzero"), py::arg("entry_negative"),
      "Packs a dictionary with qmoe::pack_entry: uint8/uint64/uint64 [K, 65536] -> int64 [K, 65536, 2].");

  m.def(
      "entry_is_valid",
      [](Array<uint8_t> length, Array<uint64_t> nonzero, Array<uint64_t> negative) {
        require(length.size() == nonzero.size() && length.size() == negative.size(),
                "entry arrays must have the same size");
        Array<bool> out(length.size());
        for (py::ssize_t i = 0; i < length.size(); ++i) {
          out.mutable_data()[i] = qmoe::entry_is_valid(length.data()[i], nonzero.data()[i], negative.data()[i]);
        }
        return out;
      },
      py::arg("entry_length"), py::arg("entry_nonzero"), py::arg("entry_negative"),
      "qmoe::entry_is_valid over flat arrays -> bool [n].");

  m.def(
      "decode_rows",
      [](Array<uint16_t> codewords, Array<uint32_t> row_offsets, Array<uint8_t> row_class, Array<int64_t> packed,
         int64_t cols) {
        require(cols >= 0, "cols must be >= 0");
        int64_t num_classes = 0;
        const qmoe::PackedEntry* table = packed_table(packed, &num_classes);
        const MatrixView mat = matrix_view(codewords, row_offsets, row_class, num_classes);
        Array<int8_t> out({mat.rows, cols});
        Array<int64_t> symbols(mat.rows);
        Array<bool> valid(mat.rows);
        for (int64_t r = 0; r < mat.rows; ++r) {
          const qmoe::RowRange range = qmoe::row_range(mat.row_offsets, r, 0, mat.n_codewords);
          valid.mutable_data()[r] = range.valid;
          symbols.mutable_data()[r] =
              qmoe::decode_row(mat.codewords, range, table + static_cast<int64_t>(mat.row_class[r]) * qmoe::kEntriesPerClass,
                               cols, out.mutable_data() + r * cols);
        }
        return py::make_tuple(out, symbols, valid);
      },
      py::arg("codewords"), py::arg("row_offsets"), py::arg("row_class"), py::arg("packed"), py::arg("cols"),
      "Decodes every row with qmoe::decode_row.\n\n"
      "codewords uint16 [n], row_offsets uint32 [rows+1], row_class uint8 [rows], packed int64 [K, 65536, 2].\n"
      "Returns (int8 [rows, cols] symbols, int64 [rows] expanded length of each row, bool [rows] offsets valid).");

  m.def(
      "decode_rows_tiled",
      [](Array<uint16_t> codewords, Array<uint32_t> row_offsets, Array<uint8_t> row_class, Array<int64_t> packed,
         int64_t cols, int64_t tile) {
        require(cols >= 0, "cols must be >= 0");
        require(tile >= 1, "tile must be >= 1");
        int64_t num_classes = 0;
        const qmoe::PackedEntry* table = packed_table(packed, &num_classes);
        const MatrixView mat = matrix_view(codewords, row_offsets, row_class, num_classes);
        Array<int8_t> out({mat.rows, cols});
        std::fill(out.mutable_data(), out.mutable_data() + out.size(), int8_t{0});
        for (int64_t r = 0; r < mat.rows; ++r) {
          const qmoe::RowRange range = qmoe::row_range(mat.row_offsets, r, 0, mat.n_codewords);
          const qmoe::PackedEntry* row_table = table + static_cast<int64_t>(mat.row_class[r]) * qmoe::kEntriesPerClass;
          auto load = [&](int64_t i) { return row_table[mat.codewords[i]]; };
          int8_t* row = out.mutable_data() + r * cols;
          qmoe::RowCursor cursor = qmoe::row_cursor(range, load);
          for (int64_t k0 = 0; k0 < cols; k0 += tile) {
            qmoe::decode_window(cursor, range, k0, std::min(cols, k0 + tile), load,
                                [&](int64_t c, bool negative) { row[c] = negative ? -1 : 1; });
          }
        }
        return out;
      },
      py::arg("codewords"), py::arg("row_offsets"), py::arg("row_class"), py::arg("packed"), py::arg("cols"),
      py::arg("tile"),
      "Decodes every row window by window (qmoe::decode_window, as the tensor-core kernel fills its tiles)\n"
      "with windows of `tile` columns. Arrays as in decode_rows; returns int8 [rows, cols].");

  m.def(
      "row_dot",
      [](Array<float> x, Array<uint16_t> codewords, Array<uint32_t> row_offsets, Array<uint8_t> row_class,
         Array<float> scales, Array<int64_t> packed, int64_t cols) {
        require(x.ndim() == 2 && x.shape(1) == cols, "x: expected float32 [T, cols]");
        int64_t num_classes = 0;
        const qmoe::PackedEntry* table = packed_table(packed, &num_classes);
        const MatrixView mat = matrix_view(codewords, row_offsets, row_class, num_classes);
        require(scales.ndim() == 2 && scales.shape(0) == mat.rows && scales.shape(1) == 2,
                "scales: expected float32 [rows, 2]");
        const int64_t tokens = x.shape(0);
        Array<float> y({tokens, mat.rows});
        constexpr int kTokens = 8;  // the kernel's largest per-warp token group
        float chunk[kTokens];
        for (int64_t t0 = 0; t0 < tokens; t0 += kTokens) {
          const int n = static_cast<int>(std::min<int64_t>(kTokens, tokens - t0));
          const float* xs = x.data() + t0 * cols;
          auto load = [&](int t, int64_t c) { return xs[t * cols + c]; };
          for (int64_t r = 0; r < mat.rows; ++r) {
            const qmoe::RowRange range = qmoe::row_range(mat.row_offsets, r, 0, mat.n_codewords);
            qmoe::row_dot<kTokens>(mat.codewords, range,
                                   table + static_cast<int64_t>(mat.row_class[r]) * qmoe::kEntriesPerClass, cols,
                                   scales.data()[2 * r], scales.data()[2 * r + 1], n, load, chunk);
            for (int t = 0; t < n; ++t) y.mutable_data()[(t0 + t) * mat.rows + r] = chunk[t];
          }
        }
        return y;
      },
      py::arg("x"), py::arg("codewords"), py::arg("row_offsets"), py::arg("row_class"), py::arg("scales"),
      py::arg("packed"), py::arg("cols"),
      "y = x @ W.T with qmoe::row_dot (groups of 8 tokens, as the kernel's GEMV path).\n\n"
      "x float32 [T, cols], scales float32 [rows, 2] (a, b); other arrays as in decode_rows. Returns float32 [T, rows].");
}

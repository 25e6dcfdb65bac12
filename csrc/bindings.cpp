// pybind11 boundary: raw pointers, sizes and the CUDA stream in, nothing framework-specific.
// Each call's parameters arrive by keyword and are checked once, into the struct the C++ side
// reads (MisArgs, WalkWindowArgs). Python (d2pruner_kernels/kernels/mis.py, cpu_walk.py)
// checks devices, dtypes, contiguity and shapes before; C++ errors surface as Python
// exceptions (std::invalid_argument: ValueError).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "mis.h"
#include "walk_cpu.h"

namespace py = pybind11;

namespace {

template <typename T>
T* pointer(uintptr_t address) { return reinterpret_cast<T*>(address); }

// The parameters of one MIS call, checked once where they are made (flash-attention's
// flash_api.cpp: checks, then one params struct); the launches take the struct. Addresses
// are data_ptr() of tensors on the device the call runs on; 0 for an optional buffer.
d2p::MisArgs dense_args(uintptr_t adj, uintptr_t order, uintptr_t kept, int batch, int n_tokens,
                        int n_pivots, int k, int rows_ready, uintptr_t rounds, uintptr_t skip,
                        uintptr_t done) {
  if (batch < 0 || n_tokens < 1 || n_pivots < 0 || n_pivots > k || k > n_tokens ||
      rows_ready < 0 || rows_ready > n_tokens - n_pivots)
    throw std::invalid_argument("d2pruner MIS: inconsistent sizes");
  return {pointer<const uint32_t>(adj), pointer<const int64_t>(order), pointer<int64_t>(kept),
          pointer<int32_t>(rounds), batch, n_tokens, n_pivots, k, rows_ready,
          pointer<const int32_t>(skip), pointer<int32_t>(done)};
}

// A ragged batch: each image's sizes and offsets from its row of `table` (int64 [batch,
// kRaggedFields]); order_len, kept_len, adj_words: the packed buffers' lengths, which every
// row is checked against (mis.h: ragged_image). max_tokens >= every N_b sizes the CUDA
// kernel's shared memory; the dense scalars n_pivots, k, rows_ready are not used.
d2p::MisArgs ragged_args(uintptr_t adj, uintptr_t order, uintptr_t kept, uintptr_t table,
                         int batch, int max_tokens, int64_t order_len, int64_t kept_len,
                         int64_t adj_words, uintptr_t rounds, uintptr_t skip, uintptr_t done) {
  if (batch < 0 || max_tokens < 1)
    throw std::invalid_argument("d2pruner MIS: inconsistent sizes");
  if (!table || order_len < 0 || kept_len < 0 || adj_words < 0)
    throw std::invalid_argument("d2pruner MIS: a ragged batch needs its table and buffer lengths >= 0");
  d2p::MisArgs a = dense_args(adj, order, kept, batch, max_tokens, 0, max_tokens, 0, rounds,
                              skip, done);
  a.ragged = {pointer<const int64_t>(table), order_len, kept_len, adj_words};
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "d2pruner_kernels compiled stages (MIS: CUDA kernel and its CPU twin; the window "
            "resolver of the graph-free CPU walk)";
  py::class_<d2p::MisArgs>(m, "MisArgs", "The parameters of one MIS call (csrc/mis.h), "
                           "checked when made: MisArgs.dense(...) or MisArgs.ragged(...).")
      .def_static("dense", &dense_args, py::kw_only(), py::arg("adj"), py::arg("order"),
                  py::arg("kept"), py::arg("batch"), py::arg("n_tokens"), py::arg("n_pivots"),
                  py::arg("k"), py::arg("rows_ready"), py::arg("rounds") = 0,
                  py::arg("skip") = 0, py::arg("done") = 0,
                  "A dense batch: adj [batch, C, words(C)], order [batch, n_tokens], kept "
                  "[batch, k]; rows [0, rows_ready) of each graph are ready.")
      .def_static("ragged", &ragged_args, py::kw_only(), py::arg("adj"), py::arg("order"),
                  py::arg("kept"), py::arg("table"), py::arg("batch"), py::arg("max_tokens"),
                  py::arg("order_len"), py::arg("kept_len"), py::arg("adj_words"),
                  py::arg("rounds") = 0, py::arg("skip") = 0, py::arg("done") = 0,
                  "A ragged batch: packed adj / order / kept, each image at the offsets of "
                  "its row of table [batch, ragged_fields['FIELDS']].")
      .def_readonly("batch", &d2p::MisArgs::batch)
      .def_readonly("n_tokens", &d2p::MisArgs::n_tokens)
      .def_readonly("n_pivots", &d2p::MisArgs::n_pivots)
      .def_readonly("k", &d2p::MisArgs::k)
      .def_readonly("rows_ready", &d2p::MisArgs::rows_ready)
      .def_property_readonly("is_ragged",
                             [](const d2p::MisArgs& a) { return a.ragged.table != nullptr; });
  m.def("mis_rounds_cpu", [](const d2p::MisArgs& a) {
    py::gil_scoped_release nogil;
    d2p::mis_rounds_cpu(a);
  }, py::arg("args"), "CPU twin of the CUDA kernel (same windows, rounds and rules).");
  m.def("walk_window_cpu", [](uintptr_t cos, uintptr_t rows, uintptr_t pos, uintptr_t order,
                              uintptr_t image, uintptr_t members, uintptr_t coords,
                              uintptr_t count, uintptr_t taken, int batch, int active,
                              int survivors, int dim, int n_tokens, int n_pivots, int m,
                              int grid_t, int grid_h, int grid_w, int radius,
                              int temporal_radius, float cos_weight, float spatial_weight,
                              float threshold, uintptr_t coord_table, int fusion) {
    const d2p::WalkWindowArgs a{
        pointer<const float>(cos), pointer<const float>(rows), pointer<const int64_t>(pos),
        pointer<const int64_t>(order), pointer<const int64_t>(image), pointer<float>(members),
        pointer<int64_t>(coords), pointer<int64_t>(count), pointer<uint8_t>(taken), batch,
        active, survivors, dim, n_tokens, n_pivots, m, grid_t, grid_h, grid_w, radius,
        temporal_radius, cos_weight, spatial_weight, threshold,
        pointer<const int32_t>(coord_table), fusion};
    py::gil_scoped_release nogil;
    d2p::walk_window_cpu(a);  // validates the sizes and every index it reads
  }, py::kw_only(), py::arg("cos"), py::arg("rows"), py::arg("pos"), py::arg("order"),
     py::arg("image"), py::arg("members"), py::arg("coords"), py::arg("count"), py::arg("taken"),
     py::arg("batch"), py::arg("active"), py::arg("survivors"), py::arg("dim"),
     py::arg("n_tokens"), py::arg("n_pivots"), py::arg("m"), py::arg("grid_t"),
     py::arg("grid_h"), py::arg("grid_w"), py::arg("radius"), py::arg("temporal_radius"),
     py::arg("cos_weight"), py::arg("spatial_weight"), py::arg("threshold"),
     py::arg("coord_table") = 0, py::arg("fusion") = static_cast<int>(d2p::kWeighted),
     "One window of the graph-free CPU walk (kernels/cpu_walk.py), by keyword: the fields "
     "of csrc/walk_cpu.h's WalkWindowArgs (coord_table: 0 for the grid arithmetic; fusion: "
     "a value of walk_fusions).");
  py::dict walk_fusions;  // csrc/walk_cpu.h's WalkFusion, by name
  walk_fusions["weighted"] = static_cast<int>(d2p::kWeighted);
  walk_fusions["similar"] = static_cast<int>(d2p::kSimilar);
  walk_fusions["similar_and_near"] = static_cast<int>(d2p::kSimilarAndNear);
  walk_fusions["near"] = static_cast<int>(d2p::kNear);
  m.attr("walk_fusions") = walk_fusions;
  py::dict ragged_fields;  // every field of csrc/mis.h's D2P_RAGGED_FIELDS, by its ragged.py name
#define D2P_RAGGED_ENTRY(cpp_name, py_name, column) \
  ragged_fields[#py_name] = static_cast<int>(d2p::cpp_name);
  D2P_RAGGED_FIELDS(D2P_RAGGED_ENTRY)
#undef D2P_RAGGED_ENTRY
  m.attr("ragged_fields") = ragged_fields;
#ifdef D2P_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("mis_rounds_cuda", [](const d2p::MisArgs& a, int device, uintptr_t stream) {
    d2p::mis_rounds_cuda(a, device, reinterpret_cast<void*>(stream));
  }, py::arg("args"), py::arg("device"), py::arg("stream"),
     "Luby rounds on the GPU: one block per image, one launch, on the given stream.");
  m.def("cuda_device_count", &d2p::cuda_device_count);
  m.attr("max_cuda_tokens") = d2p::max_cuda_tokens();
#else
  m.attr("with_cuda") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
}

// pybind11 boundary: raw pointers, sizes and the CUDA stream in, nothing framework-specific.
// Python (d2pruner_kernels/kernels/mis.py) validates device, dtype, contiguity and shapes
// before any call; C++ errors surface as Python exceptions.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "mis.h"
#include "walk_cpu.h"

namespace py = pybind11;

namespace {

// ragged = 0: a dense batch. Else the address of the ragged table [batch, kRaggedFields]
// (int64, on the device of the other pointers) and the lengths of the packed order, kept and
// adjacency; n_tokens is then the largest image (n_pivots, k, rows_ready unused).
d2p::MisArgs make_args(uintptr_t adj, uintptr_t order, uintptr_t kept, uintptr_t rounds,
                       int batch, int n_tokens, int n_pivots, int k, int rows_ready,
                       uintptr_t skip, uintptr_t done, uintptr_t ragged, int64_t order_len,
                       int64_t kept_len, int64_t adj_words) {
  if (batch < 0 || n_tokens < 1 || n_pivots < 0 || n_pivots > k || k > n_tokens ||
      rows_ready < 0 || rows_ready > n_tokens - n_pivots)
    throw std::invalid_argument("d2pruner MIS: inconsistent sizes");
  if (ragged && (order_len < 0 || kept_len < 0 || adj_words < 0))
    throw std::invalid_argument("d2pruner MIS: negative ragged buffer lengths");
  d2p::MisArgs a{reinterpret_cast<const uint32_t*>(adj), reinterpret_cast<const int64_t*>(order),
                 reinterpret_cast<int64_t*>(kept), reinterpret_cast<int32_t*>(rounds),
                 batch, n_tokens, n_pivots, k, rows_ready,
                 reinterpret_cast<const int32_t*>(skip), reinterpret_cast<int32_t*>(done)};
  if (ragged)
    a.ragged = {reinterpret_cast<const int64_t*>(ragged), order_len, kept_len, adj_words};
  return a;
}

#define MIS_PARAMS uintptr_t adj, uintptr_t order, uintptr_t kept, uintptr_t rounds, int batch, \
    int n_tokens, int n_pivots, int k, int rows_ready, uintptr_t skip, uintptr_t done,        \
    uintptr_t ragged, int64_t order_len, int64_t kept_len, int64_t adj_words
#define MIS_ARGS adj, order, kept, rounds, batch, n_tokens, n_pivots, k, rows_ready, skip, done, \
    ragged, order_len, kept_len, adj_words

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "d2pruner_kernels compiled stages (MIS: CUDA kernel and its CPU twin; the window "
            "resolver of the graph-free CPU walk)";
  m.def("mis_rounds_cpu", [](MIS_PARAMS) {
    const auto a = make_args(MIS_ARGS);
    py::gil_scoped_release nogil;
    d2p::mis_rounds_cpu(a);
  }, "CPU twin of the CUDA kernel (same windows, rounds and rules).");
  m.def("walk_window_cpu", [](uintptr_t cos, uintptr_t rows, uintptr_t pos, uintptr_t order,
                              uintptr_t image, uintptr_t members, uintptr_t coords,
                              uintptr_t count, uintptr_t taken, int batch, int active,
                              int survivors, int dim, int n_tokens, int n_pivots, int m,
                              int grid_t, int grid_h, int grid_w, int radius,
                              int temporal_radius, float cos_weight, float spatial_weight,
                              float threshold) {
    const d2p::WalkWindowArgs a{
        reinterpret_cast<const float*>(cos), reinterpret_cast<const float*>(rows),
        reinterpret_cast<const int64_t*>(pos), reinterpret_cast<const int64_t*>(order),
        reinterpret_cast<const int64_t*>(image), reinterpret_cast<float*>(members),
        reinterpret_cast<int64_t*>(coords), reinterpret_cast<int64_t*>(count),
        reinterpret_cast<uint8_t*>(taken), batch, active, survivors, dim, n_tokens, n_pivots,
        m, grid_t, grid_h, grid_w, radius, temporal_radius, cos_weight, spatial_weight,
        threshold};
    py::gil_scoped_release nogil;
    d2p::walk_window_cpu(a);  // validates the sizes and every index it reads
  }, "One window of the graph-free CPU walk (kernels/cpu_walk.py).");
  m.attr("ragged_fields") = py::dict(  // the ragged table's layout (kernels/ragged.py)
      py::arg("stride") = static_cast<int>(d2p::kRaggedFields),
      py::arg("token_offset") = static_cast<int>(d2p::kTokenOffset),
      py::arg("tokens") = static_cast<int>(d2p::kTokens),
      py::arg("pivots") = static_cast<int>(d2p::kPivots),
      py::arg("keep") = static_cast<int>(d2p::kKeep),
      py::arg("keep_offset") = static_cast<int>(d2p::kKeepOffset),
      py::arg("adj_offset") = static_cast<int>(d2p::kAdjOffset),
      py::arg("row_end") = static_cast<int>(d2p::kRowEnd));
#ifdef D2P_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("mis_rounds_cuda", [](MIS_PARAMS, int device, uintptr_t stream) {
    d2p::mis_rounds_cuda(make_args(MIS_ARGS), device, reinterpret_cast<void*>(stream));
  }, "Luby rounds on the GPU: one block per image, one launch, on the given stream.");
  m.def("cuda_device_count", &d2p::cuda_device_count);
  m.attr("max_cuda_tokens") = d2p::max_cuda_tokens();
#else
  m.attr("with_cuda") = false;
  m.def("cuda_device_count", [] { return 0; });
#endif
}

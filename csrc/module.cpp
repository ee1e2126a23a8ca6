// Python bindings of treerpo._C. Arrays come in without a copy when they already have the expected
// dtype and are C-contiguous (numpy arrays or CPU torch tensors), are converted otherwise; results are
// numpy arrays that own the C++ buffers. The GIL is released while the work runs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <utility>

#include "advantages.h"
#include "forest.h"
#include "packing.h"
#include "tile_skip.h"

namespace py = pybind11;
using namespace pybind11::literals;
using namespace treerpo;

namespace {

template <class T>
using In = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
py::array_t<T> to_numpy(Buffer<T>&& buffer) {
  T* data = buffer.data.release();
  py::capsule owner(data, [](void* p) { delete[] static_cast<T*>(p); });
  return py::array_t<T>({buffer.size}, {sizeof(T)}, data, owner);
}

void expect_1d(const char* name, const py::array& a) {
  if (a.ndim() != 1)
    throw py::value_error(std::string(name) + " must be 1-D, got " + std::to_string(a.ndim()) + " dimensions");
}

void expect_length(const char* name, const py::array& a, int64_t n) {
  expect_1d(name, a);
  if (a.shape(0) != n)
    throw py::value_error(std::string(name) + " must be 1-D with " + std::to_string(n) + " entries, got " +
                          std::to_string(a.shape(0)));
}

Forest forest_of(const In<int64_t>& node_offsets, const In<int64_t>& parent) {
  if (node_offsets.ndim() != 1 || node_offsets.size() < 1)
    throw py::value_error("node_offsets must be 1-D with one entry per tree plus one (starting at 0)");
  expect_1d("parent", parent);
  return Forest{node_offsets.data(), node_offsets.size() - 1, parent.data(), parent.size()};
}

py::array_t<double> node_values_py(const In<int64_t>& node_offsets, const In<int64_t>& parent,
                                   const In<double>& reward, const std::string& mode) {
  const Forest f = forest_of(node_offsets, parent);
  expect_length("reward", reward, f.num_nodes);
  const ValueMode m = parse_value_mode(mode);
  Buffer<double> values(f.num_nodes);
  {
    py::gil_scoped_release release;
    validate(f);
    node_values(f, reward.data(), m, values.get());
  }
  return to_numpy(std::move(values));
}

py::dict sibling_groups_py(const In<int64_t>& node_offsets, const In<int64_t>& parent,
                           const std::optional<In<double>>& values) {
  const Forest f = forest_of(node_offsets, parent);
  if (values) expect_length("values", *values, f.num_nodes);
  SiblingGroups g;
  Buffer<double> mean, std;
  {
    py::gil_scoped_release release;
    validate(f);
    g = sibling_groups(f);
    if (values) {
      mean = Buffer<double>(g.count());
      std = Buffer<double>(g.count());
      group_stats(g, values->data(), mean.get(), std.get());
    }
  }
  py::dict out("offsets"_a = to_numpy(std::move(g.offsets)), "members"_a = to_numpy(std::move(g.members)),
               "parent"_a = to_numpy(std::move(g.parent)));
  if (values) {
    out["mean"] = to_numpy(std::move(mean));
    out["std"] = to_numpy(std::move(std));
  }
  return out;
}

py::dict compute_advantages_py(const In<int64_t>& node_offsets, const In<int64_t>& parent, const In<double>& reward,
                               const std::string& value_mode, const std::string& normalization, double tau,
                               double eps) {
  const Forest f = forest_of(node_offsets, parent);
  expect_length("reward", reward, f.num_nodes);
  const ValueMode m = parse_value_mode(value_mode);
  const Normalization norm = parse_normalization(normalization);
  if (!(tau >= 0)) throw py::value_error("tau must be >= 0, got " + std::to_string(tau));
  Buffer<double> values(f.num_nodes), advantage(f.num_nodes);
  Buffer<bool> kept(f.num_nodes);
  AdvantageCounts counts;
  {
    py::gil_scoped_release release;
    validate(f);
    node_values(f, reward.data(), m, values.get());
    counts = advantages(sibling_groups(f), values.get(), f.num_nodes, norm, tau, eps, advantage.get(), kept.get());
  }
  return py::dict("values"_a = to_numpy(std::move(values)), "advantages"_a = to_numpy(std::move(advantage)),
                  "kept"_a = to_numpy(std::move(kept)), "groups"_a = counts.groups,
                  "kept_groups"_a = counts.kept_groups);
}

py::dict pack_py(const In<int64_t>& node_offsets, const In<int64_t>& parent, const In<int64_t>& token_offsets,
                 const In<int64_t>& token_ids, const In<bool>& kept, const In<double>& advantage, bool prune) {
  const Forest f = forest_of(node_offsets, parent);
  expect_length("token_offsets", token_offsets, f.num_nodes + 1);
  expect_1d("token_ids", token_ids);
  expect_length("kept", kept, f.num_nodes);
  expect_length("advantage", advantage, f.num_nodes);
  const PackInput in{f, token_offsets.data(), token_ids.data(), token_ids.size(), kept.data(), advantage.data(), prune};
  Packed p;
  {
    py::gil_scoped_release release;
    validate(f);
    p = pack(in);
  }
  return py::dict("input_ids"_a = to_numpy(std::move(p.input_ids)),
                  "position_ids"_a = to_numpy(std::move(p.position_ids)), "tin"_a = to_numpy(std::move(p.tin)),
                  "tout"_a = to_numpy(std::move(p.tout)), "prev_index"_a = to_numpy(std::move(p.prev_index)),
                  "loss_mask"_a = to_numpy(std::move(p.loss_mask)),
                  "advantages"_a = to_numpy(std::move(p.advantages)),
                  "tree_index"_a = to_numpy(std::move(p.tree_index)),
                  "node_index"_a = to_numpy(std::move(p.node_index)));
}

template <class Index>
py::tuple tile_skip_py(const py::array_t<Index, py::array::c_style>& tin,
                       const py::array_t<Index, py::array::c_style>& tout, int64_t block_q, int64_t block_k) {
  expect_1d("tin", tin);
  expect_length("tout", tout, tin.size());
  TileSkip s;
  {
    py::gil_scoped_release release;
    s = tile_skip(tin.data(), tout.data(), tin.size(), block_q, block_k);
  }
  return py::make_tuple(to_numpy(std::move(s.offsets)), to_numpy(std::move(s.key_tiles)));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "treerpo's tree bookkeeping in C++: node values, sibling groups, advantages, packing, tile skip lists.\n"
            "A batch of trees is flat: tree t owns nodes node_offsets[t]:node_offsets[t+1]; parent holds\n"
            "tree-local indices (-1 for each root, node 0), a parent before its children.";
  m.def("node_values", &node_values_py, "node_offsets"_a, "parent"_a, "reward"_a, "mode"_a = "children_mean",
        "float64 [N]: leaves take their reward, inner nodes the mean of their children (children_mean) or of "
        "the leaves below them (leaf_mean).");
  m.def("sibling_groups", &sibling_groups_py, "node_offsets"_a, "parent"_a, "values"_a = py::none(),
        "dict: offsets [G+1], members [N-T] (global node indices, ascending), parent [G] (global); with values, "
        "also mean [G] and std [G] (unbiased, 0 for one member). Groups ordered by (tree, parent).");
  m.def("compute_advantages", &compute_advantages_py, "node_offsets"_a, "parent"_a, "reward"_a,
        "value_mode"_a = "children_mean", "normalization"_a = "group_std", "tau"_a = 0.1, "eps"_a = 1e-6,
        "dict: values, advantages (float64 [N]), kept (bool [N]), groups, kept_groups.");
  m.def("pack", &pack_py, "node_offsets"_a, "parent"_a, "token_offsets"_a, "token_ids"_a, "kept"_a, "advantage"_a,
        "prune"_a = false,
        "dict of per-token arrays, depth-first: input_ids, position_ids, tin, tout (int32), prev_index, "
        "loss_mask (bool), advantages (float32), tree_index, node_index. token_offsets [N+1] is a CSR over "
        "token_ids.");
  m.def("tile_skip", &tile_skip_py<int32_t>, "tin"_a, "tout"_a, "block_q"_a = 64, "block_k"_a = 64);
  m.def("tile_skip", &tile_skip_py<int64_t>, "tin"_a, "tout"_a, "block_q"_a = 64, "block_k"_a = 64,
        "(offsets int64 [Q+1], key_tiles int32): the key tiles each query tile must visit, ascending. tin must "
        "be strictly increasing.");
}

#include "advantages.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>
#include <vector>

#include "numpy_sum.h"

namespace treerpo {
namespace {

[[noreturn]] void unscored_leaf(int64_t tree, int64_t node) {
  throw std::invalid_argument("tree " + std::to_string(tree) + ": leaf node " + std::to_string(node) +
                              " has no reward; every leaf needs a reward before values can be computed "
                              "(score the tree first)");
}

// One tree, local indices; the scratch arrays hold n entries each.
void tree_values(int64_t tree, const int64_t* parent, const double* reward, int64_t n, ValueMode mode,
                 double* values, int64_t* num_children, double* child_sum, double* leaf_sum, double* leaf_count) {
  std::fill(num_children, num_children + n, 0);
  for (int64_t i = 1; i < n; ++i) ++num_children[parent[i]];
  for (int64_t i = 0; i < n; ++i) {
    const bool leaf = num_children[i] == 0;
    if (leaf && std::isnan(reward[i])) unscored_leaf(tree, i);
    child_sum[i] = 0.0;
    leaf_sum[i] = leaf ? reward[i] : 0.0;
    leaf_count[i] = leaf ? 1.0 : 0.0;
    values[i] = reward[i];
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    if (num_children[i] > 0)
      values[i] = mode == ValueMode::children_mean ? child_sum[i] / static_cast<double>(num_children[i])
                                                   : leaf_sum[i] / leaf_count[i];
    const int64_t p = parent[i];
    if (p < 0) continue;
    child_sum[p] += values[i];
    leaf_sum[p] += leaf_sum[i];
    leaf_count[p] += leaf_count[i];
  }
}

}  // namespace

ValueMode parse_value_mode(const std::string& name) {
  if (name == "children_mean") return ValueMode::children_mean;
  if (name == "leaf_mean") return ValueMode::leaf_mean;
  throw std::invalid_argument("unknown value mode '" + name + "'; choose one of ('children_mean', 'leaf_mean')");
}

Normalization parse_normalization(const std::string& name) {
  if (name == "group_std") return Normalization::group_std;
  if (name == "mean_only") return Normalization::mean_only;
  if (name == "batch_std") return Normalization::batch_std;
  throw std::invalid_argument("unknown advantage normalization '" + name +
                              "'; choose one of ('group_std', 'mean_only', 'batch_std')");
}

void node_values(const Forest& f, const double* reward, ValueMode mode, double* values) {
  const int64_t n = f.num_nodes;
  std::vector<int64_t> num_children(n);
  std::vector<double> child_sum(n), leaf_sum(n), leaf_count(n);
  for (int64_t t = 0; t < f.num_trees; ++t) {
    const int64_t b = f.begin(t);
    tree_values(t, f.parent + b, reward + b, f.size(t), mode, values + b, num_children.data() + b,
                child_sum.data() + b, leaf_sum.data() + b, leaf_count.data() + b);
  }
}

SiblingGroups sibling_groups(const Forest& f) {
  // slot[g]: where the next child of global node g goes in members (a counting sort by parent)
  std::vector<int64_t> slot(f.num_nodes, 0);
  for (int64_t t = 0; t < f.num_trees; ++t)
    for (int64_t i = f.begin(t) + 1; i < f.begin(t) + f.size(t); ++i) ++slot[f.begin(t) + f.parent[i]];
  const int64_t num_groups = f.num_nodes - std::count(slot.begin(), slot.end(), 0);
  SiblingGroups g{Buffer<int64_t>(num_groups + 1), Buffer<int64_t>(f.num_nodes - f.num_trees),
                  Buffer<int64_t>(num_groups)};
  int64_t group = 0, cursor = 0;
  for (int64_t node = 0; node < f.num_nodes; ++node) {
    if (slot[node] == 0) continue;
    g.offsets[group] = cursor;
    g.parent[group++] = node;
    cursor += std::exchange(slot[node], cursor);
  }
  g.offsets[num_groups] = cursor;
  for (int64_t t = 0; t < f.num_trees; ++t)
    for (int64_t i = f.begin(t) + 1; i < f.begin(t) + f.size(t); ++i) g.members[slot[f.begin(t) + f.parent[i]]++] = i;
  return g;
}

void group_stats(const SiblingGroups& g, const double* values, double* mean, double* std) {
  std::vector<double> v, scratch;
  for (int64_t k = 0; k < g.count(); ++k) {
    const int64_t lo = g.offsets[k], n = g.offsets[k + 1] - lo;
    v.resize(n);
    scratch.resize(n);
    for (int64_t j = 0; j < n; ++j) v[j] = values[g.members[lo + j]];
    const MeanStd ms = numpy_mean_std(v.data(), n, 1, scratch.data());
    mean[k] = ms.mean;
    std[k] = n > 1 ? ms.std : 0.0;
  }
}

AdvantageCounts advantages(const SiblingGroups& g, const double* values, int64_t num_nodes,
                           Normalization normalization, double tau, double eps, double* advantage, bool* kept) {
  std::fill(advantage, advantage + num_nodes, 0.0);
  std::fill(kept, kept + num_nodes, false);
  std::vector<double> mean(g.count()), std(g.count()), centred_all;
  group_stats(g, values, mean.data(), std.data());
  int64_t kept_groups = 0;
  for (int64_t k = 0; k < g.count(); ++k) {
    const int64_t lo = g.offsets[k], hi = g.offsets[k + 1];
    if (hi - lo < 2 || std[k] < tau || std[k] == 0.0) continue;  // no signal: the group is dropped
    ++kept_groups;
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t node = g.members[j];
      const double centred = values[node] - mean[k];
      kept[node] = true;
      advantage[node] = normalization == Normalization::group_std ? centred / (std[k] + eps) : centred;
      if (normalization == Normalization::batch_std) centred_all.push_back(centred);
    }
  }
  if (normalization == Normalization::batch_std && !centred_all.empty()) {
    std::vector<double> scratch(centred_all.size());
    const double scale =
        numpy_mean_std(centred_all.data(), static_cast<int64_t>(centred_all.size()), 0, scratch.data()).std + eps;
    for (int64_t i = 0; i < num_nodes; ++i) advantage[i] /= scale;
  }
  return {g.count(), kept_groups};
}

}  // namespace treerpo

#include "forest.h"

#include <stdexcept>
#include <string>

namespace treerpo {
namespace {

[[noreturn]] void fail(int64_t tree, const std::string& what) {
  throw std::invalid_argument("tree " + std::to_string(tree) + ": " + what);
}

// Only called on an error path: does following parents from `node` come back to it?
bool on_cycle(const int64_t* parent, int64_t n, int64_t node) {
  int64_t at = parent[node];
  for (int64_t steps = 0; steps < n && at >= 0 && at < n; ++steps) {
    if (at == node) return true;
    at = parent[at];
  }
  return false;
}

[[noreturn]] void bad_parent(int64_t tree, const int64_t* parent, int64_t n, int64_t i) {
  const int64_t p = parent[i];
  const std::string node = "node " + std::to_string(i) + " has parent " + std::to_string(p);
  if (p < 0 || p >= n) fail(tree, node + ", out of range [0, " + std::to_string(n) + ")");
  if (p == i || on_cycle(parent, n, i)) fail(tree, node + ": a cycle of parents");
  fail(tree, node + ", numbered after it: a parent must come before its children");
}

void validate_tree(int64_t tree, const int64_t* parent, int64_t n) {
  if (parent[0] != -1) fail(tree, "node 0 is the root, its parent must be -1, got " + std::to_string(parent[0]));
  for (int64_t i = 1; i < n; ++i)
    if (parent[i] < 0 || parent[i] >= i) bad_parent(tree, parent, n, i);
}

}  // namespace

void validate(const Forest& f) {
  if (f.num_trees < 0) throw std::invalid_argument("node_offsets needs at least one entry");
  if (f.node_offsets[0] != 0) throw std::invalid_argument("node_offsets must start at 0");
  for (int64_t t = 0; t < f.num_trees; ++t) {
    if (f.size(t) < 1) fail(t, "no nodes (node_offsets must be strictly increasing: every tree has a root)");
    if (f.node_offsets[t + 1] > f.num_nodes) fail(t, "node_offsets runs past the end of parent");
  }
  if (f.node_offsets[f.num_trees] != f.num_nodes)
    throw std::invalid_argument("node_offsets must end at len(parent) = " + std::to_string(f.num_nodes) + ", got " +
                                std::to_string(f.node_offsets[f.num_trees]));
  for (int64_t t = 0; t < f.num_trees; ++t) validate_tree(t, f.parent + f.begin(t), f.size(t));
}

}  // namespace treerpo

// A batch of trees in flat arrays, and its validation.
//
// Tree t owns the nodes [node_offsets[t], node_offsets[t + 1]) of the batch. parent[] holds tree-local
// indices: -1 for each tree's root (its node 0), otherwise an earlier node of the same tree, so one
// reverse sweep over a tree finishes every child before its parent.
#pragma once

#include <cstdint>

namespace treerpo {

struct Forest {
  const int64_t* node_offsets;  // [num_trees + 1]
  int64_t num_trees;
  const int64_t* parent;  // [num_nodes], tree-local
  int64_t num_nodes;

  int64_t begin(int64_t t) const { return node_offsets[t]; }
  int64_t size(int64_t t) const { return node_offsets[t + 1] - node_offsets[t]; }
};

// Throws std::invalid_argument naming the tree and node at fault: bad offsets, a root whose parent is
// not -1, a parent out of range, a cycle, or a parent numbered after its child.
void validate(const Forest& forest);

}  // namespace treerpo

// A batch of trees laid out depth-first in one token buffer: the metadata of one tree-masked forward.
// Twin of treerpo/packing.py.
#pragma once

#include <cstdint>

#include "buffer.h"
#include "forest.h"

namespace treerpo {

struct PackInput {
  Forest forest;
  const int64_t* token_offsets;  // [num_nodes + 1]: node i's segment is token_ids[token_offsets[i]:token_offsets[i+1]]
  const int64_t* token_ids;
  int64_t num_token_ids;
  const bool* kept;          // [num_nodes]
  const double* advantage;   // [num_nodes]
  bool prune;                // leave out subtrees without a kept node
};

// One entry per packed token. Pre-order, children in index order; tin is the buffer index and tout the
// end of the token's subtree; prev_index the row predicting the token (-1 for each tree's first token).
struct Packed {
  Buffer<int64_t> input_ids, position_ids, prev_index, tree_index, node_index;
  Buffer<int32_t> tin, tout;
  Buffer<bool> loss_mask;
  Buffer<float> advantages;
};

Packed pack(const PackInput& in);

}  // namespace treerpo

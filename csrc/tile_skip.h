// The tiles of the tree-masked attention a kernel must visit. Query tile i holds rows
// [i * block_q, (i + 1) * block_q), key tile j rows [j * block_k, (j + 1) * block_k); the pair is needed iff
// some query q and key k in it satisfy tin[k] <= tin[q] < tout[k]. Twin of treerpo/tile_skip.py.
#pragma once

#include <cstdint>

#include "buffer.h"

namespace treerpo {

// CSR: the key tiles of query tile i are key_tiles[offsets[i]:offsets[i + 1]], ascending.
struct TileSkip {
  Buffer<int64_t> offsets;
  Buffer<int32_t> key_tiles;
};

// tin must be strictly increasing (a packed batch's tin is the buffer index).
template <class Index>
TileSkip tile_skip(const Index* tin, const Index* tout, int64_t n, int64_t block_q, int64_t block_k);

}  // namespace treerpo

#include "tile_skip.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

namespace treerpo {
namespace {

// Key k is visible to the query rows [k, end(k)): the rows whose tin lies in [tin[k], tout[k]).
template <class Index>
struct Visibility {
  const Index* tin;
  const Index* tout;
  int64_t n;
  bool contiguous;  // tin[i] == tin[0] + i, the packed layout: no search needed

  int64_t end(int64_t k) const {
    if (contiguous) return std::clamp<int64_t>(int64_t(tout[k]) - int64_t(tin[0]), 0, n);
    return std::lower_bound(tin, tin + n, tout[k]) - tin;
  }
};

template <class Index>
Visibility<Index> visibility(const Index* tin, const Index* tout, int64_t n) {
  bool contiguous = true;
  for (int64_t i = 1; i < n; ++i) {
    if (tin[i] <= tin[i - 1])
      throw std::invalid_argument("tin must be strictly increasing (row " + std::to_string(i) + ")");
    contiguous = contiguous && int64_t(tin[i]) - int64_t(tin[0]) == i;
  }
  return {tin, tout, n, contiguous};
}

// Calls visit(query_tile, key_tile) once per needed pair, key tiles in ascending order. Per key tile, the
// rows its keys are visible to are a union of intervals [k, end(k)), merged as k grows.
template <class Index, class Visit>
void for_each_pair(const Visibility<Index>& vis, int64_t block_q, int64_t block_k, Visit visit) {
  for (int64_t lo = 0, kt = 0; lo < vis.n; lo += block_k, ++kt) {
    int64_t last = -1, run_start = 0, run_end = 0;  // last query tile emitted; the interval being merged
    auto flush = [&] {
      if (run_end <= run_start) return;
      for (int64_t qt = std::max(run_start / block_q, last + 1); qt <= (run_end - 1) / block_q; ++qt) visit(qt, kt);
      last = std::max(last, (run_end - 1) / block_q);
    };
    for (int64_t k = lo; k < std::min(lo + block_k, vis.n); ++k) {
      const int64_t e = vis.end(k);
      if (e <= k) continue;
      if (k < run_end) {
        run_end = std::max(run_end, e);
      } else {
        flush();
        run_start = k;
        run_end = e;
      }
    }
    flush();
  }
}

}  // namespace

template <class Index>
TileSkip tile_skip(const Index* tin, const Index* tout, int64_t n, int64_t block_q, int64_t block_k) {
  if (block_q < 1 || block_k < 1) throw std::invalid_argument("block_q and block_k must be >= 1");
  const Visibility<Index> vis = visibility(tin, tout, n);
  const int64_t num_q = (n + block_q - 1) / block_q, num_k = (n + block_k - 1) / block_k;
  if (num_k > std::numeric_limits<int32_t>::max()) throw std::invalid_argument("too many key tiles for int32");
  TileSkip out{Buffer<int64_t>(num_q + 1), Buffer<int32_t>()};
  std::fill(out.offsets.get(), out.offsets.get() + num_q + 1, 0);
  for_each_pair(vis, block_q, block_k, [&](int64_t qt, int64_t) { ++out.offsets[qt + 1]; });
  for (int64_t i = 0; i < num_q; ++i) out.offsets[i + 1] += out.offsets[i];
  out.key_tiles = Buffer<int32_t>(out.offsets[num_q]);
  Buffer<int64_t> cursor(num_q);
  std::copy(out.offsets.get(), out.offsets.get() + num_q, cursor.get());
  for_each_pair(vis, block_q, block_k,
                [&](int64_t qt, int64_t kt) { out.key_tiles[cursor[qt]++] = static_cast<int32_t>(kt); });
  return out;
}

template TileSkip tile_skip<int32_t>(const int32_t*, const int32_t*, int64_t, int64_t, int64_t);
template TileSkip tile_skip<int64_t>(const int64_t*, const int64_t*, int64_t, int64_t, int64_t);

}  // namespace treerpo

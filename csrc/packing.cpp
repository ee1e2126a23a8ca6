#include "packing.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace treerpo {
namespace {

// Where each node lands in the buffer (global node indices); a node left out has subtree_tokens 0.
struct Layout {
  std::vector<bool> include;
  std::vector<int64_t> subtree_tokens, start, position, last_row;
  int64_t num_tokens = 0;
};

void validate_tokens(const PackInput& in) {
  const int64_t* offs = in.token_offsets;
  if (offs[0] != 0) throw std::invalid_argument("token_offsets must start at 0");
  for (int64_t i = 0; i < in.forest.num_nodes; ++i)
    if (offs[i + 1] < offs[i]) throw std::invalid_argument("token_offsets must be non-decreasing (node " +
                                                           std::to_string(i) + ")");
  if (offs[in.forest.num_nodes] != in.num_token_ids)
    throw std::invalid_argument("token_offsets must end at len(token_ids) = " + std::to_string(in.num_token_ids));
}

// Nodes in the forward: all, or (prune) those with a kept node at or below them, and every root.
void mark_included(const PackInput& in, int64_t b, int64_t n, Layout& l) {
  for (int64_t i = 0; i < n; ++i) l.include[b + i] = !in.prune || i == 0 || in.kept[b + i];
  if (!in.prune) return;
  for (int64_t i = n - 1; i > 0; --i)
    if (l.include[b + i]) l.include[b + in.forest.parent[b + i]] = true;
}

// Pre-order without a stack: subtree sizes bottom-up, then each child starts where its previous sibling's
// subtree ended (children in index order), top-down.
void place_tree(const PackInput& in, int64_t b, int64_t n, Layout& l, std::vector<int64_t>& next) {
  const int64_t* parent = in.forest.parent + b;
  auto len = [&](int64_t i) { return in.token_offsets[b + i + 1] - in.token_offsets[b + i]; };
  for (int64_t i = 0; i < n; ++i) l.subtree_tokens[b + i] = l.include[b + i] ? len(i) : 0;
  for (int64_t i = n - 1; i > 0; --i) l.subtree_tokens[b + parent[i]] += l.subtree_tokens[b + i];
  for (int64_t i = 0; i < n; ++i) {
    if (!l.include[b + i]) continue;
    const int64_t p = parent[i];
    const int64_t s = p < 0 ? l.num_tokens : next[b + p];
    if (p >= 0) next[b + p] += l.subtree_tokens[b + i];
    l.start[b + i] = s;
    next[b + i] = s + len(i);
    l.position[b + i] = p < 0 ? 0 : l.position[b + p] + len(p);
    // an empty segment predicts nothing: its children are predicted by the nearest non-empty ancestor
    l.last_row[b + i] = len(i) ? s + len(i) - 1 : (p < 0 ? -1 : l.last_row[b + p]);
  }
  l.num_tokens += l.subtree_tokens[b];
}

Layout layout(const PackInput& in) {
  const Forest& f = in.forest;
  Layout l{std::vector<bool>(f.num_nodes), std::vector<int64_t>(f.num_nodes), std::vector<int64_t>(f.num_nodes),
           std::vector<int64_t>(f.num_nodes), std::vector<int64_t>(f.num_nodes)};
  std::vector<int64_t> next(f.num_nodes);  // where a node's next child starts
  for (int64_t t = 0; t < f.num_trees; ++t) {
    mark_included(in, f.begin(t), f.size(t), l);
    place_tree(in, f.begin(t), f.size(t), l, next);
  }
  if (l.num_tokens > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("the packed batch has " + std::to_string(l.num_tokens) +
                                " tokens, more than tin/tout (int32) can index: pack fewer trees at once");
  return l;
}

template <class T, class V>
void fill(Buffer<T>& column, int64_t start, int64_t n, V value) {
  std::fill_n(column.get() + start, n, static_cast<T>(value));
}

template <class T, class V>
void iota(Buffer<T>& column, int64_t start, int64_t n, V first) {
  std::iota(column.get() + start, column.get() + start + n, static_cast<T>(first));
}

// One column at a time: each is a fill, a count or a copy, which the compiler vectorises.
void write_segment(const PackInput& in, const Layout& l, int64_t tree, int64_t local, Packed& out) {
  const int64_t node = in.forest.begin(tree) + local;
  const int64_t s = l.start[node], src = in.token_offsets[node], n = in.token_offsets[node + 1] - src;
  if (n == 0) return;
  const bool root = local == 0;
  std::copy_n(in.token_ids + src, n, out.input_ids.get() + s);
  iota(out.position_ids, s, n, l.position[node]);
  iota(out.tin, s, n, s);
  fill(out.tout, s, n, s + l.subtree_tokens[node]);
  iota(out.prev_index, s, n, s - 1);
  out.prev_index[s] = root ? -1 : l.last_row[in.forest.begin(tree) + in.forest.parent[node]];
  fill(out.loss_mask, s, n, !root && in.kept[node]);
  fill(out.advantages, s, n, root ? 0.0 : in.advantage[node]);
  fill(out.tree_index, s, n, tree);
  fill(out.node_index, s, n, local);
}

}  // namespace

Packed pack(const PackInput& in) {
  validate_tokens(in);
  const Layout l = layout(in);
  const int64_t m = l.num_tokens;
  Packed out{Buffer<int64_t>(m), Buffer<int64_t>(m), Buffer<int64_t>(m), Buffer<int64_t>(m), Buffer<int64_t>(m),
             Buffer<int32_t>(m), Buffer<int32_t>(m), Buffer<bool>(m),    Buffer<float>(m)};
  const Forest& f = in.forest;
  for (int64_t t = 0; t < f.num_trees; ++t)
    for (int64_t i = 0; i < f.size(t); ++i)
      if (l.include[f.begin(t) + i]) write_segment(in, l, t, i, out);
  return out;
}

}  // namespace treerpo

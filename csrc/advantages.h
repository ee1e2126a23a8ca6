// TreeRPO's step-level credit over a batch of trees: node values from the leaves up, sibling groups
// and their statistics, advantages with the tau filter. Twin of treerpo/algorithms/advantages.py.
#pragma once

#include <cstdint>
#include <string>

#include "buffer.h"
#include "forest.h"

namespace treerpo {

enum class ValueMode { children_mean, leaf_mean };
enum class Normalization { group_std, mean_only, batch_std };

ValueMode parse_value_mode(const std::string& name);
Normalization parse_normalization(const std::string& name);

// Leaves take their reward (NaN on a leaf is an error); an inner node the mean of its children's values
// or the mean reward of the leaves below it. Sums run in the reference's order, so results are equal.
void node_values(const Forest& forest, const double* reward, ValueMode mode, double* values);

// The children of each inner node, groups ordered by (tree, parent), members ascending; global indices.
struct SiblingGroups {
  Buffer<int64_t> offsets;  // [groups + 1]
  Buffer<int64_t> members;  // [non-root nodes]
  Buffer<int64_t> parent;   // [groups]
  int64_t count() const { return parent.size; }
};
SiblingGroups sibling_groups(const Forest& forest);

// Per group: the mean of its members' values and their unbiased std (0 for a single member).
void group_stats(const SiblingGroups& groups, const double* values, double* mean, double* std);

struct AdvantageCounts {
  int64_t groups;
  int64_t kept_groups;
};
AdvantageCounts advantages(const SiblingGroups& groups, const double* values, int64_t num_nodes,
                           Normalization normalization, double tau, double eps, double* advantage, bool* kept);

}  // namespace treerpo

// Sums, means and standard deviations computed exactly as numpy computes them (pairwise summation),
// so the tau filter (std < tau, std == 0) decides like the Python reference, bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

namespace treerpo {

// numpy's pairwise_sum for float64 (numpy/_core/src/umath/loops_utils.h.src); np.add.reduce adds it to 0.
inline double pairwise_sum(const double* a, int64_t n) {
  if (n < 8) {
    double res = 0.0;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

struct MeanStd {
  double mean;
  double std;
};

// np.mean(a) and np.std(a, ddof=ddof); `scratch` holds n doubles.
inline MeanStd numpy_mean_std(const double* a, int64_t n, int64_t ddof, double* scratch) {
  const double mean = pairwise_sum(a, n) / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) scratch[i] = (a[i] - mean) * (a[i] - mean);
  return {mean, std::sqrt(pairwise_sum(scratch, n) / static_cast<double>(n - ddof))};
}

}  // namespace treerpo

// An uninitialised array whose memory can be handed to numpy without a copy.
#pragma once

#include <cstdint>
#include <memory>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace treerpo {

// Large buffers ask for transparent huge pages, as numpy does for its arrays: filling fresh memory is
// otherwise dominated by one page fault per 4 KiB.
inline void advise_huge_pages(void* data, int64_t bytes) {
#ifdef __linux__
  if (bytes < (int64_t(1) << 22)) return;
  const uintptr_t page = 4096, begin = (reinterpret_cast<uintptr_t>(data) + page - 1) / page * page;
  const uintptr_t end = reinterpret_cast<uintptr_t>(data) + bytes;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

template <class T>
struct Buffer {
  std::unique_ptr<T[]> data;
  int64_t size = 0;

  Buffer() = default;
  explicit Buffer(int64_t n) : data(new T[n > 0 ? n : 1]), size(n) {  // default-init: no zeroing pass
    advise_huge_pages(data.get(), n * static_cast<int64_t>(sizeof(T)));
  }

  T* get() { return data.get(); }
  T& operator[](int64_t i) { return data[i]; }
  const T& operator[](int64_t i) const { return data[i]; }
};

}  // namespace treerpo

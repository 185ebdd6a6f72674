// SPDX-License-Identifier: Apache-2.0
#include "core/huge_pages.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tessera {

PageBytes AllocatePages(size_t bytes) {
  if (bytes == 0) return nullptr;
  constexpr size_t kPage = 4096, kHugePage = size_t{2} << 20;
  const size_t align = bytes >= kHugePage ? kHugePage : kPage;
  if (bytes > SIZE_MAX - align) return nullptr;
  const size_t size = (bytes + align - 1) / align * align;  // aligned_alloc wants a multiple
  void* p = std::aligned_alloc(align, size);
  if (p == nullptr) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: without THP the buffer keeps 4 KiB pages and works the same.
  if (align == kHugePage) (void)madvise(p, size, MADV_HUGEPAGE);
#endif
  return PageBytes(static_cast<uint8_t*>(p));
}

}  // namespace tessera

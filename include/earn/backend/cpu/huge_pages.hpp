// earn/backend/cpu/huge_pages.hpp - backing a model's weights with 2 MiB pages where Linux allows it.
//
// Decode streams every weight once per token. In 4 KiB pages that is a TLB miss every 4 KiB: a 15M-parameter model
// (61 MB) walks ~15 000 page tables a token, more than Zen 4's 3072-entry L2 TLB holds, so every page misses every
// token. llama2.c and llama.cpp map the checkpoint file, whose page cache the kernel may hold in large folios; the
// engine's weights are Eigen matrices from malloc, which Linux backs with 4 KiB pages unless the range is marked
// MADV_HUGEPAGE (transparent huge pages in "madvise" mode, as on the VMs these numbers come from).
//
// advise_huge_pages marks every 2 MiB-aligned block that a model's matrices (or any buffers) cover for the most part
// and asks the kernel to collapse it now (MADV_COLLAPSE, Linux 6.1+; older kernels leave it to khugepaged). Contents
// never change; failures (another kind of mapping in the block, no THP, not Linux) leave the pages as they were.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "earn/model/weights.hpp"

namespace earn::cpu {

/// What advise_huge_pages did: blocks of 2 MiB asked for, and those the kernel collapsed at once.
struct HugePageAdvice {
  int blocks = 0;
  int collapsed = 0;
};

/// Bytes [data, data + bytes) of one buffer, for advise_huge_pages.
struct MemoryRange {
  const void* data;
  std::size_t bytes;
};

/// Marks the 2 MiB blocks that the ranges cover at least half of as huge-page memory and collapses them.
/// Safe to call more than once (a collapsed block stays collapsed); a no-op off Linux, or when the environment sets
/// EARN_HUGE_PAGES=0 (to measure without, or to keep memory at its size to the byte: a block is advised when half of
/// it is covered, so up to 1 MiB a block that was never touched may be backed).
inline HugePageAdvice advise_huge_pages(std::vector<MemoryRange> ranges) {
  HugePageAdvice out;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (const char* e = std::getenv("EARN_HUGE_PAGES"); e && std::string_view(e) == "0") return out;
  constexpr std::uintptr_t kBlock = std::uintptr_t{2} << 20;
  std::sort(ranges.begin(), ranges.end(), [](const MemoryRange& a, const MemoryRange& b) { return a.data < b.data; });
  // Bytes covered in each 2 MiB block, block by block in address order.
  std::vector<std::pair<std::uintptr_t, std::uintptr_t>> covered;  // (block start, bytes)
  for (const MemoryRange& r : ranges) {
    const auto b = reinterpret_cast<std::uintptr_t>(r.data), e = b + r.bytes;
    for (std::uintptr_t blk = b / kBlock * kBlock; blk < e; blk += kBlock) {
      const std::uintptr_t n = std::min(e, blk + kBlock) - std::max(b, blk);
      if (!covered.empty() && covered.back().first == blk) covered.back().second += n;
      else covered.emplace_back(blk, n);
    }
  }
  for (const auto& [blk, n] : covered) {
    if (n < kBlock / 2) continue;
    void* p = reinterpret_cast<void*>(blk);
    if (madvise(p, kBlock, MADV_HUGEPAGE) != 0) continue;
    ++out.blocks;
#if defined(MADV_COLLAPSE)
    constexpr int kCollapse = MADV_COLLAPSE;
#else
    constexpr int kCollapse = 25;  // Linux 6.1's value, for C libraries whose headers predate it
#endif
    if (madvise(p, kBlock, kCollapse) == 0) ++out.collapsed;
  }
#else
  (void)ranges;
#endif
  return out;
}

/// The same for every tensor of a model (what the CPU engine does with its weights when it is built).
template <class T>
inline HugePageAdvice advise_huge_pages(const BasicModelWeights<T>& w) {
  std::vector<MemoryRange> ranges;
  for (const auto& t : w.tensors()) ranges.push_back({t.data, static_cast<std::size_t>(t.size) * sizeof(T)});
  return advise_huge_pages(std::move(ranges));
}

}  // namespace earn::cpu

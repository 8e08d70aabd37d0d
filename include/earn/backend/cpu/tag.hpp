// earn/backend/cpu/tag.hpp - the CPU backend tag (Eigen, optionally OpenMP-threaded).
#pragma once

namespace earn {

/// Backend tag: run on the host CPU with Eigen. The default backend of every earn type.
struct Cpu {
  static constexpr const char* name = "cpu";
};

}  // namespace earn

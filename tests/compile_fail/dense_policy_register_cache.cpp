// Must not compile with EARN_SHOULD_FAIL: a policy that keeps the prompt paired with a cache that cannot hold it.
#include "earn/schedule/presets.hpp"

#ifdef EARN_SHOULD_FAIL
using L = earn::Layer<earn::attention::DenseCausal, earn::kv::Register>;
#else
using L = earn::Layer<earn::attention::DenseCausal, earn::kv::Contiguous>;
#endif
L layer;

// Must not compile with EARN_SHOULD_FAIL: Gist's decode rows may not see prompt rows (its kind rule), but a
// contiguous cache holds them, and decode attends to every cached row.
#include "earn/schedule/presets.hpp"

#ifdef EARN_SHOULD_FAIL
using L = earn::Layer<earn::attention::Gist, earn::kv::Contiguous>;
#else
using L = earn::GistLayer;
#endif
L layer;

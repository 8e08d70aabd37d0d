// Must not compile with EARN_SHOULD_FAIL: a register-only layer below a dense one (rows that left the residual
// stream cannot come back). Without it, the correct order compiles (the control).
#include "earn/schedule/presets.hpp"

#ifdef EARN_SHOULD_FAIL
using Wrong = earn::Split<2, earn::RegisterLayer, earn::DenseLayer>;
#else
using Wrong = earn::Split<2, earn::DenseLayer, earn::RegisterLayer>;
#endif
Wrong schedule;

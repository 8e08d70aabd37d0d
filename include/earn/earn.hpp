// earn/earn.hpp - the umbrella header: everything of earn's CPU side (loaders, model, EARN schedules, rec loop).
#pragma once

#include "earn/attention/dense_causal.hpp"
#include "earn/attention/register_only.hpp"
#include "earn/core/config.hpp"
#include "earn/core/error.hpp"
#include "earn/generate/generate.hpp"
#include "earn/kv/contiguous.hpp"
#include "earn/kv/register.hpp"
#include "earn/layer/layer.hpp"
#include "earn/model/engine.hpp"
#include "earn/model/weights.hpp"
#include "earn/schedule/presets.hpp"
#include "earn/schedule/split.hpp"

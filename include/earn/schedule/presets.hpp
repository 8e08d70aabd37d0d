// earn/schedule/presets.hpp - the schedules most users want, by name.
#pragma once

#include "earn/attention/dense_causal.hpp"
#include "earn/attention/register_only.hpp"
#include "earn/kv/contiguous.hpp"
#include "earn/kv/register.hpp"
#include "earn/layer/layer.hpp"
#include "earn/schedule/split.hpp"

namespace earn {

/// A dense layer: causal attention over everything, contiguous cache.
using DenseLayer = Layer<attention::DenseCausal, kv::Contiguous>;
/// EARN's late layer: registers and generated tokens only, register cache.
using RegisterLayer = Layer<attention::RegisterOnly, kv::Register>;

/// The ordinary model ("Finetune" baseline): every layer dense.
using DenseSchedule = Uniform<DenseLayer>;
/// EARN with the split layer chosen at run time: `EarnSchedule{k}`.
using EarnSchedule = Split<Dynamic, DenseLayer, RegisterLayer>;
/// EARN with the split layer fixed at compile time.
template <int K>
using EarnScheduleK = Split<K, DenseLayer, RegisterLayer>;

}  // namespace earn

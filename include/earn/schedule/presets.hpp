// earn/schedule/presets.hpp - the schedules most users want, by name.
#pragma once

#include "earn/attention/dense_causal.hpp"
#include "earn/attention/gist.hpp"
#include "earn/attention/register_only.hpp"
#include "earn/kv/contiguous.hpp"
#include "earn/kv/pressed.hpp"
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

/// A dense layer whose cache keeps what press P keeps (kv/press.hpp).
template <class P>
using PressLayer = Layer<attention::DenseCausal, kv::Pressed<P>>;
/// An inference-time baseline: the dense model with press P over every layer's cache.
template <class P>
using PressSchedule = Uniform<PressLayer<P>>;
/// press_schedule(kv::press::SnapKV{.budget = {.ratio = 0.25}}): the schedule of a press value.
template <class P>
PressSchedule<P> press_schedule(P press) {
  return PressSchedule<P>{PressLayer<P>{{}, {press}}};
}

/// Gist's layer: every row computed, decode (and fed) rows see only the registers, the cache holds only them.
using GistLayer = Layer<attention::Gist, kv::Pressed<kv::press::Gist>>;
/// Gist-style prompt compression (the paper's trained baseline) from layer 0: train with it (a Gist model), then
/// decode with only the registers' KV at every layer.
using GistSchedule = Uniform<GistLayer>;

static_assert(Schedule<DenseSchedule> && Schedule<EarnSchedule> && Schedule<EarnScheduleK<2>> &&
              Schedule<PressSchedule<kv::press::SnapKV>> && Schedule<GistSchedule>);

}  // namespace earn

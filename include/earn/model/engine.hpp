// earn/model/engine.hpp - the inference engine: a model's weights run under a layer schedule on a backend.
//
//   earn::Engine<Schedule, Backend>   Schedule: DenseSchedule, EarnSchedule{k}, Split<k, Early, Late>, ...
//                                     Backend:  earn::Cpu (this header) or earn::Cuda (earn/cuda.cuh)
//
// Rows of the input are [R_prefix; prompt; R_suffix] at positions 0..n-1, then generated tokens at n, n+1, ...
// Every row keeps its original position id, also in layers where prompt rows have left.
#pragma once

#include "earn/backend/cpu/engine.hpp"
#include "earn/model/engine_fwd.hpp"

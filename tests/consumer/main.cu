// Uses earn's CUDA backend as a consumer would: <earn/cuda.cuh> in a .cu file, the backend chosen by the engine's
// template argument. With a GPU: one fp32 prefill on the GPU equals the CPU engine's; without one it was built
// and says so.
#include <earn/cuda.cuh>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  if (earn::cuda::device_count() == 0) {
    std::printf("no CUDA device: consumer_cuda built, not run\n");
    return 0;
  }
  earn::ModelConfig c;
  c.dim = 16; c.hidden_dim = 24; c.n_layers = 2; c.n_heads = 2; c.n_kv_heads = 1; c.vocab_size = 20; c.max_seq_len = 32;
  const earn::ModelWeights w = earn::random_weights(c, {.prefix_registers = 1, .suffix_registers = 1});
  earn::Engine<earn::EarnSchedule> cpu(w, earn::EarnSchedule{1});
  earn::Engine<earn::EarnSchedule, earn::Cuda> gpu(w, earn::EarnSchedule{1});
  auto cs = cpu.make_state({});
  auto gs = gpu.make_state({});
  const std::vector<int> prompt = {1, 2, 3, 4};
  const earn::Vector a = cpu.prefill(cs, 0, prompt), b = gpu.prefill(gs, 0, prompt);
  const double err = (a - b).cwiseAbs().maxCoeff();
  std::printf("CPU vs CUDA prefill logits: max |difference| %.2e\n", err);
  return err <= 1e-4 * std::max(1.0f, a.cwiseAbs().maxCoeff()) ? 0 : 1;
}

// Fuzzes the safetensors reader (earn/io/safetensors.hpp): header length, JSON header, dtypes, shapes and offsets,
// then reads every float tensor it accepted. Seeds: tensors of the real stories260K in F32, F16 and BF16
// (tests/fuzz/make_corpus.cpp).
#include "earn/io/safetensors.hpp"
#include "fuzz_support.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  earn::fuzz::clean([&] {
    const auto in = earn::fuzz::bytes(data, size);
    const auto f = earn::io::SafetensorsFile::from_bytes("fuzz.safetensors", {in.begin(), in.end()});
    for (const std::string& name : f.names()) {
      const earn::io::TensorInfo& t = *f.find(name);
      // Accepted offsets lie inside the input, so this reads at most `size` bytes' worth of elements.
      if (t.dtype == earn::io::Dtype::kF32 || t.dtype == earn::io::Dtype::kF16 || t.dtype == earn::io::Dtype::kBF16) {
        (void)f.read_floats(t);
        if (t.shape.size() == 2) (void)f.read_matrix(name);
      }
    }
  });
  return 0;
}

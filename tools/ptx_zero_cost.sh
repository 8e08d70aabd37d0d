#!/usr/bin/env bash
# tools/ptx_zero_cost.sh [BASE_COMMIT] - is a change to the policy hooks free for the position-only policies? Compiles
# the same instantiations (flash prefill attention for DenseCausal and RegisterOnly, whole and partial; flash
# decoding's combine; the press kernels; bf16, every head size) against BASE_COMMIT's include/ and the working
# tree's, to PTX with nvcc -O3 -arch=sm_90, and compares every kernel present in both, instruction by instruction,
# with symbol and label names renamed (a kernel's mangled name changes when its parameter list does).
# Needs nvcc only (no GPU, no cuobjdump). Prints one line per kernel and a summary; exit 1 when any kernel differs.
set -euo pipefail
base=${1:-HEAD}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/base"
git -C "$root" archive "$base" include | tar -x -C "$tmp/base"
cat >"$tmp/k.cu" <<'CU'
#include "earn/cuda.cuh"
using namespace earn;
void inst(cudaStream_t s, const cuda::FlashArgs<__nv_bfloat16>& fa, const __nv_bfloat16* q, const __nv_bfloat16* gk,
          const int* rs, const int* rseg, const cuda::Segment* segs, const int* pos, cuda::FlashSplit split, float* ws,
          __nv_bfloat16* out) {
  cuda::flash_attention<attention::DenseCausal, false>(s, fa);
  cuda::flash_attention<attention::RegisterOnly, true>(s, fa);
  cuda::decode_attention<attention::DenseCausal, __nv_bfloat16>(s, q, gk, gk, rs, rseg, segs, 1, 1, pos, 1, 8, 2, 64,
                                                                1, 4, split, ws, out);
}
CU
for v in base work; do
  inc=$tmp/base/include
  [ "$v" = work ] && inc=$root/include
  nvcc -std=c++20 --expt-relaxed-constexpr -O3 -arch=sm_90 -diag-suppress=20012 -I"$inc" -isystem /usr/include/eigen3 \
    -ptx "$tmp/k.cu" -o "$tmp/$v.ptx"
done
python3 - "$tmp/base.ptx" "$tmp/work.ptx" <<'PY'
import re, sys
def kernels(path):
    parts = re.split(r'\n(?=\.visible \.entry )', open(path).read())[1:]
    out = {}
    for p in parts:
        name = re.match(r'\.visible \.entry (\S+?)\(', p).group(1)
        key = re.sub(r'NS\d+_9LayerMaskIT_EE$', '', name)  # the mask parameter's mangling
        body = p.split('{', 1)[1].split('\n')
        out[key] = [re.sub(r'\$L__BB\d+_', 'L_', re.sub(r'_ZN[0-9A-Za-z_]+', 'SYM', l)) for l in body]
    return out
a, b = kernels(sys.argv[1]), kernels(sys.argv[2])
common = sorted(set(a) & set(b))
diff = 0
for k in common:
    same = a[k] == b[k]
    diff += not same
    print(('same  ' if same else 'DIFFER') + f' {sum(1 for l in b[k] if l.strip()):6d} lines  {k}')
print(f'{len(common) - diff} of {len(common)} kernels identical; only in base: {len(set(a) - set(b))}, '
      f'only in the working tree: {len(set(b) - set(a))}')
sys.exit(1 if diff else 0)
PY

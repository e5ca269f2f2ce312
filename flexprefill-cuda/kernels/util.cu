// Utility kernels for benches and tests: device-side random fills (so a 128k-token bench does
// not generate gigabytes on the host).
#include "flexprefill_common.cuh"

FP_DEVICE uint64_t splitmix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// x[i] = amp * N(0, 1) (Box-Muller on a counter-based hash), rounded to the 16-bit Elem.
extern "C" __global__ void fill_normal(uint16_t* x, uint64_t n, uint64_t seed, float amp) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
         i += (uint64_t)gridDim.x * blockDim.x) {
        const uint64_t h = splitmix64(seed ^ splitmix64(i));
        const float u = ((h >> 40) + 1) * (1.0f / 16777217.0f);
        const float v = (h & 0xffffff) * (1.0f / 16777216.0f);
        const float z = sqrtf(-2.f * __logf(u)) * __cosf(6.2831853f * v);
        x[i] = Elem::from_float(amp * z);
    }
}

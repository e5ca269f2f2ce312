// flexprefill_common.cuh: small device helpers shared by every kernel family.
//
// Written with inline PTX so that NVRTC needs no CUDA toolkit header: the crate compiles its
// kernels on any machine that has the driver and libnvrtc, toolkit or not.
// bf16 and f16 tensors are stored as raw 16-bit words (uint16_t); convert with the helpers.
#pragma once

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;

#define FP_DEVICE __device__ __forceinline__

// ---- conversions --------------------------------------------------------------------------

FP_DEVICE float bf16_to_float(uint16_t h) { return __uint_as_float(((uint32_t)h) << 16); }

FP_DEVICE float f16_to_float(uint16_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

FP_DEVICE uint16_t float_to_bf16(float f) {
    uint16_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

FP_DEVICE uint16_t float_to_f16(float f) {
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// Two floats into one 32-bit register of two 16-bit values, `lo` in the low half (the element
// with the smaller column index in mma fragments).
FP_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

FP_DEVICE uint32_t pack_f16x2(float lo, float hi) {
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Element type tags: `Elem::to_float`, `Elem::pack2`, `Elem::mma` pick the bf16 or f16 path.
struct ElemBF16 {
    static FP_DEVICE float to_float(uint16_t h) { return bf16_to_float(h); }
    static FP_DEVICE uint16_t from_float(float f) { return float_to_bf16(f); }
    static FP_DEVICE uint32_t pack2(float lo, float hi) { return pack_bf16x2(lo, hi); }
    // D = A·B + D, m16n8k16, A row-major 16x16, B col-major 16x8, f32 accumulators.
    static FP_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

struct ElemF16 {
    static FP_DEVICE float to_float(uint16_t h) { return f16_to_float(h); }
    static FP_DEVICE uint16_t from_float(float f) { return float_to_f16(f); }
    static FP_DEVICE uint32_t pack2(float lo, float hi) { return pack_f16x2(lo, hi); }
    static FP_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
};

#if defined(KEY_DTYPE_F16)
typedef ElemF16 Elem;
#else
typedef ElemBF16 Elem;
#endif

// ---- math ---------------------------------------------------------------------------------

// 2^x with the SFU (ex2.approx, ~2 ulp); -inf gives +0, which the online softmax relies on.
FP_DEVICE float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

FP_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

FP_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---- shared memory and async copies -------------------------------------------------------

FP_DEVICE uint32_t smem_u32(const void* p) {
    uint32_t a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16-byte global -> shared copy that bypasses L1; `valid == false` writes 16 zero bytes and
// reads nothing (src must still be a mapped address: pass the tensor's base).
FP_DEVICE void cp_async_16(uint32_t dst, const void* src, bool valid) {
    int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

FP_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
FP_DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; lane l gives the address of row (l & 7) of matrix (l >> 3).
FP_DEVICE void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

FP_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

FP_DEVICE void st_shared_u32(uint32_t addr, uint32_t v) {
    asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v));
}

FP_DEVICE uint4 ld_shared_u128(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr));
    return v;
}

// A CPU emulation of the CUDA execution model, just enough to run
// src/cuda/kernels.cu unchanged in CI (no GPU there): every CUDA thread of a
// block is a fiber (ucontext) on one OS thread, blocks run one after another.
// __syncthreads parks a fiber until every live thread of the block arrived;
// warp shuffles and mma.sync meet at a warp barrier and exchange values
// through a per-warp buffer. Shared memory is static storage, valid because
// blocks do not overlap. Exited threads no longer count at barriers, as on
// the hardware.
//
// The mma emulation follows the PTX ISA's fragment layout for m16n8k16 with
// bf16 inputs and f32 accumulation; a kernel that misplaces a fragment gets a
// wrong answer here exactly as it would on the GPU.
#pragma once
#define REMASK_EMU 1

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {

enum Wait { Run, AtBlock, AtWarp, Done };

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    dim3 tid;
    unsigned lane = 0, warp = 0;
    Wait wait = Run;
};

struct State {
    ucontext_t main;
    std::vector<Fiber> fibers;
    unsigned current = 0;
    std::function<void()> body;
    unsigned live = 0, at_block = 0;
    std::vector<unsigned> warp_live, at_warp;
    std::vector<uint64_t> exchange;           // 32 slots per warp
    std::vector<float> mma_a, mma_b;          // 16x16 and 16x8 per warp
    std::vector<unsigned char> dynamic_shared;
    dim3 grid, block, block_idx;
};

inline State S;

inline Fiber& me() { return S.fibers[S.current]; }

inline void park(Wait w) {
    me().wait = w;
    swapcontext(&me().ctx, &S.main);
}

inline void release(Wait kind, unsigned warp) {
    for (auto& f : S.fibers)
        if (f.wait == kind && (kind == AtBlock || f.warp == warp)) f.wait = Run;
}

inline void syncthreads() {
    if (++S.at_block == S.live) {
        S.at_block = 0;
        release(AtBlock, 0);
        return;
    }
    park(AtBlock);
}

inline void syncwarp() {
    unsigned w = me().warp;
    if (++S.at_warp[w] == S.warp_live[w]) {
        S.at_warp[w] = 0;
        release(AtWarp, w);
        return;
    }
    park(AtWarp);
}

inline void trampoline() {
    S.body();
    Fiber& f = me();
    S.live--;
    S.warp_live[f.warp]--;
    if (S.at_block > 0 && S.at_block == S.live) {
        S.at_block = 0;
        release(AtBlock, 0);
    }
    if (S.at_warp[f.warp] > 0 && S.at_warp[f.warp] == S.warp_live[f.warp]) {
        S.at_warp[f.warp] = 0;
        release(AtWarp, f.warp);
    }
    park(Done);
}

inline void launch(dim3 grid, dim3 block, size_t shared_bytes, std::function<void()> body) {
    const unsigned n = block.x * block.y * block.z, warps = (n + 31) / 32;
    S.grid = grid;
    S.block = block;
    S.body = std::move(body);
    S.fibers.resize(n);
    S.exchange.assign(32 * warps, 0);
    S.mma_a.assign(256 * warps, 0.0f);
    S.mma_b.assign(128 * warps, 0.0f);
    // Uninitialised shared memory reads as NaN, so a kernel relying on it shows.
    S.dynamic_shared.assign(shared_bytes, 0xff);
    for (auto& f : S.fibers)
        if (f.stack.empty()) f.stack.resize(256 * 1024);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                S.block_idx = dim3{bx, by, bz};
                S.live = n;
                S.at_block = 0;
                S.warp_live.assign(warps, 0);
                S.at_warp.assign(warps, 0);
                for (unsigned i = 0; i < n; ++i) {
                    Fiber& f = S.fibers[i];
                    f.tid = dim3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
                    f.lane = i % 32;
                    f.warp = i / 32;
                    f.wait = Run;
                    S.warp_live[f.warp]++;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, trampoline, 0);
                }
                for (;;) {
                    bool ran = false, all_done = true;
                    for (unsigned i = 0; i < n; ++i) {
                        if (S.fibers[i].wait == Run) {
                            S.current = i;
                            swapcontext(&S.main, &S.fibers[i].ctx);
                            ran = true;
                        }
                        all_done &= S.fibers[i].wait == Done;
                    }
                    if (all_done) break;
                    if (!ran) {
                        fprintf(stderr, "emu: deadlock in block (%u, %u, %u)\n", bx, by, bz);
                        abort();
                    }
                }
            }
}

template <class T>
T shfl_xor(T v, int mask) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    uint64_t* slots = &S.exchange[32 * me().warp];
    slots[me().lane] = bits;
    syncwarp();
    uint64_t other = slots[me().lane ^ (unsigned)mask];
    syncwarp();
    T r;
    memcpy(&r, &other, sizeof(T));
    return r;
}

inline float bf16_bits_to_f32(uint32_t h) {
    uint32_t u = (h & 0xffffu) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

}  // namespace emu

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, d += a . b, by the
// whole warp: each lane deposits its fragments, then computes its own four
// outputs from the assembled tiles.
inline void emu_mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
    using namespace emu;
    const unsigned lane = me().lane, g = lane >> 2, t = lane & 3;
    float* A = &S.mma_a[256 * me().warp];  // [16][16]
    float* B = &S.mma_b[128 * me().warp];  // [16][8]
    const unsigned rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
        A[rows[i] * 16 + cols[i]] = bf16_bits_to_f32(a[i]);
        A[rows[i] * 16 + cols[i] + 1] = bf16_bits_to_f32(a[i] >> 16);
    }
    for (int i = 0; i < 2; ++i) {
        const unsigned k = 2 * t + 8 * i;
        B[k * 8 + g] = bf16_bits_to_f32(b[i]);
        B[(k + 1) * 8 + g] = bf16_bits_to_f32(b[i] >> 16);
    }
    syncwarp();
    for (int i = 0; i < 4; ++i) {
        const unsigned r = g + 8 * (i / 2), c = 2 * t + (i & 1);
        float acc = d[i];
        for (int k = 0; k < 16; ++k) acc += A[r * 16 + k] * B[k * 8 + c];
        d[i] = acc;
    }
    syncwarp();
}

// The CUDA built-ins the kernels use.
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define threadIdx (emu::me().tid)
#define blockIdx (emu::S.block_idx)
#define blockDim (emu::S.block)
#define gridDim (emu::S.grid)
#define __syncthreads() emu::syncthreads()
#define __shfl_xor_sync(mask, v, m) emu::shfl_xor((v), (m))
#define DYNAMIC_SHARED(type, name) type* name = (type*)emu::S.dynamic_shared.data()

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __expf(float x) { return std::exp(x); }
// Rounded on their own: the emulation compiles with -ffp-contract=off.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
// Fibers switch only at barriers: an add is atomic.
template <class T>
T atomicAdd(T* address, T v) {
    T old = *address;
    *address = old + v;
    return old;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

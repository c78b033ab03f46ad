// The generated-weight kernel of src/cuda/kernels.cu (`init_normal_bf16`),
// compiled for the CPU emulation (emu.h) with a C launcher, for
// tests/generated_weights_emulated.rs. Kept apart from launch.cpp so that
// each test binary builds only what it calls.
#include "emu.h"
#include "../../src/cuda/kernels.cu"

extern "C" void launch_init_normal_bf16(unsigned gx, unsigned bx, bf16_t* out, int rows, int cols, long long full_cols,
                                        long long row0, long long col0, u64 seed, u64 tensor, float stddev,
                                        int one_plus) {
    emu::launch(dim3{gx, 1, 1}, dim3{bx, 1, 1}, 0,
                [&] { init_normal_bf16(out, rows, cols, full_cols, row0, col0, seed, tensor, stddev, one_plus); });
}

// The kernels of src/cuda/kernels.cu, compiled for the CPU emulation
// (emu.h) and exported with a C launcher each: geometry first (grid x y z,
// block x y z, dynamic shared bytes), then the kernel's own arguments.
// Pointers are host memory: in the emulation, device memory is host memory.
#include "emu.h"
#include "../../src/cuda/kernels.cu"

#define GEOM unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared
#define RUN(kernel, ...) emu::launch(dim3{gx, gy, gz}, dim3{bx, by, bz}, shared, [&] { kernel(__VA_ARGS__); })

extern "C" {

void launch_embed(GEOM, float* out, const bf16_t* table, const unsigned* ids, int rows, int d) {
    RUN(embed, out, table, ids, rows, d);
}

void launch_rms_norm(GEOM, float* out, const float* x, const float* w, int d, float eps) {
    RUN(rms_norm, out, x, w, d, eps);
}

void launch_to_bf16(GEOM, bf16_t* out, const float* x, long long n) { RUN(to_bf16, out, x, n); }

void launch_rope(GEOM, float* x, const unsigned* positions, const float* c, const float* s, int rows, int cols,
                 int hd) {
    RUN(rope, x, positions, c, s, rows, cols, hd);
}

void launch_attention(GEOM, float* out, const float* q, const float* k, const float* v, const unsigned* start,
                      const unsigned* len, int nh, int nkv, int hd, float scale) {
    RUN(attention, out, q, k, v, start, len, nh, nkv, hd, scale);
}

#define EXPORT_TC(HD)                                                                                      \
    void launch_attention_tc_##HD(GEOM, float* out, const float* q, const float* k, const float* v,        \
                                  const unsigned* tiles, int nh, int nkv, float scale) {                   \
        RUN(attention_tc_##HD, out, q, k, v, tiles, nh, nkv, scale);                                       \
    }
EXPORT_TC(16)
EXPORT_TC(32)
EXPORT_TC(64)
EXPORT_TC(128)

void launch_silu_mul(GEOM, float* out, const float* gate, const float* up, long long n) {
    RUN(silu_mul, out, gate, up, n);
}

void launch_add_assign(GEOM, float* x, const float* y, long long n) { RUN(add_assign, x, y, n); }

void launch_gather_rows(GEOM, float* out, const float* x, const unsigned* rows, int n, int cols) {
    RUN(gather_rows, out, x, rows, n, cols);
}

void launch_head_partials(GEOM, double* score, unsigned* token, double* logit, double* lse, double* mean,
                          double* max, double* top_logit, int* top_token, const float* logits, int width,
                          int offset, const unsigned* cond, const int* uncond, const u64* keys, const double* temp,
                          const double* cfg, const unsigned* mask, const unsigned* eos, const unsigned* flags,
                          const unsigned* floors) {
    RUN(head_partials, score, token, logit, lse, mean, max, top_logit, top_token, logits, width, offset, cond, uncond,
        keys, temp, cfg, mask, eos, flags, floors);
}

void launch_head_histograms(GEOM, u64* count, u64* mass, const float* logits, int width, int offset,
                            const unsigned* cond, const int* uncond, const double* cfg, const unsigned* mask,
                            const unsigned* eos, const unsigned* flags, const unsigned* rounds,
                            const double* round_scale) {
    RUN(head_histograms, count, mass, logits, width, offset, cond, uncond, cfg, mask, eos, flags, rounds,
        round_scale);
}

void launch_init_normal_bf16(GEOM, bf16_t* out, int rows, int cols, long long full_cols, long long row0,
                             long long col0, u64 seed, u64 tensor, float stddev, int one_plus) {
    RUN(init_normal_bf16, out, rows, cols, full_cols, row0, col0, seed, tensor, stddev, one_plus);
}
}

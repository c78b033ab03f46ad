// remask's CUDA kernels, compiled by NVRTC when the CUDA backend starts.
// Activations are f32; matrix weights are bf16 (raw bits, unsigned short);
// norm weights and RoPE tables are f32. Matrix products go to cuBLAS.

// NVRTC has no <math.h>: the one constant we need from it.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Dynamic shared memory, spelled so the CPU emulation (tests/cuda_emu) can
// provide it too.
#ifndef DYNAMIC_SHARED
#define DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

typedef unsigned short bf16_t;
typedef unsigned long long u64;

__device__ __forceinline__ float bf16_to_f32(bf16_t v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

// Round to nearest even, as torch does.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__device__ __forceinline__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : 0.0f;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    return shared[0];
}

__device__ __forceinline__ float block_max(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < warps) ? shared[threadIdx.x] : -INFINITY;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (threadIdx.x == 0) shared[0] = v;
    __syncthreads();
    return shared[0];
}

// out[r, :] = table[ids[r], :]
extern "C" __global__ void embed(float* out, const bf16_t* table, const unsigned int* ids, int rows, int d) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * d) return;
    int r = i / d, c = i % d;
    out[i] = bf16_to_f32(table[(long long)ids[r] * d + c]);
}

// One block per row: out = x * rsqrt(mean(x^2) + eps) * w, in f32.
extern "C" __global__ void rms_norm(float* out, const float* x, const float* w, int d, float eps) {
    __shared__ float shared[32];
    const float* row = x + (long long)blockIdx.x * d;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < d; c += blockDim.x) ss += row[c] * row[c];
    float r = rsqrtf(block_sum(ss, shared) / d + eps);
    float* o = out + (long long)blockIdx.x * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = row[c] * r * w[c];
}

extern "C" __global__ void to_bf16(bf16_t* out, const float* x, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = f32_to_bf16(x[i]);
}

// Rotate-half RoPE in place; one thread per (row, head, i < hd/2).
extern "C" __global__ void rope(float* x, const unsigned int* positions, const float* cos_t, const float* sin_t,
                                int rows, int cols, int hd) {
    int half = hd / 2;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long per_row = cols / 2;
    if (i >= (long long)rows * per_row) return;
    int r = i / per_row, rest = i % per_row;
    int head = rest / half, k = rest % half;
    float* h = x + (long long)r * cols + head * hd;
    float c = cos_t[positions[r] * half + k], s = sin_t[positions[r] * half + k];
    float x1 = h[k], x2 = h[k + half];
    h[k] = x1 * c - x2 * s;
    h[k + half] = x2 * c + x1 * s;
}

// Bidirectional attention within each packed sequence, the simple way: one
// block per (query row, head), the row's scores in shared memory (seq_len
// floats). Every block reads its sequence's whole K and V, so this is only
// the fallback for head dims the tiled kernel below does not cover.
extern "C" __global__ void attention(float* out, const float* q, const float* k, const float* v,
                                     const unsigned int* seq_start, const unsigned int* seq_len,
                                     int n_heads, int n_kv_heads, int hd, float scale) {
    DYNAMIC_SHARED(float, scores);
    __shared__ float red[32];
    int row = blockIdx.x, head = blockIdx.y;
    int kv_head = head / (n_heads / n_kv_heads);
    int qs = n_heads * hd, kvs = n_kv_heads * hd;
    int start = seq_start[row], len = seq_len[row];
    const float* qr = q + (long long)row * qs + head * hd;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float* kr = k + (long long)(start + j) * kvs + kv_head * hd;
        float dot = 0.0f;
        for (int c = 0; c < hd; ++c) dot += qr[c] * kr[c];
        scores[j] = dot * scale;
    }
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = block_max(m, red);
    float s = 0.0f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        float e = __expf(scores[j] - m);
        scores[j] = e;
        s += e;
    }
    float inv = 1.0f / block_sum(s, red);
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < len; ++j) acc += scores[j] * v[(long long)(start + j) * kvs + kv_head * hd + c];
        out[(long long)row * qs + head * hd + c] = acc * inv;
    }
}

// ---------------------------------------------------------------- attention
// Flash-style bidirectional attention on the tensor cores (the FlashAttention-2
// scheme). A block of 4 warps takes 64 query rows of one sequence and one
// head; each warp owns 16 rows. Keys and values stream through shared memory
// in tiles of 64, rounded to bf16 (as PyTorch's bf16 attention sees them);
// S = Q K^T and O += P V run as mma.sync m16n8k16 (bf16 in, f32 accumulate)
// and the softmax is online (running max and sum per row, in f32). Nothing of
// size T x T exists anywhere, and each K/V tile is read once per 64 queries.
//
// Fragment layouts (PTX ISA, mma.m16n8k16): lane = 4 * g + t;
//   A 16x16 row-major: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8 column:     b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C 16x8 f32:        c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// A pair of bf16 in one 32-bit register holds the lower index in the low half.

#define ATT_Q 64      // query rows per block (16 per warp)
#define ATT_KV 64     // keys per tile
#define ATT_PAD 8     // bf16 elements of padding per shared row: no bank conflicts

__device__ __forceinline__ unsigned int pack_bf16(float lo, float hi) {
    return (unsigned int)f32_to_bf16(lo) | ((unsigned int)f32_to_bf16(hi) << 16);
}

// d += a . b for one 16x8x16 tile (bf16 inputs, f32 accumulation).
__device__ __forceinline__ void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
#ifdef REMASK_EMU
    emu_mma_bf16_16816(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// tiles: 4 numbers per block.x: first query row, end of the query rows,
// and the start and end of their sequence (rows of the packed batch).
template <int HD>
__device__ __forceinline__ void attention_tc(float* out, const float* q, const float* k, const float* v,
                                             const unsigned int* tiles, int n_heads, int n_kv_heads,
                                             float scale) {
    __shared__ bf16_t ks[ATT_KV][HD + ATT_PAD];   // K tile, row = key
    __shared__ bf16_t vt[HD][ATT_KV + ATT_PAD];   // V tile transposed, row = dim
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const unsigned int* tile = tiles + 4 * blockIdx.x;
    const int q0 = tile[0], q_end = tile[1], s0 = tile[2], s_end = tile[3];
    const int head = blockIdx.y, kv_head = head / (n_heads / n_kv_heads);
    const long long qs = (long long)n_heads * HD, kvs = (long long)n_kv_heads * HD;
    // log2(e) folded into the scale: the softmax runs on exp2.
    const float sl2 = scale * 1.4426950408889634f;

    // This warp's 16 query rows as A fragments, one per 16 dims.
    const int r_lo = q0 + warp * 16 + g, r_hi = r_lo + 8;
    unsigned int qa[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        const int c = kk * 16 + 2 * t;
        const float* lo = q + r_lo * qs + head * HD;
        const float* hi = q + r_hi * qs + head * HD;
        bool in_lo = r_lo < q_end, in_hi = r_hi < q_end;
        qa[kk][0] = in_lo ? pack_bf16(lo[c], lo[c + 1]) : 0u;
        qa[kk][1] = in_hi ? pack_bf16(hi[c], hi[c + 1]) : 0u;
        qa[kk][2] = in_lo ? pack_bf16(lo[c + 8], lo[c + 9]) : 0u;
        qa[kk][3] = in_hi ? pack_bf16(hi[c + 8], hi[c + 9]) : 0u;
    }
    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    // Running max (log2 units) and this thread's part of the running sum,
    // for rows g and g + 8.
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f;

    for (int kv0 = s0; kv0 < s_end; kv0 += ATT_KV) {
        __syncthreads();  // the previous tile is no longer read
        for (int i = threadIdx.x; i < ATT_KV * HD / 2; i += blockDim.x) {
            const int key = i / (HD / 2), c = 2 * (i % (HD / 2));
            float k0 = 0.0f, k1 = 0.0f, v0 = 0.0f, v1 = 0.0f;
            if (kv0 + key < s_end) {
                const long long at = (kv0 + key) * kvs + kv_head * HD + c;
                k0 = k[at]; k1 = k[at + 1]; v0 = v[at]; v1 = v[at + 1];
            }
            *(unsigned int*)&ks[key][c] = pack_bf16(k0, k1);
            vt[c][key] = f32_to_bf16(v0);
            vt[c + 1][key] = f32_to_bf16(v1);
        }
        __syncthreads();

        // S = Q K^T for 16 rows x 64 keys: 8 tiles of 8 keys.
        float s[ATT_KV / 8][4];
#pragma unroll
        for (int n = 0; n < ATT_KV / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                unsigned int b[2];
                b[0] = *(const unsigned int*)&ks[n * 8 + g][kk * 16 + 2 * t];
                b[1] = *(const unsigned int*)&ks[n * 8 + g][kk * 16 + 8 + 2 * t];
                mma_bf16_16816(s[n], qa[kk], b);
            }
        }
        // Scale, hide keys past the sequence, and the tile's row maxima.
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
        for (int n = 0; n < ATT_KV / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = kv0 + n * 8 + 2 * t + (e & 1);
                s[n][e] = key < s_end ? s[n][e] * sl2 : -INFINITY;
            }
            mx_lo = fmaxf(mx_lo, fmaxf(s[n][0], s[n][1]));
            mx_hi = fmaxf(mx_hi, fmaxf(s[n][2], s[n][3]));
        }
        // The 4 threads of a group share a row.
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        // Every tile has at least one key of the sequence: the maxima are finite.
        const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
        const float c_lo = exp2f(m_lo - new_lo), c_hi = exp2f(m_hi - new_hi);
        m_lo = new_lo;
        m_hi = new_hi;
        l_lo *= c_lo;
        l_hi *= c_hi;
#pragma unroll
        for (int n = 0; n < HD / 8; ++n) {
            o[n][0] *= c_lo; o[n][1] *= c_lo;
            o[n][2] *= c_hi; o[n][3] *= c_hi;
        }
#pragma unroll
        for (int n = 0; n < ATT_KV / 8; ++n) {
            s[n][0] = exp2f(s[n][0] - m_lo); s[n][1] = exp2f(s[n][1] - m_lo);
            s[n][2] = exp2f(s[n][2] - m_hi); s[n][3] = exp2f(s[n][3] - m_hi);
            l_lo += s[n][0] + s[n][1];
            l_hi += s[n][2] + s[n][3];
        }
        // O += P V: the S accumulators of two key tiles are one A fragment.
#pragma unroll
        for (int kk = 0; kk < ATT_KV / 16; ++kk) {
            unsigned int a[4];
            a[0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
            a[1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
            a[2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            a[3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int n = 0; n < HD / 8; ++n) {
                unsigned int b[2];
                b[0] = *(const unsigned int*)&vt[n * 8 + g][kk * 16 + 2 * t];
                b[1] = *(const unsigned int*)&vt[n * 8 + g][kk * 16 + 8 + 2 * t];
                mma_bf16_16816(o[n], a, b);
            }
        }
    }
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    const float inv_lo = 1.0f / l_lo, inv_hi = 1.0f / l_hi;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        const int c = head * HD + n * 8 + 2 * t;
        if (r_lo < q_end) {
            out[r_lo * qs + c] = o[n][0] * inv_lo;
            out[r_lo * qs + c + 1] = o[n][1] * inv_lo;
        }
        if (r_hi < q_end) {
            out[r_hi * qs + c] = o[n][2] * inv_hi;
            out[r_hi * qs + c + 1] = o[n][3] * inv_hi;
        }
    }
}

// One entry point per head dim (grid: tiles x heads, 128 threads).
#define ATTENTION_TC(HD)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) attention_tc_##HD(                          \
        float* out, const float* q, const float* k, const float* v, const unsigned int* tiles,    \
        int n_heads, int n_kv_heads, float scale) {                                               \
        attention_tc<HD>(out, q, k, v, tiles, n_heads, n_kv_heads, scale);                        \
    }
ATTENTION_TC(16)
ATTENTION_TC(32)
ATTENTION_TC(64)
ATTENTION_TC(128)

extern "C" __global__ void silu_mul(float* out, const float* gate, const float* up, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float g = gate[i];
        out[i] = g / (1.0f + __expf(-g)) * up[i];
    }
}

extern "C" __global__ void add_assign(float* x, const float* y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void gather_rows(float* out, const float* x, const unsigned int* rows, int n_rows, int cols) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n_rows * cols) return;
    int r = i / cols, c = i % cols;
    out[i] = x[(long long)rows[r] * cols + c];
}

// The sampler's counter-based generator (remask_sampler::rng), bit for bit.
__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
__device__ __forceinline__ u64 absorb(u64 h, u64 v) { return mix64(h ^ (v + 0x9E3779B97F4A7C15ull)); }
__device__ __forceinline__ double uniform(u64 key, u64 index) {
    return ((double)(absorb(key, index) >> 12) + 0.5) * (1.0 / 4503599627370496.0);
}

// Top-k of the head reduction (`remask_sampler::TopK`): at most 5 entries,
// best first by value, ties to the lower index.
#define HEAD_TOP_MAX 5
__device__ __forceinline__ bool top_ahead(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}
// Inserts (v, i) into the sorted list (tv, ti) of n <= k entries.
__device__ __forceinline__ void top_insert(float* tv, int* ti, int& n, int k, float v, int i) {
    if (n == k && !top_ahead(v, i, tv[k - 1], ti[k - 1])) return;
    int at = n < k ? n : k - 1;
    while (at > 0 && top_ahead(v, i, tv[at - 1], ti[at - 1])) {
        tv[at] = tv[at - 1]; ti[at] = ti[at - 1];
        --at;
    }
    tv[at] = v; ti[at] = i;
    if (n < k) ++n;
}

// The rows of one queried position that the head kernels read.
struct HeadRow {
    const float* cond;
    const float* un;  // the prompt-masked twin under guidance (cfg_scale > 0), else 0
    float s1;         // cfg_scale + 1
    unsigned int mask, eos;
    bool eos_inf;
};

__device__ __forceinline__ HeadRow head_row(const float* logits, int width, const unsigned int* cond_rows,
                                            const int* uncond_rows, const double* cfg_scale,
                                            const unsigned int* mask_ids, const unsigned int* eos_ids,
                                            const unsigned int* flags, int p) {
    HeadRow r;
    r.cond = logits + (long long)cond_rows[p] * width;
    r.un = uncond_rows[p] >= 0 && cfg_scale[p] > 0.0 ? logits + (long long)uncond_rows[p] * width : 0;
    r.s1 = (float)(cfg_scale[p] + 1.0);
    r.mask = mask_ids[p];
    r.eos = eos_ids[p];
    r.eos_inf = flags[p] & 1u;
    return r;
}

// The guided logit of token v (vocabulary id `id`), as
// remask_sampler::guided_logits computes it: un + (s+1)(cond - un), each
// operation rounded on its own (Rust does not fuse), then the mask (and with
// flag 1 the EOS) logit at -inf. Both head kernels read the logits through
// it, so the select's thresholds (head_histograms) compare exact keys of the
// values the draw (head_partials) sees, and both are the host's.
__device__ __forceinline__ float guided_logit(const HeadRow& r, int v, unsigned int id) {
    float g = r.un ? __fadd_rn(r.un[v], __fmul_rn(r.s1, r.cond[v] - r.un[v])) : r.cond[v];
    return id == r.mask || (r.eos_inf && id == r.eos) ? -INFINITY : g;
}

// The ordered key of a logit (remask_sampler::truncate::key): keys compare
// as the logits do.
__device__ __forceinline__ unsigned int logit_key(float g) {
    unsigned int b = __float_as_uint(g);
    return (b >> 31) ? ~b : (b | 0x80000000u);
}

// The fused output-head reduction. One block per queried position: the
// guided logits (guided_logit), Gumbel-max with the position's key when
// temperature > 0 over the tokens whose key is at least the position's
// floor (a truncated draw's threshold; 0: every token), and the slice's
// best (score, token, guided logit), logsumexp, softmax-weighted mean logit
// and largest guided logit (over the whole slice, whatever the floor); with
// k = flags >> 1 (0 to 5) also the slice's k largest guided logits and their
// ids (-inf / -1 past the slice's finite ones). Only these numbers per
// position leave the GPU; `remask_sampler::combine` merges slices. k = 0
// skips every top-k instruction but one branch.
extern "C" __global__ void head_partials(
    double* out_score, unsigned int* out_token, double* out_logit, double* out_lse,
    double* out_mean, double* out_max, double* out_top_logit, int* out_top_token, const float* logits,
    int width, int vocab_offset, const unsigned int* cond_rows, const int* uncond_rows, const u64* keys,
    const double* temperature, const double* cfg_scale, const unsigned int* mask_ids,
    const unsigned int* eos_ids, const unsigned int* flags, const unsigned int* floors) {
    __shared__ double s_score[256];
    __shared__ int s_idx[256];
    __shared__ float s_logit[256];
    __shared__ float s_max[256];
    __shared__ double s_sum[256];
    // sum of exp(g - max) * (g - max): with s_sum, the softmax-weighted mean
    // logit (the entropy's second term) in the same single pass.
    __shared__ double s_wsum[256];
    __shared__ float s_tv[256 * HEAD_TOP_MAX];
    __shared__ int s_ti[256 * HEAD_TOP_MAX];
    __shared__ int s_tn[256];
    int p = blockIdx.x, t = threadIdx.x;
    const HeadRow row = head_row(logits, width, cond_rows, uncond_rows, cfg_scale, mask_ids, eos_ids, flags, p);
    double temp = temperature[p];
    unsigned int floor = floors[p];
    int k = (int)(flags[p] >> 1);
    if (k > HEAD_TOP_MAX) k = HEAD_TOP_MAX;
    double best = -INFINITY; int best_i = 0x7fffffff; float best_l = -INFINITY;
    float m = -INFINITY; double sum = 0.0, wsum = 0.0;
    float tv[HEAD_TOP_MAX]; int ti[HEAD_TOP_MAX]; int tn = 0;
    for (int v = t; v < width; v += blockDim.x) {
        unsigned int id = vocab_offset + v;
        float g = guided_logit(row, v, id);
        double score = (double)g;
        if (temp != 0.0)
            score = logit_key(g) >= floor ? (double)g - temp * log(-log(uniform(keys[p], id))) : -INFINITY;
        if (score > best || (score == best && (int)v < best_i)) { best = score; best_i = v; best_l = g; }
        if (k > 0 && g != -INFINITY) top_insert(tv, ti, tn, k, g, v);
        if (g > m) {
            // Re-centre on the new maximum: each old term's (g - m) shifts by d.
            if (m == -INFINITY) { sum = 0.0; wsum = 0.0; }
            else {
                double d = (double)m - (double)g, e = exp(d);
                wsum = e * (wsum + d * sum); sum = e * sum;
            }
            sum += 1.0; m = g;
        } else if (g != -INFINITY) {
            double d = (double)g - (double)m, e = exp(d);
            sum += e; wsum += e * d;
        }
    }
    s_score[t] = best; s_idx[t] = best_i; s_logit[t] = best_l; s_max[t] = m; s_sum[t] = sum;
    s_wsum[t] = wsum;
    if (k > 0) {
        s_tn[t] = tn;
        for (int j = 0; j < tn; ++j) { s_tv[t * HEAD_TOP_MAX + j] = tv[j]; s_ti[t * HEAD_TOP_MAX + j] = ti[j]; }
    }
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (t < o) {
            double sa = s_score[t], sb = s_score[t + o];
            if (sb > sa || (sb == sa && s_idx[t + o] < s_idx[t])) {
                s_score[t] = sb; s_idx[t] = s_idx[t + o]; s_logit[t] = s_logit[t + o];
            }
            float ma = s_max[t], mb = s_max[t + o];
            float mm = fmaxf(ma, mb);
            double sum2 = 0.0, w2 = 0.0;
            if (ma != -INFINITY) {
                double d = (double)ma - (double)mm, e = exp(d);
                sum2 += e * s_sum[t]; w2 += e * (s_wsum[t] + d * s_sum[t]);
            }
            if (mb != -INFINITY) {
                double d = (double)mb - (double)mm, e = exp(d);
                sum2 += e * s_sum[t + o]; w2 += e * (s_wsum[t + o] + d * s_sum[t + o]);
            }
            s_max[t] = mm; s_sum[t] = sum2; s_wsum[t] = w2;
            if (k > 0) {
                // Merge two sorted lists, keeping the k best.
                const float* av = s_tv + t * HEAD_TOP_MAX; const int* ai = s_ti + t * HEAD_TOP_MAX;
                const float* bv = s_tv + (t + o) * HEAD_TOP_MAX; const int* bi = s_ti + (t + o) * HEAD_TOP_MAX;
                int na = s_tn[t], nb = s_tn[t + o], x = 0, y = 0, n = 0;
                while (n < k && (x < na || y < nb)) {
                    if (y >= nb || (x < na && top_ahead(av[x], ai[x], bv[y], bi[y]))) {
                        tv[n] = av[x]; ti[n] = ai[x]; ++x;
                    } else {
                        tv[n] = bv[y]; ti[n] = bi[y]; ++y;
                    }
                    ++n;
                }
                for (int j = 0; j < n; ++j) { s_tv[t * HEAD_TOP_MAX + j] = tv[j]; s_ti[t * HEAD_TOP_MAX + j] = ti[j]; }
                s_tn[t] = n;
            }
        }
        __syncthreads();
    }
    if (t == 0) {
        // As predict_partial: a chosen token that is not kept or not finite
        // (a slice that keeps nothing reports its token 0) cannot win the draw.
        float l = s_logit[0];
        bool drawn = temp == 0.0 || (l > -INFINITY && l < INFINITY && logit_key(l) >= floor);
        out_score[p] = drawn ? s_score[0] : -INFINITY;
        out_token[p] = vocab_offset + s_idx[0];
        out_logit[p] = (double)l;
        bool empty = s_max[0] == -INFINITY;
        out_lse[p] = empty ? -INFINITY : (double)s_max[0] + log(s_sum[0]);
        out_mean[p] = empty ? -INFINITY : (double)s_max[0] + s_wsum[0] / s_sum[0];
        out_max[p] = (double)s_max[0];
        for (int j = 0; j < k; ++j) {
            bool have = j < s_tn[0];
            out_top_logit[p * HEAD_TOP_MAX + j] = have ? (double)s_tv[j] : -INFINITY;
            out_top_token[p * HEAD_TOP_MAX + j] = have ? vocab_offset + s_ti[j] : -1;
        }
    }
}

// One round of the truncation's select (remask_sampler::truncate::Round)
// over this vocabulary slice: one block per queried position, the same
// guided logits as head_partials, and for a position with a round the
// histogram of its finite guided logits' keys by the round's digit: a
// count per bin and, when the round's temperature is > 0, a mass: 2^40
// exp((g - row_max) / temperature) truncated to an integer (Round::weight;
// the row's largest token weighs 2^40). Integer sums: the bins do not
// depend on the order of the atomics or on how the vocabulary is split.
// (`exp` in double may differ from the host's libm in the last bit, which
// can move a mass by one unit against the CPU backend's, the rarest case.)
// rounds: 4 numbers per position: active (0: no round, zero bins), floor,
// prefix, level; round_scale: 2 per position: temperature, the whole row's
// largest guided logit.
// out_count, out_mass: 256 bins per position.
extern "C" __global__ void head_histograms(
    u64* out_count, u64* out_mass, const float* logits, int width, int vocab_offset,
    const unsigned int* cond_rows, const int* uncond_rows, const double* cfg_scale,
    const unsigned int* mask_ids, const unsigned int* eos_ids, const unsigned int* flags,
    const unsigned int* rounds, const double* round_scale) {
    __shared__ u64 s_count[256];
    __shared__ u64 s_mass[256];
    int p = blockIdx.x, t = threadIdx.x;
    for (int d = t; d < 256; d += blockDim.x) { s_count[d] = 0; s_mass[d] = 0; }
    __syncthreads();
    const unsigned int* r = rounds + 4 * p;
    if (r[0]) {
        const HeadRow row = head_row(logits, width, cond_rows, uncond_rows, cfg_scale, mask_ids, eos_ids, flags, p);
        const unsigned int floor = r[1], prefix = r[2], level = r[3];
        const unsigned int shift = 24 - 8 * level;
        const double temp = round_scale[2 * p], row_max = round_scale[2 * p + 1];
        for (int v = t; v < width; v += blockDim.x) {
            float g = guided_logit(row, v, vocab_offset + v);
            // -inf and NaN (tokens the rules exclude) never count.
            if (!(g > -INFINITY && g < INFINITY)) continue;
            unsigned int key = logit_key(g);
            // Level 0 has no prefix (and a shift by 32 would be undefined).
            if (key < floor || (level > 0 && key >> (shift + 8) != prefix >> (shift + 8))) continue;
            unsigned int d = (key >> shift) & 0xFFu;
            atomicAdd(&s_count[d], 1ull);
            if (temp > 0.0) atomicAdd(&s_mass[d], (u64)fmin(exp(((double)g - row_max) / temp) * 1099511627776.0, 1099511627776.0));
        }
    }
    __syncthreads();
    for (int d = t; d < 256; d += blockDim.x) {
        out_count[(long long)p * 256 + d] = s_count[d];
        out_mass[(long long)p * 256 + d] = s_mass[d];
    }
}

// Random weights drawn where they are used (`model init --on-device-weights`):
// remask_model::init_value bit for bit (its counter hash, Box-Muller in
// double, the scale in f32), rounded to bf16 as the file `model init --dtype
// bf16` holds it. One thread per element of the block rows x cols at (row0,
// col0) of a tensor full_cols wide: element (r, c) of the whole tensor has
// index r * full_cols + c, so a tensor-parallel rank draws exactly its slice.
// SplitMix64 with its increment: init.rs's `mix`, over the sampler's finaliser.
__device__ __forceinline__ u64 init_mix(u64 z) { return mix64(z + 0x9E3779B97F4A7C15ull); }

extern "C" __global__ void init_normal_bf16(bf16_t* out, int rows, int cols, long long full_cols, long long row0,
                                            long long col0, u64 seed, u64 tensor, float stddev, int one_plus) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * cols) return;
    long long r = i / cols, c = i % cols;
    u64 index = (u64)((row0 + r) * full_cols + col0 + c);
    u64 h = init_mix(init_mix(init_mix(seed) ^ tensor) ^ index);
    double u1 = ((double)(h >> 40) + 0.5) / 16777216.0;
    double u2 = (double)(h & 0xFFFFFFull) / 16777216.0;
    double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
    // Rounded on its own, never fused with the + 1 of OnePlus (Rust does not fuse).
    float v = __fmul_rn((float)z, stddev);
    if (one_plus) v = 1.0f + v;
    out[i] = f32_to_bf16(v);
}

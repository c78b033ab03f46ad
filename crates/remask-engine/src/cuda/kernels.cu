// remask's CUDA kernels, compiled by NVRTC when the CUDA backend starts.
// Activations are f32; matrix weights are bf16 (raw bits, unsigned short);
// norm weights and RoPE tables are f32. Matrix products go to cuBLAS.

// NVRTC has no <math.h>: the one constant we need from it.
#define INFINITY __int_as_float(0x7f800000)

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

// Bidirectional attention within each packed sequence. One block per
// (query row, head): the row's scores live in shared memory (seq_len floats),
// never a T x T matrix in device memory. Grouped KV heads.
extern "C" __global__ void attention(float* out, const float* q, const float* k, const float* v,
                                     const unsigned int* seq_start, const unsigned int* seq_len,
                                     int n_heads, int n_kv_heads, int hd, float scale) {
    extern __shared__ float scores[];
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

// The fused output-head reduction. One block per queried position: guidance
// (un + (s+1)(cond - un)), the mask (and with flag 1 the EOS) logit at -inf,
// Gumbel-max with the position's key when temperature > 0, and the slice's
// best (score, token, guided logit) and logsumexp. Only these four numbers
// per position leave the GPU; `remask_sampler::combine` merges slices.
extern "C" __global__ void head_partials(
    double* out_score, unsigned int* out_token, double* out_logit, double* out_lse,
    const float* logits, int width, int vocab_offset,
    const unsigned int* cond_rows, const int* uncond_rows, const u64* keys,
    const double* temperature, const double* cfg_scale, const unsigned int* mask_ids,
    const unsigned int* eos_ids, const unsigned int* flags) {
    __shared__ double s_score[256];
    __shared__ int s_idx[256];
    __shared__ float s_logit[256];
    __shared__ float s_max[256];
    __shared__ double s_sum[256];
    int p = blockIdx.x, t = threadIdx.x;
    const float* cond = logits + (long long)cond_rows[p] * width;
    const float* un = uncond_rows[p] >= 0 ? logits + (long long)uncond_rows[p] * width : 0;
    float s1 = (float)(cfg_scale[p] + 1.0);
    double temp = temperature[p];
    double best = -INFINITY; int best_i = 0x7fffffff; float best_l = -INFINITY;
    float m = -INFINITY; double sum = 0.0;
    for (int v = t; v < width; v += blockDim.x) {
        float g = (un && cfg_scale[p] > 0.0) ? un[v] + s1 * (cond[v] - un[v]) : cond[v];
        unsigned int id = vocab_offset + v;
        if (id == mask_ids[p] || ((flags[p] & 1u) && id == eos_ids[p])) g = -INFINITY;
        double score = (double)g;
        if (temp != 0.0) score = (double)g - temp * log(-log(uniform(keys[p], id)));
        if (score > best || (score == best && (int)v < best_i)) { best = score; best_i = v; best_l = g; }
        if (g > m) { sum = sum * exp((double)m - (double)g) + 1.0; m = g; }
        else if (g != -INFINITY) sum += exp((double)g - (double)m);
    }
    s_score[t] = best; s_idx[t] = best_i; s_logit[t] = best_l; s_max[t] = m; s_sum[t] = sum;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (t < o) {
            double sa = s_score[t], sb = s_score[t + o];
            if (sb > sa || (sb == sa && s_idx[t + o] < s_idx[t])) {
                s_score[t] = sb; s_idx[t] = s_idx[t + o]; s_logit[t] = s_logit[t + o];
            }
            float ma = s_max[t], mb = s_max[t + o];
            float mm = fmaxf(ma, mb);
            double sa2 = ma == -INFINITY ? 0.0 : s_sum[t] * exp((double)ma - (double)mm);
            double sb2 = mb == -INFINITY ? 0.0 : s_sum[t + o] * exp((double)mb - (double)mm);
            s_max[t] = mm; s_sum[t] = sa2 + sb2;
        }
        __syncthreads();
    }
    if (t == 0) {
        out_score[p] = s_score[0];
        out_token[p] = vocab_offset + s_idx[0];
        out_logit[p] = (double)s_logit[0];
        out_lse[p] = s_max[0] == -INFINITY ? -INFINITY : (double)s_max[0] + log(s_sum[0]);
    }
}

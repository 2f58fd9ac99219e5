// The MLP activation fused with per-token E4M3 quantization of its output (the down
// projection's input). One block per token; the activated row lives in dynamic shared memory
// (inter * 2 bytes, above 48 KB the host raises the kernel's limit).
//   ACT_SILU:  in = [tokens, 2·inter] (gate | up): a = bf16(silu(g) · u), silu computed the way
//              candle's bf16 op does it: bf16(g / bf16(1 + bf16(exp(−g)))).
//   ACT_GELU:  same layout, gelu (tanh approximation) in f32, rounded once.
//   ACT_RELU2: in = [tokens, inter] (up only): a = bf16(relu(u)²).

#define ACT_SILU 0
#define ACT_GELU 1
#define ACT_RELU2 2

__device__ __forceinline__ float activate_relu2(float u) {
    u = fmaxf(u, 0.0f);
    return bfr(u * u);
}

template <int ACT>
__device__ __forceinline__ float activate_gated(float g, float u) {
    float a;
    if (ACT == ACT_SILU) {
        a = bfr(g / bfr(1.0f + bfr(expf(-g))));
    } else {
        a = bfr(0.5f * g * (1.0f + tanhf(0.7978845608028654f * g * (1.0f + 0.044715f * g * g))));
    }
    return bfr(a * u);
}

template <int ACT>
__device__ __forceinline__ float activate(const bf16* in, size_t base, int inter, int i) {
    if (ACT == ACT_RELU2) return activate_relu2(bf(in[base + i]));
    return activate_gated<ACT>(bf(in[base + i]), bf(in[base + inter + i]));
}

template <int ACT>
__device__ void act_quant_body(const bf16* in, int inter, bf16* y, fp8* q, float* q_scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* row = reinterpret_cast<bf16*>(smem_raw);
    __shared__ float red[32];
    const size_t in_base = (size_t)blockIdx.x * inter * (ACT == ACT_RELU2 ? 1 : 2);
    const size_t out_base = (size_t)blockIdx.x * inter;
    float amax = 0.0f;
    // 16-byte accesses when the row allows (inter % 8 == 0, aligned pointers).
    const bool vec = inter % 8 == 0 && aligned16(in) && (!y || aligned16(y));
    for (int c = threadIdx.x; vec && c < inter / 8; c += blockDim.x) {
        float g[8], a[8];
        unpack8(reinterpret_cast<const uint4*>(in + in_base)[c], g);
        if (ACT != ACT_RELU2) unpack8(reinterpret_cast<const uint4*>(in + in_base + inter)[c], a);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            a[k] = ACT == ACT_RELU2 ? activate_relu2(g[k]) : activate_gated<ACT>(g[k], a[k]);
            amax = fmaxf(amax, fabsf(a[k]));
        }
        const uint4 packed = pack8(a);
        reinterpret_cast<uint4*>(row)[c] = packed;
        if (y) reinterpret_cast<uint4*>(y + out_base)[c] = packed;
    }
    for (int i = vec ? inter : threadIdx.x; i < inter; i += blockDim.x) {
        const float a = activate<ACT>(in, in_base, inter, i);
        row[i] = to_bf(a);
        if (y) y[out_base + i] = to_bf(a);
        amax = fmaxf(amax, fabsf(a));
    }
    if (!q) return;
    amax = block_reduce<true>(amax, red);
    quantize_row(row, inter, amax, q + out_base, q_scale + blockIdx.x);
}

extern "C" __global__ void swiglu_quant_bf16(const bf16* gate_up /* [tokens, 2*inter] */, int inter,
                                             bf16* y /* [tokens, inter] or null */, fp8* q, float* q_scale) {
    act_quant_body<ACT_SILU>(gate_up, inter, y, q, q_scale);
}

extern "C" __global__ void geglu_quant_bf16(const bf16* gate_up /* [tokens, 2*inter] */, int inter,
                                            bf16* y, fp8* q, float* q_scale) {
    act_quant_body<ACT_GELU>(gate_up, inter, y, q, q_scale);
}

extern "C" __global__ void relu2_quant_bf16(const bf16* up /* [tokens, inter] */, int inter,
                                            bf16* y, fp8* q, float* q_scale) {
    act_quant_body<ACT_RELU2>(up, inter, y, q, q_scale);
}

// camelid::dequantize_int4: output rows [start, end) of a 4-bit weight as float32 or bfloat16 [end - start, K].
//
// nibbles uint8 [N, K/2], row-major: byte j of a row holds weight 2j in its low four bits and 2j+1 in its high ones;
// scale_zero bfloat16 [G, Npad, 2] (the layout PyTorch's int4 kernel takes: group g's scale and zero of row n, Npad >= N);
// a group is `group` consecutive weights of a row. w = (q - 8) * scale + zero, computed in float32 as torch computes it
// (the product is exact: an 8-bit mantissa times a 4-bit integer) and rounded once to the output's type (to nearest,
// ties to even, as torch's cast rounds). The same values as camelid/quant.py's Int4Linear.dequantize_rows in torch,
// bit for bit, in one pass over the weight instead of six: the dense prefill and QLoRA's backward dequantize every
// layer at every chunk, so that pass is on their path.
//
// Built at run time by camelid/kernels.py with the machine's compiler (-march=native) into the model store.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>

namespace {

inline uint16_t to_bf16_bits(float f) {  // round to nearest, ties to even (NaN kept a NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if defined(__AVX512F__)
inline __m256i to_bf16_bits(__m512 f) {  // 16 floats -> 16 bfloat16: the same rounding as the scalar one (no NaN here)
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  return _mm512_cvtepi32_epi16(r);
}

// 32 weights from 16 bytes: w[2j] from byte j's low bits, w[2j+1] from its high ones
template <bool BF16>
inline void group32(const uint8_t* b, float s, float z, void* out) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
  const __m512i eight = _mm512_set1_epi32(8), mask = _mm512_set1_epi32(0x0F);
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, mask), eight));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight));
  // (q - 8) * s is exact in float32, so the fused multiply-add rounds as the product then the sum do
  const __m512 wl = _mm512_fmadd_ps(lo, vs, vz), wh = _mm512_fmadd_ps(hi, vs, vz);
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 a = _mm512_permutex2var_ps(wl, first, wh), c = _mm512_permutex2var_ps(wl, second, wh);
  if (BF16) {
    __m256i* o = static_cast<__m256i*>(out);
    _mm256_storeu_si256(o, to_bf16_bits(a));
    _mm256_storeu_si256(o + 1, to_bf16_bits(c));
  } else {
    float* o = static_cast<float*>(out);
    _mm512_storeu_ps(o, a);
    _mm512_storeu_ps(o + 16, c);
  }
}
#endif

template <bool BF16>
void rows(const uint8_t* nib, const at::BFloat16* sz, void* out, int64_t r0, int64_t r1, int64_t start, int64_t K,
          int64_t G, int64_t group, int64_t npad) {
  const int64_t half = group / 2, size = BF16 ? 2 : 4;
  float buf[256];
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = nib + n * (K / 2);
    for (int64_t g = 0; g < G; ++g) {
      const float s = static_cast<float>(sz[(g * npad + n) * 2]);
      const float z = static_cast<float>(sz[(g * npad + n) * 2 + 1]);
      const uint8_t* b = row + g * half;
      char* o = static_cast<char*>(out) + ((n - start) * K + g * group) * size;
#if defined(__AVX512F__)
      if (group % 32 == 0) {
        for (int64_t j = 0; j < group; j += 32) group32<BF16>(b + j / 2, s, z, o + j * size);
        continue;
      }
#endif
      for (int64_t j = 0; j < half; ++j) {
        buf[2 * j] = static_cast<float>(static_cast<int>(b[j] & 0x0F) - 8) * s + z;
        buf[2 * j + 1] = static_cast<float>(static_cast<int>(b[j] >> 4) - 8) * s + z;
      }
      if (BF16) {
        for (int64_t j = 0; j < group; ++j) reinterpret_cast<uint16_t*>(o)[j] = to_bf16_bits(buf[j]);
      } else {
        std::memcpy(o, buf, group * sizeof(float));
      }
    }
  }
}

at::Tensor dequantize_int4(const at::Tensor& nibbles, const at::Tensor& scale_zero, int64_t start, int64_t end,
                           int64_t group, at::ScalarType dtype) {
  TORCH_CHECK(nibbles.device().is_cpu() && nibbles.scalar_type() == at::kByte && nibbles.dim() == 2 &&
                  nibbles.is_contiguous(), "dequantize_int4: nibbles must be a contiguous uint8 [N, K/2] CPU tensor");
  TORCH_CHECK(scale_zero.scalar_type() == at::kBFloat16 && scale_zero.dim() == 3 && scale_zero.size(2) == 2 &&
                  scale_zero.is_contiguous(), "dequantize_int4: scale_zero must be a contiguous bfloat16 [G, N, 2]");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dequantize_int4: the output is float32 or bfloat16");
  const int64_t K = nibbles.size(1) * 2, G = scale_zero.size(0), npad = scale_zero.size(1);
  TORCH_CHECK(group > 0 && group % 2 == 0 && group <= 256 && K == G * group,
              "dequantize_int4: K must be G groups of an even group size up to 256");
  TORCH_CHECK(0 <= start && start <= end && end <= nibbles.size(0) && end <= npad, "dequantize_int4: rows out of range");
  at::Tensor out = at::empty({end - start, K}, nibbles.options().dtype(dtype));
  const uint8_t* nib = nibbles.data_ptr<uint8_t>();
  const at::BFloat16* sz = scale_zero.data_ptr<at::BFloat16>();
  void* o = out.data_ptr();
  at::parallel_for(start, end, 16, [&](int64_t r0, int64_t r1) {
    if (dtype == at::kBFloat16)
      rows<true>(nib, sz, o, r0, r1, start, K, G, group, npad);
    else
      rows<false>(nib, sz, o, r0, r1, start, K, G, group, npad);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(camelid, m) {
  m.def("dequantize_int4(Tensor nibbles, Tensor scale_zero, int start, int end, int group, ScalarType dtype) -> Tensor");
}
TORCH_LIBRARY_IMPL(camelid, CPU, m) { m.impl("dequantize_int4", dequantize_int4); }

// camelid::decode_attention: each query over the filled prefix of the KV cache, one query at a time.
//
// q [B,T,H,E], k and v [B,K,S,E] (views of the cache: the first S slots), mask [B,1,T,S] additive -> [B,T,H,E].
// q, mask and the output float32; k and v float32 or float16 (the fast path's half-precision cache, widened to float32
// in registers as they are read: half the bytes decode reads at long positions); E a multiple of 16 up to 128;
// scores are taken 16 slots at a time (products reduced by one fixed shuffle tree) and exponentiated as vectors;
// G = H/K query heads share a key/value head (grouped-query attention).
// T is 1 in the compiled decode step; a prefill chunk of T tokens passes all its queries at once (camelid/model.py).
//
// Work is split over (row, query, key/value head, CHUNK slots), so two threads stay busy on one row. Each piece reads
// its keys and values once for all G query heads and keeps a running maximum, sum and unnormalised output; the pieces
// are then combined in slot order (the log-sum-exp rule). What a query gets depends only on its own inputs (its row's
// keys and values, its mask row) and on the fixed chunk boundaries, never on the threads, on the other rows of the
// batch or on the other queries beside it: a slot the mask hides adds exactly zero, and a chunk it hides entirely is
// skipped. So a row decodes bit-identically alone and in a batch, and a prompt token's attention (hence its keys and
// values in the next layer) is the same whichever chunk of the prompt it is computed in: the prompt cache relies on it.
//
// Built at run time by camelid/kernels.py with the machine's compiler (-march=native) into the model store.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {
constexpr int64_t CHUNK = 256;  // slots per piece of work (fixed: the result must not depend on anything else)
constexpr int64_t AHEAD = 16;   // slots prefetched ahead of the one read
constexpr int W = 16;           // floats per vector: one AVX-512 register, two AVX2 ones
typedef float vf __attribute__((vector_size(W * 4)));
typedef float vfu __attribute__((vector_size(W * 4), aligned(4)));  // the same type at any float address
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline vf load(const at::Half* p) {  // W float16 -> float32, exact (vcvtph2ps: one with AVX-512, two with F16C)
#if defined(__AVX512F__)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
  const v8 a = (v8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const v8 b = (v8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  vf out;
  for (int i = 0; i < W; ++i) out[i] = static_cast<float>(p[i]);
  return out;
#endif
}
template <typename KV>
inline void prefetch_row(const KV* p, int E) {  // every cache line of a row of E elements
  for (int b = 0; b < E * static_cast<int>(sizeof(KV)); b += 64) __builtin_prefetch(reinterpret_cast<const char*>(p) + b);
}
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }

inline float hsum(vf v) {  // a fixed tree: 16 -> 8 -> 4 -> 1
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The lane sums of W vectors at once, as one vector: a fixed tree of halving steps (15 adds for W dot products,
// where one horizontal sum each takes 4). Leaf LEAF[r] holds slot r, so that lane r of the result is slot r's sum.
constexpr int LEAF[W] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};  // 4-bit reversal

inline vf sum_lanes(const vf* a) {
  vf b[8], c[4], d[2];
  for (int j = 0; j < 8; ++j)
    b[j] = __builtin_shufflevector(a[2 * j], a[2 * j + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * j], a[2 * j + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int j = 0; j < 4; ++j)
    c[j] = __builtin_shufflevector(b[2 * j], b[2 * j + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * j], b[2 * j + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int j = 0; j < 2; ++j)
    d[j] = __builtin_shufflevector(c[2 * j], c[2 * j + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(c[2 * j], c[2 * j + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

// exp(x) for x <= 0 (a score minus its maximum), W at once: 2^n * p(r), |r| <= ln2/2, a degree-6 polynomial
// (about 1 ulp); exactly 0 below -87 and for -inf (a masked slot).
typedef int32_t vi __attribute__((vector_size(W * 4)));
inline vf exp_neg(vf x) {
  const vf lo = vf{} - 87.0f;
  const vf y = x < lo ? lo : x;
  const vf big = vf{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const vf n = (y * 1.44269504088896341f + big) - big;
  const vf r = y - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  return x < lo ? vf{} : p * reinterpret_cast<const vf&>(bits);
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}

struct Strides {
  int64_t kss, vss, mss;
};

// One piece: G queries over n slots -> maxima m[G], sums l[G], unnormalised outputs o[G][E]; s is scratch [G][CHUNK].
template <int E, int G, typename KV>
void piece(const float* const* qr, const KV* kb, const KV* vb, const float* mb, const Strides& st, int64_t n,
           float scale, float* m, float* l, float* o, float* s) {
  constexpr int J = E / W;
  bool visible = false;
  for (int64_t i = 0; i < n; ++i) visible |= mb[i * st.mss] != NEG_INF;
  if (!visible) {  // hidden from this row (a longer row's slots): adds nothing, whatever it holds
    for (int g = 0; g < G; ++g) m[g] = NEG_INF, l[g] = 0.f;
    std::fill(o, o + G * E, 0.f);
    return;
  }
  vf q[G][J];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < J; ++j) q[g][j] = load(qr[g] + j * W);
  vf mx[G];
  for (int g = 0; g < G; ++g) mx[g] = vf{} + NEG_INF;
  vf part[G][W];  // a block of W slots' products q*k, summed across lanes together by sum_lanes
  for (int64_t i0 = 0; i0 < n; i0 += W) {  // scores: each key read once for the G queries
    const int64_t w = std::min<int64_t>(W, n - i0);
    for (int r = w; r < W; ++r)
      for (int g = 0; g < G; ++g) part[g][LEAF[r]] = vf{};
    for (int64_t r = 0; r < w; ++r) {
      const KV* kr = kb + (i0 + r) * st.kss;
      prefetch_row(kr + AHEAD * st.kss, E);
      vf k[J];
      for (int j = 0; j < J; ++j) k[j] = load(kr + j * W);
      for (int g = 0; g < G; ++g) {
        vf acc = q[g][0] * k[0];
        for (int j = 1; j < J; ++j) acc += q[g][j] * k[j];
        part[g][LEAF[r]] = acc;
      }
    }
    vf add;  // the mask's W slots (past the piece's end: -inf)
    if (w == W && st.mss == 1) {
      add = load(mb + i0);
    } else {
      for (int r = 0; r < W; ++r) add[r] = r < w ? mb[(i0 + r) * st.mss] : NEG_INF;
    }
    for (int g = 0; g < G; ++g) {
      const vf x = sum_lanes(part[g]) * scale + add;  // lane r: slot i0 + r
      store(s + g * CHUNK + i0, x);
      mx[g] = mx[g] > x ? mx[g] : x;
    }
  }
  const int64_t padded = (n + W - 1) / W * W;
  for (int g = 0; g < G; ++g) {  // weights exp(score - max), and their sum in a fixed order (W lanes, then across)
    float* sg = s + g * CHUNK;
    const float top = hmax(mx[g]);
    vf sum{};
    for (int64_t i = 0; i < padded; i += W) {
      const vf e = exp_neg(load(sg + i) - top);
      store(sg + i, e);
      sum += e;
    }
    m[g] = top, l[g] = hsum(sum);
  }
  vf acc[G][J];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < J; ++j) acc[g][j] = vf{};
  for (int64_t i = 0; i < n; ++i) {  // outputs: each value read once for the G queries
    const KV* vr = vb + i * st.vss;
    prefetch_row(vr + AHEAD * st.vss, E);
    vf v[J];
    for (int j = 0; j < J; ++j) v[j] = load(vr + j * W);
    for (int g = 0; g < G; ++g) {
      const float p = s[g * CHUNK + i];
      for (int j = 0; j < J; ++j) acc[g][j] += p * v[j];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < J; ++j) store(o + g * E + j * W, acc[g][j]);
}

template <int E, int G, typename KV>
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = k.size(1), S = k.size(2);
  const int64_t nc = (S + CHUNK - 1) / CHUNK, pieces = B * T * K * nc;  // stored in the order (b, t, h, c)
  auto out = at::empty({B, T, H, E}, q.options());
  std::vector<float> pm(pieces * G), pl(pieces * G), po(pieces * G * E);
  const float* qp = q.data_ptr<float>();
  const KV* kp = k.data_ptr<KV>();
  const KV* vp = v.data_ptr<KV>();
  const float* mp = mask.data_ptr<float>();
  const Strides st{k.stride(2), v.stride(2), mask.stride(3)};
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(G * CHUNK);
    for (int64_t w = begin; w < end; ++w) {  // taken in the order (b, h, c, t): a piece's queries one after another,
      // while its keys and values are in the core's cache
      const int64_t b = w / (K * nc * T), h = w / (nc * T) % K, c = w / T % nc, t = w % T;
      const int64_t p = ((b * T + t) * K + h) * nc + c;
      const int64_t s0 = c * CHUNK, n = std::min(S, s0 + CHUNK) - s0;
      const float* qr[G];
      for (int g = 0; g < G; ++g) qr[g] = qp + b * q.stride(0) + t * q.stride(1) + (h * G + g) * q.stride(2);
      piece<E, G, KV>(qr, kp + b * k.stride(0) + h * k.stride(1) + s0 * st.kss, vp + b * v.stride(0) + h * v.stride(1) + s0 * st.vss,
                  mp + b * mask.stride(0) + t * mask.stride(2) + s0 * st.mss, st, n, sc, &pm[p * G], &pl[p * G],
                  &po[p * G * E], s.data());
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t bth = 0; bth < B * T * H; ++bth) {  // combine each query's pieces in slot order
    const int64_t bt = bth / H, h = bth % H / G, g = bth % H % G, first = (bt * K + h) * nc;
    float top = NEG_INF;
    for (int64_t c = 0; c < nc; ++c) top = std::max(top, pm[(first + c) * G + g]);
    float total = 0.f, acc[E] = {};
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t p = first + c;
      if (pm[p * G + g] == NEG_INF) continue;
      const float w = std::exp(pm[p * G + g] - top);
      total += w * pl[p * G + g];
      const float* oc = &po[(p * G + g) * E];
      for (int e = 0; e < E; ++e) acc[e] += w * oc[e];
    }
    for (int e = 0; e < E; ++e) op[bth * E + e] = acc[e] / total;
  }
  return out;
}

using Fn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double);

template <int E, typename KV>
Fn for_group(int64_t G) {
  switch (G) {
    case 1: return attend<E, 1, KV>;
    case 2: return attend<E, 2, KV>;
    case 3: return attend<E, 3, KV>;
    case 4: return attend<E, 4, KV>;
    case 5: return attend<E, 5, KV>;
    case 6: return attend<E, 6, KV>;
    case 7: return attend<E, 7, KV>;
    case 8: return attend<E, 8, KV>;
    default: return nullptr;
  }
}

template <typename KV>
Fn pick(int64_t E, int64_t G) {
  switch (E) {
    case 16: return for_group<16, KV>(G);
    case 32: return for_group<32, KV>(G);
    case 64: return for_group<64, KV>(G);
    case 96: return for_group<96, KV>(G);
    case 128: return for_group<128, KV>(G);
    default: return nullptr;
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "decode_attention: 4-d inputs");
  for (const at::Tensor* t : {&q, &k, &v, &mask}) TORCH_CHECK(t->device().is_cpu(), "decode_attention: CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kFloat && mask.scalar_type() == at::kFloat, "decode_attention: float32 q and mask");
  const bool half = k.scalar_type() == at::kHalf;
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (half || k.scalar_type() == at::kFloat),
              "decode_attention: k and v both float32 or both float16");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), E = q.size(3), K = k.size(1), S = k.size(2);
  TORCH_CHECK(T > 0 && K > 0 && H % K == 0, "decode_attention: q [B,T,H,E] with H a multiple of k's heads");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == E, "decode_attention: k, v [B,K,S,E]");
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == 1 && mask.size(2) == T && mask.size(3) == S, "decode_attention: mask [B,1,T,S]");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: E contiguous");
  const Fn fn = half ? pick<at::Half>(E, H / K) : pick<float>(E, H / K);
  TORCH_CHECK(fn != nullptr, "decode_attention: head size ", E, " with ", H / K, " query heads per key head is not built");
  return fn(q, k, v, mask, scale);
}
}  // namespace

TORCH_LIBRARY(camelid, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(camelid, CPU, m) { m.impl("decode_attention", decode_attention); }

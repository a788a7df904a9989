// Decode / short-verify attention over a KV cache on the CPU, as an XLA FFI custom call.
//
// For each batch row b and KV head k, the M query rows of that head's group (GQA heads x tree nodes)
// attend to the committed cache keys [0, kv_len[b]); the result is the online-softmax partial
// (row max m, normaliser l, unnormalised weighted sum acc), which the caller merges with the new
// block's keys. K/V stay in the model's [B, S, K, E] cache layout: one pass reads each committed key
// and value row once, in order, split over the intra-op thread pool (split-K, merged at the end).
// Why not XLA: XLA:CPU runs these two skinny products as separate GEMMs at roughly half of what a
// streaming read of the cache reaches on the same machine (BENCHMARKS, roofline).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 64;     // keys per inner block: their scores stay in L1
constexpr int64_t kMaxRows = 64;   // query rows per KV head
constexpr int64_t kStreamRows = 2;  // see attend_range
constexpr int64_t kPartKeys = 1024;  // fewest keys worth a work item of their own
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(r) for |r| <= ln(2)/2: Cephes' degree-6 polynomial, for a float or a 16-lane vector
template <class T>
inline T exp_poly(T r) {
  T y = r * 0.f + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  return y * r * r + r + 1.0f;
}

// exp(x) for x <= 0 (-inf gives 0): Cephes' range reduction and polynomial, within ~2 ulp of expf; written
// without calls so that the loops over a block's scores vectorise.
inline float exp_nonpos(float x) {
  x = std::max(x, -87.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float y = exp_poly(r);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}


// 16 fp32 lanes (one AVX-512 register; two AVX2 ones): the compiler picks the instructions for the machine.
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, v16 v) { std::memcpy(p, &v, sizeof(v)); }

// Pairwise sums of two vectors' neighbouring lanes: [a0+a1, a2+a3, ..., a14+a15, b0+b1, ..., b14+b15].
inline v16 hadd(v16 a, v16 b) {
  const i16 even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const i16 odd = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  return __builtin_shuffle(a, b, even) + __builtin_shuffle(a, b, odd);
}

// Lane i = the sum of all lanes of p[i]: 15 pairwise steps for 16 dot products, instead of 16 full reductions.
inline v16 sum_each(v16* p) {
  for (int w = 16; w > 1; w /= 2)
    for (int i = 0; i < w / 2; ++i) p[i] = hadd(p[2 * i], p[2 * i + 1]);
  return p[0];
}

// Scores of one query row (C = E / 16 lane groups, in registers) against keys j0 .. j0 + n - 1 (n <= 16) of one head.
template <int C>
inline void scores16(const v16* qv, const float* kb, int64_t row, int64_t j0, int64_t n, float* out) {
  v16 part[16];
  for (int64_t jj = 0; jj < 16; ++jj) {
    v16 acc = {};
    if (jj < n) {
      const float* kv = kb + (j0 + jj) * row;
      for (int c = 0; c < C; ++c) acc += qv[c] * load16(kv + 16 * c);
    }
    part[jj] = acc;
  }
  store16(out + j0, sum_each(part));
}

// acc[r] += sum_j p[r][j] V[j] for R rows at once, over n keys of one head: the rows' sums stay in registers.
template <int C, int R>
inline void weighted_sum(const float* const* p, float* const* acc, const float* vb, int64_t row, int64_t n) {
  v16 a[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) a[r][c] = load16(acc[r] + 16 * c);
  for (int64_t j = 0; j < n; ++j) {
    v16 v[C];
    for (int c = 0; c < C; ++c) v[c] = load16(vb + j * row + 16 * c);
    for (int r = 0; r < R; ++r) {
      const float pj = p[r][j];
      for (int c = 0; c < C; ++c) a[r][c] += pj * v[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) store16(acc[r] + 16 * c, a[r][c]);
}

// exp_nonpos on 16 lanes (the same steps and constants, written on vectors: the compiler's vectorisation of the
// scalar loop measured ~7 cycles per element)
inline v16 exp16(v16 x) {
  const v16 lo = v16{} - 87.3f;
  x = x < lo ? lo : x;
  const v16 t = x * 1.44269504088896341f + 0.5f;
  i16 ti = __builtin_convertvector(t, i16);  // truncates toward zero; t < 0 here, so step down where t had a fraction
  const v16 tf = __builtin_convertvector(ti, v16);
  ti = tf > t ? ti - 1 : ti;
  const v16 n = __builtin_convertvector(ti, v16);
  v16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const v16 y = exp_poly(r);
  const i16 bits = (ti + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// max of x[0 .. n), n <= kBlock: 16 lanes at a time (a scalar running max is one long dependency chain)
inline float block_max(const float* x, int64_t n) {
  v16 mv = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf,
            kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const v16 v = load16(x + j);
    mv = mv > v ? mv : v;
  }
  float mx = kNegInf;
  for (int i = 0; i < 16; ++i) mx = std::max(mx, mv[i]);
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

struct Dims {
  int64_t S, K, M, E;
};

// Online-softmax partial over keys [lo, hi) of one batch row: m, l [K*M], acc [K*M*E].
// kE > 0 fixes the head dim at compile time (loops unroll into vector registers); kE == 0 reads it from d.E.
// Groups of more than kStreamRows rows per KV head (compute-heavier: 7B-shaped GQA, short chains) run
// register-blocked loops (`scores16`, `weighted_sum`); the smallest groups, memory-bound, read each key and value
// row once, whole and in order, one row at a time, which measured faster there (BENCHMARKS, the CPU kernel).
template <int64_t kE>
void attend_range(const Dims& d, const float* q, const float* kc, const float* vc, int64_t lo, int64_t hi,
                  float* m_out, float* l_out, float* acc_out) {
  constexpr bool kVec = kE > 0 && kE % 16 == 0;  // whole lane groups
  constexpr int kC = kVec ? static_cast<int>(kE / 16) : 1;
  constexpr int kR = kC <= 4 ? 4 : 2;  // rows per register tile of `weighted_sum`: kR * kC sums in registers
  const int64_t E = kE > 0 ? kE : d.E;
  const int64_t K = d.K, M = d.M, KM = K * M, row = K * E;
  const bool blocked = kVec && M > kStreamRows;
  std::fill(m_out, m_out + KM, kNegInf);
  std::fill(l_out, l_out + KM, 0.f);
  std::fill(acc_out, acc_out + KM * E, 0.f);
  std::vector<float> scores(KM * kBlock);  // row c = k * M + r, column j: key b0 + j
  const auto s = [&scores](int64_t c) { return scores.data() + c * kBlock; };
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t n = std::min(kBlock, hi - b0);
    const float* kb = kc + b0 * row;
    const float* vb = vc + b0 * row;
    // scores
    if (blocked) {
      if constexpr (kVec) {
        for (int64_t j0 = 0; j0 < n; j0 += 16) {  // 16 keys' rows stay in L1 over every head and query row
          for (int64_t k = 0; k < K; ++k) {
            for (int64_t r = 0; r < M; ++r) {
              v16 qv[kC];
              for (int c = 0; c < kC; ++c) qv[c] = load16(q + (k * M + r) * E + 16 * c);
              scores16<kC>(qv, kb + k * E, row, j0, std::min<int64_t>(16, n - j0), s(k * M + r));
            }
          }
        }
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t k = 0; k < K; ++k) {
          const float* kv = kb + j * row + k * E;
          for (int64_t r = 0; r < M; ++r) {
            const float* qr = q + (k * M + r) * E;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t e = 0; e < E; ++e) dot += qr[e] * kv[e];
            s(k * M + r)[j] = dot;
          }
        }
      }
    }
    // online softmax: scores -> probabilities, rescale what was summed so far
    for (int64_t c = 0; c < KM; ++c) {
      const float mx = block_max(s(c), n);
      const float m_old = m_out[c];
      const float m_new = std::max(m_old, mx);
      const float corr = m_old == kNegInf ? 0.f : exp_nonpos(m_old - m_new);
      float* sc = s(c);
      v16 sum16 = {};
      int64_t j = 0;
      for (; j + 16 <= n; j += 16) {
        const v16 p = exp16(load16(sc + j) - m_new);
        store16(sc + j, p);
        sum16 += p;
      }
      float sum = 0.f;
      for (int i = 0; i < 16; ++i) sum += sum16[i];
      for (; j < n; ++j) {
        const float p = exp_nonpos(sc[j] - m_new);
        sc[j] = p;
        sum += p;
      }
      l_out[c] = l_out[c] * corr + sum;
      m_out[c] = m_new;
      if (corr != 1.f) {
        float* a = acc_out + c * E;
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) a[e] *= corr;
      }
    }
    // acc += P V
    if (blocked) {
      if constexpr (kVec) {
        for (int64_t j0 = 0; j0 < n; j0 += 16) {  // 16 keys' value rows stay in L1 over every head and row tile
          const int64_t nj = std::min<int64_t>(16, n - j0);
          for (int64_t k = 0; k < K; ++k) {
            for (int64_t r = 0; r < M; r += kR) {
              const int rows = static_cast<int>(std::min<int64_t>(kR, M - r));
              const float* p[kR];
              float* a[kR];
              for (int i = 0; i < rows; ++i) {
                p[i] = s(k * M + r + i) + j0;
                a[i] = acc_out + (k * M + r + i) * E;
              }
              const float* v = vb + j0 * row + k * E;
              if (rows == kR) {
                weighted_sum<kC, kR>(p, a, v, row, nj);
              } else if (rows == 1) {
                weighted_sum<kC, 1>(p, a, v, row, nj);
              } else if constexpr (kR == 4) {
                if (rows == 2) weighted_sum<kC, 2>(p, a, v, row, nj);
                else weighted_sum<kC, 3>(p, a, v, row, nj);
              }
            }
          }
        }
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        for (int64_t k = 0; k < K; ++k) {
          const float* vv = vb + j * row + k * E;
          for (int64_t r = 0; r < M; ++r) {
            const float p = s(k * M + r)[j];
            float* a = acc_out + (k * M + r) * E;
#pragma omp simd
            for (int64_t e = 0; e < E; ++e) a[e] += p * vv[e];
          }
        }
      }
    }
  }
}

using RangeFn = void (*)(const Dims&, const float*, const float*, const float*, int64_t, int64_t, float*, float*,
                         float*);

RangeFn range_fn(int64_t E) {
  switch (E) {
    case 32: return attend_range<32>;
    case 64: return attend_range<64>;
    case 80: return attend_range<80>;
    case 96: return attend_range<96>;
    case 128: return attend_range<128>;
    default: return attend_range<0>;
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_cache,
                           ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> kv_len,
                           ffi::ResultBuffer<ffi::F32> m_res, ffi::ResultBuffer<ffi::F32> l_res,
                           ffi::ResultBuffer<ffi::F32> acc_res) {
  const auto qd = q.dimensions();       // [B, K, M, E]
  const auto kd = k_cache.dimensions();  // [B, S, K, E]
  if (qd.size() != 4 || kd.size() != 4 || v_cache.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("sparrow_decode_attention: q [B, K, M, E] and k/v caches [B, S, K, E] expected");
  for (int i = 0; i < 4; ++i)
    if (v_cache.dimensions()[i] != kd[i])
      return ffi::Error::InvalidArgument("sparrow_decode_attention: k and v caches differ in shape");
  const int64_t B = qd[0];
  const Dims d{kd[1], qd[1], qd[2], qd[3]};
  if (kd[0] != B || kd[2] != d.K || kd[3] != d.E || kv_len.element_count() != static_cast<size_t>(B))
    return ffi::Error::InvalidArgument("sparrow_decode_attention: q, caches and kv_len disagree on B, K or E");
  if (d.M > kMaxRows) return ffi::Error::InvalidArgument("sparrow_decode_attention: more than 64 query rows per KV head");
  const int64_t KM = d.K * d.M, KME = KM * d.E, cache_row = d.S * d.K * d.E;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t parts = std::clamp<int64_t>(d.S / kPartKeys, 1, 4 * threads);  // per batch row
  const int64_t items = B * parts;

  // Shared with the pool's tasks, which may start after this call has done every item itself.
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::vector<int64_t> len;
    std::vector<float> m, l, acc;
  };
  auto st = std::make_shared<State>();
  st->len.resize(B);
  for (int64_t b = 0; b < B; ++b) st->len[b] = std::clamp<int64_t>(kv_len.typed_data()[b], 0, d.S);
  st->m.resize(items * KM);
  st->l.resize(items * KM);
  st->acc.resize(items * KME);
  const float* qp = q.typed_data();
  const float* kp = k_cache.typed_data();
  const float* vp = v_cache.typed_data();
  const RangeFn fn = range_fn(d.E);
  std::function<void()> work = [st, d, parts, items, KM, KME, cache_row, qp, kp, vp, fn]() {
    for (int64_t i = st->next.fetch_add(1); i < items; i = st->next.fetch_add(1)) {
      const int64_t b = i / parts, p = i % parts, len = st->len[b];
      const int64_t per = ((len + parts - 1) / parts + kBlock - 1) / kBlock * kBlock;
      const int64_t lo = std::min(len, p * per), hi = std::min(len, lo + per);
      fn(d, qp + b * KME, kp + b * cache_row, vp + b * cache_row, lo, hi, st->m.data() + i * KM,
         st->l.data() + i * KM, st->acc.data() + i * KME);
      st->done.fetch_add(1);
    }
  };
  for (int64_t t = 1; t < std::min(threads, items); ++t) pool.Schedule(std::function<void()>(work));
  work();
  while (st->done.load() < items) std::this_thread::yield();  // items other threads claimed

  float* m_out = m_res->typed_data();
  float* l_out = l_res->typed_data();
  float* acc_out = acc_res->typed_data();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < KM; ++c) {
      float mx = kNegInf;
      for (int64_t p = 0; p < parts; ++p) mx = std::max(mx, st->m[(b * parts + p) * KM + c]);
      float l = 0.f;
      float* a = acc_out + (b * KM + c) * d.E;
      std::fill(a, a + d.E, 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t i = (b * parts + p) * KM + c;
        if (st->m[i] == kNegInf) continue;  // a part with no key
        const float w = exp_nonpos(st->m[i] - mx);
        l += w * st->l[i];
        const float* ap = st->acc.data() + i * d.E;
        for (int64_t e = 0; e < d.E; ++e) a[e] += w * ap[e];
      }
      m_out[b * KM + c] = mx;
      l_out[b * KM + c] = l;
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparrowDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [B, K, M, E], pre-scaled
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache [B, S, K, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache [B, S, K, E]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // kv_len [B]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // m [B, K, M]
                                  .Ret<ffi::Buffer<ffi::F32>>()  // l [B, K, M]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // acc [B, K, M, E]

// CPU kernels of the fused-backend primitives (backend contract v2, fused_objectives/backends/cpu.py):
//   lse_forward:   per-token target log-probability, softmax state (row max, log-normaliser),
//                  argmax and row statistics (lse; entropy and dotz = sum_j dot_j z_j when asked) of
//                  z = transform(x W^T + b), merged online over vocabulary chunks;
//   grad_backward: dX, dW, db of sum_i c_i logp_i + b_i lse_i + g_i dotz_i (coefficients c, or
//                  (c, b), or (c, b, g)), recomputing z chunk by chunk.
//
//   chunk_stats / chunk_grad_: the same two epilogues on one [rows, V] logits tile the caller
//                  computed (fused_objectives/backends/chunked.py: gradients in the forward);
//   target_logits: x_i . w_{y_i} in fp32 (the target's logit apart from a half-precision tile).
//
// Design: the vocabulary is walked in chunks of `chunk_cols` rows of W (outer loop, so a weight
// chunk is converted once), the active tokens in chunks of `chunk_rows` (inner loop).  Each
// [rows, cols] logits tile is one ATen GEMM (MKL/oneDNN, multi-threaded) into a reusable buffer,
// followed by one fused, row-parallel epilogue pass (at::parallel_for).  GEMM dtype: fp32, or with
// `half_gemm` and bf16/fp16 inputs of one dtype, that dtype (oneDNN's half-precision kernels,
// fp32 accumulation inside; the caller decides per dtype whether they are faster here).  Row
// statistics and the epilogue are fp32 either way; dz is rounded to the GEMM dtype for the dX /
// dW GEMMs, whose per-chunk products are accumulated in fp32.  The tile sizes
// come from the Python planner (fused_objectives/backends/cpu.py) and bound every buffer here, so
// memory never grows with N * V.  Tokens that are not active (invalid in the forward, all
// coefficients zero in the backward) are gathered away before any GEMM.  Results do not depend on the
// thread count beyond the GEMM library's own rounding: each row and each bias column is reduced by
// one thread in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fused_objectives_cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The library is built with -ffp-contract=off: the compiler never fuses a multiply and an add, so
// a logit recomputed in the backward ((raw + b) * scale, then minus the row max) rounds exactly
// as the forward's did; with contraction, raw * scale - m became one FMA there and not here,
// which at logit_scale 1e6 moved probabilities by tens of percent.  Only the polynomial below
// asks for FMAs explicitly (identical in every loop that inlines it).
inline float madd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// exp(x) to ~2 ulp, branch-free so the loops that call it vectorise; NaN propagates, exp(-inf) = 0.
inline float fast_exp(float x) {
  const float xc = x < -87.5f ? -87.5f : (x > 88.5f ? 88.5f : x);
  // round to nearest by the 1.5 * 2^23 trick (|xc * log2 e| < 2^22): no libm call, vectorises
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // two-constant Cody-Waite reduction: r = xc - n ln2, |r| <= ln2 / 2
  float r = madd(n, -0.693359375f, xc);
  r = madd(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = madd(p, r, 1.3981999507e-3f);
  p = madd(p, r, 8.3334519073e-3f);
  p = madd(p, r, 4.1665795894e-2f);
  p = madd(p, r, 1.6666665459e-1f);
  p = madd(p, r, 5.0000001201e-1f);
  p = madd(p * r, r, r) + 1.0f;
  int32_t bits;
  const int32_t e = static_cast<int32_t>(n) + 127;
  bits = e << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < -87.5f ? 0.0f : y;
  y = x > 88.5f ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

// The soft-cap's tanh, to a few ulp over the whole range and branch-free (the loops calling it
// stay vectorised): for |a| < 0.5 the odd Taylor series through a^17 (truncation < 1e-9
// relative), else 1 - 2 / (exp(2|a|) + 1), which has no cancellation there (t >= 0.46).  The
// former (1 - e) / (1 + e) with e = exp(-2|a|) cancelled for small |a|: at softcap 1e8 the logits
// lost all their digits.
inline float cap_tanh(float a) {
  const float x = std::fabs(a);
  const float x2 = x * x;
  float p = 5.9002744095e-4f;
  p = madd(p, x2, -1.4558343871e-3f);
  p = madd(p, x2, 3.5921280366e-3f);
  p = madd(p, x2, -8.8632355299e-3f);
  p = madd(p, x2, 2.1869488536e-2f);
  p = madd(p, x2, -5.3968253968e-2f);
  p = madd(p, x2, 1.3333333333e-1f);
  p = madd(p, x2, -3.3333333333e-1f);
  const float small = madd(x * x2, p, x);
  const float large = 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f);
  const float t = x < 0.5f ? small : large;  // NaN takes `large`, which is NaN
  return std::copysign(t, a);
}

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// bf16 -> fp32 is the top half of the fp32 bits: spelled out so every loop vectorises it
template <>
inline float to_f<at::BFloat16>(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Transform {
  const float* bias;  // fp32 [V] or nullptr
  float scale;        // 1 when unset
  float cap;          // 0 when unset
};

// z = cap * tanh(((raw + b) * scale) / cap); returns t = tanh(...) through `t` when capped.
template <bool kBias, bool kScale, bool kCap>
inline float apply_transform(float raw, const float* b, int64_t j, const Transform& tr, float* t) {
  float a = raw;
  if (kBias) a += b[j];
  if (kScale) a *= tr.scale;
  if (kCap) {
    *t = cap_tanh(a / tr.cap);
    a = tr.cap * *t;
  }
  return a;
}

// Online softmax state of the active rows, merged across vocabulary chunks.  `rest` is the sum of
// exp(z - m) over every column but the running argmax, whose own term (exactly 1) is kept out: the
// small remainder keeps its digits, and with them 1 - p of a confident token.
struct FwdState {
  float* m;
  float* rest;
  int64_t* amax;
  float* tlogit;
  const int64_t* target;  // per active row
  // raw target logits computed apart in fp32 (per active row), or nullptr: with half-precision
  // GEMMs they replace the target's rounded logit (see lse_forward)
  const float* traw;
  // per active row, or nullptr when not asked: sum of exp(z - m) * (z - m) over the row (the
  // argmax's own term is exactly 0), rescaled with m like `rest`; gives the softmax entropy
  float* sent = nullptr;
  // per active row, or nullptr when not asked: dotz = sum_j dot[j] * z[j] over the transformed
  // logits (linear in z: no rescaling with m); `dot` is the fp32 [V] vector of the whole vocabulary
  float* dotz = nullptr;
  const float* dot = nullptr;
};

// sum over j in [0, n) of exp(z[j] - shift), in a fixed vector-lane order (independent of threads)
inline float sum_exp(const float* z, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += fast_exp(z[j] - shift);
  return s;
}

// sum over j of exp(z[j] - shift) * (z[j] - shift); a column whose term underflows to 0 (also
// z = -inf) adds exactly 0
inline float sum_exp_shifted(const float* z, int64_t n, float shift) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) {
    const float d = z[j] - shift;
    const float e = fast_exp(d);
    s += e > 0.0f ? e * d : 0.0f;
  }
  return s;
}

// sum over j in [0, n) of u[j] * z[j], in a fixed vector-lane order (independent of threads)
inline float sum_dot(const float* z, const float* u, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += u[j] * z[j];
  return s;
}

// The first j with z[j] == v (cols - 1 if none): blocks are tested with a vectorised OR, then the
// hit block is scanned.  The first match keeps torch.argmax's tie rule.
inline int64_t first_equal(const float* z, int64_t cols, float v) {
  constexpr int64_t kBlock = 64;
  for (int64_t j0 = 0; j0 < cols; j0 += kBlock) {
    const int64_t j1 = std::min(cols, j0 + kBlock);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = j0; j < j1; ++j) hit |= z[j] == v ? 1 : 0;
    if (hit) {
      int64_t a = j0;
      while (a < j1 - 1 && !(z[a] == v)) ++a;
      return a;
    }
  }
  return cols - 1;
}

// Transformed fp32 logits of one row: the raw row itself (fp32, no transform) or `scratch`.
// With `y` in [0, cols), column y's raw logit is `raw_y` instead of raw[y].
template <typename T, bool kBias, bool kScale, bool kCap>
inline const float* row_logits(const T* raw, int64_t cols, const float* b, const Transform& tr, float* scratch,
                               float* row_max, int64_t y, float raw_y) {
  float tmax = kNegInf;
  // NaN is skipped by the max (as torch.argmax on the GPU) and reaches the sum later
  if (std::is_same<T, float>::value && !kBias && !kScale && !kCap && y < 0) {
#pragma omp simd reduction(max : tmax)
    for (int64_t j = 0; j < cols; ++j) tmax = raw[j] > tmax ? to_f(raw[j]) : tmax;
    *row_max = tmax;
    return reinterpret_cast<const float*>(raw);
  } else {
    // one pass: convert, transform, max (vectorised)
#pragma omp simd reduction(max : tmax)
    for (int64_t j = 0; j < cols; ++j) {
      float unused;
      const float rv = j == y ? raw_y : to_f(raw[j]);
      const float v = apply_transform<kBias, kScale, kCap>(rv, b, j, tr, &unused);
      scratch[j] = v;
      tmax = v > tmax ? v : tmax;
    }
    *row_max = tmax;
    return scratch;
  }
}

// Merges a [rows, cols] tile of raw logits (columns v0.., active rows row0..) into the softmax
// state.  The tile is read only.
template <typename T, bool kBias, bool kScale, bool kCap>
void forward_epilogue(const T* z, int64_t rows, int64_t cols, int64_t row0, int64_t v0,
                      const Transform& tr, FwdState st) {
  const float* b = kBias ? tr.bias + v0 : nullptr;
  const bool direct = std::is_same<T, float>::value && !kBias && !kScale && !kCap && st.traw == nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    std::vector<float> scratch(direct ? 0 : cols);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t i = row0 + r;
      const int64_t yt = st.target[i] - v0;
      const bool over = st.traw != nullptr && yt >= 0 && yt < cols;
      float tmax;
      const float* zr = row_logits<T, kBias, kScale, kCap>(z + r * cols, cols, b, tr, scratch.data(), &tmax,
                                                           over ? yt : -1, over ? st.traw[i] : 0.0f);
      const float m_old = st.m[i];
      // strict '>' here and the first-match scan keep the first index of a tie, as torch.argmax does
      const bool new_max = tmax > m_old;
      const float m_new = new_max ? tmax : m_old;
      const int64_t a = new_max ? first_equal(zr, cols, tmax) : -1;
      const int64_t y = st.target[i] - v0;
      if (y >= 0 && y < cols) st.tlogit[i] = zr[y];
      const float shift = m_new == kNegInf ? 0.0f : m_new;
      // the new argmax's term (exactly 1) stays out of the sum
      const float tsum = a >= 0 ? sum_exp(zr, a, shift) + sum_exp(zr + a + 1, cols - a - 1, shift)
                                : sum_exp(zr, cols, shift);
      if (st.sent != nullptr) {
        const float ssum = sum_exp_shifted(zr, cols, shift);
        // rescaled to the new max: exp(dm) * (S + dm * (rest + 1)), dm = m_old - m_new <= 0
        const float dm = m_old - m_new;
        st.sent[i] = (new_max ? (m_old == kNegInf ? 0.0f : std::exp(dm) * (st.sent[i] + dm * (st.rest[i] + 1.0f)))
                              : st.sent[i]) + ssum;
      }
      if (st.dotz != nullptr) st.dotz[i] += sum_dot(zr, st.dot + v0, cols);
      if (new_max) {
        st.rest[i] = (m_old == kNegInf ? 0.0f : (st.rest[i] + 1.0f) * std::exp(m_old - m_new)) + tsum;
        st.amax[i] = v0 + a;
        st.m[i] = m_new;
      } else {
        st.rest[i] += tsum;
      }
    }
  });
}

// Per-token coefficients of the backward (contract v2): the gradient on the final logits of
// sum_i c_i logp_i + b_i lse_i + g_i dotz_i is dz_ij = c_i (onehot_j - p_ij) + b_i p_ij + g_i u_j.
// `b` / `g` are nullptr when the call has no such term (then they cost nothing: with b absent the
// per-row factor below is -c, exactly today's epilogue); `g` requires `u` (the dot vector, offset
// to the tile's first column).
struct Coefs {
  const float* c;
  const float* b;  // or nullptr
  const float* g;  // or nullptr
  const float* u;  // dot[v0..], with g
};

// In place: raw logits z -> dz = (c (onehot - p) + b p + g u) * d(transform), d = scale * (1 -
// tanh^2), rounded to T.  p = exp((z - m) - log_norm) from the forward's state; at the target,
// 1 - p = -expm1(logp) comes from the forward's log p: near p = 1 it is all cancellation, and a
// recomputed logit one rounding away from the forward's would change it by percents.  So the
// target column is c (1 - p_y) + b p_y + g u_y and every other column (b - c) p_j + g u_j.  A row
// whose coefficients are all zero becomes zeros without reading its state (no NaN from it).
// kDot: the g u term (a compile-time branch: without it the loop is the classic one).
template <typename T, bool kBias, bool kScale, bool kCap, bool kDot>
void backward_epilogue(T* z, int64_t rows, int64_t cols, int64_t v0, const Transform& tr,
                       const float* row_max, const float* log_norm, const float* logp, Coefs cf,
                       const int64_t* target, const float* traw) {
  const float* b = kBias ? tr.bias + v0 : nullptr;
  const float* u = kDot ? cf.u : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      T* zr = z + r * cols;
      const float c = cf.c[r];
      const float bc = cf.b != nullptr ? cf.b[r] : 0.0f;
      const float gc = kDot ? cf.g[r] : 0.0f;
      if (c == 0.0f && bc == 0.0f && gc == 0.0f) {
        std::fill(zr, zr + cols, static_cast<T>(0.0f));
        continue;
      }
      // the factor on p off the target: -c as ever, (b - c) with an lse term
      const float a = cf.b != nullptr ? bc - c : -c;
      const float m = row_max[r];
      const float ln = log_norm[r];
      const int64_t y = target[r] - v0;
      const bool has_y = y >= 0 && y < cols;
      const float raw_y = has_y ? (traw != nullptr ? traw[r] : to_f(zr[y])) : 0.0f;
      for (int64_t j = 0; j < cols; ++j) {
        float t = 0.0f;
        const float zz = apply_transform<kBias, kScale, kCap>(to_f(zr[j]), b, j, tr, &t);
        float d = kScale ? tr.scale : 1.0f;
        if (kCap) d *= 1.0f - t * t;
        float v = a * fast_exp((zz - m) - ln);
        if (kDot) v += gc * u[j];
        zr[j] = static_cast<T>(v * d);
      }
      if (has_y) {
        float t = 0.0f;
        (void)apply_transform<kBias, kScale, kCap>(raw_y, b, y, tr, &t);
        float d = kScale ? tr.scale : 1.0f;
        if (kCap) d *= 1.0f - t * t;
        float v = c * -std::expm1(logp[r]);
        if (cf.b != nullptr) v += bc * std::exp(logp[r]);
        if (kDot) v += gc * u[y];
        zr[y] = static_cast<T>(v * d);
      }
    }
  });
}

template <bool V>
using Flag = std::integral_constant<bool, V>;

// Calls f(Flag<bias>, Flag<scale>, Flag<softcap>): 8 instantiations, so the common case without
// transforms keeps its loops free of dead work.
template <typename F>
void dispatch_transform(const Transform& tr, F&& f) {
  const bool hb = tr.bias != nullptr, hs = tr.scale != 1.0f, hc = tr.cap != 0.0f;
  if (hb) {
    if (hs) { hc ? f(Flag<true>(), Flag<true>(), Flag<true>()) : f(Flag<true>(), Flag<true>(), Flag<false>()); }
    else { hc ? f(Flag<true>(), Flag<false>(), Flag<true>()) : f(Flag<true>(), Flag<false>(), Flag<false>()); }
  } else {
    if (hs) { hc ? f(Flag<false>(), Flag<true>(), Flag<true>()) : f(Flag<false>(), Flag<true>(), Flag<false>()); }
    else { hc ? f(Flag<false>(), Flag<false>(), Flag<true>()) : f(Flag<false>(), Flag<false>(), Flag<false>()); }
  }
}

// Calls f(Flag<with the g u term>).
template <typename F>
void dispatch_dot(const Coefs& cf, F&& f) {
  if (cf.g != nullptr) f(Flag<true>());
  else f(Flag<false>());
}

// db[v0 + j] += sum over rows of g[r, j]; columns are split among threads, rows summed in order.
template <typename T>
void add_column_sums(const T* g, int64_t rows, int64_t cols, float* db) {
  at::parallel_for(0, cols, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* gr = g + r * cols;
      for (int64_t j = lo; j < hi; ++j) db[j] += to_f(gr[j]);
    }
  });
}

// dst[idx[r]] += src[r] for rows r; idx holds distinct rows, so threads never collide.
template <typename T>
void scatter_add_rows(const T* src, int64_t rows, int64_t H, const int64_t* idx, float* dst) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* d = dst + idx[r] * H;
      const T* s = src + r * H;
      for (int64_t h = 0; h < H; ++h) d[h] += to_f(s[h]);
    }
  });
}

// Calls f(T()) with T the C++ type of an fp32 / bf16 / fp16 tensor.
template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float()); break;
    case at::kBFloat16: f(at::BFloat16()); break;
    case at::kHalf: f(at::Half()); break;
    default: TORCH_CHECK(false, "fused_objectives CPU kernels: unsupported dtype ", st);
  }
}

Transform make_transform(const std::optional<at::Tensor>& bias_f, std::optional<double> logit_scale,
                         std::optional<double> softcap) {
  Transform tr;
  tr.bias = bias_f.has_value() ? bias_f->data_ptr<float>() : nullptr;
  tr.scale = logit_scale.has_value() ? static_cast<float>(*logit_scale) : 1.0f;
  tr.cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.0f;
  return tr;
}

void check_common(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& target, int64_t chunk_rows, int64_t chunk_cols) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && target.device().is_cpu(),
              "fused_objectives CPU kernels need CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden must be [N, H] and weight [V, H], got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0) && target.scalar_type() == at::kLong,
              "target must be int64 [N]");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "bias must be [V]");
  TORCH_CHECK(chunk_rows > 0 && chunk_cols > 0, "chunk sizes must be positive");
}

// The dot vector u of the dotz row statistic / the g term: contiguous fp32 [V] on the CPU.
void check_dot(const std::optional<at::Tensor>& dot, int64_t V) {
  TORCH_CHECK(!dot.has_value() || (dot->device().is_cpu() && dot->dim() == 1 && dot->size(0) == V &&
                                   dot->scalar_type() == at::kFloat && dot->is_contiguous()),
              "dot must be a contiguous fp32 CPU tensor [V] = [", V, "], got ",
              dot.has_value() ? dot->sizes() : at::IntArrayRef{}, " ",
              dot.has_value() ? dot->scalar_type() : at::kFloat);
}

// coef: fp32 [N] (c), [2, N] (c, b) or [3, N] (c, b, g; needs dot).  Returns the number of rows (1..3).
int64_t check_coef(const at::Tensor& coef, int64_t n, const std::optional<at::Tensor>& dot) {
  TORCH_CHECK(coef.scalar_type() == at::kFloat, "coef must be fp32, got ", coef.scalar_type());
  TORCH_CHECK((coef.dim() == 1 && coef.size(0) == n) ||
                  (coef.dim() == 2 && (coef.size(0) == 2 || coef.size(0) == 3) && coef.size(1) == n),
              "coef must be [N], [2, N] or [3, N] with N = ", n, ", got ", coef.sizes());
  const int64_t k = coef.dim() == 1 ? 1 : coef.size(0);
  TORCH_CHECK(k < 3 || dot.has_value(), "coef [3, N] (with the g term) needs dot");
  return k;
}

// Pointers of k coefficient rows laid out contiguously as [k, n], for rows from r0 on.
Coefs coef_rows(const float* base, int64_t k, int64_t n, int64_t r0, const float* u) {
  Coefs cf{base + r0, k >= 2 ? base + n + r0 : nullptr, k >= 3 ? base + 2 * n + r0 : nullptr, k >= 3 ? u : nullptr};
  return cf;
}

// The GEMM dtype: the inputs' half-precision dtype when asked for and both share it, else fp32.
at::ScalarType gemm_dtype(const at::Tensor& hidden, const at::Tensor& weight, bool half_gemm) {
  const auto st = hidden.scalar_type();
  if (half_gemm && st == weight.scalar_type() && (st == at::kBFloat16 || st == at::kHalf)) return st;
  return at::kFloat;
}

// Rows [r0, r0 + rows) of the active tokens as a [rows, H] matrix of the GEMM dtype: a view of
// `hidden` when possible (that dtype, every token active), else gathered / converted into `xbuf`.
bool direct_rows(const at::Tensor& hidden, bool identity, at::ScalarType cdt) {
  return identity && hidden.scalar_type() == cdt && hidden.stride(1) == 1;
}

at::Tensor token_chunk(const at::Tensor& hidden, const at::Tensor& idx, bool identity, int64_t r0, int64_t rows,
                       at::Tensor& xbuf) {
  const int64_t H = hidden.size(1);
  if (direct_rows(hidden, identity, xbuf.scalar_type())) return hidden.narrow(0, r0, rows);
  at::Tensor dst = xbuf.narrow(0, 0, rows * H).view({rows, H});
  if (identity) dst.copy_(hidden.narrow(0, r0, rows));
  else dst.copy_(hidden.index_select(0, idx.narrow(0, r0, rows)));
  return dst;
}

// Rows [v0, v0 + cols) of the weight as [cols, H] of the GEMM dtype: a view, or converted into `wbuf`.
bool direct_cols(const at::Tensor& weight, at::ScalarType cdt) {
  return weight.scalar_type() == cdt && weight.stride(1) == 1;
}

at::Tensor vocab_chunk(const at::Tensor& weight, int64_t v0, int64_t cols, at::Tensor& wbuf) {
  const int64_t H = weight.size(1);
  if (direct_cols(weight, wbuf.scalar_type())) return weight.narrow(0, v0, cols);
  at::Tensor dst = wbuf.narrow(0, 0, cols * H).view({cols, H});
  dst.copy_(weight.narrow(0, v0, cols));
  return dst;
}

// Raw target logits x_r . w_{t_r} in fp32, for rows rows[r] of `hidden` (all rows when `rows` is
// empty) and targets tgt[r]; NaN for a target outside [0, V) (never read).  With half-precision
// GEMMs the logits tile is rounded to bf16 (relative 2^-9, e.g. 0.03 on a logit of 16); the
// target's logit, which decides log p and, for a confident token, most of the normaliser, is
// taken from here instead: worst-row gradient errors drop about 5x below eager bf16's.
at::Tensor target_dots(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows,
                       const at::Tensor& tgt) {
  const int64_t n = tgt.size(0), H = hidden.size(1), V = weight.size(0);
  at::Tensor out = at::empty({n}, hidden.options().dtype(at::kFloat));
  at::Tensor hc = hidden.contiguous(), wc = weight.contiguous(), tc = tgt.contiguous();
  const int64_t* t_p = tc.data_ptr<int64_t>();
  const int64_t* r_p = rows.numel() > 0 ? rows.data_ptr<int64_t>() : nullptr;
  float* o = out.data_ptr<float>();
  dispatch_dtype(hc.scalar_type(), [&](auto tx) {
    using X = decltype(tx);
    dispatch_dtype(wc.scalar_type(), [&](auto tw) {
      using W = decltype(tw);
      const X* x = static_cast<const X*>(hc.data_ptr());
      const W* w = static_cast<const W*>(wc.data_ptr());
      at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t t = t_p[r];
          if (t < 0 || t >= V) {
            o[r] = std::numeric_limits<float>::quiet_NaN();
            continue;
          }
          const X* xr = x + (r_p ? r_p[r] : r) * H;
          const W* wr = w + t * H;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t h = 0; h < H; ++h) acc += to_f(xr[h]) * to_f(wr[h]);
          o[r] = acc;
        }
      });
    });
  });
  return out;
}

using Stats4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// rows [3, n] = (lse, entropy, dotz) from the merged state: lse = m + log(1 + rest); entropy H =
// log_norm - E_p[z - m] = log_norm - S / sum_j exp(z_j - m) (zeros unless asked); dotz (zeros
// unless asked).
at::Tensor finish_rows(const at::Tensor& m, const at::Tensor& log_norm, const at::Tensor& rest, const at::Tensor& sent,
                       const at::Tensor& dotz, bool with_entropy, bool with_dot) {
  at::Tensor out = at::zeros({3, m.size(0)}, m.options());
  out[0].copy_(m + log_norm);
  if (with_entropy) out[1].copy_(log_norm - sent / (rest + 1.0));
  if (with_dot) out[2].copy_(dotz);
  return out;
}

// (logp [N], state [3, N] = (row max, log-normaliser, logp), argmax [N], rows [3, N] = (lse,
// entropy, dotz)); rows that are not valid hold zeros; a valid token whose target is outside
// [0, V) gets a NaN logp.  rows[0] = lse = max + log-normaliser always (free); rows[1] = the
// softmax entropy of the transformed logits only `with_entropy` (one more exp per logit in the
// epilogue, paid only when asked), else zeros; rows[2] = sum_j dot_j z_j only with `dot` (one
// multiply-add per logit), else zeros.
Stats4 lse_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& valid, std::optional<double> logit_scale,
    std::optional<double> softcap, int64_t chunk_rows, int64_t chunk_cols, bool half_gemm, bool with_entropy,
    const std::optional<at::Tensor>& dot) {
  check_common(hidden, weight, bias, target, chunk_rows, chunk_cols);
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == hidden.size(0) && valid.scalar_type() == at::kBool,
              "valid must be bool [N]");
  check_dot(dot, weight.size(0));
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const at::ScalarType cdt = gemm_dtype(hidden, weight, half_gemm);
  const auto copt = hidden.options().dtype(cdt);
  at::Tensor idx = valid.nonzero().view({-1});
  const int64_t Na = idx.size(0);
  const bool identity = Na == N;
  at::Tensor state = at::zeros({3, identity ? 0 : N}, f32);
  at::Tensor amax = at::zeros({identity ? 0 : N}, hidden.options().dtype(at::kLong));
  at::Tensor rows_all = at::zeros({3, identity ? 0 : N}, f32);
  if (Na == 0) return {state[2].clone(), state, amax, rows_all};

  at::Tensor tgt = identity ? target.contiguous() : target.index_select(0, idx);
  at::Tensor m = at::full({Na}, kNegInf, f32);
  at::Tensor rest = at::zeros({Na}, f32);
  at::Tensor am = at::zeros({Na}, hidden.options().dtype(at::kLong));
  at::Tensor tl = at::full({Na}, std::numeric_limits<float>::quiet_NaN(), f32);
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const Transform tr = make_transform(bias_f, logit_scale, softcap);

  const int64_t R = std::min(chunk_rows, Na), C = std::min(chunk_cols, V);
  at::Tensor zbuf = at::empty({R * C}, copt);
  at::Tensor xbuf = at::empty({direct_rows(hidden, identity, cdt) ? 0 : R * H}, copt);
  at::Tensor wbuf = at::empty({direct_cols(weight, cdt) ? 0 : C * H}, copt);
  at::Tensor traw;
  if (cdt != at::kFloat) traw = target_dots(hidden, weight, identity ? at::empty({0}, tgt.options()) : idx, tgt);
  FwdState st{m.data_ptr<float>(), rest.data_ptr<float>(), am.data_ptr<int64_t>(), tl.data_ptr<float>(),
              tgt.data_ptr<int64_t>(), traw.defined() ? traw.data_ptr<float>() : nullptr};
  at::Tensor sent = at::zeros({with_entropy ? Na : 0}, f32);
  if (with_entropy) st.sent = sent.data_ptr<float>();
  at::Tensor dotz = at::zeros({dot.has_value() ? Na : 0}, f32);
  if (dot.has_value()) {
    st.dotz = dotz.data_ptr<float>();
    st.dot = dot->data_ptr<float>();
  }
  for (int64_t v0 = 0; v0 < V; v0 += C) {
    const int64_t cols = std::min(C, V - v0);
    at::Tensor w = vocab_chunk(weight, v0, cols, wbuf);
    for (int64_t r0 = 0; r0 < Na; r0 += R) {
      const int64_t rows = std::min(R, Na - r0);
      at::Tensor x = token_chunk(hidden, idx, identity, r0, rows, xbuf);
      at::Tensor z = zbuf.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(z, x, w.t());  // [rows, cols] logits
      dispatch_dtype(cdt, [&](auto tz) {
        using T = decltype(tz);
        dispatch_transform(tr, [&](auto fb, auto fs, auto fk) {
          forward_epilogue<T, decltype(fb)::value, decltype(fs)::value, decltype(fk)::value>(
              static_cast<const T*>(z.data_ptr()), rows, cols, r0, v0, tr, st);
        });
      });
    }
  }
  at::Tensor log_norm = rest.log1p();
  at::Tensor logp = (tl - m) - log_norm;
  at::Tensor state_a = at::stack({m, log_norm, logp});
  at::Tensor rows_a = finish_rows(m, log_norm, rest, sent, dotz, with_entropy, dot.has_value());
  if (identity) return {logp, state_a, am, rows_a};
  state.index_copy_(1, idx, state_a);
  amax.index_copy_(0, idx, am);
  rows_all.index_copy_(1, idx, rows_a);
  return {state[2].clone(), state, amax, rows_all};
}

using OptTensor = std::optional<at::Tensor>;

// dst (fp32) = or += src (any GEMM dtype), converting on the fly: one vectorised pass where ATen's
// mixed-dtype add_ converts into a temporary first (the token chunks' half-precision dW products).
void accumulate_(const at::Tensor& dst, const at::Tensor& src, bool add) {
  TORCH_CHECK(dst.scalar_type() == at::kFloat && dst.is_contiguous(), "accumulate_: dst must be contiguous fp32");
  TORCH_CHECK(src.is_contiguous() && src.sizes() == dst.sizes(), "accumulate_: src must be contiguous, shaped like dst");
  const int64_t n = dst.numel();
  float* d = dst.data_ptr<float>();
  dispatch_dtype(src.scalar_type(), [&](auto ts) {
    using T = decltype(ts);
    const T* p = static_cast<const T*>(src.data_ptr());
    at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
      if (add) {
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) d[i] += to_f(p[i]);
      } else {
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) d[i] = to_f(p[i]);
      }
    });
  });
}

std::tuple<OptTensor, OptTensor, OptTensor> grad_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& state, const at::Tensor& coef, std::optional<double> logit_scale,
    std::optional<double> softcap, bool need_dx, bool need_dw, bool need_db, int64_t chunk_rows,
    int64_t chunk_cols, bool half_gemm, const std::optional<at::Tensor>& dot) {
  check_common(hidden, weight, bias, target, chunk_rows, chunk_cols);
  TORCH_CHECK(state.dim() == 2 && state.size(0) == 3 && state.size(1) == hidden.size(0) &&
              state.scalar_type() == at::kFloat, "state must be the forward's fp32 [3, N]");
  check_dot(dot, weight.size(0));
  const int64_t K = check_coef(coef, hidden.size(0), dot);
  TORCH_CHECK(!need_db || bias.has_value(), "need_db without a bias");
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const at::ScalarType cdt = gemm_dtype(hidden, weight, half_gemm);
  const auto copt = hidden.options().dtype(cdt);
  const bool c32 = cdt == at::kFloat;
  const bool x32 = hidden.scalar_type() == at::kFloat, w32 = weight.scalar_type() == at::kFloat;

  at::Tensor dx_acc, dw, db_acc;
  if (need_dx) dx_acc = at::zeros({N, H}, f32);
  if (need_dw) dw = at::zeros({V, H}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (need_db) db_acc = at::zeros({V}, f32);

  // a token is active when any coefficient is non-zero; NaN coefficients stay active, so a NaN
  // reaches the gradients instead of vanishing
  at::Tensor idx = (K == 1 ? coef.ne(0) : coef.ne(0).any(0)).nonzero().view({-1});
  const int64_t Na = idx.size(0);
  if (Na > 0 && (need_dx || need_dw || need_db)) {
    const bool identity = Na == N;
    at::Tensor tgt = identity ? target.contiguous() : target.index_select(0, idx);
    at::Tensor st_a = identity ? state.contiguous() : state.index_select(1, idx).contiguous();
    const float* m_p = st_a.data_ptr<float>();  // rows: max, log-normaliser, logp
    at::Tensor coef_a = identity ? coef.contiguous() : coef.index_select(K == 1 ? 0 : 1, idx).contiguous();
    const float* dot_p = K == 3 ? dot->data_ptr<float>() : nullptr;
    std::optional<at::Tensor> bias_f;
    if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
    const Transform tr = make_transform(bias_f, logit_scale, softcap);

    const int64_t R = std::min(chunk_rows, Na), C = std::min(chunk_cols, V);
    at::Tensor zbuf = at::empty({R * C}, copt);
    at::Tensor xbuf = at::empty({direct_rows(hidden, identity, cdt) ? 0 : R * H}, copt);
    at::Tensor wbuf = at::empty({direct_cols(weight, cdt) ? 0 : C * H}, copt);
    // dX of a chunk goes through this buffer (gathered rows, or a half-precision product), then to its rows
    at::Tensor tbuf = at::empty({(need_dx && (!identity || !c32)) ? R * H : 0}, copt);
    // an fp32 dW slab per vocabulary chunk (weights not fp32), and a half-precision product buffer
    at::Tensor dwbuf = at::empty({(need_dw && !w32) ? C * H : 0}, f32);
    at::Tensor pbuf = at::empty({(need_dw && !c32) ? C * H : 0}, copt);
    const int64_t* idx_p = idx.data_ptr<int64_t>();
    // the soft-cap's derivative at the target from the same fp32 logit as the forward's
    at::Tensor traw;
    if (!c32 && tr.cap != 0.0f) traw = target_dots(hidden, weight, identity ? at::empty({0}, tgt.options()) : idx, tgt);
    const float* traw_p = traw.defined() ? traw.data_ptr<float>() : nullptr;
    for (int64_t v0 = 0; v0 < V; v0 += C) {
      const int64_t cols = std::min(C, V - v0);
      at::Tensor w = vocab_chunk(weight, v0, cols, wbuf);
      at::Tensor dwv;
      if (need_dw) {
        if (w32) {
          dwv = dw.narrow(0, v0, cols);
        } else {
          dwv = dwbuf.narrow(0, 0, cols * H).view({cols, H});
          dwv.zero_();
        }
      }
      for (int64_t r0 = 0; r0 < Na; r0 += R) {
        const int64_t rows = std::min(R, Na - r0);
        at::Tensor x = token_chunk(hidden, idx, identity, r0, rows, xbuf);
        at::Tensor g = zbuf.narrow(0, 0, rows * cols).view({rows, cols});
        at::mm_out(g, x, w.t());  // logits, then in place their gradient
        dispatch_dtype(cdt, [&](auto tz) {
          using T = decltype(tz);
          const Coefs cf = coef_rows(coef_a.data_ptr<float>(), K, Na, r0, dot_p ? dot_p + v0 : nullptr);
          dispatch_transform(tr, [&](auto b, auto sc, auto k) {
            dispatch_dot(cf, [&](auto gd) {
              backward_epilogue<T, decltype(b)::value, decltype(sc)::value, decltype(k)::value, decltype(gd)::value>(
                  static_cast<T*>(g.data_ptr()), rows, cols, v0, tr, m_p + r0, m_p + Na + r0, m_p + 2 * Na + r0, cf,
                  tgt.data_ptr<int64_t>() + r0, traw_p ? traw_p + r0 : nullptr);
            });
          });
          if (need_db) add_column_sums(static_cast<const T*>(g.data_ptr()), rows, cols, db_acc.data_ptr<float>() + v0);
          if (need_dx) {
            if (identity && c32) {
              at::Tensor dst = dx_acc.narrow(0, r0, rows);
              dst.addmm_(g, w);
            } else {
              at::Tensor t = tbuf.narrow(0, 0, rows * H).view({rows, H});
              at::mm_out(t, g, w);
              if (identity) accumulate_(dx_acc.narrow(0, r0, rows), t, true);
              else scatter_add_rows(static_cast<const T*>(t.data_ptr()), rows, H, idx_p + r0, dx_acc.data_ptr<float>());
            }
          }
        });
        if (need_dw) {
          if (c32) {
            dwv.addmm_(g.t(), x);
          } else {
            at::Tensor p = pbuf.narrow(0, 0, cols * H).view({cols, H});
            at::mm_out(p, g.t(), x);
            accumulate_(dwv, p, true);  // fp32 accumulation across token chunks
          }
        }
      }
      if (need_dw && !w32) dw.narrow(0, v0, cols).copy_(dwv);
    }
  }
  OptTensor dx, dw_out, db;
  if (need_dx) dx = x32 ? dx_acc : dx_acc.to(hidden.scalar_type());
  if (need_dw) dw_out = dw;
  if (need_db) db = db_acc.to(bias->scalar_type());
  return {dx, dw_out, db};
}

void check_tile(const at::Tensor& z, const std::optional<at::Tensor>& bias, const at::Tensor& target) {
  TORCH_CHECK(z.device().is_cpu() && z.dim() == 2 && z.is_contiguous(), "z must be a contiguous CPU [rows, V] tile");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == z.size(0) && target.scalar_type() == at::kLong &&
              target.is_contiguous(), "target must be contiguous int64 [rows]");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == z.size(1)), "bias must be [V]");
}

void check_target_raw(const std::optional<at::Tensor>& target_raw, int64_t rows) {
  TORCH_CHECK(!target_raw.has_value() || (target_raw->dim() == 1 && target_raw->size(0) == rows &&
                                          target_raw->scalar_type() == at::kFloat && target_raw->is_contiguous()),
              "target_raw must be contiguous fp32 [rows]");
}

// x_r . w_{t_r} in fp32 for every row (NaN where t_r is outside [0, V)).
at::Tensor target_logits(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1) && target.dim() == 1 &&
              target.size(0) == hidden.size(0) && target.scalar_type() == at::kLong,
              "target_logits: hidden [N, H], weight [V, H], int64 target [N]");
  return target_dots(hidden, weight, at::empty({0}, target.options()), target);
}

// Statistics of full logits rows: (logp [rows], state [3, rows] = (max, log-normaliser, logp),
// argmax [rows], rows [3, rows] = (lse, entropy, dotz)), exactly as lse_forward computes them for
// a vocabulary in one chunk (entropy only `with_entropy`, dotz only with `dot`, else zeros).
// `target_raw` (fp32 [rows], optional): the target's raw logits computed apart (target_logits).
Stats4 chunk_stats(const at::Tensor& z, const std::optional<at::Tensor>& bias, const at::Tensor& target,
                   std::optional<double> logit_scale, std::optional<double> softcap,
                   const std::optional<at::Tensor>& target_raw, bool with_entropy,
                   const std::optional<at::Tensor>& dot) {
  check_tile(z, bias, target);
  check_target_raw(target_raw, z.size(0));
  check_dot(dot, z.size(1));
  const int64_t rows = z.size(0), V = z.size(1);
  const auto f32 = z.options().dtype(at::kFloat);
  at::Tensor m = at::full({rows}, kNegInf, f32);
  at::Tensor rest = at::zeros({rows}, f32);
  at::Tensor am = at::zeros({rows}, z.options().dtype(at::kLong));
  at::Tensor tl = at::full({rows}, std::numeric_limits<float>::quiet_NaN(), f32);
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const Transform tr = make_transform(bias_f, logit_scale, softcap);
  FwdState st{m.data_ptr<float>(), rest.data_ptr<float>(), am.data_ptr<int64_t>(), tl.data_ptr<float>(),
              target.data_ptr<int64_t>(), target_raw.has_value() ? target_raw->data_ptr<float>() : nullptr};
  at::Tensor sent = at::zeros({with_entropy ? rows : 0}, f32);
  if (with_entropy) st.sent = sent.data_ptr<float>();
  at::Tensor dotz = at::zeros({dot.has_value() ? rows : 0}, f32);
  if (dot.has_value()) {
    st.dotz = dotz.data_ptr<float>();
    st.dot = dot->data_ptr<float>();
  }
  if (rows > 0 && V > 0) {
    dispatch_dtype(z.scalar_type(), [&](auto tz) {
      using T = decltype(tz);
      dispatch_transform(tr, [&](auto fb, auto fs, auto fk) {
        forward_epilogue<T, decltype(fb)::value, decltype(fs)::value, decltype(fk)::value>(
            static_cast<const T*>(z.data_ptr()), rows, V, 0, 0, tr, st);
      });
    });
  }
  at::Tensor log_norm = rest.log1p();
  at::Tensor logp = (tl - m) - log_norm;
  return {logp, at::stack({m, log_norm, logp}), am,
          finish_rows(m, log_norm, rest, sent, dotz, with_entropy, dot.has_value())};
}

// In place: the raw logits tile z becomes dz = (c (onehot - p) + b p + g dot) * d(transform), in
// z's dtype; coef fp32 [rows] | [2, rows] | [3, rows] (the last with dot) as in grad_backward.
// Rows whose coefficients are all zero become zeros.
void chunk_grad_(const at::Tensor& z, const std::optional<at::Tensor>& bias, const at::Tensor& target,
                 const at::Tensor& state, const at::Tensor& coef, std::optional<double> logit_scale,
                 std::optional<double> softcap, const std::optional<at::Tensor>& target_raw,
                 const std::optional<at::Tensor>& dot) {
  check_tile(z, bias, target);
  check_target_raw(target_raw, z.size(0));
  check_dot(dot, z.size(1));
  const int64_t rows = z.size(0), V = z.size(1);
  TORCH_CHECK(state.dim() == 2 && state.size(0) == 3 && state.size(1) == rows && state.scalar_type() == at::kFloat &&
              state.is_contiguous(), "state must be chunk_stats' fp32 [3, rows]");
  const int64_t K = check_coef(coef, rows, dot);
  TORCH_CHECK(coef.is_contiguous(), "coef must be contiguous");
  if (rows == 0 || V == 0) return;
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const Transform tr = make_transform(bias_f, logit_scale, softcap);
  const float* s = state.data_ptr<float>();
  const Coefs cf = coef_rows(coef.data_ptr<float>(), K, rows, 0, K == 3 ? dot->data_ptr<float>() : nullptr);
  dispatch_dtype(z.scalar_type(), [&](auto tz) {
    using T = decltype(tz);
    dispatch_transform(tr, [&](auto fb, auto fs, auto fk) {
      dispatch_dot(cf, [&](auto gd) {
        backward_epilogue<T, decltype(fb)::value, decltype(fs)::value, decltype(fk)::value, decltype(gd)::value>(
            static_cast<T*>(z.data_ptr()), rows, V, 0, tr, s, s + rows, s + 2 * rows, cf, target.data_ptr<int64_t>(),
            target_raw.has_value() ? target_raw->data_ptr<float>() : nullptr);
      });
    });
  });
}

}  // namespace
}  // namespace fused_objectives_cpu

// One schema for every device: the CPU kernels register here; other devices add their own.
// Backend contract v2 (see fused_objectives/backends/cpu.py): the forwards
// return rows [3, N] = (lse, entropy if asked, dotz with dot); the backwards take coef [N] | [2, N]
// | [3, N] = (c, b, g), the gradient of sum c logp + b lse + g dotz.
TORCH_LIBRARY(fused_objectives, m) {
  m.def("lse_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor valid, "
        "float? logit_scale, float? softcap, int chunk_rows, int chunk_cols, bool half_gemm=False, "
        "bool entropy=False, Tensor? dot=None) -> (Tensor logp, Tensor state, Tensor argmax, Tensor rows)");
  m.def("grad_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor state, Tensor coef, "
        "float? logit_scale, float? softcap, bool need_dx, bool need_dw, bool need_db, int chunk_rows, "
        "int chunk_cols, bool half_gemm=False, Tensor? dot=None) -> (Tensor? dx, Tensor? dw, Tensor? db)");
  m.def("chunk_stats(Tensor z, Tensor? bias, Tensor target, float? logit_scale, float? softcap, "
        "Tensor? target_raw=None, bool entropy=False, Tensor? dot=None) "
        "-> (Tensor logp, Tensor state, Tensor argmax, Tensor rows)");
  m.def("chunk_grad_(Tensor(a!) z, Tensor? bias, Tensor target, Tensor state, Tensor coef, float? logit_scale, "
        "float? softcap, Tensor? target_raw=None, Tensor? dot=None) -> ()");
  m.def("target_logits(Tensor hidden, Tensor weight, Tensor target) -> Tensor");
  m.def("accumulate_(Tensor(a!) dst, Tensor src, bool add) -> ()");
}

TORCH_LIBRARY_IMPL(fused_objectives, CPU, m) {
  m.impl("lse_forward", &fused_objectives_cpu::lse_forward);
  m.impl("grad_backward", &fused_objectives_cpu::grad_backward);
  m.impl("chunk_stats", &fused_objectives_cpu::chunk_stats);
  m.impl("chunk_grad_", &fused_objectives_cpu::chunk_grad_);
  m.impl("target_logits", &fused_objectives_cpu::target_logits);
  m.impl("accumulate_", &fused_objectives_cpu::accumulate_);
}

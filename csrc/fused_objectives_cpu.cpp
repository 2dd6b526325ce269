// CPU kernels of the fused-backend primitives (see fused_objectives/backends/__init__.py):
//   lse_forward:   per-token target log-probability, softmax state (row max, log-normaliser) and
//                  argmax of z = transform(x W^T + b), merged online over vocabulary chunks;
//   grad_backward: dX, dW, db of sum_i coef_i * logp_i, recomputing z chunk by chunk.
//
// Design: the vocabulary is walked in chunks of `chunk_cols` rows of W (outer loop, so a non-fp32
// weight chunk is upcast once), the active tokens in chunks of `chunk_rows` (inner loop).  Each
// [rows, cols] logits tile is one ATen GEMM (MKL/oneDNN, multi-threaded) into a reusable fp32
// buffer, followed by one fused, row-parallel epilogue pass (at::parallel_for).  The tile sizes
// come from the Python planner (fused_objectives/backends/cpu.py) and bound every buffer here, so
// memory never grows with N * V.  Tokens that are not active (invalid in the forward, zero
// coefficient in the backward) are gathered away before any GEMM.  Results do not depend on the
// thread count beyond the GEMM library's own rounding: each row and each bias column is reduced by
// one thread in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fused_objectives_cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) to ~2 ulp, branch-free so the loops that call it vectorise; NaN propagates, exp(-inf) = 0.
inline float fast_exp(float x) {
  const float xc = x < -87.5f ? -87.5f : (x > 88.5f ? 88.5f : x);
  // round to nearest by the 1.5 * 2^23 trick (|xc * log2 e| < 2^22): no libm call, vectorises
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // two-constant Cody-Waite reduction: r = xc - n ln2, |r| <= ln2 / 2
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
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

// tanh(a) via exp(-2|a|): finite for every a, odd-symmetric.
inline float fast_tanh(float a) {
  const float e = fast_exp(-2.0f * std::fabs(a));
  const float t = (1.0f - e) / (1.0f + e);
  return a < 0.0f ? -t : t;
}

struct Transform {
  const float* bias;  // fp32 [V] or nullptr
  float scale;        // 1 when unset
  float cap;          // 0 when unset
  float inv_cap;
};

// z = cap * tanh(((raw + b) * scale) / cap); returns t = tanh(...) through `t` when capped.
template <bool kBias, bool kScale, bool kCap>
inline float apply_transform(float raw, const float* b, int64_t j, const Transform& tr, float* t) {
  float a = raw;
  if (kBias) a += b[j];
  if (kScale) a *= tr.scale;
  if (kCap) {
    *t = fast_tanh(a * tr.inv_cap);
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
};

template <bool kBias, bool kScale, bool kCap>
void forward_epilogue(float* z, int64_t rows, int64_t cols, int64_t row0, int64_t v0,
                      const Transform& tr, FwdState st) {
  const float* b = kBias ? tr.bias + v0 : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* zr = z + r * cols;
      const int64_t i = row0 + r;
      float unused;
      if (kBias || kScale || kCap) {
        for (int64_t j = 0; j < cols; ++j) zr[j] = apply_transform<kBias, kScale, kCap>(zr[j], b, j, tr, &unused);
      }
      // tile max; NaN is skipped here (as torch.argmax on the GPU) and reaches the sum below
      float tmax = kNegInf;
#pragma omp simd reduction(max : tmax)
      for (int64_t j = 0; j < cols; ++j) tmax = zr[j] > tmax ? zr[j] : tmax;

      const float m_old = st.m[i];
      // strict '>' here and the first-match scan keep the first index of a tie, as torch.argmax does
      const bool new_max = tmax > m_old;
      const float m_new = new_max ? tmax : m_old;
      int64_t a = -1;
      if (new_max) {
        a = 0;
        while (a < cols - 1 && !(zr[a] == tmax)) ++a;
      }
      const int64_t y = st.target[i] - v0;
      if (y >= 0 && y < cols) st.tlogit[i] = zr[y];
      // the new argmax's term (exactly 1) stays out of the sum
      if (a >= 0) zr[a] = kNegInf;
      const float shift = m_new == kNegInf ? 0.0f : m_new;
      // a fixed vector-lane order: the sum does not depend on the thread count
      float tsum = 0.0f;
#pragma omp simd reduction(+ : tsum)
      for (int64_t j = 0; j < cols; ++j) tsum += fast_exp(zr[j] - shift);
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

// In place: z -> dz = coef * (onehot - softmax) * d(transform), with d = scale * (1 - tanh^2).
// p = exp((z - m) - log_norm) from the forward's state; at the target, 1 - p = -expm1(logp) comes
// from the forward's log p: near p = 1 it is all cancellation, and a recomputed logit one rounding
// away from the forward's would change it by percents.
template <bool kBias, bool kScale, bool kCap>
void backward_epilogue(float* z, int64_t rows, int64_t cols, int64_t v0, const Transform& tr,
                       const float* row_max, const float* log_norm, const float* logp, const float* coef,
                       const int64_t* target) {
  const float* b = kBias ? tr.bias + v0 : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* zr = z + r * cols;
      const float c = coef[r];
      const float m = row_max[r];
      const float ln = log_norm[r];
      const int64_t y = target[r] - v0;
      const bool has_y = y >= 0 && y < cols;
      const float raw_y = has_y ? zr[y] : 0.0f;
      for (int64_t j = 0; j < cols; ++j) {
        float t = 0.0f;
        const float zz = apply_transform<kBias, kScale, kCap>(zr[j], b, j, tr, &t);
        float d = kScale ? tr.scale : 1.0f;
        if (kCap) d *= 1.0f - t * t;
        zr[j] = -c * fast_exp((zz - m) - ln) * d;
      }
      if (has_y) {
        float t = 0.0f;
        (void)apply_transform<kBias, kScale, kCap>(raw_y, b, y, tr, &t);
        float d = kScale ? tr.scale : 1.0f;
        if (kCap) d *= 1.0f - t * t;
        zr[y] = c * -std::expm1(logp[r]) * d;
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

// db[v0 + j] += sum over rows of g[r, j]; columns are split among threads, rows summed in order.
void add_column_sums(const float* g, int64_t rows, int64_t cols, float* db) {
  at::parallel_for(0, cols, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* gr = g + r * cols;
      for (int64_t j = lo; j < hi; ++j) db[j] += gr[j];
    }
  });
}

// dst[idx[r]] += src[r] for rows r; idx holds distinct rows, so threads never collide.
void scatter_add_rows(const float* src, int64_t rows, int64_t H, const int64_t* idx, float* dst) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* d = dst + idx[r] * H;
      const float* s = src + r * H;
      for (int64_t h = 0; h < H; ++h) d[h] += s[h];
    }
  });
}

Transform make_transform(const std::optional<at::Tensor>& bias_f, std::optional<double> logit_scale,
                         std::optional<double> softcap) {
  Transform tr;
  tr.bias = bias_f.has_value() ? bias_f->data_ptr<float>() : nullptr;
  tr.scale = logit_scale.has_value() ? static_cast<float>(*logit_scale) : 1.0f;
  tr.cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.0f;
  tr.inv_cap = softcap.has_value() ? 1.0f / tr.cap : 0.0f;
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

// Rows [r0, r0 + rows) of the active tokens as an fp32 [rows, H] matrix: a view of `hidden` when
// possible (fp32, every token active), else gathered and upcast into `xbuf`.
bool direct_rows(const at::Tensor& hidden, bool identity) {
  return identity && hidden.scalar_type() == at::kFloat && hidden.stride(1) == 1;
}

at::Tensor token_chunk(const at::Tensor& hidden, const at::Tensor& idx, bool identity, int64_t r0, int64_t rows,
                       at::Tensor& xbuf) {
  const int64_t H = hidden.size(1);
  if (direct_rows(hidden, identity)) return hidden.narrow(0, r0, rows);
  at::Tensor dst = xbuf.narrow(0, 0, rows * H).view({rows, H});
  if (identity) dst.copy_(hidden.narrow(0, r0, rows));
  else dst.copy_(hidden.index_select(0, idx.narrow(0, r0, rows)));
  return dst;
}

// Rows [v0, v0 + cols) of the weight as fp32 [cols, H]: a view when fp32, else upcast into `wbuf`.
bool direct_cols(const at::Tensor& weight) { return weight.scalar_type() == at::kFloat && weight.stride(1) == 1; }

at::Tensor vocab_chunk(const at::Tensor& weight, int64_t v0, int64_t cols, at::Tensor& wbuf) {
  const int64_t H = weight.size(1);
  if (direct_cols(weight)) return weight.narrow(0, v0, cols);
  at::Tensor dst = wbuf.narrow(0, 0, cols * H).view({cols, H});
  dst.copy_(weight.narrow(0, v0, cols));
  return dst;
}

// (logp [N], state [3, N] = (row max, log-normaliser, logp), argmax [N]); rows that are not valid
// hold zeros; a valid token whose target is outside [0, V) gets a NaN logp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lse_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& valid, std::optional<double> logit_scale,
    std::optional<double> softcap, int64_t chunk_rows, int64_t chunk_cols) {
  check_common(hidden, weight, bias, target, chunk_rows, chunk_cols);
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == hidden.size(0) && valid.scalar_type() == at::kBool,
              "valid must be bool [N]");
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor idx = valid.nonzero().view({-1});
  const int64_t Na = idx.size(0);
  const bool identity = Na == N;
  at::Tensor state = at::zeros({3, identity ? 0 : N}, f32);
  at::Tensor amax = at::zeros({identity ? 0 : N}, hidden.options().dtype(at::kLong));
  if (Na == 0) return {state[2].clone(), state, amax};

  at::Tensor tgt = identity ? target.contiguous() : target.index_select(0, idx);
  at::Tensor m = at::full({Na}, kNegInf, f32);
  at::Tensor rest = at::zeros({Na}, f32);
  at::Tensor am = at::zeros({Na}, hidden.options().dtype(at::kLong));
  at::Tensor tl = at::full({Na}, std::numeric_limits<float>::quiet_NaN(), f32);
  std::optional<at::Tensor> bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  const Transform tr = make_transform(bias_f, logit_scale, softcap);

  const int64_t R = std::min(chunk_rows, Na), C = std::min(chunk_cols, V);
  at::Tensor zbuf = at::empty({R * C}, f32);
  at::Tensor xbuf = at::empty({direct_rows(hidden, identity) ? 0 : R * H}, f32);
  at::Tensor wbuf = at::empty({direct_cols(weight) ? 0 : C * H}, f32);
  FwdState st{m.data_ptr<float>(), rest.data_ptr<float>(), am.data_ptr<int64_t>(), tl.data_ptr<float>(),
              tgt.data_ptr<int64_t>()};
  for (int64_t v0 = 0; v0 < V; v0 += C) {
    const int64_t cols = std::min(C, V - v0);
    at::Tensor w = vocab_chunk(weight, v0, cols, wbuf);
    for (int64_t r0 = 0; r0 < Na; r0 += R) {
      const int64_t rows = std::min(R, Na - r0);
      at::Tensor x = token_chunk(hidden, idx, identity, r0, rows, xbuf);
      at::Tensor z = zbuf.narrow(0, 0, rows * cols).view({rows, cols});
      at::mm_out(z, x, w.t());  // [rows, cols] logits
      dispatch_transform(tr, [&](auto fb, auto fs, auto fk) {
        forward_epilogue<decltype(fb)::value, decltype(fs)::value, decltype(fk)::value>(
            z.data_ptr<float>(), rows, cols, r0, v0, tr, st);
      });
    }
  }
  at::Tensor log_norm = rest.log1p();
  at::Tensor logp = (tl - m) - log_norm;
  at::Tensor state_a = at::stack({m, log_norm, logp});
  if (identity) return {logp, state_a, am};
  state.index_copy_(1, idx, state_a);
  amax.index_copy_(0, idx, am);
  return {state[2].clone(), state, amax};
}

using OptTensor = std::optional<at::Tensor>;

std::tuple<OptTensor, OptTensor, OptTensor> grad_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const at::Tensor& state, const at::Tensor& coef, std::optional<double> logit_scale,
    std::optional<double> softcap, bool need_dx, bool need_dw, bool need_db, int64_t chunk_rows,
    int64_t chunk_cols) {
  check_common(hidden, weight, bias, target, chunk_rows, chunk_cols);
  TORCH_CHECK(state.dim() == 2 && state.size(0) == 3 && state.size(1) == hidden.size(0) &&
              state.scalar_type() == at::kFloat, "state must be the forward's fp32 [3, N]");
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == hidden.size(0) && coef.scalar_type() == at::kFloat, "coef must be fp32 [N]");
  TORCH_CHECK(!need_db || bias.has_value(), "need_db without a bias");
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool x32 = hidden.scalar_type() == at::kFloat, w32 = weight.scalar_type() == at::kFloat;

  at::Tensor dx_acc, dw, db_acc;
  if (need_dx) dx_acc = at::zeros({N, H}, f32);
  if (need_dw) dw = at::zeros({V, H}, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (need_db) db_acc = at::zeros({V}, f32);

  // NaN coefficients stay active, so a NaN reaches the gradients instead of vanishing
  at::Tensor idx = coef.ne(0).nonzero().view({-1});
  const int64_t Na = idx.size(0);
  if (Na > 0 && (need_dx || need_dw || need_db)) {
    const bool identity = Na == N;
    at::Tensor tgt = identity ? target.contiguous() : target.index_select(0, idx);
    at::Tensor st_a = identity ? state.contiguous() : state.index_select(1, idx).contiguous();
    const float* m_p = st_a.data_ptr<float>();  // rows: max, log-normaliser, logp
    at::Tensor coef_a = identity ? coef.contiguous() : coef.index_select(0, idx);
    std::optional<at::Tensor> bias_f;
    if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
    const Transform tr = make_transform(bias_f, logit_scale, softcap);

    const int64_t R = std::min(chunk_rows, Na), C = std::min(chunk_cols, V);
    at::Tensor zbuf = at::empty({R * C}, f32);
    at::Tensor xbuf = at::empty({direct_rows(hidden, identity) ? 0 : R * H}, f32);
    at::Tensor wbuf = at::empty({direct_cols(weight) ? 0 : C * H}, f32);
    // dX of a gathered chunk goes through this buffer, then to its rows
    at::Tensor tbuf = at::empty({(need_dx && !identity) ? R * H : 0}, f32);
    at::Tensor dwbuf = at::empty({(need_dw && !w32) ? C * H : 0}, f32);
    const int64_t* idx_p = idx.data_ptr<int64_t>();
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
        dispatch_transform(tr, [&](auto b, auto sc, auto k) {
          backward_epilogue<decltype(b)::value, decltype(sc)::value, decltype(k)::value>(
              g.data_ptr<float>(), rows, cols, v0, tr, m_p + r0, m_p + Na + r0, m_p + 2 * Na + r0,
              coef_a.data_ptr<float>() + r0, tgt.data_ptr<int64_t>() + r0);
        });
        if (need_db) add_column_sums(g.data_ptr<float>(), rows, cols, db_acc.data_ptr<float>() + v0);
        if (need_dx) {
          if (identity) {
            at::Tensor dst = dx_acc.narrow(0, r0, rows);
            dst.addmm_(g, w);
          } else {
            at::Tensor t = tbuf.narrow(0, 0, rows * H).view({rows, H});
            at::mm_out(t, g, w);
            scatter_add_rows(t.data_ptr<float>(), rows, H, idx_p + r0, dx_acc.data_ptr<float>());
          }
        }
        if (need_dw) dwv.addmm_(g.t(), x);
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

}  // namespace
}  // namespace fused_objectives_cpu

// One schema for every device: the CPU kernels register here; other devices add their own.
TORCH_LIBRARY(fused_objectives, m) {
  m.def("lse_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor valid, "
        "float? logit_scale, float? softcap, int chunk_rows, int chunk_cols) -> (Tensor logp, Tensor state, Tensor argmax)");
  m.def("grad_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor target, Tensor state, Tensor coef, "
        "float? logit_scale, float? softcap, bool need_dx, bool need_dw, bool need_db, int chunk_rows, "
        "int chunk_cols) -> (Tensor? dx, Tensor? dw, Tensor? db)");
}

TORCH_LIBRARY_IMPL(fused_objectives, CPU, m) {
  m.impl("lse_forward", &fused_objectives_cpu::lse_forward);
  m.impl("grad_backward", &fused_objectives_cpu::grad_backward);
}

// OPEN's per-parameter network (flax GRUCell, two Dense + LayerNorm + ReLU
// layers, Dense(3)) as one fused CPU kernel, called through XLA's FFI.
//
// Why: written in JAX, the network is a few skinny matmuls ([24, 19] @ [19, N]
// and the like) and elementwise passes over [rows, N] arrays of several MB;
// on CPU much of its time is that memory traffic. Here each block of 24
// parameters goes through the whole network with its intermediates in L1.
//
// Layout (feature-major, as in learned_optim/open.py): the input features in
// two parts, x_a [..., Ia, N] and x_b [..., Ib, N] (rows 0..Ia-1 and
// Ia..I-1 of x: OPEN's 15 normalised features and its 4 others, so that x is
// never copied into one array), carry [..., H, N], weights [..., W] packed by
// open_kernel.pack_weights; outputs:
// the new carry [..., H, N] and o [..., 3, N]. Leading dims are a batch
// (vmap); each batch element has its own weights.
//
// Vectorisation: parameters lie on the 8 lanes of AVX2 registers, so every
// matmul is broadcast-weight x vector-of-parameters multiply-adds with no
// reductions across lanes. The small loops over register tiles are unrolled
// with pragmas: without that GCC keeps the accumulator arrays in memory and
// stores every multiply-add's result to the stack (about 14G multiply-adds
// per second on this design's 4 x 3 tile instead of 30-36G).
//
// Numerics: exp is a degree-6 polynomial after range reduction (about 1
// ulp); sigmoid = 1 / (1 + exp(-x)) and tanh = 2 sigmoid(2x) - 1 with the
// reciprocal from rcp plus one Newton step (about 2^-22 relative). NaN
// propagates as in XLA (max/min and comparisons are ordered so that a NaN
// input gives a NaN output).

#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "OPEN's CPU kernel needs AVX2 and FMA"
#endif

#include <algorithm>
#include <atomic>
#include <memory>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef __m256 v8;
constexpr int kCT = 3;              // vectors per block row
constexpr int64_t kG = 8 * kCT;     // parameters per block
constexpr int64_t kOut = 3;
constexpr int64_t kMaxI = 32, kMaxH = 32, kMaxM = 64;  // checked at call time
constexpr int64_t kPrefetch = 4;    // blocks ahead
constexpr int64_t kMinBlocksPerThread = 256;  // below ~6k parameters a second thread is not worth starting

#define UNROLL _Pragma("GCC unroll 16")

inline v8 splat(float a) { return _mm256_set1_ps(a); }
inline v8 bc(const float* p) { return _mm256_broadcast_ss(p); }
inline v8 ld(const float* p) { return _mm256_loadu_ps(p); }
inline void st(float* p, v8 v) { _mm256_storeu_ps(p, v); }
// Keeps a loaded vector in a register (stops GCC from folding it into each
// multiply-add as a memory operand, which makes the tiles load-bound).
#define PIN(v) __asm__("" : "+x"(v))

inline v8 vexp(v8 x) {
  x = _mm256_max_ps(splat(-87.0f), x);  // max/min return the second operand when one is NaN
  x = _mm256_min_ps(splat(88.0f), x);
  const v8 big = _mm256_fmadd_ps(x, splat(1.44269504088896341f), splat(12582912.0f));  // x/ln2 rounded
  const v8 n = _mm256_sub_ps(big, splat(12582912.0f));
  v8 r = _mm256_fnmadd_ps(n, splat(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, splat(1.428606765330187e-06f), r);
  v8 p = splat(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, r, splat(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, splat(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, splat(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, splat(0.5f));
  p = _mm256_fmadd_ps(p, r, splat(1.0f));
  p = _mm256_fmadd_ps(p, r, splat(1.0f));
  const __m256i scale = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_castps_si256(big), _mm256_set1_epi32(127 - 0x4B400000)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
inline v8 vinv(v8 d) {  // 1 / d: rcp (12 bits) and one Newton step
  const v8 r = _mm256_rcp_ps(d);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(d, r, splat(2.0f)));
}
inline v8 vsigmoid(v8 x) { return vinv(_mm256_add_ps(splat(1.0f), vexp(_mm256_sub_ps(_mm256_setzero_ps(), x)))); }
inline v8 vtanh(v8 x) {
  return _mm256_fmsub_ps(splat(2.0f), vinv(_mm256_add_ps(splat(1.0f), vexp(_mm256_mul_ps(splat(-2.0f), x)))), splat(1.0f));
}

struct Net {
  int64_t I, H, M;
  const float *w_in, *b_in, *w_h, *b_hn, *w1, *b1, *s1, *c1, *w2, *b2, *s2, *c2, *wo, *bo;
  static int64_t Size(int64_t I, int64_t H, int64_t M) {
    return 3 * H * I + 3 * H + 3 * H * H + H + (M * H + 3 * M) + (M * M + 3 * M) + kOut * M + kOut;
  }
  Net(const float* w, int64_t I_, int64_t H_, int64_t M_) : I(I_), H(H_), M(M_) {
    w_in = w;            b_in = w_in + 3 * H * I;  w_h = b_in + 3 * H;  b_hn = w_h + 3 * H * H;
    w1 = b_hn + H;       b1 = w1 + M * H;          s1 = b1 + M;         c1 = s1 + M;
    w2 = c1 + M;         b2 = w2 + M * M;          s2 = b2 + M;         c2 = s2 + M;
    wo = c2 + M;         bo = wo + kOut * M;
  }
};

// out[r] = b[r] + sum_k w[r, k] in[k] for rows r0..r0+RT of a block ([K, kG] in, [rows, kG] out).
template <int RT>
inline void DenseRows(const float* w, const float* b, int64_t r0, int64_t K, const float* in, float* out) {
  v8 acc[RT][kCT];
  UNROLL for (int i = 0; i < RT; ++i) UNROLL for (int c = 0; c < kCT; ++c) acc[i][c] = bc(b + r0 + i);
  for (int64_t k = 0; k < K; ++k) {
    v8 x[kCT];
    UNROLL for (int c = 0; c < kCT; ++c) { x[c] = ld(in + k * kG + 8 * c); PIN(x[c]); }
    UNROLL for (int i = 0; i < RT; ++i) {
      const v8 wv = bc(w + (r0 + i) * K + k);
      UNROLL for (int c = 0; c < kCT; ++c) acc[i][c] = _mm256_fmadd_ps(wv, x[c], acc[i][c]);
    }
  }
  UNROLL for (int i = 0; i < RT; ++i) UNROLL for (int c = 0; c < kCT; ++c) st(out + (r0 + i) * kG + 8 * c, acc[i][c]);
}

inline void Dense(const float* w, const float* b, int64_t rows, int64_t K, const float* in, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) DenseRows<4>(w, b, r, K, in, out);
  for (; r + 2 <= rows; r += 2) DenseRows<2>(w, b, r, K, in, out);
  for (; r < rows; ++r) DenseRows<1>(w, b, r, K, in, out);
}

// LayerNorm (its mean already folded into the Dense weights), then ReLU, in place on [rows, kG].
inline void NormRelu(float* a, const float* scale, const float* bias, int64_t rows) {
  v8 var[kCT];
  UNROLL for (int c = 0; c < kCT; ++c) var[c] = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r)
    UNROLL for (int c = 0; c < kCT; ++c) {
      const v8 v = ld(a + r * kG + 8 * c);
      var[c] = _mm256_fmadd_ps(v, v, var[c]);
    }
  const v8 inv_rows = splat(1.0f / static_cast<float>(rows));
  v8 inv[kCT];
  UNROLL for (int c = 0; c < kCT; ++c)
    inv[c] = _mm256_div_ps(splat(1.0f), _mm256_sqrt_ps(_mm256_fmadd_ps(var[c], inv_rows, splat(1e-6f))));
  for (int64_t r = 0; r < rows; ++r) {
    const v8 sc = bc(scale + r), bi = bc(bias + r);
    UNROLL for (int c = 0; c < kCT; ++c) {
      const v8 y = _mm256_fmadd_ps(_mm256_mul_ps(ld(a + r * kG + 8 * c), inv[c]), sc, bi);
      // y < 0 ? 0 : y (a NaN stays NaN)
      st(a + r * kG + 8 * c, _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LT_OQ)));
    }
  }
}

// One block of kG parameters. x[k]: the block's first element of input row k;
// h: H rows with stride hs; writes h_out (H rows) and o (3 rows), both with
// stride os.
void Block(const Net& n, const float* const* x, const float* h, int64_t hs, float* h_out, float* o,
           int64_t os) {
  const int64_t I = n.I, H = n.H, M = n.M;
  alignas(64) float pre[4 * kMaxH * kG];  // per hidden unit: the r, z, n_in, n_h pre-activations
  alignas(64) float hn[kMaxH * kG];
  alignas(64) float a1[kMaxM * kG];
  alignas(64) float a2[kMaxM * kG];
  for (int64_t j = 0; j < H; ++j) {
    v8 ar[kCT], az[kCT], an[kCT], ah[kCT];
    UNROLL for (int c = 0; c < kCT; ++c) {
      ar[c] = bc(n.b_in + j);
      az[c] = bc(n.b_in + H + j);
      an[c] = bc(n.b_in + 2 * H + j);
      ah[c] = bc(n.b_hn + j);
    }
    const float* wr = n.w_in + j * I;
    const float* wz = n.w_in + (H + j) * I;
    const float* wn = n.w_in + (2 * H + j) * I;
    for (int64_t k = 0; k < I; ++k) {
      const v8 a = bc(wr + k), b = bc(wz + k), e = bc(wn + k);
      v8 xv[kCT];
      UNROLL for (int c = 0; c < kCT; ++c) { xv[c] = ld(x[k] + 8 * c); PIN(xv[c]); }
      UNROLL for (int c = 0; c < kCT; ++c) {
        ar[c] = _mm256_fmadd_ps(a, xv[c], ar[c]);
        az[c] = _mm256_fmadd_ps(b, xv[c], az[c]);
        an[c] = _mm256_fmadd_ps(e, xv[c], an[c]);
      }
    }
    const float* ur = n.w_h + j * H;
    const float* uz = n.w_h + (H + j) * H;
    const float* un = n.w_h + (2 * H + j) * H;
    for (int64_t k = 0; k < H; ++k) {
      const v8 a = bc(ur + k), b = bc(uz + k), e = bc(un + k);
      v8 hv[kCT];
      UNROLL for (int c = 0; c < kCT; ++c) { hv[c] = ld(h + k * hs + 8 * c); PIN(hv[c]); }
      UNROLL for (int c = 0; c < kCT; ++c) {
        ar[c] = _mm256_fmadd_ps(a, hv[c], ar[c]);
        az[c] = _mm256_fmadd_ps(b, hv[c], az[c]);
        ah[c] = _mm256_fmadd_ps(e, hv[c], ah[c]);
      }
    }
    float* pj = pre + 4 * j * kG;
    UNROLL for (int c = 0; c < kCT; ++c) {
      st(pj + 8 * c, ar[c]);
      st(pj + kG + 8 * c, az[c]);
      st(pj + 2 * kG + 8 * c, an[c]);
      st(pj + 3 * kG + 8 * c, ah[c]);
    }
  }
  // The gates as a separate pass: independent iterations the core can overlap.
  for (int64_t j = 0; j < H; ++j) {
    const float* pj = pre + 4 * j * kG;
    for (int c = 0; c < kCT; ++c) {
      const v8 r = vsigmoid(ld(pj + 8 * c)), z = vsigmoid(ld(pj + kG + 8 * c));
      const v8 nn = vtanh(_mm256_fmadd_ps(r, ld(pj + 3 * kG + 8 * c), ld(pj + 2 * kG + 8 * c)));
      const v8 out = _mm256_fmadd_ps(z, _mm256_sub_ps(ld(h + j * hs + 8 * c), nn), nn);  // (1 - z) n + z h
      st(hn + j * kG + 8 * c, out);
      st(h_out + j * os + 8 * c, out);
    }
  }
  Dense(n.w1, n.b1, M, H, hn, a1);
  NormRelu(a1, n.s1, n.c1, M);
  Dense(n.w2, n.b2, M, M, a1, a2);
  NormRelu(a2, n.s2, n.c2, M);
  v8 ao[kOut][kCT];
  UNROLL for (int i = 0; i < kOut; ++i) UNROLL for (int c = 0; c < kCT; ++c) ao[i][c] = bc(n.bo + i);
  for (int64_t k = 0; k < M; ++k) {
    v8 y[kCT];
    UNROLL for (int c = 0; c < kCT; ++c) { y[c] = ld(a2 + k * kG + 8 * c); PIN(y[c]); }
    UNROLL for (int i = 0; i < kOut; ++i) {
      const v8 wv = bc(n.wo + i * M + k);
      UNROLL for (int c = 0; c < kCT; ++c) ao[i][c] = _mm256_fmadd_ps(wv, y[c], ao[i][c]);
    }
  }
  UNROLL for (int i = 0; i < kOut; ++i) UNROLL for (int c = 0; c < kCT; ++c) st(o + i * os + 8 * c, ao[i][c]);
}

// Blocks [b0, b1) of one batch element with N parameters; x[k] is input row
// k. The last block may be short (zero-padded).
void Blocks(const Net& n, const float* const* x, const float* h, float* h_out, float* o, int64_t N,
            int64_t b0, int64_t b1) {
  const float* rows[kMaxI];
  for (int64_t bi = b0; bi < b1; ++bi) {
    const int64_t j0 = bi * kG;
    if (j0 + kG <= N) {
      const int64_t jp = j0 + kPrefetch * kG;  // the rows' next lines: 27+ streams defeat the hardware prefetcher
      if (jp + kG <= N) {
        for (int64_t r = 0; r < n.I; ++r) {
          __builtin_prefetch(x[r] + jp);
          __builtin_prefetch(x[r] + jp + kG - 1);
        }
        for (int64_t r = 0; r < n.H; ++r) {
          __builtin_prefetch(h + r * N + jp);
          __builtin_prefetch(h + r * N + jp + kG - 1);
        }
      }
      for (int64_t r = 0; r < n.I; ++r) rows[r] = x[r] + j0;
      Block(n, rows, h + j0, N, h_out + j0, o + j0, N);
      continue;
    }
    const int64_t len = N - j0;
    alignas(64) float xp[kMaxI * kG] = {}, hp[kMaxH * kG] = {}, hop[kMaxH * kG], op[kOut * kG];
    for (int64_t r = 0; r < n.I; ++r) {
      std::memcpy(xp + r * kG, x[r] + j0, sizeof(float) * len);
      rows[r] = xp + r * kG;
    }
    for (int64_t r = 0; r < n.H; ++r) std::memcpy(hp + r * kG, h + r * N + j0, sizeof(float) * len);
    Block(n, rows, hp, kG, hop, op, kG);
    for (int64_t r = 0; r < n.H; ++r) std::memcpy(h_out + r * N + j0, hop + r * kG, sizeof(float) * len);
    for (int64_t r = 0; r < kOut; ++r) std::memcpy(o + r * N + j0, op + r * kG, sizeof(float) * len);
  }
}

// Threads to use at most: METARL_OPEN_KERNEL_THREADS, else all of XLA's pool.
int64_t MaxThreads() {
  if (const char* env = std::getenv("METARL_OPEN_KERNEL_THREADS")) {
    const int64_t t = std::atoll(env);
    if (t > 0) return t;
  }
  return 1 << 20;
}

// Work shared by the calling thread and helpers on XLA's intra-op pool.
// Chunks are claimed from a counter; the caller works too and then waits
// only for chunks already claimed by running helpers, never for a task still
// in the pool's queue. So it cannot deadlock when every pool thread is busy
// (as jaxlib 0.10's LAPACK kernels can, blocking a pool thread on queued
// pool work), and a helper that starts late finds nothing left and returns.
struct Shared {
  std::atomic<int64_t> next{0}, done{0};
  int64_t chunks = 0;
};
ffi::Error OpenForwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x_a, ffi::Buffer<ffi::F32> x_b,
                           ffi::Buffer<ffi::F32> carry, ffi::Buffer<ffi::F32> weights,
                           ffi::ResultBuffer<ffi::F32> carry_out, ffi::ResultBuffer<ffi::F32> o) {
  const auto xd = x_a.dimensions();
  const auto bd = x_b.dimensions();
  const auto hd = carry.dimensions();
  const auto wd = weights.dimensions();
  if (xd.size() < 2 || bd.size() != xd.size() || hd.size() != xd.size() || wd.size() != xd.size() - 1)
    return ffi::Error::InvalidArgument(
        "open_forward: expected x_a [..., Ia, N], x_b [..., Ib, N], carry [..., H, N], weights [..., W]");
  const int64_t rank = xd.size();
  const int64_t N = xd[rank - 1], Ia = xd[rank - 2], Ib = bd[rank - 2], I = Ia + Ib, H = hd[rank - 2];
  int64_t batch = 1;
  for (int64_t i = 0; i < rank - 2; ++i) {
    if (xd[i] != bd[i] || xd[i] != hd[i] || xd[i] != wd[i])
      return ffi::Error::InvalidArgument("open_forward: batch dims differ");
    batch *= xd[i];
  }
  if (hd[rank - 1] != N || bd[rank - 1] != N)
    return ffi::Error::InvalidArgument("open_forward: the inputs differ in N");
  if (I > kMaxI || H > kMaxH) return ffi::Error::InvalidArgument("open_forward: too many inputs or GRU units");
  const int64_t w_total = wd[rank - 2];
  int64_t M = 0;
  for (int64_t m = 1; m <= kMaxM; ++m)
    if (Net::Size(I, H, m) == w_total) M = m;
  if (M == 0) return ffi::Error::InvalidArgument("open_forward: the weight vector does not match the sizes");

  const float* xap = x_a.typed_data();
  const float* xbp = x_b.typed_data();
  const float* hp = carry.typed_data();
  const float* wp = weights.typed_data();
  float* hop = carry_out->typed_data();
  float* op = o->typed_data();
  const int64_t blocks = (N + kG - 1) / kG;  // per batch element
  // Work item i: block i % blocks of batch element i / blocks; a thread takes a contiguous range.
  auto run = [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / blocks, first = i % blocks, last = std::min(blocks, first + (end - i));
      const Net net(wp + b * w_total, I, H, M);
      const float* rows[kMaxI];
      for (int64_t r = 0; r < I; ++r) rows[r] = r < Ia ? xap + (b * Ia + r) * N : xbp + (b * Ib + r - Ia) * N;
      Blocks(net, rows, hp + b * H * N, hop + b * H * N, op + b * kOut * N, N, first, last);
      i += last - first;
    }
  };
  const int64_t items = batch * blocks;
  const int64_t chunk = kMinBlocksPerThread / 4;
  auto shared = std::make_shared<Shared>();
  shared->chunks = (items + chunk - 1) / chunk;
  auto work = [shared, run, items, chunk]() {
    for (int64_t c; (c = shared->next.fetch_add(1)) < shared->chunks;) {
      run(c * chunk, std::min(items, (c + 1) * chunk));
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), MaxThreads(), items / kMinBlocksPerThread}) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetarlOpenForward, OpenForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

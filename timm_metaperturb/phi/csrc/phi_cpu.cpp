// φ's noise path, modulation and scale features, and their gradients, as fused CPU kernels (loaded by
// timm_metaperturb/phi_cpu.py).
//
// Feature maps are float32 (B, C, H, W) tensors, contiguous or channels-last. The kernels compute channels-last,
// (B, H, W, C) in memory, so that a row of pixels with all its channels is one contiguous span and the inner loops,
// which run along it, vectorise; a contiguous map is transposed one image at a time in cache. Work is split over
// the images of the batch, each image going through all its stages while it sits in cache, and the per-image
// sums of the weight gradients are added up afterwards in a fixed order: results do not depend on the number of
// threads.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

using torch::Tensor;

namespace {

// exp and log1p written with plain arithmetic (Cephes' polynomials) so that loops calling them vectorise
// without -ffast-math, which would also break NaN propagation.
inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

inline float fast_exp(float x) {
  x = x > 88.37f ? 88.37f : (x < -87.33f ? -87.33f : x);
  float fx = x * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(fx);
  n -= static_cast<float>(n) > fx ? 1 : 0;  // floor
  float fn = static_cast<float>(n);
  x = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  return y * bits_to_float((n + 127) << 23);
}

// log(y) for a normal float y > 0.
inline float fast_log(float y) {
  const int32_t bits = float_to_bits(y);
  int32_t e = ((bits >> 23) & 0xff) - 126;
  float m = bits_to_float((bits & 0x807fffff) | 0x3f000000);  // y = m * 2^e, m in [0.5, 1)
  const bool low = m < 0.707106781186547524f;
  e -= low ? 1 : 0;
  m = (low ? m + m : m) - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  return m + (p * m * z - 2.12194440e-4f * fe - 0.5f * z) + 0.693359375f * fe;
}

// log(1 + t) for t in [0, 1], accurate for small t too (Goldberg's correction).
inline float log1p_unit(float t) {
  const float y = 1.0f + t, d = y - 1.0f;
  return d == 0.0f ? t : fast_log(y) * (t / d);
}

// torch's softplus (beta 1, threshold 20) and, from the same exp(-|u|), its derivative sigmoid(u).
inline float softplus(float u, float& derivative) {
  const float a = u < 0.0f ? -u : u;
  const float e = fast_exp(-a), inverse = 1.0f / (1.0f + e);
  derivative = u < 0.0f ? e * inverse : inverse;
  const float v = (u < 0.0f ? 0.0f : u) + log1p_unit(e);
  return u > 20.0f ? u : v;
}

inline float softplus(float u) {
  float unused;
  return softplus(u, unused);
}

// eps ~ N(0, 1) from a counter-based generator: each value depends only on (seed, image, position), so the noise
// is the same whatever the number of threads, and is computed where it is used instead of stored.
inline uint32_t mix32(uint32_t h) {  // an integer hash with full avalanche (C. Wellons' lowbias32)
  h ^= h >> 16;
  h *= 0x7feb352dU;
  h ^= h >> 15;
  h *= 0x846ca68bU;
  h ^= h >> 16;
  return h;
}

// cos and sin of 2 pi v for v in [0, 1): quadrant, then Cephes' polynomials on [-pi/4, pi/4].
inline void cos_sin_turn(float v, float& cosine, float& sine) {
  const float quarters = v * 4.0f;
  const int32_t q = static_cast<int32_t>(quarters);
  const float x = (quarters - static_cast<float>(q) - 0.5f) * 1.57079632679489662f;  // in [-pi/4, pi/4)
  const float x2 = x * x;
  const float s = x + x * x2 * (-1.6666654611e-1f + x2 * (8.3321608736e-3f + x2 * -1.9515295891e-4f));
  const float c = 1.0f - 0.5f * x2 + x2 * x2 * (4.166664568298827e-2f + x2 * (-1.388731625493765e-3f + x2 * 2.443315711809948e-5f));
  const float r = 0.70710678118654752f;  // the angle within the quadrant is x + pi/4
  const float cq = (c - s) * r, sq = (s + c) * r;
  cosine = q == 0 ? cq : (q == 1 ? -sq : (q == 2 ? -cq : sq));
  sine = q == 0 ? sq : (q == 1 ? cq : (q == 2 ? -sq : -cq));
}

// The pair of N(0, 1) values at counter i of an image's stream (keys), by Box-Muller.
inline void normal_pair(uint32_t key1, uint32_t key2, uint32_t i, float& first, float& second) {
  const uint32_t counter = mix32(mix32(i ^ key1) ^ key2);
  const float u1 = static_cast<float>(static_cast<int32_t>(mix32(counter ^ 0x68e31da4U) >> 8) + 1) * 5.9604645e-8f;
  const float u2 = static_cast<float>(static_cast<int32_t>(mix32(counter + 0xb5297a4dU) >> 8)) * 5.9604645e-8f;
  const float radius = std::sqrt(-2.0f * fast_log(u1));  // u1 in (0, 1], u2 in [0, 1)
  float cosine, sine;
  cos_sin_turn(u2, cosine, sine);
  first = radius * cosine;
  second = radius * sine;
}

void fill_normal_pairs(uint32_t key1, uint32_t key2, float* __restrict first, float* __restrict second, int64_t n) {
  for (int64_t i = 0; i < n; ++i) normal_pair(key1, key2, static_cast<uint32_t>(i), first[i], second[i]);
}

// The n values of image b under `seed`: pair i gives eps[i] and eps[i + n / 2] (and an odd n's last value alone).
void normal_noise(uint64_t seed, int64_t b, float* __restrict eps, int64_t n) {
  const uint32_t image = mix32(static_cast<uint32_t>(b) ^ 0x9e3779b9U);
  const uint32_t key1 = mix32(static_cast<uint32_t>(seed) ^ image);
  const uint32_t key2 = mix32(static_cast<uint32_t>(seed >> 32) + image);
  const int64_t half = n / 2;
  fill_normal_pairs(key1, key2, eps, eps + half, half);
  if (n % 2 == 1) {
    float unused;
    normal_pair(key1, key2, static_cast<uint32_t>(half), eps[n - 1], unused);
  }
}

struct Geometry {
  int64_t batch, channels, height, width, ksize, pad;
  bool channels_last;  // the maps' memory layout (the kernels compute channels-last either way)
  int64_t pixels() const { return height * width; }
  int64_t image() const { return height * width * channels; }
  at::MemoryFormat layout() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
  void check(const Tensor& t, const char* name) const {
    TORCH_CHECK(t.sizes() == at::IntArrayRef({batch, channels, height, width}) && t.is_contiguous(layout()),
                name, " must have the feature map's shape and memory layout");
  }
};

Geometry geometry(const Tensor& x, const Tensor& kernel) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "φ's CPU kernels take a float32 (B, C, H, W) CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(), "φ's CPU kernels take contiguous or channels-last maps");
  const int64_t k = kernel.size(-1);
  return {x.size(0), x.size(1), x.size(2), x.size(3), k, k / 2, channels_last};
}

Tensor empty_map(const Tensor& x) { return at::empty_like(x, at::MemoryFormat::ChannelsLast); }

// dst (cols x rows) = src (rows x cols) transposed, in square blocks transposed in registers: 16 x 16 with AVX-512,
// 8 x 8 with AVX2 (element by element, a transpose costs several times a copy, and its stores, a row of the
// image apart, fall into the same few cache sets); elsewhere in 8 x 8 blocks of single values, and at the edges one
// value at a time.
void transpose(const float* __restrict src, float* __restrict dst, int64_t rows, int64_t cols) {
#if defined(__AVX512F__)
  constexpr int64_t block = 16;
#else
  constexpr int64_t block = 8;
#endif
  const int64_t whole_rows = rows / block * block, whole_cols = cols / block * block;
  for (int64_t r0 = 0; r0 < whole_rows; r0 += block) {
    for (int64_t c0 = 0; c0 < whole_cols; c0 += block) {
#if defined(__AVX512F__)
      __m512 a[16], b[16];
      for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_ps(src + (r0 + i) * cols + c0);
      // within each 128-bit lane: pairs of rows interleaved, then groups of four rows
      for (int i = 0; i < 16; i += 2) {
        b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {
        a[i] = _mm512_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        a[i + 1] = _mm512_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        a[i + 2] = _mm512_shuffle_ps(b[i + 1], b[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        a[i + 3] = _mm512_shuffle_ps(b[i + 1], b[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      // a[4g + j], lane k, holds column 4k + j of rows 4g..4g+3: the lanes transposed across the four groups
      for (int j = 0; j < 4; ++j) {
        const __m512 v0 = _mm512_shuffle_f32x4(a[j], a[4 + j], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512 v1 = _mm512_shuffle_f32x4(a[j], a[4 + j], _MM_SHUFFLE(3, 2, 3, 2));
        const __m512 v2 = _mm512_shuffle_f32x4(a[8 + j], a[12 + j], _MM_SHUFFLE(1, 0, 1, 0));
        const __m512 v3 = _mm512_shuffle_f32x4(a[8 + j], a[12 + j], _MM_SHUFFLE(3, 2, 3, 2));
        float* out = dst + (c0 + j) * rows + r0;
        _mm512_storeu_ps(out, _mm512_shuffle_f32x4(v0, v2, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm512_storeu_ps(out + 4 * rows, _mm512_shuffle_f32x4(v0, v2, _MM_SHUFFLE(3, 1, 3, 1)));
        _mm512_storeu_ps(out + 8 * rows, _mm512_shuffle_f32x4(v1, v3, _MM_SHUFFLE(2, 0, 2, 0)));
        _mm512_storeu_ps(out + 12 * rows, _mm512_shuffle_f32x4(v1, v3, _MM_SHUFFLE(3, 1, 3, 1)));
      }
#elif defined(__AVX2__)
      __m256 a[8], b[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(src + (r0 + i) * cols + c0);
      // within each 128-bit half: pairs of rows interleaved, then groups of four rows; then the halves exchanged
      for (int i = 0; i < 8; i += 2) {
        b[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
        b[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        a[i] = _mm256_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        a[i + 1] = _mm256_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        a[i + 2] = _mm256_shuffle_ps(b[i + 1], b[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        a[i + 3] = _mm256_shuffle_ps(b[i + 1], b[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      // a[j], half k, holds column 4k + j of rows 0..3; a[4 + j] that of rows 4..7
      for (int j = 0; j < 4; ++j) {
        float* out = dst + (c0 + j) * rows + r0;
        _mm256_storeu_ps(out, _mm256_permute2f128_ps(a[j], a[4 + j], 0x20));
        _mm256_storeu_ps(out + 4 * rows, _mm256_permute2f128_ps(a[j], a[4 + j], 0x31));
      }
#else
      for (int64_t c = c0; c < c0 + block; ++c)
        for (int64_t r = r0; r < r0 + block; ++r) dst[c * rows + r] = src[r * cols + c];
#endif
    }
  }
  for (int64_t r = 0; r < rows; ++r)  // what the blocks left: the last columns, then the last rows
    for (int64_t c = r < whole_rows ? whole_cols : 0; c < cols; ++c) dst[c * rows + r] = src[r * cols + c];
}

// One map's images, read and written channels-last whatever the map's layout: a channels-last map in place, a
// channels-first one through a transposed copy of the current image in this thread's buffer (in cache, instead of
// a copy of the whole map before and after φ).
class Images {
 public:
  Images(const Geometry& g, const Tensor& map) : g_(g), map_(map), buffer_(g.channels_last ? 0 : g.image()) {}

  const float* read(int64_t b) {
    const float* image = map_.data_ptr<float>() + b * g_.image();
    if (g_.channels_last) return image;
    transpose(image, buffer_.data(), g_.channels, g_.pixels());
    return buffer_.data();
  }

  // Where to put image b's channels-last values; `store` then writes them into the map.
  float* target(int64_t b) { return g_.channels_last ? map_.data_ptr<float>() + b * g_.image() : buffer_.data(); }

  void store(int64_t b) {
    if (g_.channels_last) return;
    float* image = map_.data_ptr<float>() + b * g_.image();
    transpose(buffer_.data(), image, g_.pixels(), g_.channels);
  }

 private:
  const Geometry& g_;
  Tensor map_;
  std::vector<float> buffer_;
};

inline float dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

// An image of `channels` values per pixel inside a zero border of `pad` pixels, so that every stencil tap reads
// in bounds. The border is zeroed once; `fill` overwrites only the interior.
struct Padded {
  const Geometry& g;
  int64_t channels, row;
  std::vector<float> data;
  Padded(const Geometry& geometry, int64_t ch)
      : g(geometry), channels(ch), row(row_length(geometry, ch)),
        data((geometry.height + 2 * geometry.pad) * row, 0.0f) {}
  static int64_t row_length(const Geometry& g, int64_t channels) { return (g.width + 2 * g.pad) * channels; }
  const float* at(int64_t i, int64_t j) const { return data.data() + i * row + j * channels; }
  // The interior's row i (image row i, inside the border), to write in place of `fill`.
  float* interior(int64_t i) { return data.data() + (i + g.pad) * row + g.pad * channels; }
  // Where each of a k x k stencil's taps starts reading for output row i: taps[di * k + dj].
  void row_taps(int64_t i, int64_t k, const float** taps) const {
    for (int64_t di = 0; di < k; ++di)
      for (int64_t dj = 0; dj < k; ++dj) taps[di * k + dj] = at(i + di, dj);
  }
  void fill(const float* x) {
    for (int64_t i = 0; i < g.height; ++i)
      std::copy(x + i * g.width * channels, x + (i + 1) * g.width * channels,
                data.data() + (i + g.pad) * row + g.pad * channels);
  }
};

// y[p, c] (=, or += with `accumulate`) sum_d w[d] * x[p + d, c] for one image, with x padded; `flip` turns the
// kernel around (the transposed stencil: sum_d w[d] * x[p - d, c]). Optionally plus a value per pixel for all its
// channels (`pixel_bias`: an equivariant layer's mean part), then relu'd. Each output value sums all taps in a
// register, starting from a row of what it adds to them (the bias broadcast, y's old values), made in cache.
template <int KT>
void stencil_impl(const Padded& x, const float* w, float* __restrict y, bool flip, bool accumulate,
                  const float* pixel_bias, bool relu) {
  const Geometry& g = x.g;
  const int64_t K = KT > 0 ? KT : g.ksize, taps = K * K, C = x.channels, n = g.width * C;
  std::vector<float> wk(taps), start(2 * n);
  for (int64_t d = 0; d < taps; ++d) wk[d] = flip ? w[taps - 1 - d] : w[d];
  // row i's starting values: the bias broadcast over the channels, plus y's old values with `accumulate`
  auto begin_row = [&](int64_t i, float* __restrict si) {
    if (pixel_bias != nullptr) {
      for (int64_t j = 0; j < g.width; ++j) std::fill_n(si + j * C, C, pixel_bias[i * g.width + j]);
    } else {
      std::fill_n(si, n, 0.0f);
    }
    if (accumulate)
      for (int64_t e = 0; e < n; ++e) si[e] += y[i * n + e];
  };
  int64_t i = 0;
  if constexpr (KT == 3) {  // two output rows at a time: they share two of their three input rows' loads
    const float w0 = wk[0], w1 = wk[1], w2 = wk[2], w3 = wk[3], w4 = wk[4], w5 = wk[5], w6 = wk[6], w7 = wk[7],
                w8 = wk[8];
    for (; i + 1 < g.height; i += 2) {
      float* __restrict s0 = start.data();
      float* __restrict s1 = start.data() + n;
      begin_row(i, s0);
      begin_row(i + 1, s1);
      const float* __restrict r0 = x.at(i, 0);
      const float* __restrict r1 = x.at(i + 1, 0);
      const float* __restrict r2 = x.at(i + 2, 0);
      const float* __restrict r3 = x.at(i + 3, 0);
      float* __restrict y0 = y + i * n;
      float* __restrict y1 = y0 + n;
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) {
        const float a1 = r1[e], b1 = r1[e + C], c1 = r1[e + 2 * C];
        const float a2 = r2[e], b2 = r2[e + C], c2 = r2[e + 2 * C];
        float v0 = s0[e] + w0 * r0[e] + w1 * r0[e + C] + w2 * r0[e + 2 * C];
        float v1 = s1[e] + w0 * a1 + w1 * b1 + w2 * c1;
        v0 += w3 * a1 + w4 * b1 + w5 * c1 + w6 * a2 + w7 * b2 + w8 * c2;
        v1 += w3 * a2 + w4 * b2 + w5 * c2 + w6 * r3[e] + w7 * r3[e + C] + w8 * r3[e + 2 * C];
        y0[e] = relu && v0 < 0.0f ? 0.0f : v0;  // NaN kept, as torch's relu keeps it
        y1[e] = relu && v1 < 0.0f ? 0.0f : v1;
      }
    }
  }
  std::vector<const float*> src(taps);
  for (; i < g.height; ++i) {
    float* __restrict si = start.data();
    begin_row(i, si);
    x.row_taps(i, K, src.data());
    float* __restrict yi = y + i * n;
    for (int64_t e = 0; e < n; ++e) {
      float sum = si[e];
      for (int64_t d = 0; d < taps; ++d) sum += wk[d] * src[d][e];
      yi[e] = relu && sum < 0.0f ? 0.0f : sum;  // NaN kept, as torch's relu keeps it
    }
  }
}

void stencil(const Padded& x, const float* w, float* y, bool flip, bool accumulate,
             const float* pixel_bias = nullptr, bool relu = false) {
  if (x.g.ksize == 3) return stencil_impl<3>(x, w, y, flip, accumulate, pixel_bias, relu);
  stencil_impl<0>(x, w, y, flip, accumulate, pixel_bias, relu);
}

// grad_w[d] += scale * sum_p grad[p] . x[p + d] for one image, x padded, grad's row i at grad + i * grad_stride: the
// stencil's gradient to its kernel. For 3x3 kernels one pass keeps all nine sums in registers; other sizes take one
// pass per tap.
void stencil_weight_grad(const float* grad, int64_t grad_stride, const Padded& x, float* grad_w, float scale) {
  const Geometry& g = x.g;
  const int64_t n = g.width * x.channels;
  if (g.ksize == 3) {
    double totals[9] = {0.0};  // per-row float sums added up in double: accurate on large maps too
    const int64_t ch = x.channels;
    for (int64_t i = 0; i < g.height; ++i) {
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0, s8 = 0;
      const float* __restrict gi = grad + i * grad_stride;
      const float* __restrict r0 = x.at(i, 0);
      const float* __restrict r1 = x.at(i + 1, 0);
      const float* __restrict r2 = x.at(i + 2, 0);
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7, s8)
      for (int64_t e = 0; e < n; ++e) {
        const float v = gi[e];
        s0 += v * r0[e];
        s1 += v * r0[e + ch];
        s2 += v * r0[e + 2 * ch];
        s3 += v * r1[e];
        s4 += v * r1[e + ch];
        s5 += v * r1[e + 2 * ch];
        s6 += v * r2[e];
        s7 += v * r2[e + ch];
        s8 += v * r2[e + 2 * ch];
      }
      const float sums[9] = {s0, s1, s2, s3, s4, s5, s6, s7, s8};
      for (int d = 0; d < 9; ++d) totals[d] += sums[d];
    }
    for (int d = 0; d < 9; ++d) grad_w[d] += scale * static_cast<float>(totals[d]);
    return;
  }
  for (int64_t di = 0; di < g.ksize; ++di) {
    for (int64_t dj = 0; dj < g.ksize; ++dj) {
      float sum = 0.0f;
      for (int64_t i = 0; i < g.height; ++i) sum += dot(grad + i * grad_stride, x.at(i + di, dj), n);
      grad_w[di * g.ksize + dj] += scale * sum;
    }
  }
}

// A map and its channel mean, both padded: what an equivariant layer reads.
class MapAndMean {
 public:
  Padded map, mean;
  std::vector<float> plain_mean;

  explicit MapAndMean(const Geometry& g)
      : map(g, g.channels), mean(g, 1), plain_mean(g.pixels()), block_(block_pixels * g.channels) {}

  void fill(const float* x) {
    channel_mean(x);
    map.fill(x);
    mean.fill(plain_mean.data());
  }

 private:
  static constexpr int64_t block_pixels = 16;

  // The channel mean of each pixel, 16 pixels at a time: their values transposed to channels-first, the
  // channels then summed in order for all 16 at once (a sum within one vector would be 16 dependent additions).
  void channel_mean(const float* x) {
    const int64_t C = map.channels, P = map.g.pixels(), T = block_pixels, whole = P / T * T;
    for (int64_t p0 = 0; p0 < whole; p0 += T) {
      transpose(x + p0 * C, block_.data(), T, C);
      float sums[block_pixels] = {};
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = 0; j < T; ++j) sums[j] += block_[c * T + j];
      for (int64_t j = 0; j < T; ++j) plain_mean[p0 + j] = sums[j] / static_cast<float>(C);
    }
    for (int64_t p = whole; p < P; ++p) {
      float sum = 0.0f;
      for (int64_t c = 0; c < C; ++c) sum += x[p * C + c];
      plain_mean[p] = sum / static_cast<float>(C);
    }
  }

  std::vector<float> block_;
};

// y (=, or +=) E(x) = w_self * x + w_mean * mean_c(x) (broadcast over channels) for one image, relu'd with
// `relu`; `flip`: the transposed E (whose mean part reads the gradient's channel mean, see equivariant_backward).
void equivariant(const MapAndMean& x, const float* w_self, const float* w_mean, float* y, bool flip,
                 bool accumulate, float* scratch, bool relu = false) {
  stencil(x.mean, w_mean, scratch, flip, false);
  stencil(x.map, w_self, y, flip, accumulate, scratch, relu);
}

// Per-image working memory, allocated once per thread.
struct Scratch {
  MapAndMean x, r, grad;
  std::vector<float> hidden, a, eps, grad_u, grad_pre, pixels;
  explicit Scratch(const Geometry& g)
      : x(g), r(g), grad(g), hidden(g.image()), a(g.image()), eps(g.image()), grad_u(g.image()),
        grad_pre(g.image()), pixels(g.pixels()) {}
};

// r = relu(E1(x)) for one image into t.hidden, with x and r (and their channel means) padded in t.x and t.r.
void hidden(const float* x, const float* w_self, const float* w_mean, Scratch& t) {
  t.x.fill(x);
  equivariant(t.x, w_self, w_mean, t.hidden.data(), false, false, t.pixels.data(), true);
  t.r.fill(t.hidden.data());
}

// E's gradients for one image from the gradient `grad` at its output, E having read `input`: to the kernels
// (added to grad_w_self, grad_w_mean; skipped where these are null, φ frozen) and to the input (written to dx, or
// added with `accumulate`).
void equivariant_backward(const float* grad, const MapAndMean& input, const float* w_self, const float* w_mean,
                          float* grad_w_self, float* grad_w_mean, float* dx, bool accumulate, Scratch& t) {
  const Geometry& g = input.map.g;
  t.grad.fill(grad);
  if (grad_w_self != nullptr) {
    stencil_weight_grad(grad, g.width * g.channels, input.map, grad_w_self, 1.0f);
    // the mean part: d/dw_mean = sum_p G[p] mean[p + d] with G the channel sum = C * the channel mean
    stencil_weight_grad(t.grad.plain_mean.data(), g.width, input.mean, grad_w_mean,
                        static_cast<float>(g.channels));
  }
  equivariant(t.grad, w_self, w_mean, dx, true, accumulate, t.pixels.data());
}

void modulate_sampled(int64_t pixels, int64_t C, const float* __restrict a, const float* __restrict eps,
                      const float* __restrict x, const float* __restrict s, float k, float clip, float* __restrict u,
                      float* __restrict out) {
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = p * C + c;
      const float un = a[n] + eps[n];
      if (u) u[n] = un;
      const float v = ((s[c] * softplus(un) - 1.0f) * k + 1.0f) * x[n];
      out[n] = v > clip ? clip : v;
    }
  }
}

void modulate_expected(int64_t pixels, int64_t C, const float* __restrict a, const float* __restrict start,
                       const float* __restrict rise, int32_t last, float inv_step, float offset,
                       const float* __restrict x, const float* __restrict s, float k, float clip,
                       float* __restrict out) {
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = p * C + c;
      float position = a[n] * inv_step + offset;
      position = position < 0.0f ? 0.0f : position;
      // a NaN position reads the last entry and stays NaN in z; 32-bit indices: 16-lane gathers instead of 8
      const int32_t index = position < static_cast<float>(last) ? static_cast<int32_t>(position) : last;
      const float z = start[index] + (position - static_cast<float>(index)) * rise[index];
      const float v = ((s[c] * z - 1.0f) * k + 1.0f) * x[n];
      out[n] = v > clip ? clip : v;
    }
  }
}

// Through out = min(m * x, clip), m = (s * z - 1) * k + 1, z = softplus(u): the gradient to x (direct part),
// the sums that make s's gradient, and the gradient to u.
void modulate_backward(int64_t pixels, int64_t C, const float* __restrict grad_out, const float* __restrict x,
                       const float* __restrict u, const float* __restrict s, float k, float clip,
                       float* __restrict grad_x, float* __restrict grad_s, float* __restrict grad_u) {
  for (int64_t p = 0; p < pixels; ++p) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = p * C + c;
      float sigmoid;
      const float z = softplus(u[n], sigmoid);
      const float m = z * (s[c] * k) + (1.0f - k);
      const float grad = m * x[n] < clip ? grad_out[n] : 0.0f;
      grad_x[n] = grad * m;
      grad_s[c] += grad * x[n] * z;
      grad_u[n] = grad * x[n] * (s[c] * k) * sigmoid;
    }
  }
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define PHI_VEC16 1
// 16 float lanes and the few operations the scale's kernels need on them, with a 16-bit mask of the lanes to read
// and write (the row's end, relu's gates): one register with AVX-512, two halves with AVX2, so that the kernels
// below are written once.
namespace vec16 {
#if defined(__AVX512F__)
using V = __m512;
inline V zero() { return _mm512_setzero_ps(); }
inline V load(uint16_t lanes, const float* p) { return _mm512_maskz_loadu_ps(lanes, p); }
inline void store(uint16_t lanes, float* p, V v) { _mm512_mask_storeu_ps(p, lanes, v); }
inline V fmadd(float w, V x, V acc) { return _mm512_fmadd_ps(_mm512_set1_ps(w), x, acc); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V relu(V v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }  // max(0, NaN) keeps the NaN, as torch's relu
inline uint16_t positive(uint16_t lanes, V v) {
  return static_cast<uint16_t>(_mm512_mask_cmp_ps_mask(lanes, v, _mm512_setzero_ps(), _CMP_GT_OQ));
}
#else
struct V {
  __m256 lo, hi;
};
// The lanes of a 16-bit mask as two 8-lane masks (all bits set where the bit is).
inline __m256i half_mask(uint32_t bits) {
  const __m256i powers = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), powers), powers);
}
inline V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V load(uint16_t lanes, const float* p) {  // whole vectors unmasked: a masked access costs more on some CPUs
  if (lanes == 0xffff) return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
  return {_mm256_maskload_ps(p, half_mask(lanes & 0xff)), _mm256_maskload_ps(p + 8, half_mask(lanes >> 8))};
}
inline void store(uint16_t lanes, float* p, V v) {
  if (lanes == 0xffff) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
    return;
  }
  _mm256_maskstore_ps(p, half_mask(lanes & 0xff), v.lo);
  _mm256_maskstore_ps(p + 8, half_mask(lanes >> 8), v.hi);
}
inline V fmadd(float w, V x, V acc) {
  const __m256 wv = _mm256_set1_ps(w);
  return {_mm256_fmadd_ps(wv, x.lo, acc.lo), _mm256_fmadd_ps(wv, x.hi, acc.hi)};
}
inline V add(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V relu(V v) {  // max(0, NaN) keeps the NaN (maxps returns its second operand where either is NaN)
  return {_mm256_max_ps(_mm256_setzero_ps(), v.lo), _mm256_max_ps(_mm256_setzero_ps(), v.hi)};
}
inline uint16_t positive(uint16_t lanes, V v) {
  const int lo = _mm256_movemask_ps(_mm256_cmp_ps(v.lo, _mm256_setzero_ps(), _CMP_GT_OQ));
  const int hi = _mm256_movemask_ps(_mm256_cmp_ps(v.hi, _mm256_setzero_ps(), _CMP_GT_OQ));
  return static_cast<uint16_t>((lo | hi << 8) & lanes);
}
#endif
}  // namespace vec16
#endif

// relu's gates of a row of n values as bits, 16 to a word: bit l of word w is set where value 16 w + l is above 0
// (not at NaN, as in the torch operators' backward). The forward keeps them so that the backward need not compute
// the stencils again: a thirty-second of the map's memory per kernel.
void pack_gates(const float* __restrict v, int64_t n, uint16_t* __restrict bits) {
  for (int64_t e = 0; e < n; e += 16) {
    uint16_t word = 0;
    for (int64_t l = 0; l < 16 && e + l < n; ++l) word |= static_cast<uint16_t>(v[e + l] > 0.0f ? 1u << l : 0u);
    bits[e / 16] = word;
  }
}

// y[e] = g[e] where bit e of the row's gates is set, else 0: the gradient through relu.
void apply_gates(const uint16_t* __restrict bits, const float* __restrict g, int64_t n, float* __restrict y) {
  int64_t e = 0;
#if defined(PHI_VEC16)
  for (; e + 16 <= n; e += 16) vec16::store(0xffff, y + e, vec16::load(bits[e / 16], g + e));
#endif
  for (; e < n; ++e) y[e] = (bits[e / 16] >> (e % 16)) & 1u ? g[e] : 0.0f;
}

// The scale's shared kernels in groups of four, the last group padded with zero kernels: one pass over an image's
// taps then feeds four stencils (9 loads for 36 multiply-adds instead of 36 for 36). One per thread (the portable
// build keeps a row buffer).
class KernelGroups {
 public:
  static constexpr int64_t size = 4;
#if defined(PHI_VEC16)
  static constexpr bool vectorised = true;  // 16-value vectors (vec16), else portable loops
#else
  static constexpr bool vectorised = false;
#endif

  KernelGroups(const Tensor& kernels, const Geometry& g)
      : ksize_(kernels.size(-1)), taps_(ksize_ * ksize_), n_(g.width * g.channels),
        weights_((kernels.size(0) + size - 1) / size * size * taps_, 0.0f), offsets_(taps_),
        rows_(vectorised ? 0 : size * n_) {
    const Tensor k = kernels.contiguous();
    std::copy_n(k.data_ptr<float>(), k.numel(), weights_.begin());
    const int64_t row = Padded::row_length(g, g.channels);
    for (int64_t d = 0; d < taps_; ++d) offsets_[d] = d / ksize_ * row + d % ksize_ * g.channels;
  }

  // Row i of one image (x padded) under the four kernels first, ..., first + 3: relu((K_{first + h} * x)[i]) added
  // to sums[h * n ...] (where sums is given) and relu's gates packed into gates[h] (where given), for the row's
  // n = W * C values. The forward's features and the backward's gates both come from here, so they agree.
  void relu_row(const Padded& x, int64_t first, int64_t i, float* __restrict sums, uint16_t* const* gates) {
    if (ksize_ == 3) return relu_row_impl<3>(x, first, i, sums, gates);
    relu_row_impl<0>(x, first, i, sums, gates);
  }

  // y[i] = sum over the group's four kernels of K_{first + h}^T v_h, row i of one image, each v_h padded: the
  // transposed stencils (kernels turned around) of the gated gradients in one pass (a zero kernel padding the last
  // group reads a v_h of zeros).
  void transposed_row(const Padded* const* v, int64_t first, int64_t i, float* __restrict y) {
    if (ksize_ == 3) return transposed_row_impl<3>(v, first, i, y);
    transposed_row_impl<0>(v, first, i, y);
  }

 private:
  // A group's weights and the taps' offsets, for kernels of size KT known at compile time copied onto the stack,
  // where the compiler sees that the loops' stores leave them unchanged (it then keeps them in registers or reads
  // them at fixed offsets); for any size (KT = 0) read where they are.
  template <int KT>
  struct Taps {
    float copy_w[KT > 0 ? size * KT * KT : 1];
    int64_t copy_off[KT > 0 ? KT * KT : 1];
    const float* weights;
    const int64_t* offsets;
    Taps(const float* w, const int64_t* off, int64_t taps) : weights(w), offsets(off) {
      if constexpr (KT > 0) {
        std::copy_n(w, size * taps, copy_w);
        std::copy_n(off, taps, copy_off);
        weights = copy_w;
        offsets = copy_off;
      }
    }
  };

  // KT: the kernel size where known at compile time (the taps' loops unrolled), else 0
  template <int KT>
  void relu_row_impl(const Padded& x, int64_t first, int64_t i, float* __restrict sums, uint16_t* const* gates) {
    const int64_t taps = KT > 0 ? KT * KT : taps_;
    const float* __restrict src = x.at(i, 0);
    Taps<KT> t(weights_.data() + first * taps, offsets_.data(), taps);
    const float* w = t.weights;
    const int64_t* off = t.offsets;
#if defined(PHI_VEC16)
    using namespace vec16;
    for (int64_t e = 0; e < n_; e += 16) {  // the last vector masked to the row's end
      const uint16_t lanes = row_lanes(e);
      V v[size] = {zero(), zero(), zero(), zero()};
      for (int64_t d = 0; d < taps; ++d) {
        const V xd = load(lanes, src + off[d] + e);
        for (int64_t h = 0; h < size; ++h) v[h] = fmadd(w[h * taps + d], xd, v[h]);
      }
      for (int64_t h = 0; h < size; ++h) {
        if (gates != nullptr && gates[h] != nullptr) gates[h][e / 16] = positive(lanes, v[h]);
        if (sums != nullptr) {
          float* row = sums + h * n_ + e;
          store(lanes, row, add(load(lanes, row), relu(v[h])));
        }
      }
    }
#else
    float* __restrict rows = rows_.data();
    for (int64_t e = 0; e < n_; ++e) {
      float v0 = 0.0f, v1 = 0.0f, v2 = 0.0f, v3 = 0.0f;
      for (int64_t d = 0; d < taps; ++d) {
        const float xd = src[off[d] + e];
        v0 += w[d] * xd;
        v1 += w[taps + d] * xd;
        v2 += w[2 * taps + d] * xd;
        v3 += w[3 * taps + d] * xd;
      }
      rows[e] = v0;
      rows[n_ + e] = v1;
      rows[2 * n_ + e] = v2;
      rows[3 * n_ + e] = v3;
    }
    for (int64_t h = 0; h < size; ++h) {
      if (gates != nullptr && gates[h] != nullptr) pack_gates(rows + h * n_, n_, gates[h]);
      if (sums != nullptr)
        for (int64_t e = 0; e < n_; ++e) sums[h * n_ + e] += rows[h * n_ + e] < 0.0f ? 0.0f : rows[h * n_ + e];
    }
#endif
  }

  template <int KT>
  void transposed_row_impl(const Padded* const* v, int64_t first, int64_t i, float* __restrict y) {
    const int64_t taps = KT > 0 ? KT * KT : taps_;
    const float* src[size];
    for (int64_t h = 0; h < size; ++h) src[h] = v[h]->at(i, 0);
    Taps<KT> t(weights_.data() + first * taps, offsets_.data(), taps);
    const float* w = t.weights;
    const int64_t* off = t.offsets;
#if defined(PHI_VEC16)
    using namespace vec16;
    for (int64_t e = 0; e < n_; e += 16) {
      const uint16_t lanes = row_lanes(e);
      V sums[size] = {zero(), zero(), zero(), zero()};  // one chain of multiply-adds per kernel, four at once
      for (int64_t d = 0; d < taps; ++d)
        for (int64_t h = 0; h < size; ++h)
          sums[h] = fmadd(w[h * taps + taps - 1 - d], load(lanes, src[h] + off[d] + e), sums[h]);
      store(lanes, y + e, add(add(sums[0], sums[1]), add(sums[2], sums[3])));
    }
#else
    for (int64_t e = 0; e < n_; ++e) {
      float sum = 0.0f;
      for (int64_t h = 0; h < size; ++h)
        for (int64_t d = 0; d < taps; ++d) sum += w[h * taps + taps - 1 - d] * src[h][off[d] + e];
      y[e] = sum;
    }
#endif
  }

#if defined(PHI_VEC16)
  // The lanes of the 16-value vector at e that lie within the row: all but in the last vector.
  uint16_t row_lanes(int64_t e) const {
    return n_ - e >= 16 ? 0xffff : static_cast<uint16_t>((1u << (n_ - e)) - 1u);
  }
#endif

  int64_t ksize_, taps_, n_;
  std::vector<float> weights_;
  std::vector<int64_t> offsets_;  // where each tap reads, from its output's position in a padded image
  std::vector<float> rows_;       // the portable relu_row's four rows
};

// The gates' words of row i of kernel h in image b, gates being (B, h_dim, H, words) 16-bit words.
uint16_t* gate_row(const Tensor& gates, int64_t b, int64_t h, int64_t i) {
  const int64_t h_dim = gates.size(1), height = gates.size(2), words = gates.size(3);
  return reinterpret_cast<uint16_t*>(gates.data_ptr<int16_t>()) + ((b * h_dim + h) * height + i) * words;
}

const float* ptr(const Tensor& t) { return t.data_ptr<float>(); }

float* slot(float* base, int64_t offset) { return base == nullptr ? nullptr : base + offset; }

}  // namespace

// out = min(((s * z - 1) * k + 1) * x, clip) with z = softplus(E2(relu(E1(x))) + eps), eps given (`noise`) or
// drawn from `seed` (see normal_noise), or, with neither, z = E[softplus(a + eps)] read off the table (start,
// rise) of `expected_softplus`. Returns out and, with `keep_u`, u = a + eps for the backward.
std::vector<Tensor> perturb_forward(const Tensor& x, const std::optional<Tensor>& noise, std::optional<int64_t> seed,
                                    const Tensor& s, const Tensor& w1_self, const Tensor& w1_mean,
                                    const Tensor& w2_self, const Tensor& w2_mean, const Tensor& table_start,
                                    const Tensor& table_rise, double grid_limit, double grid_step, double strength,
                                    double clip, bool keep_u) {
  const Geometry g = geometry(x, w1_self);
  const bool sampled = noise.has_value() || seed.has_value();
  if (noise.has_value()) g.check(*noise, "eps");
  Tensor out = at::empty_like(x, g.layout());
  Tensor u = sampled && keep_u ? empty_map(x) : Tensor();  // read only by perturb_backward: channels-last
  const float k = static_cast<float>(strength), limit = static_cast<float>(clip);
  const float inv_step = static_cast<float>(1.0 / grid_step), offset = static_cast<float>(grid_limit / grid_step);
  at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
    Scratch t(g);
    Images x_images(g, x), out_images(g, out), noise_images(g, noise.has_value() ? *noise : x);
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = x_images.read(b);
      hidden(xb, ptr(w1_self), ptr(w1_mean), t);
      equivariant(t.r, ptr(w2_self), ptr(w2_mean), t.a.data(), false, false, t.pixels.data());
      if (sampled) {
        if (!noise.has_value()) normal_noise(static_cast<uint64_t>(*seed), b, t.eps.data(), g.image());
        const float* eps = noise.has_value() ? noise_images.read(b) : t.eps.data();
        modulate_sampled(g.pixels(), g.channels, t.a.data(), eps, xb, ptr(s), k, limit,
                         u.defined() ? u.data_ptr<float>() + b * g.image() : nullptr, out_images.target(b));
      } else {
        modulate_expected(g.pixels(), g.channels, t.a.data(), ptr(table_start), ptr(table_rise),
                          static_cast<int32_t>(table_start.numel() - 1), inv_step, offset, xb, ptr(s), k, limit,
                          out_images.target(b));
      }
      out_images.store(b);
    }
  });
  return {out, u};
}

// Gradients of the sampled perturb_forward to x, s (C) and, with `weight_grads` (φ being trained), the four
// kernels (else undefined). relu(E1(x)) is computed again rather than kept, and so is u = a + eps where the
// forward kept nothing but its seed (`u` undefined).
std::vector<Tensor> perturb_backward(const Tensor& grad_out, const Tensor& x, const std::optional<Tensor>& u,
                                     std::optional<int64_t> seed, const Tensor& s, const Tensor& w1_self,
                                     const Tensor& w1_mean, const Tensor& w2_self, const Tensor& w2_mean,
                                     double strength, double clip, bool weight_grads) {
  const Geometry g = geometry(x, w1_self);
  g.check(grad_out, "the gradient");
  TORCH_CHECK(u.has_value() != seed.has_value(), "perturb_backward takes either u or the seed of eps");
  const int64_t taps = g.ksize * g.ksize;
  Tensor grad_x = at::empty_like(x, g.layout());
  Tensor grad_s = at::zeros({g.batch, g.channels}, x.options());
  // per image: w1_self, w1_mean, w2_self, w2_mean
  Tensor grad_w = weight_grads ? at::zeros({g.batch, 4, taps}, x.options()) : Tensor();
  const float k = static_cast<float>(strength), limit = static_cast<float>(clip);
  at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
    Scratch t(g);
    Images x_images(g, x), grad_images(g, grad_out), grad_x_images(g, grad_x);
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = x_images.read(b);
      float* gxb = grad_x_images.target(b);
      float* gwb = weight_grads ? grad_w.data_ptr<float>() + b * 4 * taps : nullptr;
      hidden(xb, ptr(w1_self), ptr(w1_mean), t);
      const float* ub = u.has_value() ? ptr(*u) + b * g.image() : t.a.data();
      if (!u.has_value()) {  // u = E2(r) + eps again
        equivariant(t.r, ptr(w2_self), ptr(w2_mean), t.a.data(), false, false, t.pixels.data());
        normal_noise(static_cast<uint64_t>(*seed), b, t.eps.data(), g.image());
        for (int64_t n = 0; n < g.image(); ++n) t.a[n] += t.eps[n];
      }
      modulate_backward(g.pixels(), g.channels, grad_images.read(b), xb, ub, ptr(s), k, limit, gxb,
                        grad_s.data_ptr<float>() + b * g.channels, t.grad_u.data());
      equivariant_backward(t.grad_u.data(), t.r, ptr(w2_self), ptr(w2_mean), slot(gwb, 2 * taps),
                           slot(gwb, 3 * taps), t.grad_pre.data(), false, t);
      for (int64_t n = 0; n < g.image(); ++n) t.grad_pre[n] = t.hidden[n] > 0.0f ? t.grad_pre[n] : 0.0f;  // relu
      equivariant_backward(t.grad_pre.data(), t.x, ptr(w1_self), ptr(w1_mean), gwb, slot(gwb, taps), gxb, true, t);
      grad_x_images.store(b);
    }
  });
  grad_s = grad_s.sum(0).mul_(strength);
  if (!weight_grads) return {grad_x, grad_s, Tensor(), Tensor(), Tensor(), Tensor()};
  Tensor grads = grad_w.sum(0);
  const auto shape = w1_self.sizes();
  return {grad_x, grad_s, grads[0].view(shape), grads[1].view(shape), grads[2].view(shape), grads[3].view(shape)};
}

// f[b, c, i] = mean over pixels of relu(K_i * x)[b, c] for the shared kernels K (h_dim, 1, k, k), four kernels per
// pass over x (see KernelGroups); each row's relu values are summed in place and over the row's pixels at the end.
// With `keep_gates`, also relu's gates as bits (see pack_gates) for the backward, else undefined.
std::vector<Tensor> scale_features_forward(const Tensor& x, const Tensor& kernels, bool keep_gates) {
  const Geometry g = geometry(x, kernels);
  const int64_t h_dim = kernels.size(0), C = g.channels, n = g.width * C;
  Tensor f = at::zeros({g.batch, h_dim, C}, x.options());
  Tensor gates = keep_gates ? at::empty({g.batch, h_dim, g.height, (n + 15) / 16}, x.options().dtype(at::kShort))
                            : Tensor();
  at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
    KernelGroups groups(kernels, g);
    Padded xp(g, C);
    Images x_images(g, x);
    std::vector<float> sums(KernelGroups::size * n);
    uint16_t* gate_rows[KernelGroups::size];
    for (int64_t b = b0; b < b1; ++b) {
      xp.fill(x_images.read(b));
      for (int64_t first = 0; first < h_dim; first += KernelGroups::size) {
        const int64_t count = std::min(KernelGroups::size, h_dim - first);
        std::fill(sums.begin(), sums.end(), 0.0f);
        for (int64_t i = 0; i < g.height; ++i) {
          for (int64_t h = 0; h < KernelGroups::size; ++h)  // none for the zero kernels that pad the last group
            gate_rows[h] = keep_gates && h < count ? gate_row(gates, b, first + h, i) : nullptr;
          groups.relu_row(xp, first, i, sums.data(), gate_rows);
        }
        for (int64_t h = 0; h < count; ++h) {
          float* fh = f.data_ptr<float>() + (b * h_dim + first + h) * C;
          const float* row = sums.data() + h * n;
          for (int64_t j = 0; j < g.width; ++j)
            for (int64_t c = 0; c < C; ++c) fh[c] += row[j * C + c];
        }
      }
    }
  });
  return {f.div_(static_cast<double>(g.pixels())).transpose(1, 2), gates};
}

// Gradients of scale_features_forward to x and, with `kernel_grads` (φ being trained), the kernels (else
// undefined). relu's gates are read from `gates` where the forward kept them, else found again from K * x, four
// kernels per pass; x itself is read only then, or for the kernels' gradients. The gated gradients are written
// into padded images, which the transposed stencils of a group then read in one pass.
std::vector<Tensor> scale_features_backward(const Tensor& grad_f, const Tensor& x, const std::optional<Tensor>& gates,
                                            const Tensor& kernels, bool kernel_grads) {
  const Geometry g = geometry(x, kernels);
  const int64_t h_dim = kernels.size(0), taps = g.ksize * g.ksize, C = g.channels, n = g.width * C,
                words = (n + 15) / 16;
  if (gates.has_value())
    TORCH_CHECK(gates->sizes() == at::IntArrayRef({g.batch, h_dim, g.height, words}) &&
                    gates->scalar_type() == at::kShort && gates->is_contiguous(),
                "the gates must be the ones scale_features_forward kept for this map and these kernels");
  const bool read_x = !gates.has_value() || kernel_grads;
  Tensor grad = grad_f.transpose(1, 2).contiguous().div_(static_cast<double>(g.pixels()));  // (B, h_dim, C)
  Tensor grad_x = at::empty_like(x, g.layout());
  Tensor grad_k = kernel_grads ? at::zeros({g.batch, h_dim, taps}, x.options()) : Tensor();
  at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
    KernelGroups groups(kernels, g);
    Padded xp(g, C);
    std::vector<Padded> gated(KernelGroups::size, Padded(g, C));  // the gated gradients, one image per kernel
    const Padded* gated_images[KernelGroups::size];
    for (int64_t h = 0; h < KernelGroups::size; ++h) gated_images[h] = &gated[h];
    Images x_images(g, x), grad_x_images(g, grad_x);
    std::vector<float> grad_rows(KernelGroups::size * n), row(n);
    std::vector<uint16_t> found(KernelGroups::size * words);  // one row's gates, where found again
    uint16_t* found_rows[KernelGroups::size];
    for (int64_t h = 0; h < KernelGroups::size; ++h) found_rows[h] = found.data() + h * words;
    for (int64_t b = b0; b < b1; ++b) {
      if (read_x) xp.fill(x_images.read(b));
      float* gxb = grad_x_images.target(b);
      for (int64_t first = 0; first < h_dim; first += KernelGroups::size) {
        const int64_t count = std::min(KernelGroups::size, h_dim - first);
        for (int64_t h = 0; h < count; ++h)  // the feature's gradient along a row, for relu's gate
          for (int64_t j = 0; j < g.width; ++j)
            std::copy_n(ptr(grad) + (b * h_dim + first + h) * C, C, grad_rows.data() + h * n + j * C);
        for (int64_t i = 0; i < g.height; ++i) {
          if (!gates.has_value()) groups.relu_row(xp, first, i, nullptr, found_rows);
          for (int64_t h = 0; h < count; ++h) {
            const uint16_t* bits = gates.has_value() ? gate_row(*gates, b, first + h, i) : found_rows[h];
            apply_gates(bits, grad_rows.data() + h * n, n, gated[h].interior(i));
          }
        }
        for (int64_t h = count; h < KernelGroups::size; ++h)  // a zero kernel's image: zeros, not an earlier group's
          std::fill(gated[h].data.begin(), gated[h].data.end(), 0.0f);
        if (kernel_grads)
          for (int64_t h = 0; h < count; ++h)
            stencil_weight_grad(gated[h].interior(0), gated[h].row, xp,
                                grad_k.data_ptr<float>() + (b * h_dim + first + h) * taps, 1.0f);
        for (int64_t i = 0; i < g.height; ++i) {
          if (first == 0) {
            groups.transposed_row(gated_images, first, i, gxb + i * n);
          } else {  // a further group of kernels adds to the first's
            groups.transposed_row(gated_images, first, i, row.data());
            for (int64_t e = 0; e < n; ++e) gxb[i * n + e] += row[e];
          }
        }
      }
      grad_x_images.store(b);
    }
  });
  return {grad_x, kernel_grads ? grad_k.sum(0).view(kernels.sizes()) : Tensor()};
}

// The eps that perturb_forward draws from `seed` for a map shaped like x (channels-last).
Tensor normal_noise_like(const Tensor& x, int64_t seed) {
  Tensor eps = empty_map(x);
  const int64_t image = eps.numel() / std::max<int64_t>(x.size(0), 1);
  at::parallel_for(0, x.size(0), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      normal_noise(static_cast<uint64_t>(seed), b, eps.data_ptr<float>() + b * image, image);
  });
  return eps;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("normal_noise_like", &normal_noise_like);
  m.def("perturb_forward", &perturb_forward);
  m.def("perturb_backward", &perturb_backward);
  m.def("scale_features_forward", &scale_features_forward);
  m.def("scale_features_backward", &scale_features_backward);
}

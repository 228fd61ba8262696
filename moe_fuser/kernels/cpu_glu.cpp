// SiLU experts' elementwise work on CPU in one pass per direction, for the ATen lowering's streamed expert groups.
//
// Built at first use by ``native.py`` with cpu_gemm.cpp into one library (the host's C++ compiler, -O3
// -march=native) and called through ctypes (``cpu_glu.py``) with raw pointers: no torch headers, so the build takes
// about a second. Plain ATen runs a SwiGLU group's backward as six to eight passes over [rows, F] with two exps per
// element (the activation's recompute as silu then mul, the routing weight's gradient as mul and rowsum, the
// routing-weight scale, the GLU's backward as three more); here it is one pass with one exp, reading gate, up and
// the output gradient once. The forward's silu and mul are one pass.
//
// Rows are processed in parallel by OpenMP, linked against the libgomp that torch itself loaded, so these loops
// share torch's thread pool (no second set of spinning threads) and take torch.get_num_threads() threads.
// Every tensor is [rows, F] with unit column stride and any row stride; gate and up may be views of one buffer.
// Math is fp32 (bf16 in and out: widened on load, rounded to nearest even on store, and silu(gate) rounded before
// the GLU's product, as the model's own two ops round it).

#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));

static inline v8f load8(const float* p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline v8f load8(const uint16_t* p) {
  v8h h;
  memcpy(&h, p, sizeof h);
  return (v8f)(__builtin_convertvector(h, v8u) << 16);
}
static inline void store8(float* p, v8f v) { memcpy(p, &v, sizeof v); }
static inline void store8(uint16_t* p, v8f v) {
  v8u u = (v8u)v;
  v8u r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  r = (v != v) ? (v8u){} + 0x7FC0u : r;             // NaN stays NaN
  v8h h = __builtin_convertvector(r, v8h);
  memcpy(p, &h, sizeof h);
}
// v as the dtype T holds it (rounded to bf16 and widened back; float: unchanged)
static inline v8f round_to(v8f v, const float*) { return v; }
static inline v8f round_to(v8f v, const uint16_t*) {
  uint16_t tmp[8];
  store8(tmp, v);
  return load8(tmp);
}
// m < 8 elements (a row's tail): through a zero-padded temporary
template <typename T> static inline v8f load_n(const T* p, int64_t m) {
  if (m == 8) return load8(p);
  T tmp[8] = {};
  memcpy(tmp, p, m * sizeof(T));
  return load8(tmp);
}
template <typename T> static inline void store_n(T* p, v8f v, int64_t m) {
  if (m == 8) return store8(p, v);
  T tmp[8];
  store8(tmp, v);
  memcpy(p, tmp, m * sizeof(T));
}

// exp over the float range to ~1 ulp: round(x / ln 2) by the 1.5 * 2^23 trick, ln 2 split in two for the
// reduction, a degree-6 polynomial on [-ln2/2, ln2/2], the power of two built in the exponent bits.
static inline v8f vexp(v8f x) {
  const v8f lo = (v8f){} - 87.3f, hi = (v8f){} + 88.7f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  v8f k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  v8f r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  v8f p = (v8f){} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.0f);
  v8i e = (__builtin_convertvector(k, v8i) + 127) << 23;
  return p * (v8f)e;
}
static inline v8f vsigmoid(v8f x) { return 1.0f / (1.0f + vexp(-x)); }
static inline float hsum(v8f v) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Parallel over rows only where a call has enough elements to pay for waking the pool.
static const int64_t PARALLEL_MIN_ELEMENTS = 16384;

// a = silu(gate) * up, with silu(gate) rounded to T first, as ATen's two ops do (bf16 outputs match theirs);
// a = silu(gate) where up is null.
template <typename T>
static void silu_glu(int64_t n, int64_t F, const T* gate, int64_t gr, const T* up, int64_t ur, T* a, int64_t ar,
                     int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n * F >= PARALLEL_MIN_ELEMENTS)
  for (int64_t i = 0; i < n; ++i) {
    const T* g = gate + i * gr;
    T* o = a + i * ar;
    for (int64_t j = 0; j < F; j += 8) {
      int64_t m = F - j < 8 ? F - j : 8;
      v8f x = load_n(g + j, m);
      v8f act = x * vsigmoid(x);
      store_n(o + j, up ? round_to(act, g) * load_n(up + i * ur + j, m) : act, m);
    }
  }
}

// The backward of a = silu(gate) * up (or of a = silu(gate): up and d_up null) in one pass, one exp per element.
// With s = sigmoid(gate) and d = dA * w[i] (w: one routing weight per row, or null for none):
//   a      = silu(gate) * up [* w[i] with weight_a]   recomputed (the second projection's weight gradient reads it:
//                                                     weighted, dW2 = dy^T a needs no weighted copy of dy)
//   dg[i]  = sum_j a[i, j] * dA[i, j]                 the routing weight's gradient (from the stored a); dg may be null
//   d_gate = d * up * s * (1 + gate * (1 - s))
//   d_up   = d * silu(gate)
// Any output may be the memory of an input (each element is read before it is written): the lowering writes a
// over dA and the gradients over the saved rows' shape in one buffer.
template <typename T>
static void silu_backward(int64_t n, int64_t F, const T* gate, int64_t gr, const T* up, int64_t ur, const T* dA,
                          int64_t dr, const T* w, T* a, int64_t ar, T* d_gate, int64_t dgr, T* d_up, int64_t dur,
                          float* dg, bool weight_a, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n * F >= PARALLEL_MIN_ELEMENTS)
  for (int64_t i = 0; i < n; ++i) {
    const T* g = gate + i * gr;
    const T* d = dA + i * dr;
    T* oa = a + i * ar;
    T* og = d_gate + i * dgr;
    const float wi = w ? load_n(w + i, 1)[0] : 1.0f;
    const float wa = weight_a ? wi : 1.0f;
    v8f acc = {};
    for (int64_t j = 0; j < F; j += 8) {
      int64_t m = F - j < 8 ? F - j : 8;
      v8f x = load_n(g + j, m), da = load_n(d + j, m);
      v8f s = vsigmoid(x);
      v8f act = round_to(x * s, g);
      v8f dd = da * wi;
      v8f ds = dd * s * (1.0f + x * (1.0f - s));   // d silu(gate), before the GLU's product
      if (up) {
        v8f y = load_n(up + i * ur + j, m);
        v8f v = round_to(act * y, g);
        acc += v * da;
        store_n(oa + j, v * wa, m);
        store_n(d_up + i * dur + j, dd * act, m);
        store_n(og + j, ds * y, m);
      } else {
        acc += act * da;
        store_n(oa + j, act * wa, m);
        store_n(og + j, ds, m);
      }
    }
    if (dg) dg[i] = hsum(acc);
  }
}

extern "C" {

// dtype: 0 float32, 1 bfloat16. Row strides in elements. up may be null.
void moe_silu_glu(int dtype, int64_t n, int64_t F, const void* gate, int64_t gr, const void* up, int64_t ur,
                  void* a, int64_t ar, int threads) {
  if (dtype == 1)
    silu_glu(n, F, (const uint16_t*)gate, gr, (const uint16_t*)up, ur, (uint16_t*)a, ar, threads);
  else
    silu_glu(n, F, (const float*)gate, gr, (const float*)up, ur, (float*)a, ar, threads);
}

// up and d_up (both or neither), w and dg may be null.
void moe_silu_backward(int dtype, int64_t n, int64_t F, const void* gate, int64_t gr, const void* up, int64_t ur,
                       const void* dA, int64_t dr, const void* w, void* a, int64_t ar, void* d_gate, int64_t dgr,
                       void* d_up, int64_t dur, float* dg, int weight_a, int threads) {
  if (dtype == 1)
    silu_backward(n, F, (const uint16_t*)gate, gr, (const uint16_t*)up, ur, (const uint16_t*)dA, dr,
                  (const uint16_t*)w, (uint16_t*)a, ar, (uint16_t*)d_gate, dgr, (uint16_t*)d_up, dur, dg, weight_a,
                  threads);
  else
    silu_backward(n, F, (const float*)gate, gr, (const float*)up, ur, (const float*)dA, dr, (const float*)w,
                  (float*)a, ar, (float*)d_gate, dgr, (float*)d_up, dur, dg, weight_a, threads);
}
}

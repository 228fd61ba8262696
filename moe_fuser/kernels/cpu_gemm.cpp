// An expert group's independent fp32 GEMMs, cut into tiles and spread over torch's threads, each tile one
// single-threaded BLAS call, for the ATen lowering.
//
// The lowering's GEMMs are small (one expert's rows: [128, 256] @ [256, 1024] in the Switch benchmark). torch.mm
// hands each to the BLAS with all of torch's threads, which split it statically and meet at a barrier; at these
// sizes, on a 2-core machine shared with other tenants, that ran no faster than 1.2x one thread. Here a group's
// GEMMs (one per expert, or one cut along its longer output dimension) become tiles that the threads take one at a
// time (OpenMP dynamic schedule): no barrier until the last tile, and a thread the host slows down takes fewer.
//
// The BLAS is the sgemm_ (Fortran interface, column-major) that torch itself links, its address handed in by
// cpu_gemm.py. Inside the parallel region it runs single-threaded: MKL does so in a thread of an active OpenMP
// region, and the region is torch's own libgomp (the library links it, as cpu_glu.cpp does).
// Matrices are row-major with a leading dimension: C[m, n] = op(A)[m, k] @ op(B)[k, n] (+ C), op a transpose when
// the operand is stored [k, m] (A) or [n, k] (B); as column-major that is C^T = op(B)^T op(A)^T.

#include <stdint.h>

#include <algorithm>
#include <vector>

typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);

// One GEMM's description, as cpu_gemm.py packs it: 12 int64 fields.
struct Gemm {
  int64_t trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, accumulate;
};

struct Tile {
  int64_t gemm, lo, hi;
  bool rows;  // a range of C's rows (else of its columns)
};

static void run_tile(sgemm_fn sgemm, const Gemm& g, const Tile& t) {
  const float* A = reinterpret_cast<const float*>(g.a);
  const float* B = reinterpret_cast<const float*>(g.b);
  float* C = reinterpret_cast<float*>(g.c);
  int m = (int)g.m, n = (int)g.n, k = (int)g.k, lda = (int)g.lda, ldb = (int)g.ldb, ldc = (int)g.ldc;
  if (t.rows) {  // rows lo..hi of op(A) and of C
    m = (int)(t.hi - t.lo);
    A += g.trans_a ? t.lo : t.lo * g.lda;
    C += t.lo * g.ldc;
  } else {       // columns lo..hi of op(B) and of C
    n = (int)(t.hi - t.lo);
    B += g.trans_b ? t.lo * g.ldb : t.lo;
    C += t.lo;
  }
  const char ta = g.trans_a ? 'T' : 'N', tb = g.trans_b ? 'T' : 'N';
  const float one = 1.0f, beta = g.accumulate ? 1.0f : 0.0f;
  sgemm(&tb, &ta, &n, &m, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

extern "C" {

// The GEMMs of `desc` (`count` of them), tiled so that the threads get about `tiles_per_thread` tiles each (a
// GEMM's share of all the flops decides its number of tiles), no tile under `min_tile` rows or columns, tile
// bounds on multiples of 16 (64-byte lines of C). One tile in all: one call on the calling thread, with the BLAS's
// own threads.
void moe_gemms(void* sgemm_ptr, int64_t count, const int64_t* desc, int threads, int64_t tiles_per_thread,
               int64_t min_tile) {
  sgemm_fn sgemm = reinterpret_cast<sgemm_fn>(sgemm_ptr);
  const Gemm* gemms = reinterpret_cast<const Gemm*>(desc);
  double total = 0;
  for (int64_t i = 0; i < count; i++) total += (double)gemms[i].m * gemms[i].n * gemms[i].k;
  const double per_tile = total / std::max<int64_t>(1, threads * tiles_per_thread);
  std::vector<Tile> tiles;
  for (int64_t i = 0; i < count; i++) {
    const Gemm& g = gemms[i];
    if (g.m == 0 || g.n == 0) continue;
    const bool rows = g.m >= g.n;
    const int64_t len = rows ? g.m : g.n;
    int64_t want = threads > 1 && per_tile > 0 ? (int64_t)((double)g.m * g.n * g.k / per_tile + 0.5) : 1;
    want = std::max<int64_t>(1, std::min(want, len / std::max<int64_t>(1, min_tile)));
    const int64_t step = ((len + want - 1) / want + 15) / 16 * 16;
    for (int64_t lo = 0; lo < len; lo += step) tiles.push_back({i, lo, std::min(len, lo + step), rows});
  }
  const int64_t nt = (int64_t)tiles.size();
  if (nt == 1) {
    run_tile(sgemm, gemms[tiles[0].gemm], tiles[0]);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
  for (int64_t j = 0; j < nt; j++) run_tile(sgemm, gemms[tiles[j].gemm], tiles[j]);
}

}  // extern "C"

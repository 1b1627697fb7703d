// The fused quadratic form of CTAL (docs/design.md section 3): no N x N matrix ever reaches device memory.
//
// One thread block owns BM = 16 query pixels i of one batch item. Keys are streamed in chunks of
// KC = 32 pixels (chunk c holds keys [c*KC, c*KC + KC)):
//
//   S_t[i, k]  = n_t[i] . n_t[k]                      similarity of one key chunk, tensor cores
//   M[i, j]    = b_i + sum_t sum_d w[i,t,d] S_t[i, j+d]  3x3 stencil over the key grid (zero
//                                                      outside the grid)
//   y_t'[:, i] = sum_j M[i, j] v_t'[:, j]              value tiles, tensor cores
//
// Key tiling with a row halo. A key k = j + d is at most W + 1 flat positions from j, so S of key
// chunk u only reaches M columns in chunks u - a .. u + a, a = ceil((W + 1) / KC). M is kept in a
// ring of R = min(2a + 1, chunks) chunk slots (chunk c in slot c % R) and accumulated in scatter
// form: after S_t of chunk u is formed, every M[i, j] that one of its keys reaches gets those
// terms. M chunk c is complete once key chunk c + a has been added; it is then consumed and its
// slot reset for the chunk that enters the ring next. Each similarity is formed once per task and
// key chunk. Shared memory grows with W (the halo), T and C (the resident query tiles), not with N
// (make_layout; the dispatcher reads it through fused_smem_bytes and refuses what does not fit).
//
// Backward recomputes M and S_t (there is no softmax state to save), in one pass over the chunks:
//
//   dM      = sum_t' dY_t' V_t'^T  chunk u + a, into a second ring;  db_i = sum_j dM[i, j]
//   dw[i,t,d] = sum_k S_t[i, k] dM[i, k-d]      from S_t of chunk u and the dM ring
//   dA_t[i, k] = sum_d w[i,t,d] dM[i, k-d]      adjoint stencil, chunk u, from the dM ring
//   dn_t[i] += dA_t[i, :] n_t   (query side)  and  dn_t[k] += dA_t[:, k]^T n_t[i]  (key side)
//   dV[j]  += sum_i M[i, j] dY[i]               M chunk u - a, complete at this point
// dn and dV are accumulated with atomicAdd (other blocks own other query rows), so their
// summation order varies; dw and db are per-block partials (B, N, ...) that ATen sums. The
// normalization backward runs in ATen on the (B, T, C, N) dn.
//
// Staging: the key operand tiles (x_t or v_t of one chunk, Cp x KC) go through two shared buffers
// with cp.async (sm_80+): the copy of the next tile is in flight while the current one is used.
// x is copied raw and each thread then scales the vectors it copied itself by the reciprocal norm
// (its own cp.async writes are visible to it after cp.async.wait_group, the others' only after the
// barrier that follows). Tiles whose rows are not 16-byte aligned (N * sizeof(scalar) not a multiple
// of 16, or a misaligned base pointer) take plain loads instead, same buffers and barriers.
//
// Matrix products are block-level shared-memory GEMMs: WMMA on tensor cores (TF32 for float32
// when allowed, bf16 / fp16 for 16-bit inputs, float accumulators) or plain FMA (exact float32,
// float64). Every operand tile is zero-padded to the MMA shape, so any C, H, W works.
#include "ctal_ext.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace ctal_ext {

namespace {

using namespace nvcuda;

constexpr int kBM = 16;        // query pixels per block (one MMA tile high)
constexpr int kKC = 32;        // key pixels per chunk
constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kSkewAcc = 4;    // row padding of accumulator buffers (elements)
constexpr int kBand = kKC + 2; // M columns one stencil row offset of a key chunk reaches

enum class Mode { kSimt, kTf32, kHalf };

// op_t: staged MMA operand type (same size as scalar_t, so tiles are copied byte for byte);
// acc_t: accumulators; kStep: MMA k depth; kSkewOp: row padding of the key operand buffers (keeps
// WMMA's ld a multiple of 16 bytes and spreads banks).
template <typename scalar_t, Mode M>
struct Cfg;
template <>
struct Cfg<double, Mode::kSimt> {
  using op_t = double; using acc_t = double;
  static constexpr int kStep = 1, kSkewOp = 2;
};
template <>
struct Cfg<float, Mode::kSimt> {
  using op_t = float; using acc_t = float;
  static constexpr int kStep = 1, kSkewOp = 4;
};
template <>
struct Cfg<float, Mode::kTf32> {
  using op_t = float; using acc_t = float;
  static constexpr int kStep = 8, kSkewOp = 4;
};
template <>
struct Cfg<c10::BFloat16, Mode::kHalf> {
  using op_t = __nv_bfloat16; using acc_t = float;
  static constexpr int kStep = 16, kSkewOp = 8;
};
template <>
struct Cfg<c10::Half, Mode::kHalf> {
  using op_t = __half; using acc_t = float;
  static constexpr int kStep = 16, kSkewOp = 8;
};

template <typename op_t, typename acc_t>
__device__ __forceinline__ op_t to_op(acc_t v) {
  if constexpr (std::is_same_v<op_t, __nv_bfloat16>) {
    return __float2bfloat16(static_cast<float>(v));
  } else if constexpr (std::is_same_v<op_t, __half>) {
    return __float2half(static_cast<float>(v));
  } else {
    return static_cast<op_t>(v);
  }
}

template <typename acc_t, typename op_t>
__device__ __forceinline__ acc_t from_op(op_t v) {
  if constexpr (std::is_same_v<op_t, __nv_bfloat16>) {
    return static_cast<acc_t>(__bfloat162float(v));
  } else if constexpr (std::is_same_v<op_t, __half>) {
    return static_cast<acc_t>(__half2float(v));
  } else {
    return static_cast<acc_t>(v);
  }
}

// ---- shared-memory layout (computed on the host, passed by value) -------------------------------
struct Layout {
  int Cp;    // channels padded to 16
  int nch;   // key chunks, ceil(N / KC)
  int halo;  // a = ceil((W + 1) / KC): chunks a stencil reaches on either side
  int R;     // ring slots, min(2a + 1, nch)
  int ldR;   // row stride of the BM x (R * KC) rings of M and dM
  int ldq;   // query tiles: Cp x BM operand per task (n_t of the block's queries / dY_t)
  int ldk;   // key tiles: Cp x KC operand (x_t or v_t of one chunk), two buffers
  int lda;   // As: BM x KC operand (a chunk of M or dA in operand precision)
  int lds;   // S: BM x KC accumulator (similarity of one chunk)
  int ldy;   // Y: BM x Cp accumulator per task (forward)
  int64_t off_m, off_dm, off_s, off_q, off_g, off_k, off_a, off_y, off_tile, off_w, off_dw, total;
};

int64_t align128(int64_t v) { return (v + 127) / 128 * 128; }

// The forward keeps: the M ring, S, T query tiles, two key tiles, As, T output accumulators and
// the weights. The backward replaces the output accumulators (its dn and dV leave through atomics)
// with a dM ring, T dY tiles, one 16 x 16 staging tile per warp for the atomics of the tensor-core
// modes, and the dw / db partials.
Layout make_layout(int64_t T, int64_t C, int64_t H, int64_t W, int64_t op_bytes, int64_t acc_bytes,
                   int64_t skew_op, bool tensor_cores, bool backward) {
  (void)H;
  const int64_t N = H * W;
  Layout L;
  L.Cp = static_cast<int>((C + 15) / 16 * 16);
  L.nch = static_cast<int>((N + kKC - 1) / kKC);
  L.halo = static_cast<int>((W + 1 + kKC - 1) / kKC);
  L.R = std::min(2 * L.halo + 1, L.nch);
  L.ldR = L.R * kKC + kSkewAcc;
  L.ldq = kBM;
  L.ldk = kKC + static_cast<int>(skew_op);
  L.lda = kKC + static_cast<int>(skew_op);
  L.lds = kKC + kSkewAcc;
  L.ldy = L.Cp + kSkewAcc;
  int64_t off = 0;
  auto take = [&](int64_t bytes) { const int64_t at = off; off = align128(off + bytes); return at; };
  L.off_m = take(int64_t{kBM} * L.ldR * acc_bytes);
  L.off_dm = backward ? take(int64_t{kBM} * L.ldR * acc_bytes) : off;
  L.off_s = take(int64_t{kBM} * L.lds * acc_bytes);
  L.off_q = take(T * L.Cp * L.ldq * op_bytes);
  L.off_g = backward ? take(T * L.Cp * L.ldq * op_bytes) : off;
  L.off_k = take(2 * int64_t{L.Cp} * L.ldk * op_bytes);
  L.off_a = take(int64_t{kBM} * L.lda * op_bytes);
  L.off_y = backward ? off : take(T * kBM * L.ldy * acc_bytes);
  L.off_tile = (backward && tensor_cores) ? take(int64_t{kWarps} * 256 * acc_bytes) : off;
  L.off_w = take(int64_t{kBM} * T * 9 * acc_bytes);
  L.off_dw = backward ? take((int64_t{kBM} * T * 9 + kBM) * acc_bytes) : off;
  L.total = off;
  return L;
}

// ---- block-level GEMM over shared memory ---------------------------------------------------------
struct RowMajor { using wmma_t = wmma::row_major; };
struct ColMajor { using wmma_t = wmma::col_major; };

template <class L>
__device__ __forceinline__ int elem(int r, int c, int ld) {
  if constexpr (std::is_same_v<L, RowMajor>) return r * ld + c;
  else return c * ld + r;
}

// One 16 x 16 output tile of A (M x K, layout LA) * B (K x N, layout LB) in a WMMA fragment.
template <class CF, Mode MD, class LA, class LB, class Frag>
__device__ __forceinline__ void tile_mma(Frag& c, const typename CF::op_t* A, int lda,
                                         const typename CF::op_t* B, int ldb, int m0, int n0, int K) {
  constexpr int KS = CF::kStep;
  using prec = std::conditional_t<MD == Mode::kTf32, wmma::precision::tf32, typename CF::op_t>;
  for (int k0 = 0; k0 < K; k0 += KS) {
    wmma::fragment<wmma::matrix_a, 16, 16, KS, prec, typename LA::wmma_t> a;
    wmma::fragment<wmma::matrix_b, 16, 16, KS, prec, typename LB::wmma_t> b;
    wmma::load_matrix_sync(a, A + elem<LA>(m0, k0, lda), lda);
    wmma::load_matrix_sync(b, B + elem<LB>(k0, n0, ldb), ldb);
    if constexpr (MD == Mode::kTf32) {
#pragma unroll
      for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
#pragma unroll
      for (int t = 0; t < b.num_elements; ++t) b.x[t] = wmma::__float_to_tf32(b.x[t]);
    }
    wmma::mma_sync(c, a, b, c);
  }
}

// C (M x N, row-major, acc_t) = [C +] A (M x K, layout LA) * B (K x N, layout LB).
// M, N multiples of 16 and K a multiple of the MMA depth (the staging zero-pads). Call between
// __syncthreads(): it reads A and B and writes C without barriers of its own; a warp (a thread in
// SIMT mode) always owns the same C elements for the same M, N, so accumulating calls need no
// barrier between them.
template <class CF, Mode MD, class LA, class LB>
__device__ void block_mma(const typename CF::op_t* A, int lda, const typename CF::op_t* B, int ldb,
                          typename CF::acc_t* C, int ldc, int M, int N, int K, bool accumulate) {
  using acc_t = typename CF::acc_t;
  if constexpr (MD == Mode::kSimt) {
    for (int e = threadIdx.x; e < M * N; e += kThreads) {
      const int m = e / N, n = e % N;
      acc_t s = accumulate ? C[m * ldc + n] : acc_t(0);
      for (int k = 0; k < K; ++k) s += A[elem<LA>(m, k, lda)] * B[elem<LB>(k, n, ldb)];
      C[m * ldc + n] = s;
    }
  } else {
    const int warp = threadIdx.x / 32;
    const int tiles_n = N / 16, tiles = (M / 16) * tiles_n;
    for (int tile = warp; tile < tiles; tile += kWarps) {
      const int m0 = (tile / tiles_n) * 16, n0 = (tile % tiles_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, CF::kStep, float> c;
      if (accumulate) {
        wmma::load_matrix_sync(c, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(c, 0.0f);
      }
      tile_mma<CF, MD, LA, LB>(c, A, lda, B, ldb, m0, n0, K);
      wmma::store_matrix_sync(C + m0 * ldc + n0, c, ldc, wmma::mem_row_major);
    }
  }
}

// dst[n * N + p0 + m] += (A * B)[m, n] for p0 + m < N and n < C: the product's rows are pixels
// and its columns channels of a (C, N) gradient plane. A is M x K, B is K x N (M, N multiples of
// 16). Tensor-core modes pass each warp's 16 x 16 result through the warp's own staging tile
// (wtile, 256 elements; __syncwarp orders the warp's writes and reads of it); consecutive lanes
// add consecutive pixels. Reads A and B only: call between __syncthreads().
template <class CF, Mode MD, class LA, class LB>
__device__ void block_mma_scatter(const typename CF::op_t* A, int lda, const typename CF::op_t* B,
                                  int ldb, int M, int Nc, int K, typename CF::acc_t* __restrict__ dst,
                                  int p0, int C, int N, typename CF::acc_t* wtile) {
  using acc_t = typename CF::acc_t;
  if constexpr (MD == Mode::kSimt) {
    (void)wtile;
    for (int e = threadIdx.x; e < M * Nc; e += kThreads) {
      const int m = e % M, n = e / M;
      if (p0 + m >= N || n >= C) continue;
      acc_t s = 0;
      for (int k = 0; k < K; ++k) s += A[elem<LA>(m, k, lda)] * B[elem<LB>(k, n, ldb)];
      atomicAdd(dst + static_cast<int64_t>(n) * N + p0 + m, s);
    }
  } else {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    acc_t* wt = wtile + warp * 256;
    const int tiles_n = Nc / 16, tiles = (M / 16) * tiles_n;
    for (int tile = warp; tile < tiles; tile += kWarps) {
      const int m0 = (tile / tiles_n) * 16, n0 = (tile % tiles_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, CF::kStep, float> c;
      wmma::fill_fragment(c, 0.0f);
      tile_mma<CF, MD, LA, LB>(c, A, lda, B, ldb, m0, n0, K);
      __syncwarp();  // the previous tile's reads of wt are done
      wmma::store_matrix_sync(wt, c, 16, wmma::mem_col_major);  // wt[n * 16 + m]
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int p = p0 + m0 + e % 16, ch = n0 + e / 16;
        if (p < N && ch < C) atomicAdd(dst + static_cast<int64_t>(ch) * N + p, wt[e]);
      }
    }
  }
}

// ---- staging --------------------------------------------------------------------------------------
// 16-byte global -> shared copy; bytes = 0 zero-fills the destination without reading src.
__device__ __forceinline__ void copy16_async(void* dst, const void* src, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned saddr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(src), "r"(bytes)
               : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = bytes ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most one committed group (the most recent) of this thread is still in flight.
__device__ __forceinline__ void async_wait_prior() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
}

// dst[c * ld + j] = src[c * N + j0 + j] (* rnorm[j0 + j]) for c < C, j0 + j < N; zero elsewhere in
// the Cp x cols tile. Plain loads; consecutive threads read consecutive pixels of one channel plane.
template <typename scalar_t, typename op_t, typename acc_t>
__device__ void stage_plane(op_t* dst, int ld, const scalar_t* __restrict__ src,
                            const acc_t* __restrict__ rnorm, int j0, int cols, int C, int Cp, int N) {
  for (int e = threadIdx.x; e < Cp * cols; e += kThreads) {
    const int c = e / cols, j = e % cols, jj = j0 + j;
    acc_t val = 0;
    if (c < C && jj < N) {
      val = static_cast<acc_t>(src[static_cast<int64_t>(c) * N + jj]);
      if (rnorm != nullptr) val *= rnorm[jj];
    }
    dst[c * ld + j] = to_op<op_t>(val);
  }
}

// dst (rows x cols, ldd) = src (rows x cols, lds) converted to the operand type.
template <typename op_t, typename acc_t>
__device__ void stage_acc(op_t* dst, int ldd, const acc_t* src, int lds, int rows, int cols) {
  for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
    const int r = e / cols, c = e % cols;
    dst[r * ldd + c] = to_op<op_t>(src[r * lds + c]);
  }
}

// wsm[(i * T + t) * 9 + d] = w[i0 + i, t, d] (0 for query rows past N).
template <typename scalar_t, typename acc_t>
__device__ void stage_weights(acc_t* wsm, const scalar_t* __restrict__ weight, int i0, int T, int N) {
  for (int e = threadIdx.x; e < kBM * T * 9; e += kThreads) {
    const int i = e / (T * 9), qi = i0 + i;
    wsm[e] = qi < N ? static_cast<acc_t>(weight[static_cast<int64_t>(i0) * T * 9 + e]) : acc_t(0);
  }
}

// The order in which a kernel consumes key tiles: steps u in [u_begin, u_end), each with two
// parts p = 0, 1 that stage chunk u + off_p of every task t (when that chunk exists) from x
// (normalized) or v. The kernels' loops visit (u, p, t) in exactly this order.
struct StageIter {
  int u, part, t;
  int u_end, nch, T;
  int off0, off1;  // chunk offsets of parts 0 and 1
  __device__ bool active(int uu, int p) const {
    const int c = uu + (p ? off1 : off0);
    return c >= 0 && c < nch;
  }
  __device__ void settle() {  // move to the first active part at or after (u, part)
    while (u < u_end && !active(u, part)) {
      if (part == 0) { part = 1; } else { part = 0; ++u; }
      t = 0;
    }
  }
  __device__ void advance() {
    if (++t < T) return;
    t = 0;
    if (part == 0) { part = 1; } else { part = 0; ++u; }
    settle();
  }
  __device__ bool valid() const { return u < u_end; }
  __device__ int chunk() const { return u + (part ? off1 : off0); }
};

// Double-buffered key tiles. acquire() returns the tile of the next stage in StageIter order,
// complete and visible to the whole block, after starting the copy of the stage after it into
// the other buffer. Barrier argument:
//  - acquire() opens with __syncthreads(): every thread has finished the work on the previous
//    stage's tile (held in the buffer the prefetch is about to overwrite) and on any shared data
//    written before the call;
//  - cp.async.wait_group 1 completes this thread's copies of the current stage (only the prefetch
//    just committed may still be in flight); the thread scales the vectors it copied itself;
//  - the closing __syncthreads() publishes all threads' copies and scaled values.
// So a tile stays valid until the next acquire(), and callers need no barrier of their own
// between their last read of a tile and the next acquire().
template <typename scalar_t, typename op_t, typename acc_t>
struct KeyPipe {
  op_t* buf0;
  op_t* buf1;
  const scalar_t* src0;  // part 0 / part 1: the batch item's (T, C, N) block of x or v
  const scalar_t* src1;
  bool norm0, norm1;     // part 0 / part 1: scale by the reciprocal norm (x) or not (v)
  const acc_t* rnorm_b;    // (T, N) reciprocal norms of the batch item
  int ldk, C, Cp, N;
  bool vec;                // 16-byte aligned rows: cp.async; otherwise plain loads
  StageIter it;
  int seq;

  __device__ op_t* buffer(int s) const { return (s & 1) ? buf1 : buf0; }

  __device__ void issue(const StageIter& s, op_t* dst) const {
    const int64_t plane = static_cast<int64_t>(C) * N;
    const scalar_t* src_t = (s.part ? src1 : src0) + s.t * plane;
    const acc_t* rn = (s.part ? norm1 : norm0) ? rnorm_b + static_cast<int64_t>(s.t) * N : nullptr;
    const int k0 = s.chunk() * kKC;
    if (vec) {
      constexpr int V = 16 / static_cast<int>(sizeof(op_t));  // elements per 16-byte copy
      constexpr int per_row = kKC / V;
      // Source: (c * N + k0 + q) * sizeof is a multiple of 16 (N * sizeof is, k0 and q are
      // multiples of V); destination: ldk * sizeof and q * sizeof are multiples of 16. N is a
      // multiple of V, so a vector lies wholly inside or wholly outside [0, N).
      for (int e = threadIdx.x; e < Cp * per_row; e += kThreads) {
        const int c = e / per_row, q = (e % per_row) * V, k = k0 + q;
        const bool in = c < C && k < N;
        copy16_async(dst + c * ldk + q, in ? src_t + static_cast<int64_t>(c) * N + k : src_t, in ? 16 : 0);
      }
    } else {
      stage_plane<scalar_t, op_t, acc_t>(dst, ldk, src_t, rn, k0, kKC, C, Cp, N);
    }
  }

  // Scales the vectors this thread copied in issue(s, dst) (same loop) by the reciprocal norm.
  __device__ void scale_own(const StageIter& s, op_t* dst) const {
    constexpr int V = 16 / static_cast<int>(sizeof(op_t));
    constexpr int per_row = kKC / V;
    const acc_t* rn = rnorm_b + static_cast<int64_t>(s.t) * N;
    const int k0 = s.chunk() * kKC;
    for (int e = threadIdx.x; e < Cp * per_row; e += kThreads) {
      const int c = e / per_row, q = (e % per_row) * V, k = k0 + q;
      if (c >= C || k >= N) continue;
#pragma unroll
      for (int r = 0; r < V; ++r) {
        op_t& x = dst[c * ldk + q + r];
        x = to_op<op_t>(from_op<acc_t>(x) * rn[k + r]);
      }
    }
  }

  __device__ void start() {
    it.settle();
    seq = 0;
    if (it.valid()) issue(it, buffer(0));
    async_commit();
  }

  __device__ op_t* acquire() {
    __syncthreads();
    StageIter nx = it;
    nx.advance();
    if (nx.valid()) issue(nx, buffer(seq + 1));
    async_commit();  // possibly an empty group, so that wait_group 1 always means "all but the prefetch"
    async_wait_prior();
    op_t* cur = buffer(seq);
    if (vec && (it.part ? norm1 : norm0)) scale_own(it, cur);
    __syncthreads();
    it = nx;
    ++seq;
    return cur;
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- the stencil on rings of chunk slots ---------------------------------------------------------
__device__ __forceinline__ int ring_col(int j, int R) { return (j / kKC) % R * kKC + j % kKC; }

// M[i, c*KC + k] = b_i for the block's valid rows and keys (0 elsewhere): ring slot of chunk c.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void init_slot(acc_t* Mr, const Layout& L, int c, const scalar_t* __restrict__ bias,
                                          int i0, int N) {
  const int base = (c % L.R) * kKC;
  for (int e = threadIdx.x; e < kBM * kKC; e += kThreads) {
    const int i = e / kKC, k = e % kKC, j = c * kKC + k;
    Mr[i * L.ldR + base + k] =
        (bias != nullptr && i0 + i < N && j < N) ? static_cast<acc_t>(bias[i0 + i]) : acc_t(0);
  }
}

// Adds to the M ring every term w[i,t,d] S_t[i, j+d] whose key j + d lies in chunk u (S holds
// S_t of that chunk). A key k = j + dy*W + dx of the chunk has j in the band
// [u*KC - dy*W - 1, u*KC - dy*W + KC] (KC + 2 columns) of its row offset dy. A thread takes one
// (i, j) of the union of the three bands (a j that lies in several bands goes to the first) and
// adds all its terms from this chunk, so no two threads write the same element.
template <typename acc_t>
__device__ __forceinline__ void stencil_scatter(acc_t* Mr, const Layout& L, const acc_t* S, const acc_t* wsm, int t,
                                int T, int u, int i0, int H, int W) {
  const int N = H * W, k0 = u * kKC;
  for (int e = threadIdx.x; e < kBM * 3 * kBand; e += kThreads) {
    const int i = e / (3 * kBand), band = (e / kBand) % 3, j = k0 - (band - 1) * W - 1 + e % kBand;
    if (i0 + i >= N || j < 0 || j >= N) continue;
    bool earlier = false;
    for (int pb = 0; pb < band; ++pb) {
      const int lo = k0 - (pb - 1) * W - 1;
      earlier |= j >= lo && j < lo + kBand;
    }
    if (earlier) continue;
    const int jy = j / W, jx = j % W;
    const acc_t* w_it = wsm + (i * T + t) * 9;
    acc_t acc = 0;
#pragma unroll
    for (int d = 0; d < 9; ++d) {
      const int ky = jy + d / 3 - 1, kx = jx + d % 3 - 1, k = ky * W + kx;
      if (ky >= 0 && ky < H && kx >= 0 && kx < W && k >= k0 && k < k0 + kKC) acc += w_it[d] * S[i * L.lds + k - k0];
    }
    Mr[i * L.ldR + ring_col(j, L.R)] += acc;
  }
}

// dw[i, t, d] += sum over keys k of chunk u of S_t[i, k] dM[i, k - d] (k - d inside the grid).
// One warp per (i, d), lanes over keys; the (i, d) -> warp map is fixed, so lane 0 of one warp is
// the only writer of each partial.
template <typename acc_t>
__device__ __forceinline__ void dw_chunk(acc_t* dwacc, const acc_t* Dr, const acc_t* S, const Layout& L, int t, int T,
                         int u, int i0, int H, int W) {
  const int N = H * W, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int p = warp; p < kBM * 9; p += kWarps) {
    const int i = p / 9, d = p % 9, dy = d / 3 - 1, dx = d % 3 - 1;
    if (i0 + i >= N) continue;  // warp-uniform
    acc_t s = 0;
    for (int kk = lane; kk < kKC; kk += 32) {
      const int k = u * kKC + kk;
      if (k >= N) continue;
      const int jy = k / W - dy, jx = k % W - dx;
      if (jy >= 0 && jy < H && jx >= 0 && jx < W) s += S[i * L.lds + kk] * Dr[i * L.ldR + ring_col(jy * W + jx, L.R)];
    }
    s = warp_sum(s);
    if (lane == 0) dwacc[(i * T + t) * 9 + d] += s;
  }
}

// As[i, k] = dA_t[i, u*KC + k] = sum_d w[i,t,d] dM[i, u*KC + k - d] (adjoint stencil; 0 for keys
// past N and query rows past N).
template <typename op_t, typename acc_t>
__device__ __forceinline__ void adjoint_chunk(op_t* As, int lda, const acc_t* Dr, const acc_t* wsm, const Layout& L,
                              int t, int T, int u, int i0, int H, int W) {
  const int N = H * W;
  for (int e = threadIdx.x; e < kBM * kKC; e += kThreads) {
    const int i = e / kKC, kk = e % kKC, k = u * kKC + kk;
    acc_t acc = 0;
    if (k < N && i0 + i < N) {
      const int ky = k / W, kx = k % W;
      const acc_t* w_it = wsm + (i * T + t) * 9;
#pragma unroll
      for (int d = 0; d < 9; ++d) {
        const int jy = ky - (d / 3 - 1), jx = kx - (d % 3 - 1);
        if (jy >= 0 && jy < H && jx >= 0 && jx < W) acc += w_it[d] * Dr[i * L.ldR + ring_col(jy * W + jx, L.R)];
      }
    }
    As[i * lda + kk] = to_op<op_t>(acc);
  }
}

// ---- forward ---------------------------------------------------------------------------------------
// One block per SM is the expected occupancy at the paper shapes (over 100 KiB of shared memory),
// so the compiler may use up to 255 registers per thread.
template <typename scalar_t, Mode MD>
__global__ void __launch_bounds__(kThreads, 1)
fused_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
                 const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                 const typename Cfg<scalar_t, MD>::acc_t* __restrict__ rnorm, scalar_t* __restrict__ y,
                 int T, int C, int H, int W, const Layout L, bool vec) {
  using CF = Cfg<scalar_t, MD>;
  using op_t = typename CF::op_t;
  using acc_t = typename CF::acc_t;
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* Mr = reinterpret_cast<acc_t*>(smem + L.off_m);
  acc_t* S = reinterpret_cast<acc_t*>(smem + L.off_s);
  op_t* Q = reinterpret_cast<op_t*>(smem + L.off_q);
  op_t* Kb = reinterpret_cast<op_t*>(smem + L.off_k);
  op_t* As = reinterpret_cast<op_t*>(smem + L.off_a);
  acc_t* Yb = reinterpret_cast<acc_t*>(smem + L.off_y);
  acc_t* wsm = reinterpret_cast<acc_t*>(smem + L.off_w);
  const int N = H * W, a = L.halo, qtile = L.Cp * L.ldq, ytile = kBM * L.ldy;
  const int i0 = static_cast<int>(blockIdx.x) * kBM;
  const int64_t b = blockIdx.y;
  const int64_t plane = static_cast<int64_t>(C) * N;
  const scalar_t* x_b = x + b * T * plane;
  const scalar_t* v_b = v + b * T * plane;
  const acc_t* rn_b = rnorm + b * T * N;

  stage_weights(wsm, weight, i0, T, N);
  for (int t = 0; t < T; ++t) {
    stage_plane(Q + t * qtile, L.ldq, x_b + t * plane, rn_b + static_cast<int64_t>(t) * N, i0, kBM, C, L.Cp, N);
  }
  for (int c = 0; c <= a && c < L.nch; ++c) init_slot(Mr, L, c, bias, i0, N);

  // Step u: part 0 = n_t of key chunk u (similarity, stencil into the M ring), part 1 = v_t' of
  // chunk u - a (the M chunk that just became complete times the values).
  KeyPipe<scalar_t, op_t, acc_t> pipe{Kb, Kb + L.Cp * L.ldk, x_b, v_b, true, false, rn_b,
                                      L.ldk, C, L.Cp, N, vec,
                                      StageIter{0, 0, 0, L.nch + a, L.nch, T, 0, -a}, 0};
  pipe.start();  // the first acquire()'s barriers also publish the prologue's shared writes
  for (int u = 0; u < L.nch + a; ++u) {
    if (u < L.nch) {
      for (int t = 0; t < T; ++t) {
        const op_t* Kt = pipe.acquire();
        // S (BM x KC) = A(i, c) = Q_t[c * ldq + i] (col-major) * B(c, k) = Kt[c * ldk + k] (row-major)
        block_mma<CF, MD, ColMajor, RowMajor>(Q + t * qtile, L.ldq, Kt, L.ldk, S, L.lds, kBM, kKC, L.Cp, false);
        __syncthreads();
        stencil_scatter(Mr, L, S, wsm, t, T, u, i0, H, W);
      }  // S is next written after the barrier that opens the next acquire()
    }
    const int c = u - a;  // < nch since u < nch + a
    if (c >= 0) {
      __syncthreads();  // every stencil term of chunk c is in the ring
      stage_acc(As, L.lda, Mr + (c % L.R) * kKC, L.ldR, kBM, kKC);
      for (int tp = 0; tp < T; ++tp) {
        const op_t* Vt = pipe.acquire();  // its barriers publish As
        // Y_tp (BM x Cp) += M[:, chunk] (row-major) * V^T (B(k, c) = Vt[c * ldk + k], col-major)
        block_mma<CF, MD, RowMajor, ColMajor>(As, L.lda, Vt, L.ldk, Yb + tp * ytile, L.ldy, kBM, L.Cp, kKC, c > 0);
      }
    }
    // The slot of chunk u + a + 1 is either unused so far or held chunk c, whose last read
    // (stage_acc) precedes the barriers of the acquire() calls above; this step's stencil
    // touched chunks u - a .. u + a only.
    if (u + a + 1 < L.nch) init_slot(Mr, L, u + a + 1, bias, i0, N);
  }
  __syncthreads();
  for (int tp = 0; tp < T; ++tp) {
    scalar_t* y_bt = y + (b * T + tp) * plane;
    for (int e = threadIdx.x; e < kBM * C; e += kThreads) {
      const int c = e / kBM, i = e % kBM;
      if (i0 + i < N) {
        y_bt[static_cast<int64_t>(c) * N + i0 + i] = static_cast<scalar_t>(Yb[tp * ytile + i * L.ldy + c]);
      }
    }
  }
}

// ---- backward --------------------------------------------------------------------------------------
template <typename scalar_t, Mode MD>
__global__ void __launch_bounds__(kThreads, 1)
fused_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                 const scalar_t* __restrict__ v, const scalar_t* __restrict__ weight,
                 const scalar_t* __restrict__ bias,
                 const typename Cfg<scalar_t, MD>::acc_t* __restrict__ rnorm,
                 typename Cfg<scalar_t, MD>::acc_t* __restrict__ dn,   // (B, T, C, N), atomics
                 typename Cfg<scalar_t, MD>::acc_t* __restrict__ dv,   // (B, T, C, N), atomics
                 typename Cfg<scalar_t, MD>::acc_t* __restrict__ dwp,  // (B, N, T, 9)
                 typename Cfg<scalar_t, MD>::acc_t* __restrict__ dbp,  // (B, N)
                 int T, int C, int H, int W, const Layout L, bool vec) {
  using CF = Cfg<scalar_t, MD>;
  using op_t = typename CF::op_t;
  using acc_t = typename CF::acc_t;
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* Mr = reinterpret_cast<acc_t*>(smem + L.off_m);
  acc_t* Dr = reinterpret_cast<acc_t*>(smem + L.off_dm);
  acc_t* S = reinterpret_cast<acc_t*>(smem + L.off_s);
  op_t* Q = reinterpret_cast<op_t*>(smem + L.off_q);
  op_t* G = reinterpret_cast<op_t*>(smem + L.off_g);
  op_t* Kb = reinterpret_cast<op_t*>(smem + L.off_k);
  op_t* As = reinterpret_cast<op_t*>(smem + L.off_a);
  acc_t* wtile = reinterpret_cast<acc_t*>(smem + L.off_tile);
  acc_t* wsm = reinterpret_cast<acc_t*>(smem + L.off_w);
  acc_t* dwacc = reinterpret_cast<acc_t*>(smem + L.off_dw);  // (BM, T, 9)
  acc_t* dbacc = dwacc + kBM * T * 9;                         // (BM)
  const int N = H * W, a = L.halo, qtile = L.Cp * L.ldq;
  const int i0 = static_cast<int>(blockIdx.x) * kBM;
  const int64_t b = blockIdx.y;
  const int64_t plane = static_cast<int64_t>(C) * N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* x_b = x + b * T * plane;
  const scalar_t* v_b = v + b * T * plane;
  const scalar_t* dy_b = dy + b * T * plane;
  const acc_t* rn_b = rnorm + b * T * N;
  acc_t* dn_b = dn + b * T * plane;
  acc_t* dv_b = dv + b * T * plane;

  stage_weights(wsm, weight, i0, T, N);
  for (int t = 0; t < T; ++t) {
    stage_plane(Q + t * qtile, L.ldq, x_b + t * plane, rn_b + static_cast<int64_t>(t) * N, i0, kBM, C, L.Cp, N);
    stage_plane(G + t * qtile, L.ldq, dy_b + t * plane, static_cast<const acc_t*>(nullptr), i0, kBM, C, L.Cp, N);
  }
  for (int c = 0; c <= a && c < L.nch; ++c) init_slot(Mr, L, c, bias, i0, N);
  for (int e = threadIdx.x; e < kBM * T * 9 + kBM; e += kThreads) dwacc[e] = 0;

  // Step u (from -a): part A = v_t' of chunk u + a (dM into its ring), part B = n_t of chunk u
  // (S_t, the M ring, dw, dA_t, dn_t), then part C = the complete M chunk u - a (dV).
  KeyPipe<scalar_t, op_t, acc_t> pipe{Kb, Kb + L.Cp * L.ldk, v_b, x_b, false, true, rn_b,
                                      L.ldk, C, L.Cp, N, vec,
                                      StageIter{-a, 0, 0, L.nch + a, L.nch, T, a, 0}, 0};
  pipe.start();
  for (int u = -a; u < L.nch + a; ++u) {
    const int ca = u + a;  // >= 0
    if (ca < L.nch) {
      // The slot's previous chunk (ca - R) was last read by step u - 1's part B, before the
      // barrier that opens the acquire() below.
      acc_t* Dslot = Dr + (ca % L.R) * kKC;
      for (int tp = 0; tp < T; ++tp) {
        const op_t* Vt = pipe.acquire();
        // dM[:, chunk] (+)= A(i, c) = G_tp[c * ldq + i] (col-major) * B(c, k) = Vt[c * ldk + k] (row-major)
        block_mma<CF, MD, ColMajor, RowMajor>(G + tp * qtile, L.ldq, Vt, L.ldk, Dslot, L.ldR, kBM, kKC, L.Cp, tp > 0);
      }
      __syncthreads();
      for (int i = warp; i < kBM; i += kWarps) {  // row i's partial has one writer: lane 0 of warp i % 4
        acc_t s = 0;
        for (int k = lane; k < kKC; k += 32) {
          if (ca * kKC + k < N) s += Dslot[i * L.ldR + k];
        }
        s = warp_sum(s);
        if (lane == 0) dbacc[i] += s;
      }
    }
    if (u >= 0 && u < L.nch) {  // dM chunks u - a .. u + a are in the ring
      for (int t = 0; t < T; ++t) {
        const op_t* Kt = pipe.acquire();
        const op_t* Qt = Q + t * qtile;
        acc_t* dn_bt = dn_b + t * plane;
        block_mma<CF, MD, ColMajor, RowMajor>(Qt, L.ldq, Kt, L.ldk, S, L.lds, kBM, kKC, L.Cp, false);
        __syncthreads();  // S_t of chunk u
        stencil_scatter(Mr, L, S, wsm, t, T, u, i0, H, W);
        dw_chunk(dwacc, Dr, S, L, t, T, u, i0, H, W);
        adjoint_chunk(As, L.lda, Dr, wsm, L, t, T, u, i0, H, W);
        __syncthreads();  // dA_t of chunk u in As
        // query side: dn_t[:, i] += dA[i, chunk] (row-major As) * n_t[chunk] (B(k, c) = Kt[c * ldk + k], col-major)
        block_mma_scatter<CF, MD, RowMajor, ColMajor>(As, L.lda, Kt, L.ldk, kBM, L.Cp, kKC, dn_bt, i0, C, N, wtile);
        // key side: dn_t[:, k] += dA[:, k]^T (A(k, i) = As[i * lda + k]) * n_t[i] (B(i, c) = Qt[c * ldq + i])
        block_mma_scatter<CF, MD, ColMajor, ColMajor>(As, L.lda, Qt, L.ldq, kKC, L.Cp, kBM, dn_bt, u * kKC, C, N,
                                                      wtile);
      }  // As, S and Kt are next written after the barrier that opens the next acquire() or part C
    }
    const int c = u - a;  // < nch since u < nch + a
    if (c >= 0) {
      __syncthreads();  // the stencil terms of chunk u are in the ring; part B's reads of As are done
      stage_acc(As, L.lda, Mr + (c % L.R) * kKC, L.ldR, kBM, kKC);
      __syncthreads();
      for (int tp = 0; tp < T; ++tp) {
        // dv_tp[:, k] += M[:, k]^T (A(k, i) = As[i * lda + k]) * dY_tp[i] (B(i, c) = G_tp[c * ldq + i])
        block_mma_scatter<CF, MD, ColMajor, ColMajor>(As, L.lda, G + tp * qtile, L.ldq, kKC, L.Cp, kBM,
                                                      dv_b + tp * plane, c * kKC, C, N, wtile);
      }
    }
    // As in the forward: the slot is unused so far or held chunk c, read before the barrier above.
    if (u >= 0 && u + a + 1 < L.nch) init_slot(Mr, L, u + a + 1, bias, i0, N);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kBM * T * 9; e += kThreads) {
    if (i0 + e / (T * 9) < N) dwp[(b * N + i0) * T * 9 + e] = dwacc[e];
  }
  for (int i = threadIdx.x; i < kBM; i += kThreads) {
    if (i0 + i < N) dbp[b * N + i0 + i] = dbacc[i];
  }
}

// ---- host ------------------------------------------------------------------------------------------
Mode mode_for(at::ScalarType s, bool allow_tf32) {
  if (s == at::kHalf || s == at::kBFloat16) return Mode::kHalf;
  if (s == at::kFloat && allow_tf32) return Mode::kTf32;
  return Mode::kSimt;
}

Layout layout_for(int64_t T, int64_t C, int64_t H, int64_t W, at::ScalarType s, bool allow_tf32,
                  bool backward) {
  const Mode m = mode_for(s, allow_tf32);
  const int64_t acc = s == at::kDouble ? 8 : 4;
  const int64_t op = m == Mode::kHalf ? 2 : acc;
  const int64_t skew = m == Mode::kHalf ? 8 : (s == at::kDouble ? 2 : 4);
  return make_layout(T, C, H, W, op, acc, skew, m != Mode::kSimt, backward);
}

int64_t smem_optin(const at::Device& dev) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev.index()));
  return value;
}

void check_fused(const char* op, const at::Tensor& x, const Layout& L) {
  TORCH_CHECK(x.is_cuda(), op, ": needs CUDA tensors, got ", x.device());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  TORCH_CHECK(B <= 65535, op, ": batch ", B, " exceeds the grid limit of 65535");
  TORCH_CHECK(H * W <= (int64_t{1} << 24) && C <= 4096 && T <= 4096, op,
              ": grid, channels or tasks too large (H*W <= 2^24, C <= 4096, T <= 4096)");
  const int64_t have = smem_optin(x.device());
  TORCH_CHECK(L.total <= have, op, ": a ", H, "x", W, " grid with T=", T, ", C=", C, " needs ",
              L.total / 1024, " KiB of shared memory per block (the key halo grows with the grid "
              "width W, the query tiles with T and C), the device allows ", have / 1024,
              " KiB; use the cuda-linear backend");
}

template <typename Kernel>
void prepare_launch(Kernel kernel, const Layout& L) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(L.total)));
}

at::Tensor clamped_norm(const at::Tensor& xc) {
  const auto acc = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::linalg_vector_norm(xc.to(acc), 2, at::IntArrayRef{2}, false).clamp_min(kNormEps).flatten(2).contiguous();
}

// Key tiles may use 16-byte cp.async when every channel row starts 16-byte aligned.
bool rows_aligned16(const at::Tensor& xc, const at::Tensor& vc, int64_t N) {
  const auto addr = [](const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()); };
  return (N * xc.element_size()) % 16 == 0 && addr(xc) % 16 == 0 && addr(vc) % 16 == 0;
}

template <typename Fn>
void dispatch_mode(at::ScalarType s, bool allow_tf32, Fn&& fn) {
  switch (s) {
    case at::kDouble: fn(double{}, std::integral_constant<Mode, Mode::kSimt>{}); break;
    case at::kFloat:
      if (allow_tf32) fn(float{}, std::integral_constant<Mode, Mode::kTf32>{});
      else fn(float{}, std::integral_constant<Mode, Mode::kSimt>{});
      break;
    case at::kBFloat16: fn(c10::BFloat16{}, std::integral_constant<Mode, Mode::kHalf>{}); break;
    case at::kHalf: fn(c10::Half{}, std::integral_constant<Mode, Mode::kHalf>{}); break;
    default: TORCH_CHECK(false, "cuda-fused: unsupported dtype ", s);
  }
}

}  // namespace

int64_t fused_smem_bytes(int64_t T, int64_t C, int64_t H, int64_t W, at::ScalarType dtype,
                         bool allow_tf32, bool backward) {
  if (T <= 0 || C <= 0 || H <= 0 || W <= 0 || H * W > (int64_t{1} << 24)) return -1;
  return layout_for(T, C, H, W, dtype, allow_tf32, backward).total;
}

at::Tensor fused_fwd_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, bool allow_tf32) {
  const NoAutocast no_autocast;
  check_inputs("fused_fwd", x, v, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  const Layout L = layout_for(T, C, H, W, x.scalar_type(), allow_tf32, false);
  check_fused("fused_fwd", x, L);
  const at::Tensor xc = x.contiguous(), vc = v.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor rnorm = clamped_norm(xc).reciprocal();  // (B, T, N)
  const bool vec = rows_aligned16(xc, vc, H * W);
  at::Tensor y = output_buffer(xc.sizes(), xc.options());
  const dim3 grid(static_cast<unsigned>((H * W + kBM - 1) / kBM), static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_mode(x.scalar_type(), allow_tf32, [&](auto tag, auto mode) {
    using scalar_t = decltype(tag);
    constexpr Mode MD = decltype(mode)::value;
    using acc_t = typename Cfg<scalar_t, MD>::acc_t;
    auto kernel = fused_fwd_kernel<scalar_t, MD>;
    prepare_launch(kernel, L);
    kernel<<<grid, kThreads, L.total, stream>>>(
        xc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
        bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, rnorm.const_data_ptr<acc_t>(),
        y.mutable_data_ptr<scalar_t>(), static_cast<int>(T), static_cast<int>(C),
        static_cast<int>(H), static_cast<int>(W), L, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, bool allow_tf32) {
  const NoAutocast no_autocast;
  check_inputs("fused_bwd", x, v, weight, bias);
  // dn and dv are accumulated with float atomics across blocks, so their summation order varies
  // from run to run (dw and db are per-block partials summed by ATen, in a fixed order).
  at::globalContext().alertNotDeterministic("ctal_ext::fused_bwd");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "fused_bwd: dy must match x in shape, dtype and device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t N = H * W;
  const Layout L = layout_for(T, C, H, W, x.scalar_type(), allow_tf32, true);
  check_fused("fused_bwd", x, L);
  const at::Tensor xc = x.contiguous(), vc = v.contiguous(), wc = weight.contiguous();
  const at::Tensor dyc = dy.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor norm = clamped_norm(xc);  // (B, T, N)
  const at::Tensor rnorm = norm.reciprocal();
  const bool vec = rows_aligned16(xc, vc, N);
  const auto acc_opts = norm.options();
  at::Tensor dn = at::zeros({B, T, C, N}, acc_opts);
  at::Tensor dvacc = at::zeros({B, T, C, N}, acc_opts);
  at::Tensor dwp = output_buffer({B, N, T, 9}, acc_opts);
  at::Tensor dbp = output_buffer({B, N}, acc_opts);
  const dim3 grid(static_cast<unsigned>((N + kBM - 1) / kBM), static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_mode(x.scalar_type(), allow_tf32, [&](auto tag, auto mode) {
    using scalar_t = decltype(tag);
    constexpr Mode MD = decltype(mode)::value;
    using acc_t = typename Cfg<scalar_t, MD>::acc_t;
    auto kernel = fused_bwd_kernel<scalar_t, MD>;
    prepare_launch(kernel, L);
    kernel<<<grid, kThreads, L.total, stream>>>(
        dyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
        wc.const_data_ptr<scalar_t>(), bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr,
        rnorm.const_data_ptr<acc_t>(), dn.mutable_data_ptr<acc_t>(), dvacc.mutable_data_ptr<acc_t>(),
        dwp.mutable_data_ptr<acc_t>(), dbp.mutable_data_ptr<acc_t>(), static_cast<int>(T),
        static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), L, vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Normalization backward: n = x / max(||x||, eps); the clamp passes no gradient below eps.
  const at::Tensor nrm = norm.view({B, T, 1, N});
  const at::Tensor n = xc.view({B, T, C, N}).to(acc_opts.dtype()) / nrm;
  const at::Tensor proj = (n * dn).sum(2, /*keepdim=*/true) * (nrm > kNormEps);
  const at::Tensor dx = ((dn - n * proj) / nrm).to(x.scalar_type()).view(x.sizes());
  const at::Tensor dv = dvacc.to(x.scalar_type()).view(x.sizes());
  const at::Tensor dw = dwp.sum(0).to(x.scalar_type()).view({N, T, 3, 3});
  const at::Tensor db = dbp.sum(0).to(x.scalar_type());
  return {dx, dv, dw, db};
}

}  // namespace ctal_ext

// The fused quadratic form of CTAL (docs/design.md section 3): no N x N matrix ever reaches device memory.
//
// One thread block owns BM = 16 query pixels i of one batch item and keeps their full row block
// of the diffusion matrix in shared memory:
//
//   S_t[i, k]  = n_t[i] . n_t[k]                      similarity tile, tensor cores, per task t
//   M[i, j]    = b_i + sum_t sum_d w[i,t,d] S_t[i, j+d]  3x3 stencil over the key grid (zero
//                                                      outside the grid), from S_t in shared memory
//   y_t'[:, i] = sum_j M[i, j] v_t'[:, j]              value tiles, tensor cores
//
// Keys are streamed in chunks of KC = 64 pixels; the similarity of a whole query row block is
// kept, so the stencil needs no halo logic. Backward recomputes M and S_t (there is no softmax
// state to save):
//
//   dV[j]  += sum_i M[i, j] dY[i]          (atomics: other blocks own other query rows)
//   dM      = dY V^T,  db_i = sum_j dM[i, j]
//   dw[i,t,d] = sum_j dM[i, j] S_t[i, j+d]
//   dA_t[i, k] = sum_d w[i,t,d] dM[i, k-d]   (adjoint stencil, written over S_t)
//   dn_t[i] += dA_t[i, :] n_t             (query side)
//   dn_t[k] += dA_t[:, k]^T n_t[i]        (key side, atomics)
// and the normalization backward runs in ATen on the (B, T, C, N) dn.
//
// The row block costs 2 * BM * N accumulators of shared memory, so the kernel serves the small
// grids where the quadratic order is cheaper (N up to about a thousand); larger grids belong to the
// linear form (cuda-linear), and fused_smem_bytes() lets the dispatcher tell the two apart.
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

#include <type_traits>

namespace ctal_ext {

namespace {

using namespace nvcuda;

constexpr int kBM = 16;        // query pixels per block (one MMA tile high)
constexpr int kKC = 64;        // key pixels per streamed chunk
constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kSkewAcc = 4;    // row padding of accumulator buffers (elements)

enum class Mode { kSimt, kTf32, kHalf };

// op_t: staged MMA operand type; acc_t: accumulators; kStep: MMA k depth; kSkewOp: row padding
// of operand buffers (keeps WMMA's ld a multiple of 16 bytes and spreads banks).
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
  int Nk;    // keys padded to a multiple of kKC
  int ldN;   // row stride of the BM x Nk accumulator blocks
  int ldq;   // Qs: Cp x BM operand (query features / dY of one task)
  int ldk;   // Ks: Cp x KC operand (key features / values of one chunk)
  int lda;   // As: BM x KC operand (a chunk of M / dA in operand precision)
  int ldy;   // Yb: BM x Cp accumulator
  int ldo;   // Ob: KC x Cp accumulator (backward)
  int64_t off_m, off_s, off_q, off_k, off_a, off_y, off_o, off_w, total;
};

int64_t align128(int64_t v) { return (v + 127) / 128 * 128; }

Layout make_layout(int64_t C, int64_t N, int64_t op_bytes, int64_t acc_bytes, int64_t skew_op,
                   bool backward) {
  Layout L;
  L.Cp = static_cast<int>((C + 15) / 16 * 16);
  L.Nk = static_cast<int>((N + kKC - 1) / kKC * kKC);
  L.ldN = L.Nk + kSkewAcc;
  L.ldq = kBM + static_cast<int>(skew_op);
  L.ldk = kKC + static_cast<int>(skew_op);
  L.lda = kKC + static_cast<int>(skew_op);
  L.ldy = L.Cp + kSkewAcc;
  L.ldo = L.Cp + kSkewAcc;
  int64_t off = 0;
  auto take = [&](int64_t bytes) { const int64_t at = off; off = align128(off + bytes); return at; };
  L.off_m = take(int64_t{kBM} * L.ldN * acc_bytes);
  L.off_s = take(int64_t{kBM} * L.ldN * acc_bytes);
  L.off_q = take(int64_t{L.Cp} * L.ldq * op_bytes);
  L.off_k = take(int64_t{L.Cp} * L.ldk * op_bytes);
  L.off_a = take(int64_t{kBM} * L.lda * op_bytes);
  L.off_y = take(int64_t{kBM} * L.ldy * acc_bytes);
  L.off_o = backward ? take(int64_t{kKC} * L.ldo * acc_bytes) : off;
  L.off_w = take(int64_t{kBM} * 9 * acc_bytes);
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

// C (M x N, row-major, acc_t) = [C +] A (M x K, layout LA) * B (K x N, layout LB).
// M, N multiples of 16 and K a multiple of the MMA depth (the staging zero-pads). Call between
// __syncthreads(): it reads A and B and writes C without barriers of its own.
template <class CF, Mode MD, class LA, class LB>
__device__ void block_mma(const typename CF::op_t* A, int lda, const typename CF::op_t* B, int ldb,
                          typename CF::acc_t* C, int ldc, int M, int N, int K, bool accumulate) {
  using op_t = typename CF::op_t;
  using acc_t = typename CF::acc_t;
  if constexpr (MD == Mode::kSimt) {
    for (int e = threadIdx.x; e < M * N; e += kThreads) {
      const int m = e / N, n = e % N;
      acc_t s = accumulate ? C[m * ldc + n] : acc_t(0);
      for (int k = 0; k < K; ++k) s += A[elem<LA>(m, k, lda)] * B[elem<LB>(k, n, ldb)];
      C[m * ldc + n] = s;
    }
  } else {
    constexpr int KS = CF::kStep;
    using prec = std::conditional_t<MD == Mode::kTf32, wmma::precision::tf32, op_t>;
    const int warp = threadIdx.x / 32;
    const int tiles_n = N / 16, tiles = (M / 16) * tiles_n;
    for (int tile = warp; tile < tiles; tile += kWarps) {
      const int m0 = (tile / tiles_n) * 16, n0 = (tile % tiles_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, KS, float> c;
      if (accumulate) {
        wmma::load_matrix_sync(c, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(c, 0.0f);
      }
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
      wmma::store_matrix_sync(C + m0 * ldc + n0, c, ldc, wmma::mem_row_major);
    }
  }
}

// ---- staging --------------------------------------------------------------------------------------
// dst[c * ld + j] = src[c * N + j0 + j] (/ norm[j0 + j]) for c < C, j0 + j < N; zero elsewhere in
// the Cp x cols tile. Consecutive threads read consecutive pixels of one channel plane.
template <typename scalar_t, typename op_t, typename acc_t>
__device__ void stage_plane(op_t* dst, int ld, const scalar_t* __restrict__ src,
                            const acc_t* __restrict__ norm, int j0, int cols, int C, int Cp, int N) {
  for (int e = threadIdx.x; e < Cp * cols; e += kThreads) {
    const int c = e / cols, j = e % cols, jj = j0 + j;
    acc_t val = 0;
    if (c < C && jj < N) {
      val = static_cast<acc_t>(src[static_cast<int64_t>(c) * N + jj]);
      if (norm != nullptr) val /= norm[jj];
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

template <typename scalar_t, typename acc_t>
__device__ void stage_weights(acc_t* wsm, const scalar_t* __restrict__ weight, int i0, int t, int T,
                              int N) {
  for (int e = threadIdx.x; e < kBM * 9; e += kThreads) {
    const int i = e / 9, d = e % 9, qi = i0 + i;
    wsm[e] = qi < N ? static_cast<acc_t>(weight[(static_cast<int64_t>(qi) * T + t) * 9 + d]) : acc_t(0);
  }
}

// S[:, :] = n_t[i0 : i0 + BM] . n_t[k] for every key k (columns >= N are 0); Qs holds the queries.
template <typename scalar_t, class CF, Mode MD>
__device__ void similarity_rows(const Layout& L, typename CF::acc_t* S, const typename CF::op_t* Qs,
                                typename CF::op_t* Ks, const scalar_t* __restrict__ x_bt,
                                const typename CF::acc_t* __restrict__ norm_bt, int C, int N) {
  for (int k0 = 0; k0 < L.Nk; k0 += kKC) {
    stage_plane<scalar_t>(Ks, L.ldk, x_bt, norm_bt, k0, kKC, C, L.Cp, N);
    __syncthreads();
    // A(i, c) = Qs[c * ldq + i] (col-major), B(c, k) = Ks[c * ldk + k] (row-major)
    block_mma<CF, MD, ColMajor, RowMajor>(Qs, L.ldq, Ks, L.ldk, S + k0, L.ldN, kBM, kKC, L.Cp, false);
    __syncthreads();
  }
}

// M[i, j] = b_i + sum_t sum_d w[i,t,d] S_t[i, j+d] for the block's BM query rows.
template <typename scalar_t, class CF, Mode MD>
__device__ void diffusion_rows(const Layout& L, unsigned char* smem, const scalar_t* __restrict__ x_b,
                               const typename CF::acc_t* __restrict__ norm_b,
                               const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                               int i0, int T, int C, int H, int W) {
  using op_t = typename CF::op_t;
  using acc_t = typename CF::acc_t;
  acc_t* Mb = reinterpret_cast<acc_t*>(smem + L.off_m);
  acc_t* S = reinterpret_cast<acc_t*>(smem + L.off_s);
  op_t* Qs = reinterpret_cast<op_t*>(smem + L.off_q);
  op_t* Ks = reinterpret_cast<op_t*>(smem + L.off_k);
  acc_t* wsm = reinterpret_cast<acc_t*>(smem + L.off_w);
  const int N = H * W;
  for (int e = threadIdx.x; e < kBM * L.Nk; e += kThreads) {
    const int i = e / L.Nk, j = e % L.Nk, qi = i0 + i;
    Mb[i * L.ldN + j] = (qi < N && j < N && bias != nullptr) ? static_cast<acc_t>(bias[qi]) : acc_t(0);
  }
  for (int t = 0; t < T; ++t) {
    const scalar_t* x_bt = x_b + static_cast<int64_t>(t) * C * N;
    const acc_t* norm_bt = norm_b + static_cast<int64_t>(t) * N;
    stage_plane<scalar_t>(Qs, L.ldq, x_bt, norm_bt, i0, kBM, C, L.Cp, N);
    stage_weights<scalar_t>(wsm, weight, i0, t, T, N);
    similarity_rows<scalar_t, CF, MD>(L, S, Qs, Ks, x_bt, norm_bt, C, N);  // ends with a barrier
    for (int e = threadIdx.x; e < kBM * N; e += kThreads) {
      const int i = e / N, j = e % N;
      if (i0 + i >= N) continue;
      const int jy = j / W, jx = j % W;
      acc_t acc = 0;
#pragma unroll
      for (int d = 0; d < 9; ++d) {
        const int ky = jy + d / 3 - 1, kx = jx + d % 3 - 1;
        if (ky >= 0 && ky < H && kx >= 0 && kx < W) acc += wsm[i * 9 + d] * S[i * L.ldN + ky * W + kx];
      }
      Mb[i * L.ldN + j] += acc;
    }
    __syncthreads();
  }
}

// ---- forward ---------------------------------------------------------------------------------------
template <typename scalar_t, Mode MD>
// One block per SM: the row blocks of M and S take most of the shared memory anyway, so the
// compiler may use up to 255 registers per thread.
__global__ void __launch_bounds__(kThreads, 1)
fused_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
                 const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                 const typename Cfg<scalar_t, MD>::acc_t* __restrict__ norm, scalar_t* __restrict__ y,
                 int T, int C, int H, int W, const Layout L) {
  using CF = Cfg<scalar_t, MD>;
  using op_t = typename CF::op_t;
  using acc_t = typename CF::acc_t;
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* Mb = reinterpret_cast<acc_t*>(smem + L.off_m);
  op_t* Vs = reinterpret_cast<op_t*>(smem + L.off_k);
  op_t* As = reinterpret_cast<op_t*>(smem + L.off_a);
  acc_t* Yb = reinterpret_cast<acc_t*>(smem + L.off_y);
  const int N = H * W;
  const int i0 = blockIdx.x * kBM;
  const int64_t b = blockIdx.y;
  const int64_t plane = static_cast<int64_t>(C) * N;

  diffusion_rows<scalar_t, CF, MD>(L, smem, x + b * T * plane, norm + b * T * N, weight, bias, i0, T, C, H, W);

  for (int tp = 0; tp < T; ++tp) {
    const scalar_t* v_bt = v + (b * T + tp) * plane;
    for (int k0 = 0; k0 < L.Nk; k0 += kKC) {
      stage_plane<scalar_t, op_t, acc_t>(Vs, L.ldk, v_bt, nullptr, k0, kKC, C, L.Cp, N);
      stage_acc(As, L.lda, Mb + k0, L.ldN, kBM, kKC);
      __syncthreads();
      // Y (BM x Cp) += M[:, chunk] (row-major) * V^T (B(k, c) = Vs[c * ldk + k], col-major)
      block_mma<CF, MD, RowMajor, ColMajor>(As, L.lda, Vs, L.ldk, Yb, L.ldy, kBM, L.Cp, kKC, k0 > 0);
      __syncthreads();
    }
    scalar_t* y_bt = y + (b * T + tp) * plane;
    for (int e = threadIdx.x; e < kBM * C; e += kThreads) {
      const int c = e / kBM, i = e % kBM;
      if (i0 + i < N) y_bt[static_cast<int64_t>(c) * N + i0 + i] = static_cast<scalar_t>(Yb[i * L.ldy + c]);
    }
    __syncthreads();
  }
}

// ---- backward --------------------------------------------------------------------------------------
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// dst[(c * N + k0 + k)] += Ob[k * ldo + c] for the valid part of a KC x Cp tile.
template <typename acc_t>
__device__ void scatter_keys(acc_t* __restrict__ dst, const acc_t* Ob, int ldo, int k0, int C, int N) {
  for (int e = threadIdx.x; e < kKC * C; e += kThreads) {
    const int c = e / kKC, k = e % kKC;
    if (k0 + k < N) atomicAdd(dst + static_cast<int64_t>(c) * N + k0 + k, Ob[k * ldo + c]);
  }
}

template <typename scalar_t, Mode MD>
// One block per SM: the row blocks of M and S take most of the shared memory anyway, so the
// compiler may use up to 255 registers per thread.
__global__ void __launch_bounds__(kThreads, 1)
fused_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                 const scalar_t* __restrict__ v, const scalar_t* __restrict__ weight,
                 const scalar_t* __restrict__ bias,
                 const typename Cfg<scalar_t, MD>::acc_t* __restrict__ norm,
                 typename Cfg<scalar_t, MD>::acc_t* __restrict__ dn,   // (B, T, C, N), atomics
                 typename Cfg<scalar_t, MD>::acc_t* __restrict__ dv,   // (B, T, C, N), atomics
                 typename Cfg<scalar_t, MD>::acc_t* __restrict__ dwp,  // (B, N, T, 9)
                 typename Cfg<scalar_t, MD>::acc_t* __restrict__ dbp,  // (B, N)
                 int T, int C, int H, int W, const Layout L) {
  using CF = Cfg<scalar_t, MD>;
  using op_t = typename CF::op_t;
  using acc_t = typename CF::acc_t;
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* Mb = reinterpret_cast<acc_t*>(smem + L.off_m);  // M, then dM
  acc_t* S = reinterpret_cast<acc_t*>(smem + L.off_s);   // S_t, then dA_t
  op_t* Qs = reinterpret_cast<op_t*>(smem + L.off_q);
  op_t* Ks = reinterpret_cast<op_t*>(smem + L.off_k);
  op_t* As = reinterpret_cast<op_t*>(smem + L.off_a);
  acc_t* Yb = reinterpret_cast<acc_t*>(smem + L.off_y);
  acc_t* Ob = reinterpret_cast<acc_t*>(smem + L.off_o);
  acc_t* wsm = reinterpret_cast<acc_t*>(smem + L.off_w);
  const int N = H * W;
  const int i0 = blockIdx.x * kBM;
  const int64_t b = blockIdx.y;
  const int64_t plane = static_cast<int64_t>(C) * N;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // 1. M for the block's query rows.
  diffusion_rows<scalar_t, CF, MD>(L, smem, x + b * T * plane, norm + b * T * N, weight, bias, i0, T, C, H, W);

  // 2. dV[:, k] += M[:, k]^T dY (all tasks), before M is overwritten.
  for (int tp = 0; tp < T; ++tp) {
    const int64_t bt = b * T + tp;
    stage_plane<scalar_t, op_t, acc_t>(Qs, L.ldq, dy + bt * plane, nullptr, i0, kBM, C, L.Cp, N);
    for (int k0 = 0; k0 < L.Nk; k0 += kKC) {
      stage_acc(As, L.lda, Mb + k0, L.ldN, kBM, kKC);
      __syncthreads();
      // Ob (KC x Cp) = A(k, i) = As[i * lda + k] (col-major) * B(i, c) = Qs[c * ldq + i] (col-major)
      block_mma<CF, MD, ColMajor, ColMajor>(As, L.lda, Qs, L.ldq, Ob, L.ldo, kKC, L.Cp, kBM, false);
      __syncthreads();
      scatter_keys(dv + bt * plane, Ob, L.ldo, k0, C, N);
      __syncthreads();
    }
  }

  // 3. dM = dY V^T over the tasks (into Mb), and db.
  for (int tp = 0; tp < T; ++tp) {
    const int64_t bt = b * T + tp;
    stage_plane<scalar_t, op_t, acc_t>(Qs, L.ldq, dy + bt * plane, nullptr, i0, kBM, C, L.Cp, N);
    for (int k0 = 0; k0 < L.Nk; k0 += kKC) {
      stage_plane<scalar_t, op_t, acc_t>(Ks, L.ldk, v + bt * plane, nullptr, k0, kKC, C, L.Cp, N);
      __syncthreads();
      // dM[:, chunk] (+)= A(i, c) = Qs[c * ldq + i] (col-major) * B(c, k) = Ks[c * ldk + k] (row-major)
      block_mma<CF, MD, ColMajor, RowMajor>(Qs, L.ldq, Ks, L.ldk, Mb + k0, L.ldN, kBM, kKC, L.Cp, tp > 0);
      __syncthreads();
    }
  }
  for (int i = warp; i < kBM; i += kWarps) {
    acc_t s = 0;
    for (int j = lane; j < N; j += 32) s += Mb[i * L.ldN + j];
    s = warp_sum(s);
    if (lane == 0 && i0 + i < N) dbp[b * N + i0 + i] = s;
  }

  // 4. Per task: S_t again, dw, dA_t, and both sides of dn_t.
  for (int t = 0; t < T; ++t) {
    const int64_t bt = b * T + t;
    const scalar_t* x_bt = x + bt * plane;
    const acc_t* norm_bt = norm + bt * N;
    stage_plane<scalar_t>(Qs, L.ldq, x_bt, norm_bt, i0, kBM, C, L.Cp, N);
    stage_weights<scalar_t>(wsm, weight, i0, t, T, N);
    similarity_rows<scalar_t, CF, MD>(L, S, Qs, Ks, x_bt, norm_bt, C, N);  // ends with a barrier

    // dw[i, t, d] = sum_j dM[i, j] S_t[i, j + d]: one warp per (i, d).
    for (int p = warp; p < kBM * 9; p += kWarps) {
      const int i = p / 9, d = p % 9, oy = d / 3 - 1, ox = d % 3 - 1;
      acc_t s = 0;
      for (int j = lane; j < N; j += 32) {
        const int ky = j / W + oy, kx = j % W + ox;
        if (ky >= 0 && ky < H && kx >= 0 && kx < W) s += Mb[i * L.ldN + j] * S[i * L.ldN + ky * W + kx];
      }
      s = warp_sum(s);
      if (lane == 0 && i0 + i < N) dwp[((b * N + i0 + i) * T + t) * 9 + d] = s;
    }
    __syncthreads();

    // dA_t[i, k] = sum_d w[i,t,d] dM[i, k - d] (adjoint stencil), over S_t; padding columns = 0.
    for (int e = threadIdx.x; e < kBM * L.Nk; e += kThreads) {
      const int i = e / L.Nk, k = e % L.Nk;
      acc_t acc = 0;
      if (k < N && i0 + i < N) {
        const int ky = k / W, kx = k % W;
#pragma unroll
        for (int d = 0; d < 9; ++d) {
          const int jy = ky - (d / 3 - 1), jx = kx - (d % 3 - 1);
          if (jy >= 0 && jy < H && jx >= 0 && jx < W) acc += wsm[i * 9 + d] * Mb[i * L.ldN + jy * W + jx];
        }
      }
      S[i * L.ldN + k] = acc;
    }
    __syncthreads();

    for (int k0 = 0; k0 < L.Nk; k0 += kKC) {
      stage_plane<scalar_t>(Ks, L.ldk, x_bt, norm_bt, k0, kKC, C, L.Cp, N);
      stage_acc(As, L.lda, S + k0, L.ldN, kBM, kKC);
      __syncthreads();
      // query side: Yb (BM x Cp) += dA[:, chunk] (row-major) * n_t[chunk] (B(k, c) = Ks[c*ldk + k])
      block_mma<CF, MD, RowMajor, ColMajor>(As, L.lda, Ks, L.ldk, Yb, L.ldy, kBM, L.Cp, kKC, k0 > 0);
      // key side: Ob (KC x Cp) = dA[:, chunk]^T (A(k, i) = As[i*lda + k]) * n_t[i] (B(i, c) = Qs[c*ldq + i])
      block_mma<CF, MD, ColMajor, ColMajor>(As, L.lda, Qs, L.ldq, Ob, L.ldo, kKC, L.Cp, kBM, false);
      __syncthreads();
      scatter_keys(dn + bt * plane, Ob, L.ldo, k0, C, N);
      __syncthreads();
    }
    for (int e = threadIdx.x; e < kBM * C; e += kThreads) {
      const int c = e / kBM, i = e % kBM;
      if (i0 + i < N) atomicAdd(dn + bt * plane + static_cast<int64_t>(c) * N + i0 + i, Yb[i * L.ldy + c]);
    }
    __syncthreads();
  }
}

// ---- host ------------------------------------------------------------------------------------------
Mode mode_for(at::ScalarType s, bool allow_tf32) {
  if (s == at::kHalf || s == at::kBFloat16) return Mode::kHalf;
  if (s == at::kFloat && allow_tf32) return Mode::kTf32;
  return Mode::kSimt;
}

Layout layout_for(int64_t C, int64_t N, at::ScalarType s, bool allow_tf32, bool backward) {
  const Mode m = mode_for(s, allow_tf32);
  const int64_t acc = s == at::kDouble ? 8 : 4;
  const int64_t op = m == Mode::kHalf ? 2 : acc;
  const int64_t skew = m == Mode::kHalf ? 8 : (s == at::kDouble ? 2 : 4);
  return make_layout(C, N, op, acc, skew, backward);
}

int64_t smem_optin(const at::Device& dev) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev.index()));
  return value;
}

void check_fused(const char* op, const at::Tensor& x, const Layout& L) {
  TORCH_CHECK(x.is_cuda(), op, ": needs CUDA tensors, got ", x.device());
  const int64_t B = x.size(0), H = x.size(3), W = x.size(4);
  TORCH_CHECK(B <= 65535, op, ": batch ", B, " exceeds the grid limit of 65535");
  TORCH_CHECK(H * W <= (int64_t{1} << 24) && x.size(2) <= 4096, op, ": grid or channels too large");
  const int64_t have = smem_optin(x.device());
  TORCH_CHECK(L.total <= have, op, ": a ", H, "x", W, " grid with C=", x.size(2), " needs ",
              L.total / 1024, " KiB of shared memory per block, the device allows ", have / 1024,
              " KiB; use the cuda-linear backend for grids this large");
}

template <typename scalar_t, Mode MD, typename Kernel>
void prepare_launch(Kernel kernel, const Layout& L) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(L.total)));
}

at::Tensor clamped_norm(const at::Tensor& xc) {
  const auto acc = xc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::linalg_vector_norm(xc.to(acc), 2, at::IntArrayRef{2}, false).clamp_min(kNormEps).flatten(2).contiguous();
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
  (void)T;
  if (C <= 0 || H <= 0 || W <= 0 || H * W > (int64_t{1} << 24)) return -1;
  return layout_for(C, H * W, dtype, allow_tf32, backward).total;
}

at::Tensor fused_fwd_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, bool allow_tf32) {
  const NoAutocast no_autocast;
  check_inputs("fused_fwd", x, v, weight, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  const Layout L = layout_for(C, H * W, x.scalar_type(), allow_tf32, false);
  check_fused("fused_fwd", x, L);
  const at::Tensor xc = x.contiguous(), vc = v.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor norm = clamped_norm(xc);
  at::Tensor y = output_buffer(xc.sizes(), xc.options());
  const dim3 grid(static_cast<unsigned>((H * W + kBM - 1) / kBM), static_cast<unsigned>(B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_mode(x.scalar_type(), allow_tf32, [&](auto tag, auto mode) {
    using scalar_t = decltype(tag);
    constexpr Mode MD = decltype(mode)::value;
    using acc_t = typename Cfg<scalar_t, MD>::acc_t;
    auto kernel = fused_fwd_kernel<scalar_t, MD>;
    prepare_launch<scalar_t, MD>(kernel, L);
    kernel<<<grid, kThreads, L.total, stream>>>(
        xc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(),
        bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr, norm.const_data_ptr<acc_t>(),
        y.mutable_data_ptr<scalar_t>(), static_cast<int>(T), static_cast<int>(C),
        static_cast<int>(H), static_cast<int>(W), L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& v, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, bool allow_tf32) {
  const NoAutocast no_autocast;
  check_inputs("fused_bwd", x, v, weight, bias);
  // dw and db are accumulated with float atomics across blocks: the summation order varies.
  at::globalContext().alertNotDeterministic("ctal_ext::fused_bwd");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "fused_bwd: dy must match x in shape, dtype and device");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t N = H * W;
  const Layout L = layout_for(C, N, x.scalar_type(), allow_tf32, true);
  check_fused("fused_bwd", x, L);
  const at::Tensor xc = x.contiguous(), vc = v.contiguous(), wc = weight.contiguous();
  const at::Tensor dyc = dy.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor norm = clamped_norm(xc);  // (B, T, N)
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
    prepare_launch<scalar_t, MD>(kernel, L);
    kernel<<<grid, kThreads, L.total, stream>>>(
        dyc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
        wc.const_data_ptr<scalar_t>(), bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr,
        norm.const_data_ptr<acc_t>(), dn.mutable_data_ptr<acc_t>(), dvacc.mutable_data_ptr<acc_t>(),
        dwp.mutable_data_ptr<acc_t>(), dbp.mutable_data_ptr<acc_t>(), static_cast<int>(T),
        static_cast<int>(C), static_cast<int>(H), static_cast<int>(W), L);
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

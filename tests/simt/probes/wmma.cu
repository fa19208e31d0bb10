// WMMA: out = 2 * (A B) + C for one 16x16x16 tile (A and B half, C and out float). Variant 0 is correct;
// the others plant one bug each that only alignment checks or a scrambled fragment placement reveal.
#include <cuda_fp16.h>
#include <mma.h>

#include "probe.h"

namespace {

using namespace nvcuda;

enum Variant {
  kCorrect = 0,
  kMisalignedPointer = 1,      // A loaded from 16 bytes into its shared tile
  kBadLdm = 2,                 // A's ldm 20 halves (40 bytes)
  kPositionalBias = 3,         // C added to x[e] as if lane l held elements l, l + 32, ...
  kMisalignedStore = 4,        // out stored from 16 bytes past its start
  kAccumulatorAsOperand = 5,   // out = half(2 A B + C) B, the accumulator reused elementwise as matrix_a
};

constexpr int kTile = 16;
constexpr int kLd = 24;  // the shared copy of A is padded, 48 bytes a row

__global__ void tile_product_kernel(const __half* a, const __half* b, const float* c, float* out, int variant) {
  __shared__ __align__(32) __half a_tile[kTile * kLd];
  const int lane = threadIdx.x;
  for (int i = lane; i < kTile * kLd; i += 32) {
    const int row = i / kLd, col = i % kLd;
    a_tile[i] = col < kTile ? a[row * kTile + col] : __float2half(0.0f);
  }
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc, bias;
  wmma::load_matrix_sync(fa, variant == kMisalignedPointer ? a_tile + 8 : a_tile, variant == kBadLdm ? 20 : kLd);
  wmma::load_matrix_sync(fb, b, kTile);
  wmma::fill_fragment(acc, 0.0f);
  wmma::mma_sync(acc, fa, fb, acc);
  if (variant == kPositionalBias) {
    for (int e = 0; e < acc.num_elements; ++e) {
      acc.x[e] = 2.0f * acc.x[e] + c[e * 32 + lane];
    }
  } else {
    wmma::load_matrix_sync(bias, c, kTile, wmma::mem_row_major);
    for (int e = 0; e < acc.num_elements; ++e) {  // elementwise between fragments of one type: valid
      acc.x[e] = 2.0f * acc.x[e] + bias.x[e];
    }
  }
  if (variant == kAccumulatorAsOperand) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> product;
    for (int e = 0; e < acc.num_elements; ++e) {
      product.x[e] = __float2half(acc.x[e]);
    }
    wmma::fill_fragment(acc, 0.0f);
    wmma::mma_sync(acc, product, fb, acc);
  }
  wmma::store_matrix_sync(variant == kMisalignedStore ? out + 4 : out, acc, kTile, wmma::mem_row_major);
}

}  // namespace

// a, b: 16x16 half, c: 16x16 float, out: 16x16 + 8 floats, all row-major and 32-byte aligned.
extern "C" int probe_wmma(int variant, const __half* a, const __half* b, const float* c, float* out) {
  return launch_probe("tile_product_kernel", tile_product_kernel, dim3(1), dim3(32), 0, a, b, c, out, variant);
}

/* Fused softmax focal loss for the CPU (forward and backward), called through ctypes from
   segtrain/native/__init__.py, which compiles this file on first use. No Python or torch
   headers: it builds in well under a second with any C compiler.

   The exponentials and logarithms are vectorised through glibc's libmvec. glibc declares its
   vector variants only under -ffast-math, whose finite-math assumptions would let the
   compiler drop NaN propagation; they are declared SIMD-callable here instead. Built with
   -DSEGTRAIN_SCALAR_MATH, the plain scalar functions are used.

   Threads: OpenMP, linked as libgomp.so.1. PyTorch's CPU wheels load their own copy under that
   name first, so the dynamic loader hands this library the same runtime, and its threads are
   torch's intra-op threads (separate pools would spin against each other on few cores).
   Built without -fopenmp, the pragmas are ignored and the kernel runs on one thread. */
#include <stdint.h>

#define BLOCK 256 /* pixels per block: the per-pixel scratch arrays stay in L1 */

#ifndef SEGTRAIN_SCALAR_MATH
#pragma omp declare simd notinbranch
#endif
float expf(float);
#ifndef SEGTRAIN_SCALAR_MATH
#pragma omp declare simd notinbranch
#endif
float logf(float);
#ifndef SEGTRAIN_SCALAR_MATH
#pragma omp declare simd notinbranch
#endif
float expm1f(float);
#ifndef SEGTRAIN_SCALAR_MATH
#pragma omp declare simd notinbranch
#endif
double exp(double);
#ifndef SEGTRAIN_SCALAR_MATH
#pragma omp declare simd notinbranch
#endif
double log(double);
#ifndef SEGTRAIN_SCALAR_MATH
#pragma omp declare simd notinbranch
#endif
double expm1(double);

#define T float
#define SUFFIX f32
#define EXP expf
#define LOG logf
#define EXPM1 expm1f
#include "focal_body.h"
#undef T
#undef SUFFIX
#undef EXP
#undef LOG
#undef EXPM1

#define T double
#define SUFFIX f64
#define EXP exp
#define LOG log
#define EXPM1 expm1
#include "focal_body.h"

/* Softmax focal loss over one range of pixels, for one float type. Included by focal.c
   once per type with T (the type), SUFFIX, and EXP/LOG/EXPM1 (its math functions) defined.

   Layout: logits x (N, C, P) contiguous, P = the pixels of one sample; target (N, P) int64,
   each in [0, C) (checked by the caller; a value outside only leaves x_t at 0, never reads
   out of bounds); weight (N, P) or NULL. The work is split into blocks of BLOCK pixels of one
   sample, shared among `threads` OpenMP threads (the runtime torch itself uses: see focal.c). */

#define CONCAT_(a, b) a##_##b
#define CONCAT(a, b) CONCAT_(a, b)

/* Forward: per pixel, m = max_k x_k, s = sum_k exp(x_k - m), lse = m + log s,
   l = log p_t = x_t - lse, p_t = exp(l), 1 - p_t = -expm1(l) (accurate near p_t = 1), and
     loss  = -w (1 - p_t)^g l
     ngrad = -dloss/dl = w (1 - p_t)^g (1 - g p_t l / (1 - p_t)),
   with l / (1 - p_t) -> -1 where p_t rounds to 1, so that the gradient stays finite for g < 1.
   lse is kept for the backward, which recomputes p_k = exp(x_k - lse). */
void CONCAT(segtrain_focal_forward, SUFFIX)(
    const T *x, const int64_t *target, const T *weight, int64_t n, int64_t c, int64_t p,
    double gamma_in, T *loss, T *ngrad, T *lse_out, int threads) {
    const T gamma = (T)gamma_in;
    /* 0: g = 0, 1: g = 1, 2: g = 2, 3: any other g (exp(g log(1 - p_t))). */
    const int mode = gamma_in == 0.0 ? 0 : gamma_in == 1.0 ? 1 : gamma_in == 2.0 ? 2 : 3;
    const int64_t blocks = (p + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t work = 0; work < n * blocks; ++work) {
        T m[BLOCK], s[BLOCK], xt[BLOCK], l[BLOCK], pt[BLOCK], om[BLOCK], mod[BLOCK];
        const int64_t b = work / blocks, p0 = work % blocks * BLOCK;
        const int64_t len = p - p0 < BLOCK ? p - p0 : BLOCK;
        const T *xb = x + b * c * p + p0;
        const int64_t *tb = target + b * p + p0;
        for (int64_t i = 0; i < len; ++i) {
            m[i] = xb[i];
            s[i] = 0;
            xt[i] = 0;
        }
        for (int64_t k = 1; k < c; ++k) {
            const T *row = xb + k * p;
            for (int64_t i = 0; i < len; ++i) m[i] = row[i] > m[i] ? row[i] : m[i];
        }
        for (int64_t k = 0; k < c; ++k) {
            const T *row = xb + k * p;
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) {
                s[i] += EXP(row[i] - m[i]);
                xt[i] = tb[i] == k ? row[i] : xt[i];
            }
        }
        T *lse = lse_out + b * p + p0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            lse[i] = m[i] + LOG(s[i]);
            l[i] = xt[i] - lse[i];
            pt[i] = EXP(l[i]);
            om[i] = -EXPM1(l[i]);
        }
        switch (mode) {
        case 0:
            for (int64_t i = 0; i < len; ++i) mod[i] = 1;
            break;
        case 1:
            for (int64_t i = 0; i < len; ++i) mod[i] = om[i];
            break;
        case 2:
            for (int64_t i = 0; i < len; ++i) mod[i] = om[i] * om[i];
            break;
        default:
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) mod[i] = EXP(gamma * LOG(om[i]));  /* 0 where 1 - p_t = 0 */
        }
        T *lb = loss + b * p + p0, *gb = ngrad + b * p + p0;
        const T *wb = weight ? weight + b * p + p0 : 0;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            const T w = wb ? wb[i] : (T)1;
            const T ratio = om[i] > 0 ? l[i] / om[i] : (T)-1;
            lb[i] = -w * mod[i] * l[i];
            gb[i] = w * mod[i] * (1 - gamma * pt[i] * ratio);
        }
    }
}

/* Backward: dloss/dx_k = coef (p_k - [k == t]) with coef = -dloss/dl * grad_output per pixel
   and p_k = exp(x_k - lse). */
void CONCAT(segtrain_focal_backward, SUFFIX)(
    const T *x, const int64_t *target, const T *coef, const T *lse, int64_t n, int64_t c,
    int64_t p, T *grad, int threads) {
    const int64_t blocks = (p + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t work = 0; work < n * blocks; ++work) {
        const int64_t b = work / blocks, p0 = work % blocks * BLOCK;
        const int64_t len = p - p0 < BLOCK ? p - p0 : BLOCK;
        const int64_t *tb = target + b * p + p0;
        const T *cb = coef + b * p + p0, *eb = lse + b * p + p0;
        for (int64_t k = 0; k < c; ++k) {
            const T *row = x + (b * c + k) * p + p0;
            T *out = grad + (b * c + k) * p + p0;
#pragma omp simd
            for (int64_t i = 0; i < len; ++i)
                out[i] = cb[i] * (EXP(row[i] - eb[i]) - (tb[i] == k ? (T)1 : (T)0));
        }
    }
}

#undef CONCAT
#undef CONCAT_

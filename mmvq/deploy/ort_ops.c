/* mmvq's onnxruntime custom operators (domain "mmvq", version 1): the fused
 * integer kernels of mmvq/quantizers/fused_cpu.c, the same loops mmvq's
 * PyTorch evaluation runs, as operators of an exported graph.
 *
 * Built by mmvq/deploy/ort_ops.py against onnxruntime's C API header (the
 * version it names, checked at registration: the C API only grows, so a
 * library built against API N runs in every onnxruntime that serves API N)
 * and loaded with SessionOptions.register_custom_ops_library. Every op
 * computes over rows; onnxruntime's intra-op thread pool splits the rows
 * (KernelContext_ParallelFor), each chunk runs the kernel with one thread.
 *
 *   IntLayerNorm    PTF codes + FQ-ViT integer LayerNorm -> uint8 output codes
 *   IntLayerNormS8  the same, int8 output codes
 *   FakeQuantRow    uniform fake quantization, one scale per last-axis element
 *                   (PTF on the residual stream: scale s 2^alpha_c)
 *   LogIntSoftmax   logits quantization + Log-Int-Softmax -> 2^-k (float32; the float64
 *                   form where it is exact, else the int64 definition)
 *   AdaLog          AdaLog fake quantization (threshold count + table)
 *   IGQ             IGQ-ViT instance-aware groups (rows, or channels last)
 */
#include <stddef.h>
#include "onnxruntime_c_api.h"
#include "../quantizers/fused_cpu.c"

static const OrtApi *g_api;
static const char *DOMAIN = "mmvq";

#define F32 ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
#define F64 ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE
#define I64 ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
#define U8 ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
#define I8 ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8
#define MAXIO 10
/* below this many elements a chunk is not split further (thread hand-off costs more) */
#define PARALLEL_MIN_ELEMS (1 << 15)

#define CHECK(expr) do { OrtStatus *st_ = (expr); if (st_) return st_; } while (0)

typedef struct MOp MOp;
typedef OrtStatus *(*compute_fn)(const MOp *op, void *attrs, OrtKernelContext *ctx);

struct MOp {
    OrtCustomOp base;                  /* first: the OrtCustomOp* onnxruntime passes is a MOp* */
    const char *name;
    size_t n_in;
    ONNXTensorElementDataType in_types[MAXIO];
    int last_optional;
    ONNXTensorElementDataType out_type;
    const char *const *float_attrs;    /* NULL-terminated */
    const char *const *int_attrs;
    compute_fn compute;
};

typedef struct {
    const MOp *op;
    double f[8];
    int64_t i[8];
} Kernel;

/* ---------------------------------------------------------------- tensors */
typedef struct {
    const OrtValue *v;
    void *data;
    int64_t dims[8];
    size_t ndim;
    int64_t numel;
} Tensor;

static OrtStatus *tensor_of(const OrtValue *v, Tensor *t)
{
    OrtTensorTypeAndShapeInfo *info;
    t->v = v;
    CHECK(g_api->GetTensorTypeAndShape(v, &info));
    OrtStatus *st = g_api->GetDimensionsCount(info, &t->ndim);
    if (!st && t->ndim > 8)
        st = g_api->CreateStatus(ORT_INVALID_ARGUMENT, "mmvq ops: more than 8 dimensions");
    if (!st) st = g_api->GetDimensions(info, t->dims, t->ndim);
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    if (st) return st;
    t->numel = 1;
    for (size_t d = 0; d < t->ndim; d++) t->numel *= t->dims[d];
    return g_api->GetTensorMutableData((OrtValue *)v, &t->data);
}

static OrtStatus *input(OrtKernelContext *ctx, size_t i, Tensor *t)
{
    const OrtValue *v = NULL;
    CHECK(g_api->KernelContext_GetInput(ctx, i, &v));
    if (!v) { t->v = NULL; t->data = NULL; t->ndim = 0; t->numel = 0; return NULL; }
    return tensor_of(v, t);
}

static OrtStatus *output_like(OrtKernelContext *ctx, const Tensor *x, Tensor *y)
{
    OrtValue *v = NULL;
    CHECK(g_api->KernelContext_GetOutput(ctx, 0, x->dims, x->ndim, &v));
    return tensor_of(v, y);
}

static OrtStatus *need(int ok, const char *what)
{
    return ok ? NULL : g_api->CreateStatus(ORT_INVALID_ARGUMENT, what);
}

/* ---------------------------------------------------------------- row split */
typedef void (*rows_fn)(void *args, int64_t r0, int64_t r1);
typedef struct { rows_fn fn; void *args; int64_t rows, chunk; } Split;

static void split_one(void *p, size_t k)
{
    Split *s = p;
    int64_t r0 = (int64_t)k * s->chunk, r1 = r0 + s->chunk;
    s->fn(s->args, r0, r1 < s->rows ? r1 : s->rows);
}

/* fn over rows [0, rows) in chunks of at least PARALLEL_MIN elements */
static OrtStatus *over_rows(OrtKernelContext *ctx, rows_fn fn, void *args, int64_t rows,
                            int64_t row_len)
{
    if (rows <= 0) return NULL;
    int64_t chunk = PARALLEL_MIN_ELEMS / (row_len > 0 ? row_len : 1);
    chunk = chunk < 1 ? 1 : chunk;
    int64_t n = (rows + chunk - 1) / chunk;
    if (n <= 1) { fn(args, 0, rows); return NULL; }
    Split s = {fn, args, rows, chunk};
    return g_api->KernelContext_ParallelFor(ctx, split_one, (size_t)n, 0, &s);
}

/* ---------------------------------------------------------------- IntLayerNorm */
typedef struct {
    const float *x; uint8_t *y; int64_t C;
    const Tensor *t;                   /* in_scale, in_zp, alpha, weight, bias, out_scale, out_zp */
    const Kernel *k;
} LnArgs;

static void ln_rows(void *p, int64_t r0, int64_t r1)
{
    LnArgs *a = p;
    const Kernel *k = a->k;
    mmvq_int_ln_codes(a->x + r0 * a->C, a->y + r0 * a->C, r1 - r0, a->C, a->t[0].data,
                      a->t[1].data, a->t[2].data, (float)k->f[0], a->t[3].data, a->t[4].data,
                      a->t[5].data, a->t[6].data, k->f[1], k->f[2], (int)k->i[0], (int)k->i[1], 1);
}

static OrtStatus *int_ln_compute(const MOp *op, void *kp, OrtKernelContext *ctx)
{
    (void)op;
    Tensor x, y, t[7];
    CHECK(input(ctx, 0, &x));
    for (int i = 0; i < 7; i++) CHECK(input(ctx, i + 1, &t[i]));
    CHECK(need(x.ndim >= 1, "mmvq.IntLayerNorm: x has no axes"));
    const int64_t C = x.dims[x.ndim - 1];
    CHECK(need(t[2].numel == C && t[3].numel == C && t[4].numel == C,
               "mmvq.IntLayerNorm: alpha, weight and bias must have the channels of x"));
    CHECK(output_like(ctx, &x, &y));
    LnArgs a = {x.data, y.data, C, t, kp};
    return over_rows(ctx, ln_rows, &a, C ? x.numel / C : 0, C);
}

/* ---------------------------------------------------------------- FakeQuantRow */
typedef struct { const float *x; float *y; int64_t L; const float *s, *z; float qmin, qmax; } FqArgs;

static void fq_rows(void *p, int64_t r0, int64_t r1)
{
    FqArgs *a = p;
    mmvq_fq(a->x + r0 * a->L, a->y + r0 * a->L, 1, 1, r1 - r0, a->L, 0, 0, a->L, a->s, a->z,
            0, 0, 0, 1, 0, 0, 0, 0, a->qmin, a->qmax, 1);
}

static OrtStatus *fq_compute(const MOp *op, void *kp, OrtKernelContext *ctx)
{
    (void)op;
    const Kernel *k = kp;
    Tensor x, y, s, z;
    CHECK(input(ctx, 0, &x));
    CHECK(input(ctx, 1, &s));
    CHECK(input(ctx, 2, &z));
    CHECK(need(x.ndim >= 1 && s.numel == x.dims[x.ndim - 1] && z.numel == 1,
               "mmvq.FakeQuantRow: one scale per element of the last axis, one zero point"));
    CHECK(output_like(ctx, &x, &y));
    const int64_t L = x.dims[x.ndim - 1];
    FqArgs a = {x.data, y.data, L, s.data, z.data, (float)k->f[0], (float)k->f[1]};
    return over_rows(ctx, fq_rows, &a, L ? x.numel / L : 0, L);
}

/* ---------------------------------------------------------------- LogIntSoftmax */
typedef struct {
    const float *x; float *y; int64_t N; const float *ls, *lz; float qmin, qmax;
    const double *c; const float *mask; const int64_t *off; int n, bits, f64; const float *table;
} LisArgs;

static void lis_rows(void *p, int64_t r0, int64_t r1)
{
    LisArgs *a = p;
    /* f64: the float64 form is exact for this scale and row length (lis.py float64_exact) */
    (a->f64 ? mmvq_lis : mmvq_lis_i64)(a->x + r0 * a->N, a->y + r0 * a->N, r1 - r0, a->N, a->ls,
                                       a->lz, a->qmin, a->qmax, a->c[0], a->mask,
                                       a->mask ? a->off + r0 : NULL, a->c[1], a->c[2], a->c[3],
                                       a->n, a->bits, a->table, 1);
}

/* offsets (elements) of every row's mask row in the mask's storage, the mask
 * broadcast against x (numpy rules, right-aligned; its last axis is x's) */
static OrtStatus *mask_offsets(const Tensor *x, const Tensor *m, int64_t **out)
{
    const size_t nd = x->ndim;
    CHECK(need(m->ndim <= nd && m->ndim >= 1 && m->dims[m->ndim - 1] == x->dims[nd - 1],
               "mmvq.LogIntSoftmax: the mask's last axis must be the logits' last axis"));
    int64_t mdims[8], mstr[8];
    for (size_t d = 0; d < nd; d++) mdims[d] = 1;
    for (size_t d = 0; d < m->ndim; d++) mdims[nd - m->ndim + d] = m->dims[d];
    int64_t st = 1;
    for (size_t d = nd; d-- > 0;) {
        CHECK(need(mdims[d] == 1 || mdims[d] == x->dims[d],
                   "mmvq.LogIntSoftmax: the mask does not broadcast to the logits"));
        mstr[d] = mdims[d] == 1 ? 0 : st;
        st *= mdims[d];
    }
    const int64_t rows = x->numel / x->dims[nd - 1];
    int64_t *off = malloc(sizeof(int64_t) * (rows ? rows : 1));
    if (!off) return g_api->CreateStatus(ORT_FAIL, "mmvq.LogIntSoftmax: out of memory");
    for (int64_t r = 0; r < rows; r++) {
        int64_t rem = r, o = 0;
        for (size_t d = nd - 1; d-- > 0;) {
            o += (rem % x->dims[d]) * mstr[d];
            rem /= x->dims[d];
        }
        off[r] = o;
    }
    *out = off;
    return NULL;
}

static OrtStatus *lis_compute(const MOp *op, void *kp, OrtKernelContext *ctx)
{
    (void)op;
    const Kernel *k = kp;
    Tensor x, y, ls, lz, c, table, m;
    CHECK(input(ctx, 0, &x));
    CHECK(input(ctx, 1, &ls));
    CHECK(input(ctx, 2, &lz));
    CHECK(input(ctx, 3, &c));
    CHECK(input(ctx, 4, &table));
    CHECK(input(ctx, 5, &m));
    CHECK(need(x.ndim >= 1 && ls.numel == 1 && lz.numel == 1 && c.numel == 4,
               "mmvq.LogIntSoftmax: per-tensor logits scale and 4 constants expected"));
    CHECK(need(table.numel >= ((int64_t)1 << k->i[1]) + 1,
               "mmvq.LogIntSoftmax: the 2^-k table is shorter than 2^bits + 1"));
    CHECK(output_like(ctx, &x, &y));
    const int64_t N = x.dims[x.ndim - 1];
    int64_t *off = NULL;
    if (m.v) CHECK(mask_offsets(&x, &m, &off));
    LisArgs a = {x.data, y.data, N, ls.data, lz.data, (float)k->f[0], (float)k->f[1], c.data,
                 m.v ? m.data : NULL, off, (int)k->i[0], (int)k->i[1], (int)k->i[2], table.data};
    OrtStatus *st = over_rows(ctx, lis_rows, &a, N ? x.numel / N : 0, N);
    free(off);
    return st;
}

/* ---------------------------------------------------------------- AdaLog */
typedef struct { const float *x; float *y; const float *s, *sh, *thr, *lut; int levels, unshift; } AlArgs;

static void adalog_rows(void *p, int64_t r0, int64_t r1)
{
    AlArgs *a = p;
    mmvq_adalog(a->x + r0, a->y + r0, r1 - r0, a->s, a->sh, a->thr, a->levels, a->lut, a->unshift, 1);
}

static OrtStatus *adalog_compute(const MOp *op, void *kp, OrtKernelContext *ctx)
{
    (void)op;
    const Kernel *k = kp;
    Tensor x, y, s, sh, thr, lut;
    CHECK(input(ctx, 0, &x));
    CHECK(input(ctx, 1, &s));
    CHECK(input(ctx, 2, &sh));
    CHECK(input(ctx, 3, &thr));
    CHECK(input(ctx, 4, &lut));
    const int levels = (int)k->i[0];
    CHECK(need(s.numel == 1 && sh.numel == 1 && thr.numel >= levels + 2
               && lut.numel >= (levels + 1 > 17 ? levels + 1 : 17),
               "mmvq.AdaLog: scale, shift, levels + 2 thresholds and a table of max(17, levels + 1)"));
    CHECK(output_like(ctx, &x, &y));
    AlArgs a = {x.data, y.data, s.data, sh.data, thr.data, lut.data, levels, (int)k->i[1]};
    /* elements as rows of one: chunks of PARALLEL_MIN_ELEMS */
    return over_rows(ctx, adalog_rows, &a, x.numel, 1);
}

/* ---------------------------------------------------------------- IGQ */
typedef struct {
    const float *x; float *y; int64_t M, T, C; const float *cen, *s, *z; int64_t G;
    float qmin, qmax;
} IgqArgs;

static void igq_row_units(void *p, int64_t r0, int64_t r1)
{
    IgqArgs *a = p;
    mmvq_igq_rows(a->x + r0 * a->M, a->y + r0 * a->M, r1 - r0, a->M, a->cen, a->s, a->z, a->G,
                  a->qmin, a->qmax, 1);
}

static void igq_instances(void *p, int64_t b0, int64_t b1)
{
    IgqArgs *a = p;
    const int64_t n = a->T * a->C;
    mmvq_igq_channels(a->x + b0 * n, a->y + b0 * n, b1 - b0, a->T, a->C, a->cen, a->s, a->z,
                      a->G, a->qmin, a->qmax, 1);
}

static OrtStatus *igq_compute(const MOp *op, void *kp, OrtKernelContext *ctx)
{
    (void)op;
    const Kernel *k = kp;
    Tensor x, y, cen, s, z;
    CHECK(input(ctx, 0, &x));
    CHECK(input(ctx, 1, &cen));
    CHECK(input(ctx, 2, &s));
    CHECK(input(ctx, 3, &z));
    const int64_t G = s.numel;
    CHECK(need(x.ndim >= 2 && G >= 1 && z.numel == G && cen.numel == 2 * G,
               "mmvq.IGQ: x of 2+ axes; G centres (G, 2), scales and zero points"));
    CHECK(output_like(ctx, &x, &y));
    IgqArgs a = {x.data, y.data, 0, 0, 0, cen.data, s.data, z.data, G, (float)k->f[0],
                 (float)k->f[1]};
    const int64_t mode = k->i[0];      /* 0: rows of the last axis, 1: rows of H W, 2: channels */
    if (mode == 0 || mode == 1) {
        CHECK(need(mode == 0 || x.ndim == 4, "mmvq.IGQ: spatial rows need a 4-D input"));
        a.M = mode == 0 ? x.dims[x.ndim - 1] : x.dims[2] * x.dims[3];
        return over_rows(ctx, igq_row_units, &a, a.M ? x.numel / a.M : 0, a.M);
    }
    a.C = x.dims[x.ndim - 1];
    a.T = x.numel / (x.dims[0] * a.C);
    return over_rows(ctx, igq_instances, &a, x.dims[0], a.T * a.C);
}

/* ---------------------------------------------------------------- OrtCustomOp plumbing */
static const char *op_name(const OrtCustomOp *op) { return ((const MOp *)op)->name; }
static const char *op_ep(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static size_t op_n_in(const OrtCustomOp *op) { return ((const MOp *)op)->n_in; }
static size_t op_n_out(const OrtCustomOp *op) { (void)op; return 1; }
static ONNXTensorElementDataType op_in_type(const OrtCustomOp *op, size_t i)
{
    return ((const MOp *)op)->in_types[i];
}
static ONNXTensorElementDataType op_out_type(const OrtCustomOp *op, size_t i)
{
    (void)i;
    return ((const MOp *)op)->out_type;
}
static OrtCustomOpInputOutputCharacteristic op_in_char(const OrtCustomOp *op, size_t i)
{
    const MOp *m = (const MOp *)op;
    return m->last_optional && i + 1 == m->n_in ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOpInputOutputCharacteristic op_out_char(const OrtCustomOp *op, size_t i)
{
    (void)op; (void)i;
    return INPUT_OUTPUT_REQUIRED;
}
static OrtMemType op_in_mem(const OrtCustomOp *op, size_t i)
{
    (void)op; (void)i;
    return OrtMemTypeDefault;
}

static OrtStatus *op_create(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                            void **kernel)
{
    const MOp *m = (const MOp *)op;
    Kernel *k = calloc(1, sizeof(Kernel));
    if (!k) return api->CreateStatus(ORT_FAIL, "mmvq ops: out of memory");
    k->op = m;
    for (int j = 0; m->float_attrs && m->float_attrs[j]; j++) {
        float v;
        OrtStatus *st = api->KernelInfoGetAttribute_float(info, m->float_attrs[j], &v);
        if (st) { free(k); return st; }
        k->f[j] = v;
    }
    for (int j = 0; m->int_attrs && m->int_attrs[j]; j++) {
        OrtStatus *st = api->KernelInfoGetAttribute_int64(info, m->int_attrs[j], &k->i[j]);
        if (st) { free(k); return st; }
    }
    *kernel = k;
    return NULL;
}

static OrtStatus *op_compute(void *kernel, OrtKernelContext *ctx)
{
    Kernel *k = kernel;
    return k->op->compute(k->op, k, ctx);
}

static void op_destroy(void *kernel) { free(kernel); }

static const char *const LN_F[] = {"in_qmax", "out_qmin", "out_qmax", NULL};
static const char *const LN_I[] = {"zero_weight", "m_bits", NULL};
static const char *const QRANGE[] = {"qmin", "qmax", NULL};
static const char *const LIS_I[] = {"n", "bits", "f64", NULL};
static const char *const AL_I[] = {"levels", "unshift", NULL};
static const char *const IGQ_I[] = {"mode", NULL};

static MOp OPS[] = {
    {.name = "IntLayerNorm", .n_in = 8, .in_types = {F32, F32, F32, I64, F32, F32, F32, F32},
     .out_type = U8, .float_attrs = LN_F, .int_attrs = LN_I, .compute = int_ln_compute},
    {.name = "IntLayerNormS8", .n_in = 8, .in_types = {F32, F32, F32, I64, F32, F32, F32, F32},
     .out_type = I8, .float_attrs = LN_F, .int_attrs = LN_I, .compute = int_ln_compute},
    {.name = "FakeQuantRow", .n_in = 3, .in_types = {F32, F32, F32}, .out_type = F32,
     .float_attrs = QRANGE, .compute = fq_compute},
    {.name = "LogIntSoftmax", .n_in = 6, .in_types = {F32, F32, F32, F64, F32, F32},
     .last_optional = 1, .out_type = F32, .float_attrs = QRANGE, .int_attrs = LIS_I,
     .compute = lis_compute},
    {.name = "AdaLog", .n_in = 5, .in_types = {F32, F32, F32, F32, F32}, .out_type = F32,
     .int_attrs = AL_I, .compute = adalog_compute},
    {.name = "IGQ", .n_in = 4, .in_types = {F32, F32, F32, F32}, .out_type = F32,
     .float_attrs = QRANGE, .int_attrs = IGQ_I, .compute = igq_compute},
};

/* the C API version this library was built against (ort_ops.py checks it
 * against the runtime before registering) */
int mmvq_ort_api_version(void) { return ORT_API_VERSION; }

OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *api_base)
{
    g_api = api_base->GetApi(ORT_API_VERSION);
    if (!g_api) return NULL;           /* cannot even make a status: ort_ops.py checks first */
    OrtCustomOpDomain *domain = NULL;
    CHECK(g_api->CreateCustomOpDomain(DOMAIN, &domain));
    for (size_t i = 0; i < sizeof(OPS) / sizeof(OPS[0]); i++) {
        OrtCustomOp *b = &OPS[i].base;   /* the same values at every registration */
        b->version = ORT_API_VERSION;
        b->GetName = op_name;
        b->GetExecutionProviderType = op_ep;
        b->GetInputType = op_in_type;
        b->GetInputTypeCount = op_n_in;
        b->GetOutputType = op_out_type;
        b->GetOutputTypeCount = op_n_out;
        b->KernelDestroy = op_destroy;
        b->GetInputCharacteristic = op_in_char;
        b->GetOutputCharacteristic = op_out_char;
        b->GetInputMemoryType = op_in_mem;
        b->CreateKernelV2 = op_create;
        b->KernelComputeV2 = op_compute;
        CHECK(g_api->CustomOpDomain_Add(domain, b));
    }
    return g_api->AddCustomOpDomain(options, domain);
}

/* The update-ratio norms with the snapshot copy: update_norms(), on up to `threads` of torch's
   threads. */

#include "fused.h"

/* ||s - w||^2 and ||w||^2; the difference is taken in the arrays' precision (as NumPy's subtract
   does), its square summed in double. `target` (the snapshot itself, or a spare) receives w with
   `keep`, else the difference (and the second number is 0). */
#define DEFINE_UPDATE(NAME, T)                                                                   \
    MULTIVERSION static void NAME(const T *w, const T *s, T *target, Py_ssize_t n, int keep,     \
                                  double *delta_out, double *norm_out) {                         \
        double delta = 0, norm = 0;                                                              \
        if (keep) {                                                                              \
            _Pragma("omp simd reduction(+ : delta, norm)")                                       \
            for (Py_ssize_t i = 0; i < n; i++) {                                                 \
                T v = w[i];                                                                      \
                double d = (double)(T)(s[i] - v);                                                \
                delta += d * d;                                                                  \
                norm += (double)v * (double)v;                                                   \
                target[i] = v;                                                                   \
            }                                                                                    \
        } else {                                                                                 \
            _Pragma("omp simd reduction(+ : delta)")                                             \
            for (Py_ssize_t i = 0; i < n; i++) {                                                 \
                T d = (T)(s[i] - w[i]);                                                          \
                delta += (double)d * (double)d;                                                  \
                target[i] = d;                                                                   \
            }                                                                                    \
        }                                                                                        \
        *delta_out = delta;                                                                      \
        *norm_out = norm;                                                                        \
    }

DEFINE_UPDATE(update_float, float)
DEFINE_UPDATE(update_double, double)

typedef struct {
    const Buffers *weights, *snapshots, *targets;
    const Plan *plan;
    int keep;
    double *partial; /* two per block */
} UpdateJob;

static void update_part(void *data, int part, int parts) {
    const UpdateJob *job = data;
    const Plan *plan = job->plan;
    for (Py_ssize_t k = plan->first[part]; k < plan->first[part + 1]; k++) {
        const Block *b = &plan->blocks[k];
        const void *w = job->weights->views[b->array].buf, *s = job->snapshots->views[b->array].buf;
        void *target = job->targets->views[b->array].buf;
        double *out = &job->partial[2 * k];
        if (job->weights->sizes[b->array] == 4)
            update_float((const float *)w + b->start, (const float *)s + b->start, (float *)target + b->start,
                         b->count, job->keep, &out[0], &out[1]);
        else
            update_double((const double *)w + b->start, (const double *)s + b->start, (double *)target + b->start,
                          b->count, job->keep, &out[0], &out[1]);
    }
}

static int same_layout(const Buffers *a, const Buffers *b, const char *name) {
    if (a->count != b->count) {
        PyErr_Format(PyExc_ValueError, "update_norms() got %zd weights and %zd %s", a->count, b->count, name);
        return 0;
    }
    for (Py_ssize_t i = 0; i < a->count; i++) {
        const Py_buffer *x = &a->views[i], *y = &b->views[i];
        if (a->sizes[i] != b->sizes[i] || x->len != y->len) {
            PyErr_Format(PyExc_ValueError,
                         "update_norms(): weight %zd and its %s differ in dtype or size", i, name);
            return 0;
        }
        /* element k of the one block must be element k of the other */
        int same = x->ndim == y->ndim;
        for (int k = 0; same && k < x->ndim; k++)
            same = x->shape[k] == y->shape[k] && (x->shape[k] == 1 || fused_stride(x, k) == fused_stride(y, k));
        if (!same) {
            PyErr_Format(PyExc_ValueError,
                         "update_norms(): weight %zd and its %s differ in shape or memory layout", i, name);
            return 0;
        }
    }
    return 1;
}

PyObject *fused_update_norms(PyObject *module, PyObject *args) {
    PyObject *weights_in, *snapshots_in, *into_in = Py_None;
    int keep, threads = 1;
    if (!PyArg_ParseTuple(args, "OOp|Oi:update_norms", &weights_in, &snapshots_in, &keep, &into_in, &threads))
        return NULL;
    int spare = into_in != Py_None;
    Buffers weights, snapshots, into = {NULL, NULL, 0, 0};
    if (fused_acquire(weights_in, "update_norms() takes a sequence of weights", 0, &weights) < 0) return NULL;
    if (fused_acquire(snapshots_in, "update_norms() takes a sequence of snapshots", !spare, &snapshots) < 0) {
        fused_release(&weights);
        return NULL;
    }
    if (spare && fused_acquire(into_in, "update_norms(): into is a sequence of arrays", 1, &into) < 0) {
        fused_release(&weights);
        fused_release(&snapshots);
        return NULL;
    }
    double *norms = NULL, *partial = NULL;
    Plan plan = {NULL, 0, NULL, 1};
    if (!same_layout(&weights, &snapshots, "snapshots") || (spare && !same_layout(&weights, &into, "spares")))
        goto done;
    if (fused_plan(&weights, NULL, threads, &plan) < 0) goto done;
    norms = PyMem_Calloc(2 * (weights.count ? weights.count : 1), sizeof(double));
    partial = PyMem_Malloc(2 * (plan.count ? plan.count : 1) * sizeof(double));
    if (norms == NULL || partial == NULL) {
        PyMem_Free(norms);
        norms = NULL;
        PyErr_NoMemory();
        goto done;
    }
    UpdateJob job = {&weights, &snapshots, spare ? &into : &snapshots, &plan, keep, partial};
    Py_BEGIN_ALLOW_THREADS
    fused_run(update_part, &job, plan.parts);
    for (Py_ssize_t k = 0; k < plan.count; k++) { /* in block order */
        norms[2 * plan.blocks[k].array] += partial[2 * k];
        norms[2 * plan.blocks[k].array + 1] += partial[2 * k + 1];
    }
    Py_END_ALLOW_THREADS
done:;
    Py_ssize_t count = weights.count;
    PyMem_Free(partial);
    fused_plan_release(&plan);
    fused_release(&weights);
    fused_release(&snapshots);
    fused_release(&into);
    if (norms == NULL) return NULL;
    PyObject *out = PyList_New(count);
    for (Py_ssize_t i = 0; out != NULL && i < count; i++) {
        PyObject *row = Py_BuildValue("(dd)", norms[2 * i], norms[2 * i + 1]);
        if (row == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, row);
    }
    PyMem_Free(norms);
    return out;
}

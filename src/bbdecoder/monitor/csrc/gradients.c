/* The gradients' moments and statistics: moments(), statistics(). */

#include "fused.h"

#define DEFINE_MOMENTS(NAME, T)                                             \
    MULTIVERSION static void NAME(const T *x, Py_ssize_t n, Moments *out) { \
        double total = 0, l1 = 0, squares = 0, top = 0;                     \
        _Pragma("omp simd reduction(+ : total, l1, squares) reduction(max : top)") \
        for (Py_ssize_t i = 0; i < n; i++) {                                \
            double v = (double)x[i], magnitude = fabs(v);                   \
            total += v;                                                     \
            l1 += magnitude;                                                \
            squares += v * v;                                               \
            top = top > magnitude ? top : magnitude;                        \
        }                                                                   \
        out->total = total;                                                 \
        out->l1 = l1;                                                       \
        out->top = top;                                                     \
        out->squares = squares;                                             \
    }

DEFINE_MOMENTS(moments_float, float)
DEFINE_MOMENTS(moments_double, double)

typedef struct {
    const Buffers *in;
    const Plan *plan;
    Moments *partial; /* one per block */
} MomentsJob;

static void moments_part(void *data, int part, int parts) {
    const MomentsJob *job = data;
    const Plan *plan = job->plan;
    for (Py_ssize_t k = plan->first[part]; k < plan->first[part + 1]; k++) {
        const Block *b = &plan->blocks[k];
        const char *start = (const char *)job->in->views[b->array].buf;
        if (job->in->sizes[b->array] == 4)
            moments_float((const float *)start + b->start, b->count, &job->partial[k]);
        else
            moments_double((const double *)start + b->start, b->count, &job->partial[k]);
    }
}

/* The moments of every array (but those `skip` marks) on up to `threads` of torch's threads, the
   GIL released for the whole list; -1 with MemoryError set. */
static int read_moments(const Buffers *in, const char *skip, int threads, Moments *found) {
    Plan plan;
    if (fused_plan(in, skip, threads, &plan) < 0) return -1;
    Moments *partial = PyMem_Malloc((plan.count ? plan.count : 1) * sizeof(Moments));
    if (partial == NULL) {
        fused_plan_release(&plan);
        PyErr_NoMemory();
        return -1;
    }
    MomentsJob job = {in, &plan, partial};
    Py_BEGIN_ALLOW_THREADS
    fused_run(moments_part, &job, plan.parts);
    for (Py_ssize_t i = 0; i < in->count; i++)
        if (skip == NULL || !skip[i]) found[i] = (Moments){0, 0, 0, 0};
    for (Py_ssize_t k = 0; k < plan.count; k++) { /* in block order */
        Moments *m = &found[plan.blocks[k].array];
        const Moments *p = &partial[k];
        m->total += p->total;
        m->l1 += p->l1;
        m->squares += p->squares;
        m->top = m->top > p->top ? m->top : p->top;
    }
    Py_END_ALLOW_THREADS
    PyMem_Free(partial);
    fused_plan_release(&plan);
    return 0;
}

PyObject *fused_moments(PyObject *module, PyObject *args) {
    PyObject *arrays;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "O|i:moments", &arrays, &threads)) return NULL;
    Buffers in;
    if (fused_acquire(arrays, "moments() takes a sequence of arrays", 0, &in) < 0) return NULL;
    Moments *found = PyMem_Calloc(in.count ? in.count : 1, sizeof(Moments));
    if (found == NULL) {
        fused_release(&in);
        return PyErr_NoMemory();
    }
    if (read_moments(&in, NULL, threads, found) < 0) {
        PyMem_Free(found);
        fused_release(&in);
        return NULL;
    }
    fused_release(&in);
    PyObject *out = PyList_New(in.count);
    for (Py_ssize_t i = 0; out != NULL && i < in.count; i++) {
        PyObject *row = Py_BuildValue("(dddd)", found[i].total, found[i].l1, found[i].top, found[i].squares);
        if (row == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, row);
    }
    PyMem_Free(found);
    return out;
}

/* Reads (on up to `threads` of torch's threads) what `known` (None or a 4-tuple per array) does not hold, then the six statistics per row
   (mean, mean |g|, max |g|, var, L1, L2) as Python's moment_rows computes them, and which rows to
   redo exactly: the one-pass variance beyond `condition`, squares outside (smallest, largest),
   NaN/Inf. An empty array gives a row of NaN (not redone). */
PyObject *fused_statistics(PyObject *module, PyObject *args) {
    PyObject *arrays_in, *known_in;
    double condition, largest, smallest;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OOddd|i:statistics", &arrays_in, &known_in, &condition, &largest, &smallest,
                          &threads))
        return NULL;
    Buffers in;
    if (fused_acquire(arrays_in, "statistics() takes a sequence of arrays", 0, &in) < 0) return NULL;
    PyObject *known = PySequence_Fast(known_in, "statistics(): known is a sequence");
    Moments *found = NULL;
    char *have = NULL;
    PyObject *table = NULL, *redo = NULL, *out = NULL;
    if (known == NULL) goto done;
    if (PySequence_Fast_GET_SIZE(known) != in.count) {
        PyErr_SetString(PyExc_ValueError, "statistics(): one entry of known per array");
        goto done;
    }
    found = PyMem_Calloc(in.count ? in.count : 1, sizeof(Moments));
    have = PyMem_Calloc(in.count ? in.count : 1, 1);
    if (found == NULL || have == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < in.count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(known, i);
        if (item == Py_None) continue;
        if (!PyArg_ParseTuple(item, "dddd;known rows are (sum, sum |g|, max |g|, sum g^2)", &found[i].total,
                              &found[i].l1, &found[i].top, &found[i].squares))
            goto done;
        have[i] = 1;
    }
    if (read_moments(&in, have, threads, found) < 0) goto done;
    table = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(6 * sizeof(double)) * in.count);
    redo = PyList_New(0);
    if (table == NULL || redo == NULL) goto done;
    double *row = (double *)PyByteArray_AS_STRING(table);
    for (Py_ssize_t i = 0; i < in.count; i++, row += 6) {
        const Moments *m = &found[i];
        double n = (double)(in.views[i].len / in.sizes[i]);
        if (n == 0) {
            for (int k = 0; k < 6; k++) row[k] = Py_NAN;
            continue;
        }
        double mean = m->total / n, square_mean = m->squares / n, one_pass = square_mean - mean * mean;
        double var = one_pass > 0 || isnan(one_pass) ? one_pass : 0.0;
        row[0] = mean;
        row[1] = m->l1 / n;
        row[2] = m->top;
        row[3] = var;
        row[4] = m->l1;
        row[5] = sqrt(m->squares);
        int exact = square_mean <= condition * var || square_mean == 0;
        int fits = 4.0 * n * m->top * m->top < largest && (m->top > smallest || m->top == 0);
        if (!(exact && fits && isfinite(m->total + m->l1 + m->top + m->squares))) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(redo, index) < 0) {
                Py_XDECREF(index);
                goto done;
            }
            Py_DECREF(index);
        }
    }
    out = PyTuple_Pack(2, table, redo);
done:
    Py_XDECREF(table);
    Py_XDECREF(redo);
    Py_XDECREF(known);
    PyMem_Free(found);
    PyMem_Free(have);
    fused_release(&in);
    return out;
}

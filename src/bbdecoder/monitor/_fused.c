/* The monitor's CPU passes as single loops over memory: bbdecoder.monitor._fused.

   moments(arrays) and update_norms(weights, snapshots, keep, into) do what the NumPy functions of
   the same names in bbdecoder/monitor/cpu_reductions.py do, in one read of each array from memory
   and with the GIL released for the whole list (so the writer thread's passes run beside the
   training thread). Sums are accumulated in double per SIMD lane, so they are float64-exact up to
   the rounding of the additions; the maximum is exact. NaN/Inf make the sums non-finite (the caller
   redoes such rows; the maximum may then be anything).

   Arrays are objects with the buffer protocol (NumPy arrays), C-contiguous, float32 or float64;
   the arrays of one call need not share a dtype. Built as an optional extension (setup.py): where
   no compiler is found, cpu_reductions keeps its NumPy path. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
/* AVX2 where the CPU has it (chosen once, at load), SSE2 otherwise */
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

typedef struct {
    double total, l1, top, squares;
} Moments;

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

/* 4 for float32, 8 for float64, 0 (with a TypeError set) for anything else */
static int element_size(const Py_buffer *view, Py_ssize_t index) {
    const char *format = view->format ? view->format : "B";
    size_t length = strlen(format);
    char code = length ? format[length - 1] : 'B';
    int native = length == 1 || format[0] == '=' || format[0] == '@' ||
                 (format[0] == '<' && PY_LITTLE_ENDIAN) || (format[0] == '>' && !PY_LITTLE_ENDIAN);
    if (native && code == 'f' && view->itemsize == 4) return 4;
    if (native && code == 'd' && view->itemsize == 8) return 8;
    PyErr_Format(PyExc_TypeError,
                 "array %zd has format '%s': the fused kernels take native float32 or float64 arrays",
                 index, format);
    return 0;
}

/* The buffers of a sequence of arrays, all C-contiguous (and writable with `writable`). */
typedef struct {
    Py_buffer *views;
    int *sizes;
    Py_ssize_t count, acquired;
} Buffers;

static void release(Buffers *b) {
    for (Py_ssize_t i = 0; i < b->acquired; i++) PyBuffer_Release(&b->views[i]);
    PyMem_Free(b->views);
    PyMem_Free(b->sizes);
    b->views = NULL;
    b->sizes = NULL;
    b->acquired = 0;
}

static int acquire(PyObject *sequence, const char *what, int writable, Buffers *b) {
    b->views = NULL;
    b->sizes = NULL;
    b->acquired = 0;
    PyObject *fast = PySequence_Fast(sequence, what);
    if (fast == NULL) return -1;
    b->count = PySequence_Fast_GET_SIZE(fast);
    b->views = PyMem_Calloc(b->count ? b->count : 1, sizeof(Py_buffer));
    b->sizes = PyMem_Calloc(b->count ? b->count : 1, sizeof(int));
    if (b->views == NULL || b->sizes == NULL) {
        Py_DECREF(fast);
        release(b);
        PyErr_NoMemory();
        return -1;
    }
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    for (Py_ssize_t i = 0; i < b->count; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &b->views[i], flags) < 0) {
            Py_DECREF(fast);
            release(b);
            return -1;
        }
        b->acquired = i + 1;
        b->sizes[i] = element_size(&b->views[i], i);
        if (b->sizes[i] == 0) {
            Py_DECREF(fast);
            release(b);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

static PyObject *fused_moments(PyObject *module, PyObject *arrays) {
    Buffers in;
    if (acquire(arrays, "moments() takes a sequence of arrays", 0, &in) < 0) return NULL;
    Moments *found = PyMem_Calloc(in.count ? in.count : 1, sizeof(Moments));
    if (found == NULL) {
        release(&in);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < in.count; i++) {
        Py_ssize_t n = in.views[i].len / in.sizes[i];
        if (in.sizes[i] == 4)
            moments_float((const float *)in.views[i].buf, n, &found[i]);
        else
            moments_double((const double *)in.views[i].buf, n, &found[i]);
    }
    Py_END_ALLOW_THREADS
    release(&in);
    PyObject *out = PyList_New(in.count);
    for (Py_ssize_t i = 0; out != NULL && i < in.count; i++) {
        PyObject *row = Py_BuildValue("(dddd)", found[i].total, found[i].l1, found[i].top, found[i].squares);
        if (row == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, i, row);
    }
    PyMem_Free(found);
    return out;
}

static int same_layout(const Buffers *a, const Buffers *b, const char *name) {
    if (a->count != b->count) {
        PyErr_Format(PyExc_ValueError, "update_norms() got %zd weights and %zd %s", a->count, b->count, name);
        return 0;
    }
    for (Py_ssize_t i = 0; i < a->count; i++) {
        if (a->sizes[i] != b->sizes[i] || a->views[i].len != b->views[i].len) {
            PyErr_Format(PyExc_ValueError,
                         "update_norms(): weight %zd and its %s differ in dtype or size", i, name);
            return 0;
        }
    }
    return 1;
}

static PyObject *fused_update_norms(PyObject *module, PyObject *args) {
    PyObject *weights_in, *snapshots_in, *into_in = Py_None;
    int keep;
    if (!PyArg_ParseTuple(args, "OOp|O:update_norms", &weights_in, &snapshots_in, &keep, &into_in))
        return NULL;
    int spare = into_in != Py_None;
    Buffers weights, snapshots, into = {NULL, NULL, 0, 0};
    if (acquire(weights_in, "update_norms() takes a sequence of weights", 0, &weights) < 0) return NULL;
    if (acquire(snapshots_in, "update_norms() takes a sequence of snapshots", !spare, &snapshots) < 0) {
        release(&weights);
        return NULL;
    }
    if (spare && acquire(into_in, "update_norms(): into is a sequence of arrays", 1, &into) < 0) {
        release(&weights);
        release(&snapshots);
        return NULL;
    }
    double *norms = NULL;
    if (!same_layout(&weights, &snapshots, "snapshots") || (spare && !same_layout(&weights, &into, "spares")))
        goto done;
    norms = PyMem_Calloc(2 * (weights.count ? weights.count : 1), sizeof(double));
    if (norms == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < weights.count; i++) {
        Py_ssize_t n = weights.views[i].len / weights.sizes[i];
        void *target = spare ? into.views[i].buf : snapshots.views[i].buf;
        if (weights.sizes[i] == 4)
            update_float((const float *)weights.views[i].buf, (const float *)snapshots.views[i].buf,
                         (float *)target, n, keep, &norms[2 * i], &norms[2 * i + 1]);
        else
            update_double((const double *)weights.views[i].buf, (const double *)snapshots.views[i].buf,
                          (double *)target, n, keep, &norms[2 * i], &norms[2 * i + 1]);
    }
    Py_END_ALLOW_THREADS
done:;
    Py_ssize_t count = weights.count;
    release(&weights);
    release(&snapshots);
    release(&into);
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

static PyMethodDef fused_methods[] = {
    {"moments", fused_moments, METH_O,
     "moments(arrays) -> list of (sum(g), sum(|g|), max|g|, sum(g^2)) per array, float64 sums."},
    {"update_norms", fused_update_norms, METH_VARARGS,
     "update_norms(weights, snapshots, keep, into=None) -> list of (||s - w||^2, ||w||^2)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fused_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "bbdecoder.monitor._fused",
    .m_doc = "The monitor's CPU passes as single loops over memory (see cpu_reductions.py).",
    .m_size = -1,
    .m_methods = fused_methods,
};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&fused_module); }

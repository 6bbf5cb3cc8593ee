/* The monitor's CPU passes as single loops over memory: bbdecoder.monitor._fused.

   moments(arrays) and update_norms(weights, snapshots, keep, into) do what the NumPy functions of
   the same names in bbdecoder/monitor/cpu_reductions.py do (statistics() also the arithmetic of
   moment_rows.py on the moments), in one read of each array from memory
   and with the GIL released for the whole list (so the writer thread's passes run beside the
   training thread). Sums are accumulated in double per SIMD lane, so they are float64-exact up to
   the rounding of the additions; the maximum is exact. NaN/Inf make the sums non-finite (the caller
   redoes such rows; the maximum may then be anything).

   Arrays are objects with the buffer protocol (NumPy arrays), float32 or float64, dense in memory
   in any order of their axes (C-contiguous, channels-last, transposed); the arrays of one call need
   not share a dtype. A weight, its snapshot and its spare share a shape and a layout. Built as an optional extension (setup.py): where
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

/* One forward's activation output, per channel: the largest value (NaN if the channel holds one,
   as torch's amax), the sum (double), and the count of values below `low` / above `high` (each
   bound inclusive or not; NaN never counted). Memory order is (outer, channels, inner). */
typedef struct {
    double low, high;
    int low_inclusive, high_inclusive, counting;
} Rules;

/* Values are summed in T per piece of PIECE values (per SIMD lane: 128 or fewer, a relative error
   of ~1e-7), pieces in double; counts in int per piece. */
#define PIECE 1024

#define DEFINE_CHANNELS(NAME, T)                                                                        \
    MULTIVERSION static long long NAME(const T *x, Py_ssize_t outer, Py_ssize_t channels,               \
                                       Py_ssize_t inner, const Rules *r, T *maxima, int *nan,          \
                                       double *sums, T *partial) {                                     \
        const T low = (T)r->low, high = (T)r->high;                                                    \
        const int li = r->low_inclusive, hi = r->high_inclusive, counting = r->counting;              \
        long long count = 0;                                                                           \
        if (inner == 1) { /* channels last: along the channels, PIECE rows at a time */               \
            for (Py_ssize_t first = 0; first < outer; first += PIECE) {                               \
                Py_ssize_t last = first + PIECE < outer ? first + PIECE : outer;                      \
                for (Py_ssize_t c = 0; c < channels; c++) partial[c] = 0;                              \
                for (Py_ssize_t o = first; o < last; o++) {                                            \
                    const T *row = x + o * channels;                                                  \
                    int hits = 0;                                                                      \
                    _Pragma("omp simd reduction(+ : hits)")                                            \
                    for (Py_ssize_t c = 0; c < channels; c++) {                                        \
                        T v = row[c];                                                                  \
                        maxima[c] = ((v > maxima[c]) | (v != v)) ? v : maxima[c]; /* NaN stays */     \
                        partial[c] += v;                                                               \
                        hits += (v < low) + (li & (v == low)) + (v > high) + (hi & (v == high));              \
                    }                                                                                  \
                    count += hits;                                                                     \
                }                                                                                      \
                for (Py_ssize_t c = 0; c < channels; c++) sums[c] += partial[c];                       \
            }                                                                                          \
            return counting ? count : 0;                                                               \
        }                                                                                              \
        for (Py_ssize_t o = 0; o < outer; o++) {                                                       \
            for (Py_ssize_t c = 0; c < channels; c++) {                                                \
                const T *block = x + (o * channels + c) * inner;                                      \
                T top = maxima[c];                                                                     \
                int seen_nan = 0;                                                                      \
                double total = 0;                                                                      \
                for (Py_ssize_t first = 0; first < inner; first += PIECE) {                           \
                    Py_ssize_t last = first + PIECE < inner ? first + PIECE : inner;                  \
                    T piece = 0;                                                                       \
                    int hits = 0;                                                                      \
                    _Pragma("omp simd reduction(max : top) reduction(+ : piece, hits) reduction(| : seen_nan)") \
                    for (Py_ssize_t i = first; i < last; i++) {                                        \
                        T v = block[i];                                                                \
                        top = v > top ? v : top;                                                       \
                        seen_nan |= v != v;                                                            \
                        piece += v;                                                                    \
                        hits += (v < low) + (li & (v == low)) + (v > high) + (hi & (v == high));              \
                    }                                                                                  \
                    total += piece;                                                                    \
                    count += hits;                                                                     \
                }                                                                                      \
                maxima[c] = top;                                                                       \
                nan[c] |= seen_nan;                                                                    \
                sums[c] += total;                                                                      \
            }                                                                                          \
        }                                                                                              \
        return counting ? count : 0;                                                                   \
    }

DEFINE_CHANNELS(channels_float, float)
DEFINE_CHANNELS(channels_double, double)

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

/* 1 where the elements of `view` fill one block of memory in some order of their axes (C- or
   F-contiguous, channels-last, any permutation: the passes read the block from its start, and the
   sums and the maximum do not depend on the order), else 0 with a ValueError set. */
static int dense(const Py_buffer *view, Py_ssize_t index) {
    Py_ssize_t strides[PyBUF_MAX_NDIM], extents[PyBUF_MAX_NDIM];
    int axes = 0;
    if (view->len == 0 || view->strides == NULL) return 1;
    for (int k = 0; k < view->ndim; k++) {
        if (view->shape[k] == 1) continue;  /* any stride */
        if (view->strides[k] <= 0) goto fail;
        /* insertion sort by stride: few axes */
        int at = axes++;
        while (at > 0 && strides[at - 1] > view->strides[k]) {
            strides[at] = strides[at - 1];
            extents[at] = extents[at - 1];
            at--;
        }
        strides[at] = view->strides[k];
        extents[at] = view->shape[k];
    }
    Py_ssize_t expected = view->itemsize;
    for (int k = 0; k < axes; k++) {
        if (strides[k] != expected) goto fail;
        expected *= extents[k];
    }
    return 1;
fail:
    PyErr_Format(PyExc_ValueError,
                 "array %zd is not dense in memory (a strided view): make it contiguous first", index);
    return 0;
}

/* The buffers of a sequence of arrays, all dense in memory (and writable with `writable`). */
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
    int flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    for (Py_ssize_t i = 0; i < b->count; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &b->views[i], flags) < 0) {
            Py_DECREF(fast);
            release(b);
            return -1;
        }
        b->acquired = i + 1;
        b->sizes[i] = element_size(&b->views[i], i);
        if (b->sizes[i] == 0 || !dense(&b->views[i], i)) {
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

static Py_ssize_t stride(const Py_buffer *view, int axis) {
    return view->strides ? view->strides[axis] : 0; /* no strides: C-contiguous */
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
            same = x->shape[k] == y->shape[k] && (x->shape[k] == 1 || stride(x, k) == stride(y, k));
        if (!same) {
            PyErr_Format(PyExc_ValueError,
                         "update_norms(): weight %zd and its %s differ in shape or memory layout", i, name);
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

/* Reads what `known` (None or a 4-tuple per array) does not hold, then the six statistics per row
   (mean, mean |g|, max |g|, var, L1, L2) as Python's moment_rows computes them, and which rows to
   redo exactly: the one-pass variance beyond `condition`, squares outside (smallest, largest),
   NaN/Inf. An empty array gives a row of NaN (not redone). */
static PyObject *fused_statistics(PyObject *module, PyObject *args) {
    PyObject *arrays_in, *known_in;
    double condition, largest, smallest;
    if (!PyArg_ParseTuple(args, "OOddd:statistics", &arrays_in, &known_in, &condition, &largest, &smallest))
        return NULL;
    Buffers in;
    if (acquire(arrays_in, "statistics() takes a sequence of arrays", 0, &in) < 0) return NULL;
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
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < in.count; i++) {
        if (have[i]) continue;
        Py_ssize_t n = in.views[i].len / in.sizes[i];
        if (in.sizes[i] == 4)
            moments_float((const float *)in.views[i].buf, n, &found[i]);
        else
            moments_double((const double *)in.views[i].buf, n, &found[i]);
    }
    Py_END_ALLOW_THREADS
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
    release(&in);
    return out;
}

/* A rule (op, bound), op 0..3 = lt, le, gt, ge, into `r`; 0 with a ValueError set if not one. */
static int add_rule(PyObject *rule, Rules *r) {
    int op;
    double bound;
    if (!PyArg_ParseTuple(rule, "id;a saturation rule is (op, bound)", &op, &bound)) return 0;
    if (op < 0 || op > 3 || (op < 2 && r->low != -Py_HUGE_VAL) || (op >= 2 && r->high != Py_HUGE_VAL)) {
        PyErr_SetString(PyExc_ValueError, "saturation rules: at most one lower (lt/le) and one upper (gt/ge) bound");
        return 0;
    }
    if (op < 2) {
        r->low = bound;
        r->low_inclusive = op == 1;
    } else {
        r->high = bound;
        r->high_inclusive = op == 3;
    }
    return 1;
}

/* probe_update(y, channels, inner, rules, maxima, scalars): one forward into an activation
   probe's state. `maxima` (channels,) float32 becomes max(maxima, channel max) (NaN propagates);
   `scalars` are the probe's four float64 0-d arrays (saturated, total, channel_var, forwards):
   with rules, saturated += the count and total += the size; channel_var += the population
   variance of the channel means (in double); forwards += 1. */
static PyObject *fused_probe_update(PyObject *module, PyObject *args) {
    PyObject *y_in, *rules_in, *maxima_in, *scalars_in;
    Py_ssize_t channels, inner;
    if (!PyArg_ParseTuple(args, "OnnOOO:probe_update", &y_in, &channels, &inner, &rules_in, &maxima_in, &scalars_in))
        return NULL;
    Rules rules = {-Py_HUGE_VAL, Py_HUGE_VAL, 0, 0, 0};
    PyObject *fast_rules = PySequence_Fast(rules_in, "probe_update(): rules is a sequence of (op, bound)");
    if (fast_rules == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(fast_rules); i++) {
        if (!add_rule(PySequence_Fast_GET_ITEM(fast_rules, i), &rules)) {
            Py_DECREF(fast_rules);
            return NULL;
        }
    }
    rules.counting = PySequence_Fast_GET_SIZE(fast_rules) > 0;
    Py_DECREF(fast_rules);
    PyObject *seq = PyTuple_Pack(1, y_in), *out = NULL;
    if (seq == NULL) return NULL;
    Buffers y, maxima, scalars;
    int have_y = 0, have_maxima = 0, have_scalars = 0;
    double *sums = NULL;
    void *partial = NULL, *top = NULL; /* float or double, as the output */
    int *nan = NULL;
    if (acquire(seq, "", 0, &y) < 0) goto done;
    have_y = 1;
    if (acquire(maxima_in, "probe_update(): maxima is a sequence of one array", 1, &maxima) < 0) goto done;
    have_maxima = 1;
    if (acquire(scalars_in, "probe_update(): scalars is a sequence of four arrays", 1, &scalars) < 0) goto done;
    have_scalars = 1;
    Py_ssize_t n = y.views[0].len / y.sizes[0];
    if (channels <= 0 || inner <= 0 || n == 0 || n % (channels * inner)) {
        PyErr_Format(PyExc_ValueError, "probe_update(): %zd elements are not (outer, %zd, %zd)", n, channels, inner);
        goto done;
    }
    if (maxima.count != 1 || maxima.sizes[0] != 4 || maxima.views[0].len != 4 * channels) {
        PyErr_SetString(PyExc_ValueError, "probe_update(): maxima is one float32 array of one value per channel");
        goto done;
    }
    if (scalars.count != 4) {
        PyErr_SetString(PyExc_ValueError, "probe_update(): four float64 scalars (saturated, total, channel_var, forwards)");
        goto done;
    }
    for (int k = 0; k < 4; k++) {
        if (scalars.sizes[k] != 8 || scalars.views[k].len != 8) {
            PyErr_SetString(PyExc_ValueError, "probe_update(): four float64 scalars (saturated, total, channel_var, forwards)");
            goto done;
        }
    }
    sums = PyMem_Calloc(channels, sizeof(double));
    top = PyMem_Malloc(channels * sizeof(double)); /* room for either */
    nan = PyMem_Calloc(channels, sizeof(int));
    partial = PyMem_Malloc(channels * sizeof(double)); /* room for T = double */
    if (sums == NULL || top == NULL || nan == NULL || partial == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *state = (float *)maxima.views[0].buf;
    double *counters[4];
    for (int k = 0; k < 4; k++) counters[k] = (double *)scalars.views[k].buf;
    Py_ssize_t outer = n / (channels * inner);
    long long saturated;
    double variance;
    Py_BEGIN_ALLOW_THREADS
    int wide = y.sizes[0] == 8;
    for (Py_ssize_t c = 0; c < channels; c++) {
        if (wide)
            ((double *)top)[c] = -Py_HUGE_VAL;
        else
            ((float *)top)[c] = -(float)Py_HUGE_VAL;
    }
    if (wide)
        saturated = channels_double((const double *)y.views[0].buf, outer, channels, inner, &rules, (double *)top,
                                    nan, sums, (double *)partial);
    else
        saturated = channels_float((const float *)y.views[0].buf, outer, channels, inner, &rules, (float *)top, nan,
                                   sums, (float *)partial);
    double count = (double)(outer * inner), grand = 0, spread = 0;
    for (Py_ssize_t c = 0; c < channels; c++) {
        float largest = wide ? (float)((double *)top)[c] : ((float *)top)[c];
        float channel_max = nan[c] ? (float)Py_NAN : largest;
        state[c] = state[c] != state[c] || channel_max != channel_max ? (float)Py_NAN
                   : (state[c] > channel_max ? state[c] : channel_max);
        sums[c] /= count; /* the channel's mean */
        grand += sums[c];
    }
    grand /= (double)channels;
    for (Py_ssize_t c = 0; c < channels; c++) spread += (sums[c] - grand) * (sums[c] - grand);
    variance = spread / (double)channels;
    Py_END_ALLOW_THREADS
    if (rules.counting) {
        *counters[0] += (double)saturated;
        *counters[1] += (double)n;
    }
    *counters[2] += variance;
    *counters[3] += 1;
    out = Py_NewRef(Py_None);
done:
    PyMem_Free(sums);
    PyMem_Free(top);
    PyMem_Free(nan);
    PyMem_Free(partial);
    if (have_scalars) release(&scalars);
    if (have_maxima) release(&maxima);
    if (have_y) release(&y);
    Py_DECREF(seq);
    return out;
}

static PyMethodDef fused_methods[] = {
    {"moments", fused_moments, METH_O,
     "moments(arrays) -> list of (sum(g), sum(|g|), max|g|, sum(g^2)) per array, float64 sums."},
    {"statistics", fused_statistics, METH_VARARGS,
     "statistics(arrays, known, condition, largest, smallest) -> (bytearray of (n, 6) float64 rows, "
     "indices of the rows to redo)."},
    {"probe_update", fused_probe_update, METH_VARARGS,
     "probe_update(y, channels, inner, rules, maxima, scalars): one forward into an activation probe's state."},
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

/* The per-tensor alert rules over one step's finite table in one call: what
   bbdecoder/alerts/tensor_rules.py does with some forty NumPy operations on arrays of a few
   elements, each of which costs microseconds from the cold caches a training step leaves.

   norm_rules() and ratio_rules() take the table (a 2-D float64 array), the column of the statistic
   and each row's state index (distinct), and update the TensorState arrays in place exactly as the
   NumPy path does, returning the onsets for Python to turn into alerts. Where a rule needs Python
   (a bias whose verdict depends on its layer's weight: a vanishing candidate, a ratio above the
   band) they return None before anything is changed, and the NumPy path judges the table. */

#include "fused.h"

typedef struct {
    Py_buffer view;
    int held;
} View;

/* 1 where `view` holds native elements of kind `code` ('d' float64, 'q' int64, '?' bool) in
   `ndim` dimensions */
static int of_kind(const Py_buffer *view, char code, int ndim) {
    const char *format = view->format ? view->format : "B";
    size_t length = strlen(format);
    char last = length ? format[length - 1] : 'B';
    int native = length == 1 || format[0] == '=' || format[0] == '@' || (format[0] == '<' && PY_LITTLE_ENDIAN);
    if (!native || view->ndim != ndim) return 0;
    if (code == 'd') return last == 'd' && view->itemsize == 8;
    if (code == 'q') return (last == 'q' || last == 'l') && view->itemsize == 8;
    return last == '?' && view->itemsize == 1;
}

/* 1: taken; 0: not an array of that kind (nothing held, no error set) */
static int take(PyObject *object, char code, int ndim, int writable, View *v) {
    int flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, &v->view, flags) < 0) { /* not an array of ours: the NumPy path */
        PyErr_Clear();
        return 0;
    }
    v->held = 1;
    if (!of_kind(&v->view, code, ndim)) {
        PyBuffer_Release(&v->view);
        v->held = 0;
        return 0;
    }
    return 1;
}

static void release(View *views, int count) {
    for (int i = 0; i < count; i++)
        if (views[i].held) PyBuffer_Release(&views[i].view);
}

#define AT(v, type, i) (*(type *)((char *)(v).view.buf + (i) * (v).view.strides[0]))
#define CELL(v, type, i, j) \
    (*(type *)((char *)(v).view.buf + (i) * (v).view.strides[0] + (j) * (v).view.strides[1]))
#define VALUE(i) CELL(*table, double, i, column)       /* row i's value of the judged statistic */
#define STATE(i) ((Py_ssize_t)AT(*index, long long, i)) /* row i's tensor */

/* The table's column and the state indices, checked: 1 ready, 0 not this path, -1 error. */
static int table_column(View *table, View *index, Py_ssize_t column, Py_ssize_t states) {
    Py_ssize_t rows = table->view.shape[0];
    if (column < 0 || column >= table->view.shape[1] || index->view.shape[0] != rows) return 0;
    for (Py_ssize_t i = 0; i < rows; i++) {
        long long k = AT(*index, long long, i);
        if (k < 0 || k >= states) {
            PyErr_Format(PyExc_IndexError, "state index %lld of row %zd is outside the %zd tensors", k, i, states);
            return -1;
        }
    }
    return 1;
}

/* The median of the finite values of row k of the window (its remembered norms), as
   statistics.median computes it; `count` of them, at most the window's width. */
static double window_median(View *window, Py_ssize_t k, Py_ssize_t *count) {
    double ordered[256];
    Py_ssize_t width = window->view.shape[1], n = 0;
    for (Py_ssize_t j = 0; j < width && n < 256; j++) {
        double value = CELL(*window, double, k, j);
        if (isnan(value)) continue;
        Py_ssize_t at = n++;
        while (at > 0 && ordered[at - 1] > value) {
            ordered[at] = ordered[at - 1];
            at--;
        }
        ordered[at] = value;
    }
    *count = n;
    if (n == 0) return NAN;
    return n % 2 ? ordered[n / 2] : (ordered[n / 2 - 1] + ordered[n / 2]) / 2;
}

/* norm_rules(table, column, index, window, filled, next_slot, peak, low_norm, had_gradient,
   exploding, vanishing, config) with config = (exploding_on, factor, floor, min_history,
   vanishing_on, relative, absolute, patience) -> list of (row, median, peak, limit, history) of
   the exploding onsets, or None (the NumPy path must judge this table; nothing changed). */
PyObject *fused_norm_rules(PyObject *module, PyObject *args) {
    PyObject *objects[10];
    Py_ssize_t column;
    int explode_on, vanish_on;
    double factor, floor_, relative, absolute;
    long long min_history, patience;
    if (!PyArg_ParseTuple(args, "OnOOOOOOOOO(pddLpddL):norm_rules", &objects[0], &column, &objects[1], &objects[2],
                          &objects[3], &objects[4], &objects[5], &objects[6], &objects[7], &objects[8], &objects[9],
                          &explode_on, &factor, &floor_, &min_history, &vanish_on, &relative, &absolute, &patience))
        return NULL;
    static const char codes[10] = {'d', 'q', 'd', 'q', 'q', 'd', 'q', '?', '?', '?'};
    static const int dims[10] = {2, 1, 2, 1, 1, 1, 1, 1, 1, 1};
    View v[10] = {{{0}}};
    PyObject *out = NULL;
    for (int taken = 0; taken < 10; taken++) {
        if (!take(objects[taken], codes[taken], dims[taken], taken >= 2, &v[taken])) goto fallback;
    }
    View *table = &v[0], *index = &v[1], *window = &v[2];
    Py_ssize_t states = v[3].view.shape[0];
    if (window->view.shape[0] != states || window->view.shape[1] > 256) goto fallback;
    for (int i = 4; i < 10; i++)
        if (v[i].view.shape[0] != states) goto fallback;
    int ready = table_column(table, index, column, states);
    if (ready < 0) goto done;
    if (ready == 0) goto fallback;
    Py_ssize_t rows = table->view.shape[0], width = window->view.shape[1];
    double largest = 0.0;
    for (Py_ssize_t i = 0; i < rows; i++) {
        if (!isfinite(VALUE(i))) goto fallback;
        largest = i == 0 || VALUE(i) > largest ? VALUE(i) : largest;
    }
    double vanish_limit = fmax(relative * largest, absolute);
    if (vanish_on) /* a vanishing candidate: its verdict may depend on its layer's weight */
        for (Py_ssize_t i = 0; i < rows; i++) {
            long long low = VALUE(i) < vanish_limit ? AT(v[6], long long, STATE(i)) + 1 : 0;
            if (low >= patience && AT(v[7], char, STATE(i))) goto fallback;
        }
    out = PyList_New(0);
    if (out == NULL) goto done;
    if (explode_on)
        for (Py_ssize_t i = 0; i < rows; i++) {
            Py_ssize_t k = STATE(i), history;
            long long filled = AT(v[3], long long, k);
            if (filled < min_history) continue;
            double median = window_median(window, k, &history);
            double peak = fmax(AT(v[5], double, k), median);
            double limit = fmax(factor * median, floor_ * peak);
            char bad = median > 0 && VALUE(i) > limit;
            char onset = bad && !AT(v[8], char, k);
            AT(v[5], double, k) = peak;
            AT(v[8], char, k) = bad;
            if (onset) {
                PyObject *item = Py_BuildValue("(ndddL)", i, median, peak, limit, filled);
                if (item == NULL || PyList_Append(out, item) < 0) {
                    Py_XDECREF(item);
                    Py_CLEAR(out);
                    goto done;
                }
                Py_DECREF(item);
            }
        }
    for (Py_ssize_t i = 0; i < rows; i++) { /* remember: each tensor's window of norms */
        Py_ssize_t k = STATE(i);
        long long slot = AT(v[4], long long, k);
        if (slot < 0 || slot >= width) slot = 0;
        CELL(*window, double, k, slot) = VALUE(i);
        AT(v[4], long long, k) = slot + 1 == width ? 0 : slot + 1;
        long long filled = AT(v[3], long long, k) + 1;
        AT(v[3], long long, k) = filled < width ? filled : width;
    }
    if (vanish_on)
        for (Py_ssize_t i = 0; i < rows; i++) {
            Py_ssize_t k = STATE(i);
            long long low = VALUE(i) < vanish_limit ? AT(v[6], long long, k) + 1 : 0;
            AT(v[6], long long, k) = low;
            if (low == 0) AT(v[7], char, k) = 1;
            AT(v[9], char, k) = 0; /* no candidate (checked above): nothing vanished */
        }
    goto done;
fallback:
    out = Py_NewRef(Py_None);
done:
    release(v, 10);
    return out;
}

/* ratio_rules(table, column, index, low_ratio, ratio_band, (low, high, patience)) -> list of
   (row, run) of the onsets below the band, or None (a ratio above the band: a bias's verdict may
   depend on its layer's weight; nothing changed). */
PyObject *fused_ratio_rules(PyObject *module, PyObject *args) {
    PyObject *objects[4];
    Py_ssize_t column;
    double low_limit, high_limit;
    long long patience;
    if (!PyArg_ParseTuple(args, "OnOOO(ddL):ratio_rules", &objects[0], &column, &objects[1], &objects[2], &objects[3],
                          &low_limit, &high_limit, &patience))
        return NULL;
    static const char codes[4] = {'d', 'q', 'q', '?'};
    static const int dims[4] = {2, 1, 1, 1};
    View v[4] = {{{0}}};
    PyObject *out = NULL;
    for (int taken = 0; taken < 4; taken++) {
        if (!take(objects[taken], codes[taken], dims[taken], taken >= 2, &v[taken])) goto fallback;
    }
    View *table = &v[0], *index = &v[1];
    Py_ssize_t states = v[2].view.shape[0];
    if (v[3].view.shape[0] != states) goto fallback;
    int ready = table_column(table, index, column, states);
    if (ready < 0) goto done;
    if (ready == 0) goto fallback;
    Py_ssize_t rows = table->view.shape[0];
    for (Py_ssize_t i = 0; i < rows; i++)
        if (!isfinite(VALUE(i)) || VALUE(i) > high_limit) goto fallback;
    out = PyList_New(0);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < rows; i++) {
        Py_ssize_t k = STATE(i);
        long long low = VALUE(i) < low_limit ? AT(v[2], long long, k) + 1 : 0;
        char bad = low >= patience, onset = bad && !AT(v[3], char, k);
        AT(v[2], long long, k) = low;
        AT(v[3], char, k) = bad;
        if (onset) {
            PyObject *item = Py_BuildValue("(nL)", i, low);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_CLEAR(out);
                goto done;
            }
            Py_DECREF(item);
        }
    }
    goto done;
fallback:
    out = Py_NewRef(Py_None);
done:
    release(v, 4);
    return out;
}

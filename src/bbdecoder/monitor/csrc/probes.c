/* An activation probe's update in one read of the output: probe_update(). */

#include "probe_loops.h"

typedef struct {
    const void *x;
    int wide; /* float64 */
    Py_ssize_t outer, channels, inner, units;
    const Rules *rules;
    char *maxima, *partial; /* per part: `channels` values of the output's type */
    int *nan;               /* per part: `channels` flags */
    long long *counts;      /* per part */
    double *totals;         /* (units, channels) */
} ProbeJob;

static void probe_part(void *data, int part, int parts) {
    const ProbeJob *job = data;
    Py_ssize_t first = job->units * part / parts, last = job->units * (part + 1) / parts, c = job->channels;
    size_t width = job->wide ? sizeof(double) : sizeof(float);
    void *maxima = job->maxima + (size_t)part * c * width, *partial = job->partial + (size_t)part * c * width;
    int *nan = job->nan + (size_t)part * c;
    for (Py_ssize_t k = 0; k < c; k++) {
        nan[k] = 0;
        if (job->wide)
            ((double *)maxima)[k] = -Py_HUGE_VAL;
        else
            ((float *)maxima)[k] = -(float)Py_HUGE_VAL;
    }
    if (job->wide)
        job->counts[part] = channels_double((const double *)job->x, first, last, job->outer, c, job->inner, job->rules,
                                            (double *)maxima, nan, job->totals, (double *)partial);
    else
        job->counts[part] = channels_float((const float *)job->x, first, last, job->outer, c, job->inner, job->rules,
                                           (float *)maxima, nan, job->totals, (float *)partial);
}

/* The channel's largest value over the parts, NaN where any part saw one (either way). */
static float part_maximum(const ProbeJob *job, Py_ssize_t c, int parts) {
    float largest = -(float)Py_HUGE_VAL;
    for (int part = 0; part < parts; part++) {
        Py_ssize_t at = (Py_ssize_t)part * job->channels + c;
        float value = job->wide ? (float)((const double *)job->maxima)[at] : ((const float *)job->maxima)[at];
        if (job->nan[at] || value != value) return (float)Py_NAN;
        largest = value > largest ? value : largest;
    }
    return largest;
}

/* A rule (op, bound), op 0..3 = lt, le, gt, ge, into `r`; 0 with a ValueError set if not one. */
static int add_rule(PyObject *rule, Rules *r) {
    int op;
    double bound;
    if (!PyArg_ParseTuple(rule, "id;a saturation rule is (op, bound)", &op, &bound)) return 0;
    if (op < 0 || op > 3 || (op < 2 && r->low_mode != NO_BOUND) || (op >= 2 && r->high_mode != NO_BOUND)) {
        PyErr_SetString(PyExc_ValueError, "saturation rules: at most one lower (lt/le) and one upper (gt/ge) bound");
        return 0;
    }
    if (op < 2) {
        r->low = bound;
        r->low_mode = op == 1 ? INCLUSIVE : STRICT;
    } else {
        r->high = bound;
        r->high_mode = op == 3 ? INCLUSIVE : STRICT;
    }
    return 1;
}

/* One forward's output of `n` values of `width` bytes at `data` (dense, in memory order (outer,
   channels, inner)) into an activation probe's state: `maxima` (channels,) float32 becomes
   max(maxima, channel max) (NaN propagates); `scalars` are the probe's four float64 0-d arrays
   (saturated, total, channel_var, forwards): with rules, saturated += the count and total += n;
   channel_var += the population variance of the channel means (in double); forwards += 1. */
static PyObject *probe_run(const void *data, size_t width, Py_ssize_t n, Py_ssize_t channels, Py_ssize_t inner,
                           PyObject *rules_in, PyObject *maxima_in, PyObject *scalars_in, int threads) {
    Rules rules = {-Py_HUGE_VAL, Py_HUGE_VAL, 0, NO_BOUND, NO_BOUND};
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
    PyObject *out = NULL;
    Buffers maxima, scalars;
    int have_maxima = 0, have_scalars = 0;
    ProbeJob job = {NULL, 0, 0, 0, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL};
    if (fused_acquire(maxima_in, "probe_update(): maxima is a sequence of one array", 1, &maxima) < 0) goto done;
    have_maxima = 1;
    if (fused_acquire(scalars_in, "probe_update(): scalars is a sequence of four arrays", 1, &scalars) < 0) goto done;
    have_scalars = 1;
    if (channels <= 0 || inner <= 0 || n <= 0 || n % (channels * inner)) {
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
    Py_ssize_t outer = n / (channels * inner), rows = unit_rows(channels);
    Py_ssize_t units = inner == 1 ? (outer + rows - 1) / rows : outer;
    int parts = fused_parts(n, threads);
    parts = parts < units ? parts : (int)units;
    job = (ProbeJob){data, width == 8, outer, channels, inner, units, &rules, NULL, NULL, NULL, NULL, NULL};
    job.maxima = PyMem_Malloc(parts * channels * width);
    job.partial = PyMem_Malloc(parts * channels * width);
    job.nan = PyMem_Malloc(parts * channels * sizeof(int));
    job.counts = PyMem_Malloc(parts * sizeof(long long));
    job.totals = PyMem_Malloc(units * channels * sizeof(double));
    if (job.maxima == NULL || job.partial == NULL || job.nan == NULL || job.counts == NULL || job.totals == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *state = (float *)maxima.views[0].buf;
    double *counters[4];
    for (int k = 0; k < 4; k++) counters[k] = (double *)scalars.views[k].buf;
    long long saturated = 0;
    double variance;
    Py_BEGIN_ALLOW_THREADS
    fused_run(probe_part, &job, parts);
    for (int part = 0; part < parts; part++) saturated += job.counts[part];
    double count = (double)(outer * inner), grand = 0, spread = 0;
    for (Py_ssize_t c = 0; c < channels; c++) {
        float channel_max = part_maximum(&job, c, parts);
        state[c] = state[c] != state[c] || channel_max != channel_max ? (float)Py_NAN
                   : (state[c] > channel_max ? state[c] : channel_max);
        double total = 0; /* in unit order */
        for (Py_ssize_t unit = 0; unit < units; unit++) total += job.totals[unit * channels + c];
        job.totals[c] = total / count; /* the channel's mean (unit 0's row is no longer read) */
        grand += job.totals[c];
    }
    grand /= (double)channels;
    for (Py_ssize_t c = 0; c < channels; c++) spread += (job.totals[c] - grand) * (job.totals[c] - grand);
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
    PyMem_Free(job.maxima);
    PyMem_Free(job.partial);
    PyMem_Free(job.nan);
    PyMem_Free(job.counts);
    PyMem_Free(job.totals);
    if (have_scalars) fused_release(&scalars);
    if (have_maxima) fused_release(&maxima);
    return out;
}

/* probe_update(y, channels, inner, rules, maxima, scalars, threads=1): `y` an array (float32 or
   float64, dense in memory). */
PyObject *fused_probe_update(PyObject *module, PyObject *args) {
    PyObject *y_in, *rules_in, *maxima_in, *scalars_in;
    Py_ssize_t channels, inner;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OnnOOO|i:probe_update", &y_in, &channels, &inner, &rules_in, &maxima_in, &scalars_in,
                          &threads))
        return NULL;
    PyObject *seq = PyTuple_Pack(1, y_in), *out = NULL;
    if (seq == NULL) return NULL;
    Buffers y;
    if (fused_acquire(seq, "", 0, &y) == 0) {
        out = probe_run(y.views[0].buf, (size_t)y.sizes[0], y.views[0].len / y.sizes[0], channels, inner, rules_in,
                        maxima_in, scalars_in, threads);
        fused_release(&y);
    }
    Py_DECREF(seq);
    return out;
}

/* probe_update_at(address, elements, wide, channels, inner, rules, maxima, scalars, threads=1): the
   output as `elements` float32 (float64 where `wide`) values dense at `address` (a CPU tensor's
   data_ptr(): one attribute read where a NumPy view costs a detach() and a numpy() call, each
   several microseconds from the cold caches a forward pass leaves). The caller keeps the tensor
   alive, dense and of that dtype for the call. */
PyObject *fused_probe_update_at(PyObject *module, PyObject *args) {
    unsigned long long address;
    Py_ssize_t elements, channels, inner;
    int wide, threads = 1;
    PyObject *rules_in, *maxima_in, *scalars_in;
    if (!PyArg_ParseTuple(args, "KnpnnOOO|i:probe_update_at", &address, &elements, &wide, &channels, &inner, &rules_in,
                          &maxima_in, &scalars_in, &threads))
        return NULL;
    if (address == 0) {
        PyErr_SetString(PyExc_ValueError, "probe_update_at(): no data at address 0");
        return NULL;
    }
    return probe_run((const void *)(uintptr_t)address, wide ? sizeof(double) : sizeof(float), elements, channels, inner,
                     rules_in, maxima_in, scalars_in, threads);
}

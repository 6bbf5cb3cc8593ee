/* An activation probe's update in one read of the output: probe_update(). */

#include "fused.h"

/* One forward's activation output, per channel: the largest value (NaN if the channel holds one,
   as torch's amax), the sum (double), and the count of values below `low` / above `high` (each
   bound inclusive or not; NaN never counted). Memory order is (outer, channels, inner). */
typedef struct {
    double low, high;
    int low_inclusive, high_inclusive, counting;
} Rules;

/* Values are summed in T per piece of PIECE values (per SIMD lane: 128 or fewer, a relative error
   of ~1e-7), pieces in double; counts in int per piece. A unit is a row of the outer dimension
   (channels first: each channel's `inner` values) or PIECE rows (channels last); each unit's sum
   per channel goes to `totals` (units, channels), added up in unit order afterwards, so the sums do
   not depend on how the units are split among threads. `maxima` (NaN sticks) and `nan` are the
   part's own, `partial` its scratch. */
#define PIECE 1024

#define DEFINE_CHANNELS(NAME, T)                                                                        \
    MULTIVERSION static long long NAME(const T *x, Py_ssize_t first_unit, Py_ssize_t last_unit,         \
                                       Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,         \
                                       const Rules *r, T *maxima, int *nan, double *totals, T *partial) { \
        const T low = (T)r->low, high = (T)r->high;                                                    \
        const int li = r->low_inclusive, hi = r->high_inclusive, counting = r->counting;              \
        long long count = 0;                                                                           \
        if (inner == 1) { /* channels last: along the channels, PIECE rows at a time */               \
            for (Py_ssize_t unit = first_unit; unit < last_unit; unit++) {                            \
                Py_ssize_t first = unit * PIECE, last = first + PIECE < outer ? first + PIECE : outer; \
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
                for (Py_ssize_t c = 0; c < channels; c++) totals[unit * channels + c] = partial[c];    \
            }                                                                                          \
            return counting ? count : 0;                                                               \
        }                                                                                              \
        for (Py_ssize_t o = first_unit; o < last_unit; o++) {                                          \
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
                totals[o * channels + c] = total;                                                      \
            }                                                                                          \
        }                                                                                              \
        return counting ? count : 0;                                                                   \
    }

DEFINE_CHANNELS(channels_float, float)
DEFINE_CHANNELS(channels_double, double)

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
PyObject *fused_probe_update(PyObject *module, PyObject *args) {
    PyObject *y_in, *rules_in, *maxima_in, *scalars_in;
    Py_ssize_t channels, inner;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "OnnOOO|i:probe_update", &y_in, &channels, &inner, &rules_in, &maxima_in, &scalars_in,
                          &threads))
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
    ProbeJob job = {NULL, 0, 0, 0, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL};
    if (fused_acquire(seq, "", 0, &y) < 0) goto done;
    have_y = 1;
    if (fused_acquire(maxima_in, "probe_update(): maxima is a sequence of one array", 1, &maxima) < 0) goto done;
    have_maxima = 1;
    if (fused_acquire(scalars_in, "probe_update(): scalars is a sequence of four arrays", 1, &scalars) < 0) goto done;
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
    Py_ssize_t outer = n / (channels * inner), units = inner == 1 ? (outer + PIECE - 1) / PIECE : outer;
    int parts = fused_parts(n, threads);
    parts = parts < units ? parts : (int)units;
    size_t width = y.sizes[0];
    job = (ProbeJob){y.views[0].buf, width == 8, outer, channels, inner, units, &rules, NULL, NULL, NULL, NULL, NULL};
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
    if (have_y) fused_release(&y);
    Py_DECREF(seq);
    return out;
}

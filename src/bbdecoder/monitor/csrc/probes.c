/* An activation probe's update in one read of the output: probe_update(). */

#include "fused.h"

/* One forward's activation output, per channel: the largest value (NaN if the channel holds one,
   as torch's amax), the sum (double), and the count of values below `low` / above `high` (each
   bound inclusive or not; NaN never counted). Memory order is (outer, channels, inner). */
typedef struct {
    double low, high;
    int counting;
    int low_mode, high_mode; /* NO_BOUND, STRICT or INCLUSIVE: the loops' variant */
} Rules;

enum { NO_BOUND = 0, STRICT = 1, INCLUSIVE = 2 };
#define BELOW(v, b, mode) ((mode) == STRICT ? (v) < (b) : (mode) == INCLUSIVE ? (v) <= (b) : 0)
#define ABOVE(v, b, mode) ((mode) == STRICT ? (v) > (b) : (mode) == INCLUSIVE ? (v) >= (b) : 0)

/* Values are summed in T per piece of PIECE values (channels first: in LANES running sums of 64
   values each; channels last: a channel's values of a unit's rows), pieces in double; counts in
   int per piece. A unit is a row of the outer dimension (channels first: each channel's `inner`
   values) or unit_rows() rows (channels last); each unit's sum per channel goes to `totals` (units,
   channels), added up in unit order afterwards, so the sums do not depend on how the units are
   split among threads. `maxima` and `nan` (the channel holds a NaN) are the part's own, `partial`
   its scratch. */
#define PIECE 1024

/* Channels last: the rows of a unit, about 4 * FUSED_GRAIN values (so that a (batch, tokens, width)
   output splits over the threads, while `totals` stays small), 4 to PIECE rows; fixed by the width
   alone, as the sums must be. */
static inline Py_ssize_t unit_rows(Py_ssize_t channels) {
    Py_ssize_t rows = 4 * FUSED_GRAIN / channels;
    return rows < 4 ? 4 : rows > PIECE ? PIECE : rows;
}

/* Channels first, unit by unit (rows of the outer dimension), each channel's `inner` values in
   pieces: LANES running maxima, sums and counts, so that no result waits on the one before (a
   single accumulator per statistic runs at a third of the speed), the comparisons of the rule fixed
   by `low_mode` / `high_mode` (constants where it is inlined). A NaN is found through the channel's
   sum, which is NaN then (or with +inf beside -inf: the values are looked at again). */
#define DEFINE_FIRST(NAME, T, LANES)                                                                    \
    static inline __attribute__((always_inline)) long long NAME(                                       \
        const T *x, Py_ssize_t first_unit, Py_ssize_t last_unit, Py_ssize_t channels, Py_ssize_t inner, \
        T low, T high, const int low_mode, const int high_mode, T *maxima, int *nan, double *totals) { \
        long long count = 0;                                                                           \
        for (Py_ssize_t o = first_unit; o < last_unit; o++) {                                          \
            for (Py_ssize_t c = 0; c < channels; c++) {                                                \
                const T *block = x + (o * channels + c) * inner;                                      \
                T top[LANES], sum[LANES], largest = maxima[c];                                         \
                int hits[LANES];                                                                       \
                double total = 0;                                                                      \
                for (int j = 0; j < LANES; j++) top[j] = largest;                                      \
                for (Py_ssize_t first = 0; first < inner; first += PIECE) {                           \
                    Py_ssize_t last = first + PIECE < inner ? first + PIECE : inner, i = first;        \
                    T piece = 0;                                                                       \
                    int piece_hits = 0;                                                                \
                    for (int j = 0; j < LANES; j++) sum[j] = 0, hits[j] = 0;                           \
                    for (; i + LANES <= last; i += LANES) {                                            \
                        _Pragma("omp simd")                                                            \
                        for (int j = 0; j < LANES; j++) {                                              \
                            T v = block[i + j];                                                        \
                            top[j] = v > top[j] ? v : top[j];                                          \
                            sum[j] += v;                                                               \
                            hits[j] += BELOW(v, low, low_mode) | ABOVE(v, high, high_mode);            \
                        }                                                                              \
                    }                                                                                  \
                    for (; i < last; i++) {                                                            \
                        T v = block[i];                                                                \
                        largest = v > largest ? v : largest;                                           \
                        piece += v;                                                                    \
                        piece_hits += BELOW(v, low, low_mode) | ABOVE(v, high, high_mode);             \
                    }                                                                                  \
                    for (int j = 0; j < LANES; j++) piece += sum[j], piece_hits += hits[j];            \
                    total += piece;                                                                    \
                    count += piece_hits;                                                               \
                }                                                                                      \
                for (int j = 0; j < LANES; j++) largest = top[j] > largest ? top[j] : largest;         \
                if (total != total)                                                                    \
                    for (Py_ssize_t i = 0; i < inner; i++) nan[c] |= block[i] != block[i];             \
                maxima[c] = largest;                                                                   \
                totals[o * channels + c] = total;                                                      \
            }                                                                                          \
        }                                                                                              \
        return count;                                                                                  \
    }

DEFINE_FIRST(channels_float_first, float, 16)
DEFINE_FIRST(channels_double_first, double, 8)

/* Channels last (inner == 1), PIECE rows at a time along the channels: each row's values update
   the running maxima and the piece's sums of their channels, vectorised across the channels. A NaN
   is found through the channel's piece sum, as above. */
#define DEFINE_LAST(NAME, T)                                                                            \
    static inline __attribute__((always_inline)) long long NAME(                                       \
        const T *x, Py_ssize_t first_unit, Py_ssize_t last_unit, Py_ssize_t outer, Py_ssize_t channels, \
        T low, T high, const int low_mode, const int high_mode, T *maxima, int *nan, double *totals,   \
        T *partial) {                                                                                  \
        long long count = 0;                                                                           \
        for (Py_ssize_t unit = first_unit; unit < last_unit; unit++) {                                \
            Py_ssize_t rows = unit_rows(channels), first = unit * rows;                                \
            Py_ssize_t last = first + rows < outer ? first + rows : outer;                             \
            for (Py_ssize_t c = 0; c < channels; c++) partial[c] = 0;                                  \
            Py_ssize_t o = first;                                                                      \
            for (; o + 4 <= last; o += 4) { /* four rows per read and write of the running values */  \
                const T *r0 = x + o * channels, *r1 = r0 + channels, *r2 = r1 + channels, *r3 = r2 + channels; \
                int hits = 0;                                                                          \
                _Pragma("omp simd reduction(+ : hits)")                                                \
                for (Py_ssize_t c = 0; c < channels; c++) {                                            \
                    T a = r0[c], b = r1[c], d = r2[c], e = r3[c], top = maxima[c];                     \
                    top = a > top ? a : top;                                                           \
                    top = b > top ? b : top;                                                           \
                    top = d > top ? d : top;                                                           \
                    maxima[c] = e > top ? e : top;                                                     \
                    partial[c] += (a + b) + (d + e);                                                   \
                    hits += (BELOW(a, low, low_mode) | ABOVE(a, high, high_mode)) +                    \
                            (BELOW(b, low, low_mode) | ABOVE(b, high, high_mode)) +                    \
                            (BELOW(d, low, low_mode) | ABOVE(d, high, high_mode)) +                    \
                            (BELOW(e, low, low_mode) | ABOVE(e, high, high_mode));                     \
                }                                                                                      \
                count += hits;                                                                         \
            }                                                                                          \
            for (; o < last; o++) {                                                                    \
                const T *row = x + o * channels;                                                      \
                int hits = 0;                                                                          \
                _Pragma("omp simd reduction(+ : hits)")                                                \
                for (Py_ssize_t c = 0; c < channels; c++) {                                            \
                    T v = row[c];                                                                      \
                    maxima[c] = v > maxima[c] ? v : maxima[c];                                         \
                    partial[c] += v;                                                                   \
                    hits += BELOW(v, low, low_mode) | ABOVE(v, high, high_mode);                       \
                }                                                                                      \
                count += hits;                                                                         \
            }                                                                                          \
            for (Py_ssize_t c = 0; c < channels; c++) {                                                \
                totals[unit * channels + c] = partial[c];                                              \
                if (partial[c] != partial[c])                                                          \
                    for (Py_ssize_t o = first; o < last; o++) nan[c] |= x[o * channels + c] != x[o * channels + c]; \
            }                                                                                          \
        }                                                                                              \
        return count;                                                                                  \
    }

DEFINE_LAST(channels_float_last, float)
DEFINE_LAST(channels_double_last, double)

/* The loops of a part, with the rule's comparisons fixed at compile time (one variant per pair of
   bounds, none, strict or inclusive each). */
#define DEFINE_CHANNELS(NAME, T)                                                                        \
    MULTIVERSION static long long NAME(const T *x, Py_ssize_t first_unit, Py_ssize_t last_unit,         \
                                       Py_ssize_t outer, Py_ssize_t channels, Py_ssize_t inner,         \
                                       const Rules *r, T *maxima, int *nan, double *totals, T *partial) { \
        const T low = (T)r->low, high = (T)r->high;                                                    \
        long long count = 0;                                                                           \
        switch (r->low_mode * 3 + r->high_mode) {                                                      \
            LOOP_CASE(NAME, NO_BOUND, NO_BOUND)                                                        \
            LOOP_CASE(NAME, NO_BOUND, STRICT)                                                          \
            LOOP_CASE(NAME, NO_BOUND, INCLUSIVE)                                                       \
            LOOP_CASE(NAME, STRICT, NO_BOUND)                                                          \
            LOOP_CASE(NAME, STRICT, STRICT)                                                            \
            LOOP_CASE(NAME, STRICT, INCLUSIVE)                                                         \
            LOOP_CASE(NAME, INCLUSIVE, NO_BOUND)                                                       \
            LOOP_CASE(NAME, INCLUSIVE, STRICT)                                                         \
            LOOP_CASE(NAME, INCLUSIVE, INCLUSIVE)                                                      \
        }                                                                                              \
        return r->counting ? count : 0;                                                                \
    }

#define LOOP_CASE(NAME, LOW, HIGH)                                                                      \
    case LOW * 3 + HIGH:                                                                               \
        count = inner == 1 ? NAME##_last(x, first_unit, last_unit, outer, channels, low, high, LOW, HIGH, maxima, nan, \
                                         totals, partial)                                              \
                           : NAME##_first(x, first_unit, last_unit, channels, inner, low, high, LOW, HIGH, maxima,  \
                                          nan, totals);                                                \
        break;

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
    Py_ssize_t outer = n / (channels * inner), units = inner == 1 ? (outer + unit_rows(channels) - 1) / unit_rows(channels) : outer;
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

/* The loops of an activation probe's update (probes.c): one part of the output's units, with
   the saturation rule's comparisons fixed at compile time. Included by probes.c alone. */

#ifndef BBDECODER_PROBE_LOOPS_H
#define BBDECODER_PROBE_LOOPS_H

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

/* Values are summed in T per piece of PIECE values (channels first: in LANES running sums of
   PIECE / LANES values each, 64 in float32 and 128 in float64; channels last: a channel's values
   of a unit's rows), pieces in double; counts in int per piece. A unit is a row of the outer
   dimension (channels first: each channel's `inner` values) or unit_rows() rows (channels last);
   each unit's sum per channel goes to `totals` (units, channels), added up in unit order
   afterwards, so the sums do not depend on how the units are split among threads. `maxima` and
   `nan` (the channel holds a NaN) are the part's own, `partial` its scratch. */
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

/* Channels last (inner == 1), unit_rows() rows at a time along the channels: four rows' values
   update the running maxima and the unit's sums of their channels per read and write of those,
   vectorised across the channels. A NaN is found through the channel's unit sum, as above. */
#define DEFINE_LAST(NAME, T)                                                                            \
    static inline __attribute__((always_inline)) long long NAME(                                       \
        const T *x, Py_ssize_t first_unit, Py_ssize_t last_unit, Py_ssize_t outer, Py_ssize_t channels, \
        T low, T high, const int low_mode, const int high_mode, T *maxima, int *nan, double *totals,   \
        T *partial) {                                                                                  \
        long long count = 0;                                                                           \
        const Py_ssize_t rows = unit_rows(channels);                                                   \
        for (Py_ssize_t unit = first_unit; unit < last_unit; unit++) {                                \
            Py_ssize_t first = unit * rows;                                                            \
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

#endif

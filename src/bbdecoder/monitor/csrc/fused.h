/* Shared by the sources of bbdecoder.monitor._fused (see module.c). */

#ifndef BBDECODER_FUSED_H
#define BBDECODER_FUSED_H

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

/* The buffers of a sequence of arrays, all dense in memory (and writable with `writable`). */
typedef struct {
    Py_buffer *views;
    int *sizes;
    Py_ssize_t count, acquired;
} Buffers;

/* Internal to the module: not exported from the shared object, so no other library's symbol of
   the same name can stand in for these. */
#if defined(__GNUC__)
#define INTERNAL __attribute__((visibility("hidden")))
#else
#define INTERNAL
#endif

/* threads.c: a pass split into `parts` (one per thread), part k of n run as task(job, k, n) */
typedef void (*fused_task)(void *job, int part, int parts);
#define FUSED_GRAIN 32768 /* elements: no part smaller (torch's grain size) */
INTERNAL void fused_run(fused_task task, void *job, int parts);
INTERNAL int fused_parts(Py_ssize_t elements, int threads);
INTERNAL PyObject *fused_use_openmp(PyObject *module, PyObject *path);

/* blocks.c: the arrays of a pass split into blocks of at most FUSED_BLOCK elements, each with its
   own partial sums, combined in block order afterwards: so the sums are the same bits whatever
   the number of parts. Part k runs blocks [first[k], first[k + 1]). */
#define FUSED_BLOCK 65536
typedef struct {
    Py_ssize_t array, start, count;
} Block;
typedef struct {
    Block *blocks;
    Py_ssize_t count, *first;
    int parts;
} Plan;
INTERNAL int fused_plan(const Buffers *in, const char *skip, int threads, Plan *plan);
INTERNAL void fused_plan_release(Plan *plan);

/* buffers.c */
INTERNAL int fused_acquire(PyObject *sequence, const char *what, int writable, Buffers *b);
INTERNAL void fused_release(Buffers *b);
INTERNAL Py_ssize_t fused_stride(const Py_buffer *view, int axis);

/* the functions of the module: gradients.c, weights.c, probes.c, tensor_rules.c */
INTERNAL PyObject *fused_moments(PyObject *module, PyObject *arrays);
INTERNAL PyObject *fused_statistics(PyObject *module, PyObject *args);
INTERNAL PyObject *fused_update_norms(PyObject *module, PyObject *args);
INTERNAL PyObject *fused_probe_update(PyObject *module, PyObject *args);
INTERNAL PyObject *fused_probe_update_at(PyObject *module, PyObject *args);
INTERNAL PyObject *fused_norm_rules(PyObject *module, PyObject *args);
INTERNAL PyObject *fused_ratio_rules(PyObject *module, PyObject *args);

#endif

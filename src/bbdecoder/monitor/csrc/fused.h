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

/* buffers.c */
INTERNAL int fused_acquire(PyObject *sequence, const char *what, int writable, Buffers *b);
INTERNAL void fused_release(Buffers *b);
INTERNAL Py_ssize_t fused_stride(const Py_buffer *view, int axis);

/* the functions of the module: gradients.c, weights.c, probes.c */
INTERNAL PyObject *fused_moments(PyObject *module, PyObject *arrays);
INTERNAL PyObject *fused_statistics(PyObject *module, PyObject *args);
INTERNAL PyObject *fused_update_norms(PyObject *module, PyObject *args);
INTERNAL PyObject *fused_probe_update(PyObject *module, PyObject *args);

#endif

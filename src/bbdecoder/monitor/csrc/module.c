/* The monitor's CPU passes as single loops over memory: bbdecoder.monitor._fused.

   moments(arrays) and update_norms(weights, snapshots, keep, into) do what the NumPy functions of
   the same names in bbdecoder/monitor/cpu_reductions.py do; statistics() also does the arithmetic
   of moment_rows.py on the moments, and probe_update() an activation probe's update
   (probe_kernel.py). Each pass reads an array from memory once, with the GIL released for the
   whole list (so the writer thread's passes run beside the training thread). norm_rules() and
   ratio_rules() are no passes: the per-tensor alert rules of one step's table of a few values
   (tensor_rules.c), with the GIL held. With `threads` > 1 a pass
   is split over torch's own intra-op threads (threads.c), in blocks whose partial sums are added
   in a fixed order, so the results are the same bits with any number of threads. Sums are accumulated in
   double per SIMD lane, so they are float64-exact up to the rounding of the additions; the maximum
   is exact. NaN/Inf make the sums non-finite (the caller redoes such rows; the maximum may then be
   anything).

   Arrays are objects with the buffer protocol (NumPy arrays), float32 or float64, dense in memory
   in any order of their axes (C-contiguous, channels-last, transposed); the arrays of one call need
   not share a dtype. A weight, its snapshot and its spare share a shape and a layout. Built as an
   optional extension (setup.py): where no compiler is found, cpu_reductions keeps its NumPy path. */

#include "fused.h"

static PyMethodDef fused_methods[] = {
    {"moments", fused_moments, METH_VARARGS,
     "moments(arrays, threads=1) -> list of (sum(g), sum(|g|), max|g|, sum(g^2)) per array, float64 sums."},
    {"statistics", fused_statistics, METH_VARARGS,
     "statistics(arrays, known, condition, largest, smallest, threads=1) -> (bytearray of (n, 6) float64 rows, "
     "indices of the rows to redo)."},
    {"probe_update", fused_probe_update, METH_VARARGS,
     "probe_update(y, channels, inner, rules, maxima, scalars, threads=1): one forward into an activation "
     "probe's state."},
    {"probe_update_at", fused_probe_update_at, METH_VARARGS,
     "probe_update_at(address, elements, wide, channels, inner, rules, maxima, scalars, threads=1): the same, "
     "the output given as the address of `elements` dense float32 (float64 where `wide`) values."},
    {"update_norms", fused_update_norms, METH_VARARGS,
     "update_norms(weights, snapshots, keep, into=None, threads=1) -> list of (||s - w||^2, ||w||^2)."},
    {"norm_rules", fused_norm_rules, METH_VARARGS,
     "norm_rules(table, column, index, window, filled, next_slot, peak, low_norm, had_gradient, exploding, "
     "vanishing, config) -> list of exploding onsets (row, median, peak, limit, history), or None."},
    {"ratio_rules", fused_ratio_rules, METH_VARARGS,
     "ratio_rules(table, column, index, low_ratio, ratio_band, (low, high, patience)) -> list of onsets "
     "(row, run), or None."},
    {"use_openmp", fused_use_openmp, METH_O,
     "use_openmp(path) -> bool: run `threads` > 1 on the OpenMP runtime of the loaded library at `path` "
     "(torch's extension module); True where it has one."},
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

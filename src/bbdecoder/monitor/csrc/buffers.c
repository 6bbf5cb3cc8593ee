/* Acquiring the buffers of a sequence of arrays: dtype and layout checks. */

#include "fused.h"

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

void fused_release(Buffers *b) {
    for (Py_ssize_t i = 0; i < b->acquired; i++) PyBuffer_Release(&b->views[i]);
    PyMem_Free(b->views);
    PyMem_Free(b->sizes);
    b->views = NULL;
    b->sizes = NULL;
    b->acquired = 0;
}

int fused_acquire(PyObject *sequence, const char *what, int writable, Buffers *b) {
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
        fused_release(b);
        PyErr_NoMemory();
        return -1;
    }
    int flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    for (Py_ssize_t i = 0; i < b->count; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &b->views[i], flags) < 0) {
            Py_DECREF(fast);
            fused_release(b);
            return -1;
        }
        b->acquired = i + 1;
        b->sizes[i] = element_size(&b->views[i], i);
        if (b->sizes[i] == 0 || !dense(&b->views[i], i)) {
            Py_DECREF(fast);
            fused_release(b);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

Py_ssize_t fused_stride(const Py_buffer *view, int axis) {
    return view->strides ? view->strides[axis] : 0; /* no strides: C-contiguous */
}

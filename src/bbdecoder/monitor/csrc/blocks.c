/* Splitting the arrays of a pass into blocks, and the blocks into parts of about equal size. */

#include "fused.h"

void fused_plan_release(Plan *plan) {
    PyMem_Free(plan->blocks);
    PyMem_Free(plan->first);
    plan->blocks = NULL;
    plan->first = NULL;
}

/* Called with the GIL held (it allocates); -1 with MemoryError set. Arrays `skip` marks get no
   block, nor do empty ones. */
int fused_plan(const Buffers *in, const char *skip, int threads, Plan *plan) {
    Py_ssize_t count = 0, elements = 0;
    for (Py_ssize_t i = 0; i < in->count; i++) {
        if (skip != NULL && skip[i]) continue;
        Py_ssize_t n = in->views[i].len / in->sizes[i];
        count += (n + FUSED_BLOCK - 1) / FUSED_BLOCK;
        elements += n;
    }
    plan->count = count;
    plan->parts = fused_parts(elements, threads);
    plan->blocks = PyMem_Malloc((count ? count : 1) * sizeof(Block));
    plan->first = PyMem_Malloc((plan->parts + 1) * sizeof(Py_ssize_t));
    if (plan->blocks == NULL || plan->first == NULL) {
        fused_plan_release(plan);
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t k = 0, done = 0;
    int part = 0;
    plan->first[0] = 0;
    for (Py_ssize_t i = 0; i < in->count; i++) {
        if (skip != NULL && skip[i]) continue;
        Py_ssize_t n = in->views[i].len / in->sizes[i];
        for (Py_ssize_t start = 0; start < n; start += FUSED_BLOCK, k++) {
            /* part p begins with the first block at or past p / parts of the elements */
            while (part + 1 < plan->parts && done >= elements / plan->parts * (part + 1)) plan->first[++part] = k;
            plan->blocks[k].array = i;
            plan->blocks[k].start = start;
            plan->blocks[k].count = n - start < FUSED_BLOCK ? n - start : FUSED_BLOCK;
            done += plan->blocks[k].count;
        }
    }
    while (part < plan->parts) plan->first[++part] = count;
    return 0;
}

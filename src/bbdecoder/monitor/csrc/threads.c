/* Running a pass on torch's intra-op threads: the OpenMP runtime torch itself loaded, found at run
   time (use_openmp()), so no thread is started beside torch's own pool and the extension is built
   without OpenMP. Where no runtime is found, the parts run one after the other on the calling
   thread: the same arithmetic, so the same bits. */

#include "fused.h"

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define FUSED_DLOPEN 1
#endif

typedef void (*team_start)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*team_query)(void);

/* GOMP_parallel: the entry point GCC's code calls for `#pragma omp parallel`, which libgomp,
   LLVM's libomp and Intel's libiomp5 all provide. */
static team_start start_team;
static team_query member_index, member_count, inside_team;

typedef struct {
    fused_task task;
    void *job;
    int parts;
} Team;

static void member(void *data) {
    const Team *team = data;
    int me = member_index(), size = member_count(); /* the team may be smaller than asked */
    for (int part = me; part < team->parts; part += size) team->task(team->job, part, team->parts);
}

void fused_run(fused_task task, void *job, int parts) {
    if (parts > 1 && start_team != NULL && !inside_team()) {
        Team team = {task, job, parts};
        start_team(member, &team, (unsigned)parts, 0);
        return;
    }
    for (int part = 0; part < parts; part++) task(job, part, parts);
}

int fused_parts(Py_ssize_t elements, int threads) {
    Py_ssize_t most = (elements + FUSED_GRAIN - 1) / FUSED_GRAIN;
    if (threads < 1 || most < 1) return 1;
    return most < threads ? (int)most : threads;
}

PyObject *fused_use_openmp(PyObject *module, PyObject *path) {
#ifdef FUSED_DLOPEN
    const char *name = PyUnicode_AsUTF8(path);
    if (name == NULL) return NULL;
    /* a library already loaded (torch's extension module): its symbols resolve as its own calls do */
    void *library = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
    if (library != NULL) {
        team_start start = (team_start)dlsym(library, "GOMP_parallel");
        team_query index = (team_query)dlsym(library, "omp_get_thread_num");
        team_query count = (team_query)dlsym(library, "omp_get_num_threads");
        team_query inside = (team_query)dlsym(library, "omp_in_parallel");
        if (start != NULL && index != NULL && count != NULL && inside != NULL) {
            member_index = index;
            member_count = count;
            inside_team = inside;
            start_team = start;
        }
        /* the handle is kept: the runtime must outlive the pointers taken from it */
    }
#endif
    return PyBool_FromLong(start_team != NULL);
}

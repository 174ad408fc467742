/* pymalloc's arenas carved from one 2 MiB-aligned region advised MADV_HUGEPAGE: a probe of
 * benchmarks/fresh_pages.py (--ways pymalloc+thp), compiled by it with the system's cc and
 * loaded into its child before the kernel is imported. CPython 3.11 exposes no way to advise
 * its arenas from Python (they are mmap'ed 1 MiB at a time); this installs an arena allocator
 * (PyObject_SetArenaAllocator) that hands out consecutive 1 MiB slices of a 32 GiB
 * MAP_NORESERVE reservation, so a machine whose transparent huge pages are set to `madvise`
 * faults them 2 MiB at a time. Freed arenas of the region are given back (MADV_DONTNEED) and
 * not reused; those mapped before the install are unmapped as CPython's own were.
 * Not for production: the address space is never reused. */
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
typedef struct { void *ctx; void *(*alloc)(void *, size_t); void (*free)(void *, void *, size_t); } Arenas;
extern void PyObject_SetArenaAllocator(Arenas *);
static char *base, *next, *end;
static const size_t HUGE = (size_t)2 << 20;
static void *arena_alloc(void *ctx, size_t size) {
    (void)ctx;
    if (!base) {
        size_t span = (size_t)32 << 30;
        char *p = mmap(NULL, span + HUGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return NULL;
        base = (char *)(((uintptr_t)p + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
        if (madvise(base, span, MADV_HUGEPAGE) != 0) return NULL;
        next = base; end = base + span;
    }
    if (next + size > end) return NULL;
    void *r = next; next += size; return r;
}
static void arena_free(void *ctx, void *ptr, size_t size) {
    (void)ctx;
    if ((char *)ptr >= base && (char *)ptr < end) madvise(ptr, size, MADV_DONTNEED);
    else munmap(ptr, size);
}
static Arenas arenas = {NULL, arena_alloc, arena_free};
void fresh_pages_install(void) { PyObject_SetArenaAllocator(&arenas); }

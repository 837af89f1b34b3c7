/* A team of threads inside one OpenMP parallel region, synchronised by its own barrier.
 *
 * OpenMP's barriers spin until every thread arrives. On a quiet machine that is the fastest wait,
 * but when the machine is busier than its cores, the thread waited for may be off its core for a
 * whole time slice while the others spin: a step of a few hundred barriers then takes seconds.
 * This barrier spins for a few microseconds (long enough for a thread that is running) and then
 * yields its core between checks, which lets the late thread, or anything else, run. Work is
 * split by hand (team_range, team_next), so no OpenMP construct inside the region waits.
 */
#define _POSIX_C_SOURCE 200809L
#include <sched.h>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ volatile("yield")
#else
#define cpu_relax() ((void)0)
#endif

#define SPINS_BEFORE_YIELD 2000

team team_join(team_shared *shared) {
    team t = {0, 1, shared, 0};
#ifdef _OPENMP
    t.ith = omp_get_thread_num();
    t.nth = omp_get_num_threads();
#endif
    return t;
}

void team_barrier(const team *t) {
    if (t->nth == 1) return;
    team_shared *s = t->shared;
    const int phase = atomic_load_explicit(&s->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&s->arrived, 1, memory_order_acq_rel) == t->nth - 1) {
        atomic_store_explicit(&s->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&s->phase, 1, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&s->phase, memory_order_acquire) == phase; spins++) {
        if (spins < SPINS_BEFORE_YIELD) cpu_relax();
        else sched_yield();
    }
}

void team_range(const team *t, int64_t n, int64_t *lo, int64_t *hi) {
    *lo = n * t->ith / t->nth;
    *hi = n * (t->ith + 1) / t->nth;
}

/* The shared counter only grows: each thread's last call overshoots by one, so after a loop of n
 * tasks it stands at next_base + n + nth, which every thread computes alike. */
int64_t team_next(team *t, int64_t n) {
    const int64_t i =
        atomic_fetch_add_explicit(&t->shared->next, 1, memory_order_relaxed) - t->next_base;
    return i < n ? i : -1;
}

void team_next_done(team *t, int64_t n) { t->next_base += n + t->nth; }

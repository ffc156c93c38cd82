/* The CUPTI callback behind the process-wide driver journal (workers/cupti_native.py builds and loads it).
 *
 * CUPTI calls orch_cb_callback on the calling thread, inside the driver or runtime call, for exactly the
 * lock-taking functions the journal enabled (cuptiEnableCallback) and for nothing else: launches, copies
 * and synchronisation never reach it. It runs inside another library's driver call, so it takes no lock
 * and never enters Python:
 *   - at entry it stores the time in the call's correlation slot (CUPTI keeps one per call, so a runtime
 *     call and the driver call inside it each have their own);
 *   - at exit it writes one record (start, end, the thread's kernel id, the function's id and domain, the
 *     thread's name, the return addresses from which Python names the calling library) into a bounded
 *     lock-free ring, Vyukov's multi-producer queue; a full ring drops the record and counts it.
 * The serving thread drains the ring when it flushes the journal (orch_cb_drain; one consumer at a time).
 * Times are CLOCK_MONOTONIC, the clock of Python's time.monotonic_ns() and of every other journal entry.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RING 16384 /* records between two drains; a power of two */
#define FRAMES 16  /* return addresses kept: the callback, CUPTI, the driver, the runtime, then the caller */

typedef struct {
    uint64_t start_ns;
    uint64_t end_ns;
    uint32_t tid;
    uint32_t cbid;
    uint32_t domain; /* 1 driver API, 2 runtime API */
    uint32_t nframes;
    char comm[16]; /* the thread's name (prctl PR_GET_NAME), kept for threads gone before the drain */
    uint64_t frames[FRAMES];
} orch_op;

/* The fields of CUPTI's CUpti_CallbackData read here, laid out as cupti_callbacks.h has them on LP64
 * (cupti-python's callback_data_dtype agrees: site at 0, correlationData at 56). */
typedef struct {
    int32_t callback_site; /* CUPTI_API_ENTER 0, CUPTI_API_EXIT 1 */
    const char *function_name;
    const void *function_params;
    void *function_return_value;
    const char *symbol_name;
    void *context;
    uint32_t context_uid;
    uint64_t *correlation_data;
    uint32_t correlation_id;
} cb_data;

typedef struct {
    uint64_t seq;
    orch_op op;
} slot;

static slot ring[RING];
static uint64_t head;    /* next ticket for a producer */
static uint64_t tail;    /* next record for the consumer */
static uint64_t written; /* records written, ever */
static uint64_t dropped; /* records dropped on a full ring */

__attribute__((constructor)) static void orch_cb_init(void) {
    for (uint64_t i = 0; i < RING; i++)
        ring[i].seq = i;
    void *warm[2];
    backtrace(warm, 2); /* glibc loads its unwinder (libgcc_s) at the first call: here, not in a driver call */
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void push(const orch_op *op) {
    uint64_t pos = __atomic_load_n(&head, __ATOMIC_RELAXED);
    for (;;) {
        slot *s = &ring[pos & (RING - 1)];
        uint64_t seq = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        int64_t dif = (int64_t)(seq - pos);
        if (dif == 0) {
            if (__atomic_compare_exchange_n(&head, &pos, pos + 1, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
                s->op = *op;
                __atomic_store_n(&s->seq, pos + 1, __ATOMIC_RELEASE);
                __atomic_fetch_add(&written, 1, __ATOMIC_RELAXED);
                return;
            } /* another producer took pos: the failed exchange loaded the new head */
        } else if (dif < 0) {
            __atomic_fetch_add(&dropped, 1, __ATOMIC_RELAXED); /* full: the consumer is a ring behind */
            return;
        } else {
            pos = __atomic_load_n(&head, __ATOMIC_RELAXED);
        }
    }
}

void orch_cb_callback(void *userdata, int32_t domain, uint32_t cbid, const void *data) {
    (void)userdata;
    const cb_data *cb = (const cb_data *)data;
    if (cb == 0 || cb->correlation_data == 0)
        return;
    if (cb->callback_site == 0) {
        *cb->correlation_data = now_ns();
        return;
    }
    uint64_t start = *cb->correlation_data;
    if (start == 0) /* entered before the subscription */
        return;
    orch_op op;
    op.end_ns = now_ns();
    op.start_ns = start;
    op.tid = (uint32_t)syscall(SYS_gettid);
    op.cbid = cbid;
    op.domain = (uint32_t)domain;
    if (prctl(PR_GET_NAME, op.comm) != 0)
        op.comm[0] = 0;
    op.nframes = (uint32_t)backtrace((void **)op.frames, FRAMES);
    push(&op);
}

/* Copy up to max records into out, oldest first; returns how many. One caller at a time. */
uint64_t orch_cb_drain(orch_op *out, uint64_t max) {
    uint64_t n = 0;
    while (n < max) {
        slot *s = &ring[tail & (RING - 1)];
        if (__atomic_load_n(&s->seq, __ATOMIC_ACQUIRE) != tail + 1)
            break;
        out[n++] = s->op;
        __atomic_store_n(&s->seq, tail + RING, __ATOMIC_RELEASE);
        tail++;
    }
    return n;
}

/* written, dropped, ring capacity, bytes per record */
void orch_cb_stats(uint64_t out[4]) {
    out[0] = __atomic_load_n(&written, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&dropped, __ATOMIC_RELAXED);
    out[2] = RING;
    out[3] = sizeof(orch_op);
}

/* The file of the loaded object holding code address addr, or 0. */
const char *orch_cb_object_of(uint64_t addr) {
    Dl_info info;
    if (addr == 0 || dladdr((void *)(uintptr_t)addr, &info) == 0)
        return 0;
    return info.dli_fname;
}

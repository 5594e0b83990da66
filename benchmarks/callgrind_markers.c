/* Markers a Python process calls (through ctypes) to count the instructions of one stretch of its
 * work under callgrind: benchmarks/count_monitor_instructions.py compiles this file when it runs.
 * Outside valgrind the client requests are no-ops that cost a few instructions. */
#include <valgrind/callgrind.h>

/* Zero the counters and count from here on. */
void sinkfix_count_begin(void) {
    CALLGRIND_START_INSTRUMENTATION;
    CALLGRIND_ZERO_STATS;
}

/* Write what was counted since sinkfix_count_begin() to a new profile file whose trigger line
 * carries the label, then stop counting. */
void sinkfix_count_end(const char *label) {
    CALLGRIND_DUMP_STATS_AT(label);
    CALLGRIND_STOP_INSTRUMENTATION;
}

/* 1 under valgrind, 0 otherwise. */
int sinkfix_under_valgrind(void) {
    return RUNNING_ON_VALGRIND ? 1 : 0;
}

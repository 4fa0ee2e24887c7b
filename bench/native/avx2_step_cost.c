/* The instruction cost of one AVX2 bitmask step (8 weight positions) on this CPU, in core cycles: the integer
 * part (mask byte -> table offset, popcount, cursor advance), the vector part (broadcast of the packed values,
 * vpshufb through the table row, FMA) and both, as the bitmask GEMV issues them, 8 independent steps per loop
 * iteration with everything in L1. The clock comes from a chain of dependent adds (1 cycle each).
 * x86-64 with AVX2 only; run by bench/avx2_step_cost.py, which adds the compiled kernel's own cost. */
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static char buf[4096] __attribute__((aligned(64)));
#define CLOBBER "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
                "xmm12", "xmm13", "xmm14", "xmm15", "rax", "rbx", "rcx", "rdx", "r8", "r9", "r10", "r11", "memory"
/* seconds = min(seconds, one timed pass of ITER loop iterations) */
#define TIME(seconds, body)                                                                        \
    {                                                                                              \
        double t0 = now();                                                                         \
        for (long i = 0; i < ITER; ++i) __asm__ volatile(body ::"r"(buf) : CLOBBER);              \
        double t = now() - t0;                                                                     \
        if (t < seconds) seconds = t;                                                              \
    }
enum { ITER = 10000000 };

/* one step: table offset of mask byte (rorx + and), popcount, cursor advance (lea) */
#define INT(sh, r1, r2) "rorx $" #sh ",%%rax,%%" #r1 "\n and $0x1fe0,%%" #r1 "\n popcnt %%" #r1 ",%%" #r2 \
                        "\n lea (%0,%%" #r2 ",2),%%rdx\n"
/* one step: broadcast 8 packed bf16, vpshufb with the table row operand, FMA into one of 8 accumulators */
#define VEC(o, l, t, a) "vbroadcasti128 " #o "(%0),%%ymm" #t "\n vpshufb " #l "(%0),%%ymm" #t ",%%ymm" #t \
                        "\n vfmadd231ps %%ymm" #t ",%%ymm1,%%ymm" #a "\n"
#define INT8 INT(3, rbx, rcx) INT(11, r8, r9) INT(19, r10, r11) INT(27, rbx, rcx) INT(35, r8, r9) INT(43, r10, r11) \
             INT(51, rbx, rcx) INT(59, r8, r9)
#define VEC8 VEC(0, 512, 2, 8) VEC(2, 544, 3, 9) VEC(4, 576, 4, 10) VEC(6, 608, 5, 11) VEC(8, 640, 6, 12) \
             VEC(10, 672, 7, 13) VEC(12, 704, 14, 8) VEC(14, 736, 15, 9)
#define BOTH8 INT(3, rbx, rcx) VEC(0, 512, 2, 8) INT(11, r8, r9) VEC(2, 544, 3, 9) INT(19, r10, r11)             \
              VEC(4, 576, 4, 10) INT(27, rbx, rcx) VEC(6, 608, 5, 11) INT(35, r8, r9) VEC(8, 640, 6, 12)        \
              INT(43, r10, r11) VEC(10, 672, 7, 13) INT(51, rbx, rcx) VEC(12, 704, 14, 8) INT(59, r8, r9)       \
              VEC(14, 736, 15, 9)
#define CHAIN8 "add $1,%%rax\n add $1,%%rax\n add $1,%%rax\n add $1,%%rax\n" \
               "add $1,%%rax\n add $1,%%rax\n add $1,%%rax\n add $1,%%rax\n"

int main(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("bmi2") ||
        !__builtin_cpu_supports("popcnt")) {
        printf("no AVX2/FMA/BMI2 on this CPU\n");
        return 2;
    }
    double chain = 1e30, integer = 1e30, vector = 1e30, both = 1e30;
    for (int round = 0; round < 7; ++round) { /* interleaved rounds, best of each: a busy host only adds time */
        TIME(chain, CHAIN8)
        TIME(integer, INT8)
        TIME(vector, VEC8)
        TIME(both, BOTH8)
    }
    const double ghz = 8.0 * ITER / chain / 1e9, steps = 8.0 * ITER, cyc = ghz * 1e9 / steps;
    printf("clock_ghz %.3f\n", ghz);
    printf("integer %.3f\n", integer * cyc);
    printf("vector %.3f\n", vector * cyc);
    printf("both %.3f\n", both * cyc);
    return 0;
}

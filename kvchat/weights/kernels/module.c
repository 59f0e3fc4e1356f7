/* The library's entry as a Python extension (kvchat.weights._kernel), and what it says of itself: the paths it
 * was built with, the digest of the sources it was built from, and which path this CPU runs. kvchat loads the
 * library with ctypes (kvchat/weights/quant.py); importing the module gives an empty module. setup.py builds it
 * with KVCHAT_PATHS ("scalar avx2" or "scalar") and KVCHAT_SOURCE_DIGEST (SHA-256 of packed_matvec.c and this
 * file) defined. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <cpuid.h>
#endif

#if !defined(KVCHAT_PATHS) || !defined(KVCHAT_SOURCE_DIGEST)
#error "build with setup.py, which defines KVCHAT_PATHS and KVCHAT_SOURCE_DIGEST"
#endif

const char *kvchat_kernel_paths(void) { return KVCHAT_PATHS; }

const char *kvchat_kernel_source(void) { return KVCHAT_SOURCE_DIGEST; }

/* 1 when this CPU and its operating system run the avx2 path (AVX2, FMA and F16C, with the YMM registers
 * saved by the OS), else 0. */
int kvchat_kernel_avx2(void) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c)) return 0;
    unsigned int low, high;
    __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    if ((low & 6) != 6) return 0;  /* XMM and YMM state enabled by the OS */
    if (__get_cpuid_max(0, 0) < 7) return 0;
    __cpuid_count(7, 0, a, b, c, d);
    return (b >> 5) & 1;
#else
    return 0;
#endif
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernel", "kvchat's C kernel; kvchat.weights.quant loads it with ctypes.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&module); }

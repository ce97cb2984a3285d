"""The three dialects of the C-style printer (backends/cstyle/printer.py), as tables.

A `Dialect` is everything CUDA C, OpenCL C and host C spell differently: qualifiers, the kernel's
attributes, barriers, thread indices, storage types and how to load and store them, math names,
special values and the helpers a kernel may call. The printer has no `if` on the dialect.

CUDA C and OpenCL C run a row's threads in parallel, meeting at barriers. Host C (`HOST`, compiled by
the system C compiler and called through ctypes: backends/cstyle/host.py) runs the same kernel on
one CPU thread the way PoCL's work-group compiler does: a loop over the rows around the body, and
a loop over the row's work-items around each part of the body between two barriers (`groups`,
`threads`). What a part computes per work-item is private to it (its accumulators); what passes a
barrier is in the reduction scratch or uniform across the row. So every statement, pass, tree
reduction and bound of the GPU kernels executes on any CPU, whatever its OpenCL support.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CUDA", "DIALECTS", "HOST", "OPENCL", "Dialect"]

# bf16 = the top 16 bits of an fp32; rounding adds 0x7FFF plus the lowest kept bit (ties to even), and
# a NaN keeps its top bits with the quiet bit set (the carry could otherwise turn it into an infinity)
_BF16 = {
    "hrm_bf16_to_f32": """\
{fn} float hrm_bf16_to_f32(const {u16} b) {{
  return {as_float}(({u32})b << 16);
}}
""",
    "hrm_f32_to_bf16": """\
{fn} {u16} hrm_f32_to_bf16(const float f) {{
  const {u32} u = {as_uint}(f);
  return (u & 0x7fffffffu) > 0x7f800000u ? ({u16})((u >> 16) | 0x40u)
                                         : ({u16})((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}}
""",
    "hrm_round_bf16": """\
{fn} float hrm_round_bf16(const float f) {{
  return hrm_bf16_to_f32(hrm_f32_to_bf16(f));
}}
""",
}


def _bf16_helpers(**names: str) -> dict[str, str]:
    return {k: v.format(**names) for k, v in _BF16.items()}


# max and relu keep a NaN, as torch's do: fmax returns the other operand of a NaN
_MAX = """\
{fn} float hrm_max(const float a, const float b) {{
  return (a != a || b != b) ? a + b : {fmax}(a, b);
}}
"""


# storage as CUDA C and host C see it: a half type is its 16 bits, converted by the dialect's helpers
_BITS_STORAGE = dict(
    type_map={"f32": "float", "f16": "unsigned short", "bf16": "unsigned short", "bool": "bool", "i32": "int",
              "i64": "long long"},
    load={"f32": "{ptr}[{i}]", "f16": "hrm_f16_to_f32({ptr}[{i}])", "bf16": "hrm_bf16_to_f32({ptr}[{i}])"},
    store={"f32": "{ptr}[{i}] = {v};", "f16": "{ptr}[{i}] = hrm_f32_to_f16({v});",
           "bf16": "{ptr}[{i}] = hrm_f32_to_bf16({v});"},
)


@dataclass(frozen=True)
class Dialect:
    name: str  # cuda | opencl
    suffix: str  # of the source file
    prelude: str  # the first lines of every source
    kernel_prefix: str  # what precedes the kernel's name; {block} is the number of threads per row
    helper_prefix: str  # what precedes a helper function's return type
    global_prefix: str  # address space of buffer pointers
    smem_prefix: str  # address space of the reduction scratch, shared by the threads of one row
    restrict: str  # inputs never alias outputs (the launchers check)
    barrier: str
    group_id: str  # the row: one block (work-group) per row
    local_id: str  # the thread within the row's block
    pointer_params: tuple[str, ...]  # parameters per buffer: a pointer, and in OpenCL an element offset
    index: str  # the element of buffer {name} at {i}
    type_map: dict[str, str]  # f32 f16 bf16 (storage types as the kernel sees them), bool, i32, i64
    load: dict[str, str]  # storage type -> expression of ({ptr}, {i}) giving an fp32
    store: dict[str, str]  # storage type -> statement storing fp32 {v} at ({ptr}, {i})
    math: dict[str, str]  # the fp32 math functions by role
    inf: str  # +infinity as an fp32 expression
    nan: str
    reciprocal: str  # 1 / {0} as an fp32 expression without a division subroutine where the dialect has one
    helpers: dict[str, str]  # name -> definition, printed (in this order) when the kernel calls it
    compile_options: tuple[str, ...] = field(default=())  # what every compiler of this dialect must be given
    # host C only: the loop over rows around the body, and over a row's work-items around each part
    # between barriers ((opening line, closing line), formats of {block}; empty on a device, which runs them
    # in parallel)
    groups: tuple[str, str] = ("", "")
    threads: tuple[str, str] = ("", "")


CUDA = Dialect(
    name="cuda",
    suffix=".cu",
    prelude="// compile with --fmad=false: a product and a sum are never contracted into an fma, so a value\n"
            "// recomputed in a later pass over the row is bit-identical (max's backward compares them);\n"
            "// and --prec-div=false: division within 2 ulp, as Triton's (IEEE division's slow path is a\n"
            "// call that needs a stack frame on sm_90)\n",
    kernel_prefix='extern "C" __global__ void __launch_bounds__({block})',
    helper_prefix="static __device__ __forceinline__",
    global_prefix="",
    smem_prefix="__shared__ ",
    restrict=" __restrict__",
    barrier="__syncthreads();",
    group_id="blockIdx.x",
    local_id="threadIdx.x",
    pointer_params=("ptr",),
    index="{i}",
    **_BITS_STORAGE,
    math={"exp": "expf", "log": "logf", "sqrt": "sqrtf", "rsqrt": "rsqrtf", "tanh": "tanhf", "fmax": "fmaxf",
          "pow": "powf"},
    inf="__int_as_float(0x7f800000)",
    nan="__int_as_float(0x7fc00000)",
    # the IEEE reciprocal instruction: a division, even with --prec-div=false, is a subroutine call
    # whose frame ptxas spills in kernels that hold many values (LayerNorm's backward at 256 threads)
    reciprocal="__frcp_rn({0})",
    helpers={
        "hrm_f16_to_f32": """\
static __device__ __forceinline__ float hrm_f16_to_f32(const unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
""",
        "hrm_f32_to_f16": """\
static __device__ __forceinline__ unsigned short hrm_f32_to_f16(const float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
""",
        "hrm_round_f16": """\
static __device__ __forceinline__ float hrm_round_f16(const float f) {
  return hrm_f16_to_f32(hrm_f32_to_f16(f));
}
""",
        **_bf16_helpers(fn="static __device__ __forceinline__", u16="unsigned short", u32="unsigned int",
                        as_float="__uint_as_float", as_uint="__float_as_uint"),
        "hrm_max": _MAX.format(fn="static __device__ __forceinline__", fmax="fmaxf"),
    },
    compile_options=("--fmad=false", "--prec-div=false"),
)

OPENCL = Dialect(
    name="opencl",
    suffix=".cl",
    prelude="// a product and a sum are never contracted into an fma, so a value recomputed in a later pass\n"
            "// over the row is bit-identical (max's backward compares them)\n"
            "#pragma OPENCL FP_CONTRACT OFF\n",
    kernel_prefix="__kernel __attribute__((reqd_work_group_size({block}, 1, 1))) void",
    helper_prefix="static inline",
    global_prefix="__global ",
    smem_prefix="__local ",
    restrict=" restrict",
    barrier="barrier(CLK_LOCAL_MEM_FENCE);",
    group_id="get_group_id(0)",
    local_id="get_local_id(0)",
    # a cl_mem cannot be offset on the host, so a view into a larger buffer is (buffer, element offset)
    pointer_params=("ptr", "offset"),
    index="{name}_offset + {i}",
    type_map={"f32": "float", "f16": "half", "bf16": "ushort", "bool": "bool", "i32": "int", "i64": "long"},
    load={"f32": "{ptr}[{i}]", "f16": "vload_half({i}, {ptr})", "bf16": "hrm_bf16_to_f32({ptr}[{i}])"},
    store={"f32": "{ptr}[{i}] = {v};", "f16": "vstore_half_rte({v}, {i}, {ptr});",
           "bf16": "{ptr}[{i}] = hrm_f32_to_bf16({v});"},
    math={"exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "tanh": "hrm_tanh", "fmax": "fmax",
          "pow": "pow"},
    inf="INFINITY",
    nan="NAN",
    reciprocal="1.0f / {0}",
    helpers={
        # `half` is a storage-only type without cl_khr_fp16: round through a private 16-bit slot
        "hrm_round_f16": """\
static inline float hrm_round_f16(const float f) {
  ushort h;
  vstore_half_rte(f, 0, (__private half*)&h);
  return vload_half(0, (__private const half*)&h);
}
""",
        **_bf16_helpers(fn="static inline", u16="ushort", u32="uint", as_float="as_float", as_uint="as_uint"),
        "hrm_max": _MAX.format(fn="static inline", fmax="fmax"),
        # OpenCL's tanh may miss 1 by an ulp where tanh rounds to 1 (PoCL: 1 - 2^-24 at 3.6e7); gelu's
        # derivative multiplies 1 - tanh^2 by ~a^3, so that ulp made it ~24 instead of 1 at a = 1541
        "hrm_tanh": """\
static inline float hrm_tanh(const float x) {
  return fabs(x) > 9.1f ? copysign(1.0f, x) : tanh(x);
}
""",
    },
)

# IEEE half: 1 sign, 5 exponent (bias 15), 10 mantissa bits; a subnormal is m * 2^-24. Rounding to
# nearest even: normal results by the bf16 trick on the rebiased bits (a carry rounds into the next
# binade, or to inf at >= 65520); subnormal ones by rintf of |f| * 2^24, exact since the scaling is.
_HOST_HALF = {
    "hrm_f16_to_f32": """\
static inline float hrm_f16_to_f32(const unsigned short h) {
  const unsigned int sign = (unsigned int)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return hrm_as_float(sign | 0x7f800000u | (m << 13));  /* inf, NaN */
  if (e != 0u) return hrm_as_float(sign | ((e + 112u) << 23) | (m << 13));
  return hrm_as_float(sign | hrm_as_uint((float)m * 5.9604644775390625e-08f));  /* m * 2^-24, exact */
}
""",
    "hrm_f32_to_f16": """\
static inline unsigned short hrm_f32_to_f16(const float f) {
  const unsigned int u = hrm_as_uint(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  /* NaN stays NaN */
  if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  /* 65520 and above round to inf */
  if (a >= 0x38800000u) return (unsigned short)(sign | ((a - (112u << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13));
  return (unsigned short)(sign | (unsigned int)rintf(hrm_as_float(a) * 16777216.0f));
}
""",
    "hrm_round_f16": """\
static inline float hrm_round_f16(const float f) {
  return hrm_f16_to_f32(hrm_f32_to_f16(f));
}
""",
}

HOST = Dialect(
    name="c",
    suffix=".c",
    prelude="// host C: compile with -ffp-contract=off (never an fma, as the other dialects) and without\n"
            "// -ffast-math; work-items run as loops between the barriers (backends/cstyle/dialects.py)\n"
            "#include <math.h>\n#include <stdbool.h>\n#include <string.h>\n",
    kernel_prefix="void",
    helper_prefix="static inline",
    global_prefix="",
    smem_prefix="",
    restrict=" restrict",
    barrier="",
    group_id="group",
    local_id="0",  # a uniform part runs once per row; each part between barriers declares its own tid
    pointer_params=("ptr",),
    index="{i}",
    **_BITS_STORAGE,
    math={"exp": "expf", "log": "logf", "sqrt": "sqrtf", "rsqrt": "hrm_rsqrt", "tanh": "tanhf", "fmax": "fmaxf",
          "pow": "powf"},
    inf="INFINITY",
    nan="NAN",
    reciprocal="1.0f / {0}",
    helpers={
        # type punning through memcpy: the defined way in C (a union or a pointer cast is not)
        "hrm_as_float": """\
static inline float hrm_as_float(const unsigned int u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
""",
        "hrm_as_uint": """\
static inline unsigned int hrm_as_uint(const float f) {
  unsigned int u;
  memcpy(&u, &f, sizeof u);
  return u;
}
""",
        **_HOST_HALF,
        **_bf16_helpers(fn="static inline", u16="unsigned short", u32="unsigned int", as_float="hrm_as_float",
                        as_uint="hrm_as_uint"),
        "hrm_max": _MAX.format(fn="static inline", fmax="fmaxf"),
        "hrm_rsqrt": """\
static inline float hrm_rsqrt(const float x) {
  return 1.0f / sqrtf(x);
}
""",
    },
    compile_options=("-std=c11", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared"),
    groups=("for (long long group = 0; group < n_rows; ++group) {{  // one row after another", "}"),
    threads=("for (int tid = 0; tid < {block}; ++tid) {{  // the row's work-items, one after another", "}"),
)

DIALECTS = {d.name: d for d in (CUDA, OPENCL, HOST)}

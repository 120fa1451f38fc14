"""What this machine can do, and the precision that follows. The one place for that policy.

Measured (TensorFlow 2.21, U-Net at 16-32 base filters, 256x256 crops): mixed
bfloat16 trains about 5x faster than float32 on Intel CPUs with AMX, about
1.9x faster on AMD EPYC (Zen 4) with AVX512-BF16, and about 9x *slower* on
CPUs without bfloat16 instructions (AVX2 only). See ../shared/MACHINES.md.
On GPUs mixed float16 (tensor cores) is the fastest path.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN's $ONEDNN_MAX_CPU_ISA (older name $DNNL_MAX_CPU_ISA) caps the instructions its kernels use; these
# caps leave out its bfloat16 kernels, so bfloat16 then runs on slow emulation, as on a CPU without them.
# Setting one below AVX512_CORE_BF16 makes a machine behave, for the convolutions, like the CPU kinds
# without bfloat16 (bench/ and docs/PERFORMANCE.md use that to measure them on one machine).
ISA_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


def available_cores() -> int:
    """Return how many CPU cores this process may run on (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """Return the CPU feature flags of /proc/cpuinfo (empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=None)
def cpu_name() -> str:
    """Return the CPU's model name, e.g. 'AMD EPYC' or 'Intel(R) Xeon(R) Platinum 8480+'."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onednn_isa_cap() -> str | None:
    """Return the instruction-set cap set for oneDNN ($ONEDNN_MAX_CPU_ISA, upper case), or None."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap and cap.strip() else None


def onednn_capped_below_bf16(isa_cap: str | None = None) -> bool:
    """Return True if the cap (default: $ONEDNN_MAX_CPU_ISA) keeps oneDNN below its bfloat16 (and float16) kernels.
    TensorFlow still hands it those types by the CPU's own instructions, and oneDNN then refuses half-precision
    convolutions."""
    return (onednn_isa_cap() if isa_cap is None else isa_cap.upper()) in ISA_CAPS_WITHOUT_BF16


def has_bf16_cpu(flags: frozenset[str] | None = None, isa_cap: str | None = None) -> bool:
    """Return True if the CPU has bfloat16 instructions (AMX or AVX512-BF16) and oneDNN may use them."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_CPU_FLAGS) and not onednn_capped_below_bf16(isa_cap)


def gpu_names() -> list[str]:
    """Return the names of the GPUs TensorFlow sees (empty on a CPU-only machine)."""
    import tensorflow as tf

    return [gpu.name for gpu in tf.config.list_physical_devices("GPU")]


def choose_precision(requested: str = "auto", gpus: list[str] | None = None, flags: frozenset[str] | None = None,
                     isa_cap: str | None = None) -> str:
    """Return the Keras dtype policy name to train with: the fastest correct one when 'auto'."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    gpus = gpu_names() if gpus is None else gpus
    if gpus:
        return "mixed_float16"  # tensor cores; train.py scales the loss so that small gradients survive
    return "mixed_bfloat16" if has_bf16_cpu(flags, isa_cap) else "float32"


def describe() -> str:
    """Return one line naming the hardware: CPU model, cores, bf16 support, GPUs."""
    gpus = gpu_names()
    bf16 = ", ".join(f for f in BF16_CPU_FLAGS if f in cpu_flags()) or "no bf16 instructions"
    cap = onednn_isa_cap()
    text = f"{cpu_name()} ({os.cpu_count()} cores, {bf16}{f', oneDNN capped at {cap}' if cap else ''})"
    return text + (f", GPUs: {', '.join(gpus)}" if gpus else ", no GPU")

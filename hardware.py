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
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")


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


def has_bf16_cpu(flags: frozenset[str] | None = None) -> bool:
    """Return True if the CPU has bfloat16 instructions (AMX or AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def gpu_names() -> list[str]:
    """Return the names of the GPUs TensorFlow sees (empty on a CPU-only machine)."""
    import tensorflow as tf

    return [gpu.name for gpu in tf.config.list_physical_devices("GPU")]


def choose_precision(requested: str = "auto", gpus: list[str] | None = None, flags: frozenset[str] | None = None) -> str:
    """Return the Keras dtype policy name to train with: the fastest correct one when 'auto'."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    gpus = gpu_names() if gpus is None else gpus
    if gpus:
        return "mixed_float16"  # tensor cores; train.py scales the loss so that small gradients survive
    return "mixed_bfloat16" if has_bf16_cpu(flags) else "float32"


def describe() -> str:
    """Return one line naming the hardware: CPU model, cores, bf16 support, GPUs."""
    gpus = gpu_names()
    bf16 = ", ".join(f for f in BF16_CPU_FLAGS if f in cpu_flags()) or "no bf16 instructions"
    text = f"{cpu_name()} ({os.cpu_count()} cores, {bf16})"
    return text + (f", GPUs: {', '.join(gpus)}" if gpus else ", no GPU")

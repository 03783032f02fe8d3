"""What machine a measurement ran on: recorded next to every benchmark and experiment result.

Speed and even bf16 results differ between CPUs (native bf16 vs AVX2-only emulation), so a number
without its machine cannot be compared with anything.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> dict:
    """CPU model, usable cores and the bf16 instruction sets, read from /proc/cpuinfo."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu or platform.processor() or platform.machine(), "cores": cores,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "python": platform.python_version()}


def summary(info: dict | None = None) -> str:
    """One line for reports: ``Intel Xeon ..., 2 cores, native bf16``."""
    m = info or describe()
    bf16 = "native bf16" if m.get("avx512_bf16") or m.get("amx_bf16") else "no native bf16"
    return f"{m['cpu']}, {m['cores']} cores, {bf16}"

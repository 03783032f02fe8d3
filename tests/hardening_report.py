"""Write one generated section of docs/results/hardening.md (used by the adversarial runs).

Each adversarial run owns a region between ``<!-- begin generated: NAME -->`` and
``<!-- end generated: NAME -->``; a re-run replaces only its own region, so the server, gateway
and CLI runs (and the hand-written text around them) live in one file. Nothing is written unless
``SHOPTUNE_HARDENING_REPORT`` names the file.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path


def machine_line() -> str:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((x.split(":", 1)[1].strip() for x in cpu.splitlines() if x.startswith("Model name")), "?")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "no native bf16"
    return (f"Machine: {name}, {os.cpu_count()} cores, {kind}; Python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d')}.")


def cell(x) -> str:
    x = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/", ".../", str(x))
    return x.replace("|", "\\|").replace("\n", " ")[:260]


def table(header: list[str], rows) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return out


def write_section(name: str, lines: list[str]) -> Path | None:
    """Replace (or append) the region NAME of the report with ``lines``."""
    path = os.environ.get("SHOPTUNE_HARDENING_REPORT")
    if not path:
        return None
    from shoptune._io import atomic_open
    begin, end = f"<!-- begin generated: {name} -->", f"<!-- end generated: {name} -->"
    block = "\n".join([begin, *lines, end])
    old = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    with atomic_open(path) as f:
        f.write(new)
    return Path(path)

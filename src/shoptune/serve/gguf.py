"""``shoptune export gguf``: the base model and its LoRA adapters as the GGUF files llama.cpp's
``llama-server`` loads (``-m base.gguf --lora a.gguf,b.gguf``), written by llama.cpp's own
converters (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``), the reference for tensor names
and layout.

The converters come from the llama.cpp source inside the pinned ``llama-cpp-python`` source
distribution on PyPI (the same one ``make llama-server`` builds from), found at
``$SHOPTUNE_LLAMA_CPP_DIR`` or ``<cache>/llama.cpp/``, downloaded there with pip when missing.

    shoptune export gguf --model smollm2-135m --adapter shopping=runs/quality/adapter --out runs/gguf
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from shoptune.paths import cache_dir

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned sdist; keep equal to LLAMA_CPP_PY in the Makefile
OUTTYPES = ("bf16", "f16", "f32", "q8_0")


class ExportError(Exception):
    """A one-line, user-facing reason the export cannot be done."""


def llama_cpp_root() -> Path:
    return cache_dir() / "llama.cpp"


def llama_cpp_dir(*, fetch: bool = True) -> Path:
    """The llama.cpp source folder (converters at its root): $SHOPTUNE_LLAMA_CPP_DIR, else the
    cached sdist's ``vendor/llama.cpp``, downloaded with pip (PyPI) when ``fetch``."""
    if os.environ.get("SHOPTUNE_LLAMA_CPP_DIR"):
        path = Path(os.environ["SHOPTUNE_LLAMA_CPP_DIR"])
        if not (path / "convert_hf_to_gguf.py").is_file():
            raise ExportError(f"SHOPTUNE_LLAMA_CPP_DIR={path}: no convert_hf_to_gguf.py there")
        return path
    root = llama_cpp_root()
    src = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    if not fetch:
        raise ExportError(f"no llama.cpp source at {src}; run `make llama-cpp-source`")
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                            ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)],
                           capture_output=True, text=True)
        if r.returncode != 0 or not sdist.is_file():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise ExportError(f"cannot download llama-cpp-python=={LLAMA_CPP_PYTHON} from PyPI: {last}")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / src.parents[1].name).rename(src.parents[1])  # atomic: complete or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return src


def llama_server_path() -> Path | None:
    """``$SHOPTUNE_LLAMA_SERVER``, else the binary ``make llama-server`` builds; None if absent."""
    env = os.environ.get("SHOPTUNE_LLAMA_SERVER")
    path = Path(env) if env else llama_cpp_root() / f"build-{LLAMA_CPP_PYTHON}" / "bin" / "llama-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _adapter_name(spec: str) -> tuple[str, Path]:
    """NAME=DIR, or DIR (named after the folder; ``runs/x/adapter`` is named ``x``)."""
    name, sep, folder = spec.partition("=")
    if not sep:
        folder = spec
        p = Path(folder).resolve()
        name = p.parent.name if p.name == "adapter" else p.name
    return name, Path(folder)


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [x for x in (r.stderr + r.stdout).strip().splitlines() if x.strip()]
        why = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "")
        raise ExportError(f"{what}: llama.cpp's converter failed: {why.strip()[:400]}")


def export_gguf(model: str, adapters: list[str], out: Path, *, outtype: str = "bf16",
                status=None) -> dict:
    """Convert ``model`` and each adapter into ``out``; returns (and writes as manifest.json) the
    files and the llama-server command line that serves them."""
    from shoptune.models import resolve
    from shoptune.serve.engine import AdapterError, check_adapter_dir

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: one of {', '.join(OUTTYPES)}")
    base_dir = resolve(model)
    named = [_adapter_name(a) for a in adapters]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ExportError(f"two adapters would both be named {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                          "name them with --adapter NAME=DIR")
    for name, folder in named:
        try:
            check_adapter_dir(folder)
        except AdapterError as e:
            raise ExportError(f"--adapter {name}={folder}: {e.message}") from None
    src = llama_cpp_dir()
    out.mkdir(parents=True, exist_ok=True)
    say = status or (lambda msg: None)
    base_name = Path(model).name
    files = {"base": f"{base_name}.gguf", "adapters": {}}

    def convert(script: str, args: list[str], target: Path, what: str) -> None:
        tmp = target.with_name(f".{target.name}.tmp")
        say(f"converting {what} -> {target}")
        try:
            _run([sys.executable, str(src / script), *args, "--outtype", outtype, "--outfile", str(tmp)], what)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)

    convert("convert_hf_to_gguf.py", [str(base_dir)], out / files["base"], f"base model {model}")
    for name, folder in named:
        files["adapters"][name] = f"{name}.gguf"  # (the gateway serves it as NAME)
        convert("convert_lora_to_gguf.py", [str(folder), "--base", str(base_dir)],
                out / files["adapters"][name], f"adapter {name} ({folder})")
    loras = ",".join(str(out / f) for f in files["adapters"].values())
    cmd = ["llama-server", "-m", str(out / files["base"])] + (["--lora", loras] if loras else []) + \
        ["--lora-init-without-apply"] * bool(loras)
    manifest = {"model": model, "base_dir": str(base_dir), "outtype": outtype,
                "llama_cpp_python": LLAMA_CPP_PYTHON, **files, "llama_server_command": cmd,
                "adapter_ids": {n: i for i, n in enumerate(files["adapters"])}}
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / "manifest.json")
    return manifest

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


def _adapter_name(spec: str, *, flag: str = "--adapter",
                  use: str = "written as NAME.gguf in --out") -> tuple[str, Path]:
    """NAME=DIR, or DIR (named after the folder; ``runs/x/adapter`` is named ``x``). The name
    follows the server's rule for adapter names (it becomes NAME.gguf in OUT, and llama-server's
    adapter); ExportError for any other (``../x``, empty, hidden, a path). ``flag`` and ``use``:
    how the command's messages call the argument and what the name is used for."""
    from shoptune.serve.engine import ADAPTER_NAME_RE

    name, sep, folder = spec.partition("=")
    if not sep:
        folder = spec
        p = Path(folder).resolve()
        name = p.parent.name if p.name == "adapter" else p.name
    if not folder.strip():
        raise ExportError(f"{flag} {spec!r}: no adapter folder (expected NAME=DIR or DIR)")
    if not ADAPTER_NAME_RE.fullmatch(name):
        raise ExportError(f"{flag} {spec!r}: {name!r} cannot be an adapter name ({use}): letters, "
                          f"digits, '.', '_' and '-', starting with a letter or digit, at most 128; "
                          f"name it with {flag + ' ' if flag.startswith('--') else ''}NAME=DIR")
    return name, Path(folder)


def named_adapters(specs: list[str], **how) -> dict[str, Path]:
    """NAME=DIR / DIR specs as name -> folder; two specs with one name are an ExportError."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, folder = _adapter_name(spec, **how)
        if name in out:
            raise ExportError(f"two adapters would both be named {name!r} ({out[name]} and {folder}); "
                              f"name them with NAME=DIR")
        out[name] = folder
    return out


def _base_file_name(model: str, base_dir: Path) -> str:
    """``NAME.gguf`` of the base model: the embedded name, or its folder's name."""
    from shoptune.serve.engine import ADAPTER_NAME_RE

    name = Path(model).name or base_dir.resolve().name
    return f"{name if ADAPTER_NAME_RE.fullmatch(name) else 'base'}.gguf"


def check_adapters_fit(base_dir: Path, named: list[tuple[str, Path]], model: str) -> None:
    """Each adapter folder is loadable (safetensors, no pickles) and was trained for this base
    (the project's own adapter-vs-base check, on the base's config: no weights loaded), so a
    mismatch is named here, not by the converter's reshape error."""
    from transformers import AutoConfig

    from shoptune.models import InvalidAdapterError, check_adapter
    from shoptune.serve.engine import AdapterError, check_adapter_dir

    config = None
    for name, folder in named:
        try:
            check_adapter_dir(folder)
        except AdapterError as e:
            raise ExportError(f"--adapter {name}={folder}: {e.message}") from None
        config = config or AutoConfig.from_pretrained(str(base_dir))
        try:
            check_adapter(config, folder, base_name=model)
        except InvalidAdapterError as e:
            raise ExportError(f"--adapter {name}={folder}: {e}") from None


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [x for x in (r.stderr + r.stdout).strip().splitlines() if x.strip()]
        why = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "")
        raise ExportError(f"{what}: llama.cpp's converter failed: {why.strip()[:400]}")


def export_gguf(model: str, adapters: list[str], out: Path, *, outtype: str = "bf16",
                status=None, overwrite: bool = False, legacy=None) -> dict:
    """Convert ``model`` and each adapter into ``out``; returns (and writes as manifest.json) the
    files and the llama-server command line that serves them.

    Names, adapters and ``out`` are checked before anything is converted. The files are made in
    a new folder beside ``out``, renamed into place only when every conversion succeeded
    (:func:`shoptune._io.output_dir`): a failed export leaves ``out`` as it was."""
    from shoptune._io import check_output_dir, output_dir, write_json
    from shoptune.models import resolve

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: one of {', '.join(OUTTYPES)}")
    out = Path(out)
    named = list(named_adapters(adapters).items())
    base_dir = resolve(model)
    inputs = [base_dir, *(f for _, f in named)]
    check_output_dir(out, command="export gguf", inputs=inputs, overwrite=overwrite, legacy=legacy)
    files = {"base": _base_file_name(model, base_dir), "adapters": {}}
    for name, folder in named:
        if f"{name}.gguf" == files["base"]:
            raise ExportError(f"--adapter {name}={folder}: {name}.gguf is the base model's file; "
                              "name the adapter with --adapter NAME=DIR")
    check_adapters_fit(base_dir, named, model)
    src = llama_cpp_dir()
    say = status or (lambda msg: None)
    with output_dir(out, command="export gguf", inputs=inputs, overwrite=overwrite, legacy=legacy) as stage:
        def convert(script: str, args: list[str], file: str, what: str) -> None:
            say(f"converting {what} -> {out / file}")
            _run([sys.executable, str(src / script), *args, "--outtype", outtype,
                  "--outfile", str(stage / file)], what)

        convert("convert_hf_to_gguf.py", [str(base_dir)], files["base"], f"base model {model}")
        for name, folder in named:
            files["adapters"][name] = f"{name}.gguf"  # (the gateway serves it as NAME)
            convert("convert_lora_to_gguf.py", [str(folder), "--base", str(base_dir)],
                    files["adapters"][name], f"adapter {name} ({folder})")
        loras = ",".join(str(out / f) for f in files["adapters"].values())
        cmd = ["llama-server", "-m", str(out / files["base"])] + (["--lora", loras] if loras else []) + \
            ["--lora-init-without-apply"] * bool(loras)
        manifest = {"model": model, "base_dir": str(base_dir), "outtype": outtype,
                    "llama_cpp_python": LLAMA_CPP_PYTHON, **files, "llama_server_command": cmd,
                    "adapter_ids": {n: i for i, n in enumerate(files["adapters"])}}
        write_json(stage / "manifest.json", manifest)
    return manifest

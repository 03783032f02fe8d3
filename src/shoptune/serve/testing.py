"""Helpers for tests and benchmarks: random task adapters, a `shoptune serve` subprocess."""
from __future__ import annotations

import contextlib

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def make_adapters(root: Path, names=("alpha", "beta", "gamma"), *, model: str = "smollm2-135m",
                  scale: float = 2.0) -> dict[str, Path]:
    """Rank-4 q/v LoRA adapters with random B, saved as PEFT folders (each changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from shoptune.models import load

    base, _ = load(model)
    out = {}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(scale)
        pm.save_pretrained(root / name)
        base = pm.unload()
        out[name] = root / name
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m shoptune.cli serve ARGS` on a free loopback port; waits for /health."""

    def __init__(self, args: list[str], log: Path, *, startup_timeout: float = 180.0):
        from shoptune.serve.supervise import wait_healthy

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "shoptune.cli", "serve", "--port", str(self.port),
                                      "--log-level", "warning", *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        state = wait_healthy(self.proc, self.url, startup_timeout)
        if state == "up":
            return
        if state == "exited":
            raise RuntimeError(f"server exited {self.proc.returncode}:\n{log.read_text()}")
        self.stop()
        raise RuntimeError(f"server did not come up:\n{log.read_text()}")

    def rss_bytes(self) -> int:
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def make_tiny_model(root: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0,
                    tokenizer: str = "smollm2-135m") -> Path:
    """A random tiny Llama (``hidden`` wide) with the real tokenizer, saved as a plain HF folder.

    Loads and generates in milliseconds: what engine and HTTP tests use instead of the real model.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shoptune.models import load_tokenizer

    tok = load_tokenizer(tokenizer)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root, safe_serialization=True)
    tok.save_pretrained(root)
    return root


def make_tiny_lora(base_dir: Path, out: Path, *, seed: int = 0, targets=("q_proj", "v_proj"),
                   r: int = 4, **config) -> Path:
    """A LoRA adapter with random (non-zero) B for the model in ``base_dir``, saved as PEFT folder;
    ``config``: more LoraConfig fields (``use_dora=True``, ``modules_to_save=["lm_head"]``...)."""
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # (peft warns about a tied lm_head in modules_to_save)
        warnings.simplefilter("ignore")
        pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                             init_lora_weights=False, **config))
        pm.save_pretrained(out)
    return out


def make_tiny_fixtures(root: Path) -> dict[str, Path]:
    """A tiny base model plus adapters good and bad for it (what the hardening tests load):

    ``base`` (hidden 64), ``good`` / ``good2`` (LoRA for it), ``mismatch`` (LoRA trained on a
    hidden-32 model), ``prompt_tuning`` (a PEFT type the engine cannot batch), ``corrupt``
    (a good config with a truncated ``adapter_model.safetensors``), ``dora`` and
    ``modules_to_save`` (LoRA for it that peft cannot apply per row of a mixed batch).
    """
    import shutil

    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(root / "tiny-64")
    other = make_tiny_model(root / "tiny-32", hidden=32, seed=1)
    ads = root / "adapters"
    out = {"base": base, "good": make_tiny_lora(base, ads / "good", seed=1),
           "good2": make_tiny_lora(base, ads / "good2", seed=2),
           "mismatch": make_tiny_lora(other, ads / "mismatch", seed=3),
           "dora": make_tiny_lora(base, ads / "dora", seed=4, use_dora=True),
           "modules_to_save": make_tiny_lora(base, ads / "modules_to_save", seed=5,
                                             modules_to_save=["lm_head"])}
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm.save_pretrained(ads / "prompt_tuning")
    out["prompt_tuning"] = ads / "prompt_tuning"
    shutil.copytree(out["good"], ads / "corrupt")
    weights = ads / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    out["corrupt"] = ads / "corrupt"
    return out


def greedy_reference(pm, tok, adapter: str | None, prompt: str, n: int) -> str:
    """What plain peft generates greedily for ``prompt`` with ``adapter`` (None: the base model);
    the answer a served completion must equal."""
    import torch

    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        if adapter is None:
            with pm.disable_adapter():
                out = pm.generate(**ids, max_new_tokens=n, do_sample=False)
        else:
            pm.set_adapter(adapter)
            out = pm.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


class LlamaServerProcess:
    """llama.cpp's ``llama-server`` (``shoptune.serve.gguf.llama_server_path()``) on a free
    loopback port with LoRA adapters loaded at scale 0 (chosen per request); waits for /health."""

    def __init__(self, model: Path, loras: list[Path], log: Path, *, slots: int = 16,
                 ctx_per_slot: int = 2048, threads: int = 2, startup_timeout: float = 120.0):
        from shoptune.serve.gguf import llama_server_path
        from shoptune.serve.supervise import wait_healthy
        binary = llama_server_path()
        if binary is None:
            raise RuntimeError("no llama-server binary: run `make llama-server` or set SHOPTUNE_LLAMA_SERVER")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(slots), "-c", str(ctx_per_slot * slots), "-t", str(threads)]
        if loras:
            cmd += ["--lora", ",".join(map(str, loras)), "--lora-init-without-apply"]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
        state = wait_healthy(self.proc, self.url, startup_timeout)
        if state == "up":
            return
        if state == "exited":
            raise RuntimeError(f"llama-server exited {self.proc.returncode}:\n{log.read_text()[-3000:]}")
        self.stop()
        raise RuntimeError(f"llama-server did not come up:\n{log.read_text()[-3000:]}")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@contextlib.contextmanager
def app_in_thread(app, *, port: int | None = None, start_timeout: float = 30.0):
    """Serve an ASGI ``app`` with uvicorn on loopback (``port``, else a free one) in a daemon
    thread (tests); yields its base URL, raises if it does not start, stops it on exit."""
    import threading

    import uvicorn
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(start_timeout)
        if thread.is_alive():  # a graceful shutdown stuck on an open request: cut it short
            server.force_exit = True
            thread.join(start_timeout)
        if thread.is_alive():
            raise RuntimeError(f"uvicorn on 127.0.0.1:{port} did not stop")


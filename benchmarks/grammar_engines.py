"""The same constraints through llama.cpp's and vLLM's own structured-output options: which
strings each engine allows, whether the untuned model finishes within its budget, and what a
grammar costs per token there. Companion of ``benchmarks/grammar_libs.py`` (same venv, same
constraints; input to issue #32 item 3).

    flock /tmp/shoptune-heavy.lock /work/gramvenv/bin/python benchmarks/grammar_engines.py \\
        --llama-server /work/main/.cache/shoptune/llama.cpp/build-0.3.36/bin/llama-server \\
        --gguf /tmp/smollm2-135m.bf16.gguf \\
        --vllm-python /work/main/.cache/shoptune/vllm/venv-0.32.0/bin/python \\
        --out docs/results/grammar_engines.json

Per engine and constraint it sends 4 greedy requests (the untuned SmolLM2-135M-Instruct, chat
prompts of the kind the constraint serves) and records what came back: finish reason, tokens,
and whether the text is in the *reference language* (the constraint compiled by xgrammar, as the
built-in engine would). For the JSON schema it also reads back the grammar llama.cpp converted the
schema to (``generation_settings.grammar``) and re-creates vLLM's xgrammar call, and checks probe
strings (other whitespace, too many items, too long strings, escapes) against each language.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
import grammar_adapters as ga  # noqa: E402
import grammar_cases as cases  # noqa: E402
from grammar_libs import machine  # noqa: E402

BUDGET = 256
N_PROMPTS = 4
LIMIT_S = 300  # per engine and constraint: prompts not sent by then are left out (recorded)
INSTANCE = {"brand": "Hydro Flask", "price": 34.95, "color": "blue",
            "materials": ["stainless steel", "silicone"], "features": ["vacuum insulated", "leak proof lid"]}
PROBES = {  # string -> in the bounded schema (c)'s intended language?
    "compact ', ' ': '": (json.dumps(INSTANCE), True),
    "no spaces ',' ':'": (json.dumps(INSTANCE, separators=(",", ":")), False),
    "indented (newlines)": (json.dumps(INSTANCE, indent=2), False),
    "keys in another order": (json.dumps(dict(reversed(list(INSTANCE.items())))), False),
    "5 materials (maxItems 4)": (json.dumps({**INSTANCE, "materials": list("abcde")}), False),
    "41-char brand (maxLength 40)": (json.dumps({**INSTANCE, "brand": "x" * 41}), False),
    "escaped quote in brand": (json.dumps({**INSTANCE, "brand": 'The "Best"'}), True),
    "raw tab in brand": (json.dumps(INSTANCE).replace("Hydro Flask", "Hydro\tFlask"), False),
    "80-digit price (bounded on purpose)": (json.dumps(INSTANCE).replace("34.95", "1" * 80), False),
}


# ----------------------------------------------------------------------------- constraints as sent

def gbnf_literal(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def gbnf_alt(items) -> str:
    return " | ".join(gbnf_literal(str(x)) for x in items)


def engine_forms() -> dict[str, dict]:
    """Each constraint: the reference (for xgrammar), the llama.cpp request fields, the vLLM
    ``structured_outputs`` object, and the prompt kind."""
    cs = cases.constraints()
    lab6, lab200 = cases.LABELS6, cases.LABELS200
    csv = f"root ::= label (\", \" label){{0,2}}\nlabel ::= {gbnf_alt(lab6)}\n"
    rank = [", ".join(p) for p in itertools.permutations("12345")]
    retr = [", ".join(map(str, p)) for p in itertools.permutations(cases.RETRIEVAL_VALUES, 3)]
    unb = cases.unbounded(cases.SCHEMA_C)
    return {
        "a_label6": dict(ref=cs["a_label6"], prompt="label6", llama={"grammar": f"root ::= {gbnf_alt(lab6)}\n"},
                         vllm={"choice": lab6}),
        "a_label200": dict(ref=cs["a_label200"], prompt="label200",
                           llama={"grammar": f"root ::= {gbnf_alt(lab200)}\n"}, vllm={"choice": lab200}),
        "b_labels_json": dict(ref=cs["b_labels_json"], prompt="labels6",
                              llama={"json_schema": cs["b_labels_json"]["schema"]},
                              vllm={"json": cs["b_labels_json"]["schema"], "disable_any_whitespace": True}),
        "b_labels200_unique_gbnf": dict(ref=cs["b_labels200_unique_gbnf"], prompt="labels200",
                                        llama={"grammar": cs["b_labels200_unique_gbnf"]["gbnf"]},
                                        vllm={"grammar": cs["b_labels200_unique_gbnf"]["gbnf"]}),
        "b_labels_csv": dict(ref=cs["b_labels_csv"], prompt="labels6", llama={"grammar": csv},
                             vllm={"regex": cs["b_labels_csv"]["regex"]}),
        "c_json": dict(ref=cs["c_json"], prompt="json", llama={"json_schema": cases.SCHEMA_C},
                       vllm={"json": cases.SCHEMA_C, "disable_any_whitespace": True}),
        "c_json_gbnf": dict(ref=cs["c_json_gbnf"], prompt="json", llama={"grammar": cs["c_json_gbnf"]["gbnf"]},
                            vllm={"grammar": cs["c_json_gbnf"]["gbnf"]}),
        "c_json_unbounded": dict(ref={"schema": unb}, prompt="json", llama={"json_schema": unb},
                                 vllm={"json": unb, "disable_any_whitespace": True}),
        "d_rank": dict(ref=cs["d_rank"], prompt="rank", llama={"grammar": f"root ::= {gbnf_alt(rank)}\n"},
                       vllm={"regex": cs["d_rank"]["regex"]}),
        "d_retrieval": dict(ref=cs["d_retrieval"], prompt="retrieval",
                            llama={"grammar": f"root ::= {gbnf_alt(retr)}\n"}, vllm={"regex": cs["d_retrieval"]["regex"]}),
    }


def prompt_texts(tok, kind: str) -> list[str]:
    titles = cases.TITLES[:N_PROMPTS]
    ask = {
        "label6": lambda t: f"Which category is this product in? One of: {', '.join(cases.LABELS6)}.\nProduct: {t}",
        "label200": lambda t: f"Which category is this product in? Answer with a category path like "
                              f"'Home & Kitchen > Lighting'.\nProduct: {t}",
        "labels6": lambda t: f"Which of these categories fit this product (one or more)? {', '.join(cases.LABELS6)}."
                             f"\nProduct: {t}",
        "labels200": lambda t: f"Which category paths fit this product (one to three)?\nProduct: {t}",
        "json": lambda t: "Extract the product's attributes from its title as JSON with the keys brand, price, "
                          f"color, materials and features.\nTitle: {t}",
        "rank": lambda t: f"Rank these 5 products by relevance to the query '{t}': 1. ... 5. ...\n"
                          "Answer with the 5 numbers, most relevant first.",
        "retrieval": lambda t: f"Which 3 of the 20 numbered products go with '{t}'? Answer with 3 numbers.",
    }[kind]
    return [tok.apply_chat_template([{"role": "user", "content": ask(t)}], add_generation_prompt=True,
                                    tokenize=False) for t in titles]


# ----------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1, its log in a temp file; stopped by its own pid."""

    def __init__(self, cmd: list[str], port: int, ready_path: str, env=None, timeout: float = 300):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{cmd[0]} not ready in {timeout} s: {self.tail()}")

    def tail(self) -> str:
        return Path(self.log.name).read_text()[-1500:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ask_llama(srv: Server, prompt: str, fields: dict, budget: int) -> dict:
    body = {"prompt": prompt, "n_predict": budget, "temperature": 0, "cache_prompt": False, **fields}
    t = time.perf_counter()
    r = httpx.post(srv.url + "/completion", json=body, timeout=600)
    secs = time.perf_counter() - t
    if r.status_code != 200:
        return {"error": f"{r.status_code}: {r.text[:300]}"}
    j = r.json()
    return {"text": j["content"], "tokens": j.get("tokens_predicted"), "finish": j.get("stop_type"),
            "secs": secs, "grammar": j.get("generation_settings", {}).get("grammar")}


def ask_vllm(srv: Server, prompt: str, so: dict | None, budget: int) -> dict:
    body = {"model": "m", "prompt": prompt, "max_tokens": budget, "temperature": 0}
    if so is not None:
        body["structured_outputs"] = so
    t = time.perf_counter()
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=600)
    secs = time.perf_counter() - t
    if r.status_code != 200:
        return {"error": f"{r.status_code}: {r.text[:300]}"}
    j = r.json()
    c = j["choices"][0]
    return {"text": c["text"], "tokens": j["usage"]["completion_tokens"], "finish": c["finish_reason"],
            "secs": secs}


# ----------------------------------------------------------------------------- judging

class Judge:
    """Is a text in the reference language (xgrammar, as the built-in engine compiles it)?"""

    def __init__(self, tok, vocab):
        self.lib = ga.XGrammar(tok, vocab)
        self.cache = {}

    def __call__(self, name: str, ref: dict, text: str) -> bool:
        if name not in self.cache:
            self.cache[name] = self.lib.compile(ref)
        return self.lib.accepts(self.cache[name], text, True)


def summarize(rows: list[dict], judge, name, ref) -> dict:
    errs = [r["error"] for r in rows if "error" in r]
    if errs:
        return {"error": errs[0]}
    out = {"in_reference_language": sum(judge(name, ref, r["text"]) for r in rows), "rows": len(rows),
           "finish": sorted({str(r["finish"]) for r in rows}),
           "tokens": [r["tokens"] for r in rows], "ms_per_token": round(
               1e3 * sum(r["secs"] for r in rows) / max(1, sum(r["tokens"] or 0 for r in rows)), 2),
           "example": rows[0]["text"][:300]}
    if "schema" in ref:
        valid = 0
        for r in rows:
            try:
                v = json.loads(r["text"])
                valid += cases._valid_c(v, ref["schema"]) if name.startswith("c_") else 1
            except ValueError:
                pass
        out["valid_json_rows"] = valid
    return out


def probe_languages(tok, vocab, llama_grammar: str | None) -> dict:
    """Which probe strings each engine's language for schema (c) contains."""
    xg, lg = ga.XGrammar(tok, vocab), ga.LLGuidance(tok, vocab)
    schema, gbnf = json.dumps(cases.SCHEMA_C), cases.schema_gbnf(cases.SCHEMA_C)
    langs = {  # name -> (library, how it compiles)
        "built-in xgrammar json_schema (any_whitespace=False)": (xg, lambda: xg.compile({"schema": cases.SCHEMA_C})),
        # vLLM 0.32's xgrammar backend (backend_xgrammar.py): compile_json_schema(schema,
        # any_whitespace=not D, separators=(",", ":") if D else None), D = the *server's*
        # structured_outputs_config.disable_any_whitespace
        "vLLM json, server disable_any_whitespace": (xg, lambda: xg.compiler.compile_json_schema(
            schema, any_whitespace=False, separators=(",", ":"))),
        "vLLM json (default)": (xg, lambda: xg.compiler.compile_json_schema(schema, any_whitespace=True)),
        "llguidance json_schema (compact)": (lg, lambda: lg.compile({"schema": cases.SCHEMA_C})),
        "one GBNF, xgrammar": (xg, lambda: xg.compile({"gbnf": gbnf})),
        "one GBNF, llguidance": (lg, lambda: lg.compile({"gbnf": gbnf})),
    }
    if llama_grammar:
        langs["llama.cpp json_schema (its GBNF), read by xgrammar"] = (xg, lambda: xg.compile({"gbnf": llama_grammar}))
        langs["llama.cpp json_schema (its GBNF), read by llguidance"] = (lg, lambda: lg.compile({"gbnf": llama_grammar}))
    out = {}
    for lang, (lib, make) in langs.items():
        try:
            g = make()
        except Exception as e:  # noqa: BLE001 - a dialect the library does not read
            out[lang] = f"cannot compile: {str(e).strip()[:200]}"
            continue
        out[lang] = {probe: lib.accepts(g, text, True) for probe, (text, _) in PROBES.items()}
    out["intended"] = {p: want for p, (_, want) in PROBES.items()}
    return out


def probe_vllm_guidance(tok, vocab) -> dict:
    """Run with vLLM's own venv: the grammar vLLM's guidance backend builds from the one GBNF
    (``serialize_guidance_grammar``, its llguidance version), validated and probed like the rest."""
    import llguidance
    import llguidance.hf
    from vllm.v1.structured_output.backend_guidance import serialize_guidance_grammar
    from vllm.v1.structured_output.backend_types import StructuredOutputOptions
    lt = llguidance.hf.from_tokenizer(tok, vocab)
    out = {"llguidance": llguidance.__version__}
    for name, gbnf in (("c_json_gbnf", cases.schema_gbnf(cases.SCHEMA_C)),
                       ("b_labels200_unique_gbnf", cases.ordered_subset_gbnf(cases.LABELS200, 3))):
        g = serialize_guidance_grammar(StructuredOutputOptions.GRAMMAR, gbnf)
        out[name] = {"validate": llguidance.LLMatcher.validate_grammar(g, lt) or "ok"}
    g = serialize_guidance_grammar(StructuredOutputOptions.GRAMMAR, cases.schema_gbnf(cases.SCHEMA_C))
    probes = {}
    for probe, (text, _) in PROBES.items():
        m = llguidance.LLMatcher(lt, g)
        probes[probe] = bool(m.consume_tokens(lt.tokenize_str(text)) and not m.is_error() and m.is_accepting())
    out["c_json_gbnf"]["probes"] = probes
    return out


# ----------------------------------------------------------------------------- main

def run_engine(kind: str, srv: Server, tok, judge, forms, budget) -> dict:
    res, llama_grammar = {}, None
    for name, f in forms.items():
        prompts = prompt_texts(tok, f["prompt"])
        rows, t0 = [], time.monotonic()
        for p in prompts:
            if time.monotonic() - t0 > LIMIT_S:
                break
            rows.append(ask_llama(srv, p, f["llama"], budget) if kind == "llama.cpp"
                        else ask_vllm(srv, p, f["vllm"], budget))
        if kind == "llama.cpp" and name == "c_json" and rows and "grammar" in rows[0]:
            llama_grammar = rows[0]["grammar"]
        res[name] = summarize(rows, judge, name, f["ref"])
        print(kind, name, {k: v for k, v in res[name].items() if k != "example"}, file=sys.stderr, flush=True)
    # the cost of a grammar per token: the JSON prompts without any constraint, same budget
    rows = [ask_llama(srv, p, {}, budget) if kind == "llama.cpp" else ask_vllm(srv, p, None, budget)
            for p in prompt_texts(tok, "json")]
    res["c_json_no_constraint"] = summarize(rows, judge, "c_json", forms["c_json"]["ref"])
    return res, llama_grammar


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-server")
    ap.add_argument("--gguf")
    ap.add_argument("--vllm-python")
    ap.add_argument("--vllm-backend", default="auto", help="vLLM's structured-outputs backend: auto "
                    "(xgrammar first) or guidance (llguidance)")
    ap.add_argument("--budget", type=int, default=BUDGET)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--probe-vllm-guidance", action="store_true",
                    help="(with vLLM's python) how vLLM's guidance backend reads the one GBNF")
    a = ap.parse_args()
    tok, vocab = ga.load_tokenizer()
    if a.probe_vllm_guidance:
        res = probe_vllm_guidance(tok, vocab)
        print(json.dumps(res, indent=1))
        if a.out:
            record = json.loads(a.out.read_text()) if a.out.exists() else {}
            record["vllm_guidance_backend_probe"] = res
            record.setdefault("commands", []).append("python " + " ".join(sys.argv))
            tmp = a.out.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(a.out)
        return
    judge, forms = Judge(tok, vocab), engine_forms()
    record = {"machine": machine(), "budget": a.budget, "engines": {}, "commands": []}
    if a.out and a.out.exists():  # one engine per run: the record gathers them
        record = json.loads(a.out.read_text())
    record["commands"].append("python " + " ".join(sys.argv))
    llama_grammar = None
    if a.llama_server:
        port = free_port()
        srv = Server([a.llama_server, "-m", a.gguf, "--port", str(port), "--host", "127.0.0.1", "-t", "2",
                      "-c", "4096", "-np", "1"], port, "/health")
        try:
            record["engines"]["llama.cpp"], llama_grammar = run_engine("llama.cpp", srv, tok, judge, forms, a.budget)
            record["llama_cpp_grammar_for_c"] = llama_grammar
        finally:
            srv.stop()
    llama_grammar = llama_grammar or record.get("llama_cpp_grammar_for_c")
    if a.vllm_python:
        port = free_port()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
        srv = Server([a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", ga.MODEL_DIR,
                      "--served-model-name", "m", "--port", str(port), "--host", "127.0.0.1",
                      "--dtype", "bfloat16", "--max-model-len", "4096",
                      "--structured-outputs-config.backend", a.vllm_backend], port, "/health", env=env, timeout=600)
        try:
            record["engines"][f"vLLM ({a.vllm_backend})"], _ = run_engine("vLLM", srv, tok, judge, forms, a.budget)
            record["vllm_log_structured_outputs"] = [ln for ln in srv.tail().splitlines()
                                                     if "guid" in ln.lower() or "structured" in ln.lower()][-5:]
        finally:
            srv.stop()
    record["languages_c"] = probe_languages(tok, vocab, llama_grammar)
    print(json.dumps(record["languages_c"], indent=1))
    if a.out:
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(a.out)


if __name__ == "__main__":
    main()

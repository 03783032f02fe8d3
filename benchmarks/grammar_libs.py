"""Which structured-output library constrains shoptune's decoding: xgrammar, llguidance,
outlines-core or lm-format-enforcer, measured on this machine with the embedded model's tokenizer
(SmolLM2-135M, vocab 49,152). Input to issue #32 item 3.

Runs in a venv of its own (the candidates are not project dependencies):

    python3 -m venv /work/gramvenv && /work/gramvenv/bin/pip install torch==2.13.0
    /work/gramvenv/bin/pip install transformers==5.23.0 apache-tvm-ffi==0.1.15.post2 pydantic \
        numpy psutil llguidance==1.9.1 outlines-core==0.2.14 outlines==1.3.3 \
        lm-format-enforcer==0.11.3
    /work/gramvenv/bin/pip install --no-deps xgrammar==0.2.8    # (its triton pin is GPU-only)
    flock /tmp/shoptune-heavy.lock /work/gramvenv/bin/python benchmarks/grammar_libs.py \
        --out docs/results/grammar_libs.json

Each library runs in a fresh subprocess (cold compiles, its own memory). For each constraint
shoptune needs -- (a) one of N labels, (b) a subset of labels as a JSON list or comma-separated,
(c) a JSON Schema inferred from data (strings, number, enum, string arrays, maxItems/maxLength,
required, additionalProperties false), (d) today's number lists (a ranking permutation; 3 unique
retrieval numbers out of 20) -- it measures the compile time, the first mask (time to first
token's constraint), and the per-token cost of filling the bitmask and applying it to a
49,152-float logits row while a valid answer is force-fed token by token (every token must be
allowed, and EOS at the end); then a batch of 8 rows with 8 different grammars per step; then
which JSON Schema keywords each library honours (checked on strings, not read from docs). The
baseline is the model's own decode step (HF ``generate``, bf16, batch 1 and 8), measured in the
same run, and ``generate`` with a per-row grammar processor vs without, which also answers whether
the untuned model under a grammar finishes within its budget.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from grammar_adapters import LIB_CLASSES, MODEL_DIR, XGrammar, load_tokenizer, plain_apply  # noqa: E402
from grammar_cases import (REGEX_SUPPORT, SCHEMA_C, SUPPORT, TITLES, _valid_c, constraints,  # noqa: E402
                           max_tokens_bound, schema_gbnf, special_ids, unbounded)

LIBS = ("xgrammar", "llguidance", "outlines-core", "lm-format-enforcer")
REPEATS = 5  # force-feed passes per constraint (fresh matchers; the compile is reused)
LIMIT_S = 120  # a constraint a library has not compiled and fed by then is recorded as a timeout


# ----------------------------------------------------------------------------- measuring one library

def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def bit(bitmask: torch.Tensor, row: int, t: int) -> bool:
    return bool((int(bitmask[row, t // 32]) >> (t % 32)) & 1)


def feed(lib, g, ids, eos, bitmask, logits, base) -> dict:
    """Force-feed ``ids`` then EOS through a fresh matcher; time fill and apply per step."""
    m = lib.matcher(g)
    fills, applies, ok, note = [], [], True, ""
    for step, t in enumerate(ids + [eos]):
        t0 = time.perf_counter()
        lib.fill(m, bitmask, 0)
        t1 = time.perf_counter()
        logits.copy_(base)
        t2 = time.perf_counter()
        plain_apply(logits, bitmask)
        t3 = time.perf_counter()
        fills.append(t1 - t0)
        applies.append(t3 - t2)
        if not bit(bitmask, 0, t) or not torch.isfinite(logits[0, t]):
            ok, note = False, f"token {step} ({t}) not allowed"
            break
        if t != eos and not lib.accept(m, t):
            ok, note = False, f"token {step} ({t}) refused by accept"
            break
    return {"fills": fills, "applies": applies, "ok": ok, "note": note}


def us(xs) -> float:
    return round(1e6 * statistics.fmean(xs), 1) if xs else None


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout(f"not done in {LIMIT_S} s")


def run_lib(name: str) -> dict:
    signal.signal(signal.SIGALRM, _alarm)
    torch.set_num_threads(2)
    tok, vocab = load_tokenizer()
    eos = tok.eos_token_id
    r0 = rss_mb()
    t = time.perf_counter()
    lib = LIB_CLASSES[name](tok, vocab)
    out = {"library": name, "version": lib.version, "tokenizer_setup_s": round(time.perf_counter() - t, 3),
           "api": lib.api, "constraints": {}}
    r1 = rss_mb()
    bitmask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
    base = torch.randn(1, vocab)
    logits = base.clone()
    t = time.perf_counter()
    lib.apply(logits, bitmask)  # first apply: torch.compile kernels compile here
    out["first_apply_s"] = round(time.perf_counter() - t, 3)
    compiled = {}
    for cname, c in constraints().items():
        row = {"what": c["what"]}
        ids = tok.encode(c["answer"], add_special_tokens=False)
        row["answer_tokens"] = len(ids)
        signal.alarm(LIMIT_S)
        try:
            t = time.perf_counter()
            g = lib.compile(c)
            row["compile_ms"] = round(1e3 * (time.perf_counter() - t), 2)
            t = time.perf_counter()
            lib.compile(c)
            row["recompile_ms"] = round(1e3 * (time.perf_counter() - t), 2)
            t = time.perf_counter()
            m = lib.matcher(g)
            lib.fill(m, bitmask, 0)
            row["first_mask_ms"] = round(1e3 * (time.perf_counter() - t), 2)
            size = lib.size(g)
            if size is not None:
                row["compiled_bytes"] = size
            runs = [feed(lib, g, ids, eos, bitmask, logits, base) for _ in range(REPEATS)]
            row["ok"] = all(r["ok"] for r in runs)
            if not row["ok"]:
                row["note"] = next(r["note"] for r in runs if r["note"])
            fills = [f for r in runs[1:] for f in r["fills"]]  # (the first pass warms caches)
            applies = [a for r in runs[1:] for a in r["applies"]]
            row.update(fill_us=us(fills), apply_us=us(applies), fill_max_us=round(1e6 * max(fills), 1),
                       first_pass_fill_us=us(runs[0]["fills"]))
            compiled[cname] = g
        except Exception as e:  # noqa: BLE001 - a library that cannot express it: recorded, not fatal
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            signal.alarm(0)
        out["constraints"][cname] = row
        print(f"{name:20s} {cname:18s} {json.dumps(row)[:220]}", file=sys.stderr, flush=True)
    out["apply_us"] = apply_kernels(lib, vocab)
    out["rss_mb"] = {"after_tokenizer_setup": round(r1 - r0, 1), "after_compiles": round(rss_mb() - r0, 1)}
    out["batch8"] = batch8(lib, tok, vocab, compiled)
    out["support"] = support(lib, tok, vocab)
    return out


def apply_kernels(lib, vocab) -> dict:
    """The library's own apply kernel vs :func:`plain_apply`, batch 1 and 8, a mask allowing
    about 1 token in 500 (JSON string content allows far more; the cost does not depend on it)."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        bm = torch.randint(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int32, generator=g)
        bm &= torch.randint(-2**31, 2**31 - 1, bm.shape, dtype=torch.int32, generator=g)
        base, logits = torch.randn(batch, vocab, generator=g), torch.empty(batch, vocab)
        for name, f in (("own", lib.apply), ("plain_torch", plain_apply)):
            ts, ref = [], base.clone()
            plain_apply(ref, bm)
            for _ in range(30):
                logits.copy_(base)
                t = time.perf_counter()
                f(logits, bm)
                ts.append(time.perf_counter() - t)
            assert torch.equal(logits, ref), name
            out[f"{name}_batch{batch}"] = round(1e6 * statistics.median(ts), 1)
    return out


def batch8(lib, tok, vocab, compiled) -> dict:
    """8 rows, 8 different grammars, stepped together: fill every open row's mask, apply the
    (8, vocab) mask to the batch's logits, accept each row's next answer token."""
    names = [n for n in ("a_label6", "a_label200", "b_labels_json", "b_labels200_json", "b_labels_csv",
                         "c_json", "d_rank", "d_retrieval", "d_retrieval_free", "b_labels200_unique_gbnf")
             if n in compiled][:8]  # (a library that cannot compile one: the next in this list)
    if len(names) < 8:
        return {"error": f"only {len(names)} grammars compiled"}
    cs = constraints()
    eos = tok.eos_token_id
    seqs = [tok.encode(cs[n]["answer"], add_special_tokens=False) + [eos] for n in names]
    bitmask = torch.full((8, (vocab + 31) // 32), -1, dtype=torch.int32)
    base = torch.randn(8, vocab)
    logits = base.clone()
    out = {}
    for mode in ("loop", "batch_api"):
        steps, ok = [], True
        for _ in range(REPEATS):
            ms = [lib.matcher(compiled[n]) for n in names]
            for step in range(max(map(len, seqs))):
                bitmask.fill_(-1)
                t0 = time.perf_counter()
                open_ = [i for i, s in enumerate(seqs) if step < len(s)]
                if mode == "loop":
                    for i in open_:
                        lib.fill(ms[i], bitmask, i)
                else:
                    lib.batch_fill(ms, bitmask)  # (all rows; a finished row's mask is ignored)
                logits.copy_(base)
                plain_apply(logits, bitmask)
                steps.append(time.perf_counter() - t0)
                for i in open_:
                    t = seqs[i][step]
                    ok &= bit(bitmask, i, t)
                    if t != eos:
                        ok &= bool(lib.accept(ms[i], t))
        out[mode] = {"step_us": us(steps), "ok": bool(ok)}
    out["grammars"] = names
    return out


def _leak(tok, bm, special) -> str:
    allowed = [i for i in special if bit(bm, 0, i)]
    return "none allowed" if not allowed else \
        f"{len(allowed)} of {len(special)} allowed: {tok.convert_ids_to_tokens(allowed[:3])}..."


def support(lib, tok, vocab) -> dict:
    res = {}
    for name, spec, cases in [(n, {"schema": x}, c) for n, x, c in SUPPORT] + \
            [(n, {"regex": x}, c) for n, x, c in REGEX_SUPPORT]:
        try:
            g = lib.compile(spec)
            got = [lib.accepts(g, text, complete) for text, complete, _ in cases]
            res[name] = "yes" if all(g_ == want for g_, (_, _, want) in zip(got, cases)) else \
                "no: " + "; ".join(f"{text!r} {'accepted' if g_ else 'refused'}"
                                   for g_, (text, _, want) in zip(got, cases) if g_ != want)
        except Exception as e:  # noqa: BLE001
            res[name] = f"refused: {type(e).__name__}: {str(e)[:160]}"
    # special tokens inside a JSON string: <|im_start|> etc. must never be allowed there
    try:
        g = lib.compile({"schema": {"type": "string"}})
        m = lib.matcher(g)
        quote = tok.encode('"', add_special_tokens=False)
        for t in quote:
            lib.accept(m, t)
        bm = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32)
        lib.fill(m, bm, 0)
        special = sorted(special_ids(tok))
        res["special tokens inside a string"] = _leak(tok, bm, special)
        if isinstance(lib, XGrammar):  # the same with TokenizerInfo.from_huggingface
            comp = lib.xgr.GrammarCompiler(lib.info_hf)
            m = lib.xgr.GrammarMatcher(comp.compile_json_schema('{"type": "string"}', any_whitespace=False))
            m.accept_string('"')
            m.fill_next_token_bitmask(bm, 0)
            res["special tokens inside a string (TokenizerInfo.from_huggingface)"] = _leak(tok, bm, special)
    except Exception as e:  # noqa: BLE001
        res["special tokens inside a string"] = f"error: {type(e).__name__}: {e}"
    # rollback: feed 6 tokens of (c), roll back 4, feed them again
    try:
        c = constraints()["c_json"]
        g = lib.compile(c)
        m = lib.matcher(g)
        ids = tok.encode(c["answer"], add_special_tokens=False)[:6]
        assert all(lib.accept(m, t) for t in ids)
        lib.rollback(m, 4)
        res["rollback"] = "yes" if all(lib.accept(m, t) for t in ids[2:]) else "no: refused after rollback"
        res["forced continuation after '{\"brand'"] = repr(lib.forced(lib.matcher(g))) \
            if lib.forced(lib.matcher(g)) is not None else "n/a"
    except Exception as e:  # noqa: BLE001
        res["rollback"] = f"error: {type(e).__name__}: {str(e)[:160]}"
    return res


# ----------------------------------------------------------------------------- the model baseline

def load_model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16).eval()


def prompts(tok, n):
    msgs = [[{"role": "user", "content": "Extract the product's attributes from its title as JSON with the keys "
                                         "brand, price, color, materials and features.\nTitle: " + t}]
            for t in TITLES[:n]]
    return [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]


class GrammarRows:
    """Logits processor: one matcher per row (any library above), as the engine's RowLogits would
    hold it; a row that ended (EOS accepted) is left alone."""

    def __init__(self, lib, grammars, eos, vocab, prompt_len, tok=None, plain: bool = False,
                 close_budget: int | None = None):
        self.lib, self.eos, self.prompt_len, self.tok, self.plain = lib, eos, prompt_len, tok, plain
        self.ms = [lib.matcher(g) for g in grammars]
        self.done = [False] * len(grammars)
        self.plans: list[list[int] | None] = [None] * len(grammars)  # forced closing tokens
        self.closed = 0
        self.close_budget = close_budget
        self.bitmask = torch.full((len(grammars), (vocab + 31) // 32), -1, dtype=torch.int32)
        self.time = 0.0

    def _close(self, i: int, left: int) -> None:
        """With ``close_budget``: when the row's remaining tokens just fit a closing text (and
        EOS), force that text from here on."""
        if self.plans[i] is not None or left > 64:
            return
        suffix = self.lib.closing_suffix(self.ms[i])
        if suffix is not None:
            ids = self.tok.encode(suffix, add_special_tokens=False) + [self.eos]
            if len(ids) >= left:
                self.plans[i] = ids
                self.closed += 1

    def __call__(self, input_ids, scores):
        t0 = time.perf_counter()
        self.bitmask.fill_(-1)
        step = input_ids.shape[1] - self.prompt_len
        for i, m in enumerate(self.ms):
            if step > 0 and not self.done[i]:
                t = int(input_ids[i, -1])
                if t == self.eos or not self.lib.accept(m, t):
                    self.done[i] = True
            if self.done[i]:
                continue
            if self.close_budget is not None:
                self._close(i, self.close_budget - step)
            if self.plans[i]:
                self.bitmask[i] = 0
                t = self.plans[i].pop(0)
                self.bitmask[i, t // 32] = (1 << (t % 32)) - (1 << 32 if t % 32 == 31 else 0)
            else:
                self.lib.fill(m, self.bitmask, i)
        s = scores.float()
        (plain_apply if self.plain else self.lib.apply)(s, self.bitmask)
        self.time += time.perf_counter() - t0
        return s


def run_model(libs: list[str], budget: int, plain: bool = False) -> dict:
    from transformers import GenerationConfig, LogitsProcessorList
    torch.set_num_threads(2)
    tok, vocab = load_tokenizer()
    tok.padding_side = "left"
    model = load_model()
    out = {"dtype": "bfloat16", "decode": {}, "grammar_generate": {}}

    def gen(batch, new, processors=None):
        enc = tok(prompts(tok, batch), return_tensors="pt", padding=True, add_special_tokens=False)
        cfg = GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id)
        t = time.perf_counter()
        with torch.inference_mode():
            ids = model.generate(**enc, generation_config=cfg, logits_processor=processors)
        return time.perf_counter() - t, ids[:, enc["input_ids"].shape[1]:], enc["input_ids"].shape[1]

    gen(1, 4)  # warm-up
    for batch in (1, 8):
        t1, _, _ = gen(batch, 1, None)
        cfg_min = 33  # 32 decode steps after the first token; EOS ignored by min_new_tokens below
        enc = tok(prompts(tok, batch), return_tensors="pt", padding=True, add_special_tokens=False)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**enc, generation_config=GenerationConfig(
                max_new_tokens=cfg_min, min_new_tokens=cfg_min, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
        tn = time.perf_counter() - t
        out["decode"][f"batch{batch}"] = {"ms_per_step": round(1e3 * (tn - t1) / (cfg_min - 1), 2),
                                          "prefill_plus_first_ms": round(1e3 * t1, 1)}
        print("decode", batch, out["decode"][f"batch{batch}"], file=sys.stderr, flush=True)

    import re
    for name in libs:
        lib = LIB_CLASSES[name](tok, vocab)
        res = {}
        runs = [("bounded", {"schema": SCHEMA_C}, budget, False, (1, 8)),
                ("unbounded", {"schema": unbounded(SCHEMA_C)}, budget, False, (1, 8))]
        if hasattr(lib, "closing_suffix"):  # one GBNF, a tight budget, closed when it runs out
            runs.append(("gbnf_close_at_40", {"gbnf": schema_gbnf(SCHEMA_C)}, 40, True, (8,)))
        for label, spec, new_tokens, close, batches in runs:
            g = lib.compile(spec)
            schema = SCHEMA_C if "gbnf" in spec else spec["schema"]
            for batch in batches:
                enc_len = tok(prompts(tok, batch), return_tensors="pt", padding=True,
                              add_special_tokens=False)["input_ids"].shape[1]
                proc = GrammarRows(lib, [g] * batch, tok.eos_token_id, vocab, enc_len, tok, plain,
                                   new_tokens if close else None)
                secs, new, _ = gen(batch, new_tokens, LogitsProcessorList([proc]))
                texts, lens, valid = [], [], 0
                for row in new.tolist():
                    n = next((k for k, t in enumerate(row) if t == tok.eos_token_id), None)
                    lens.append(len(row) if n is None else n + 1)
                    text = tok.decode(row[:n] if n is not None else row, skip_special_tokens=True)
                    texts.append(text)
                    try:
                        v = json.loads(text)
                        valid += _valid_c(v, schema)
                    except ValueError:
                        pass
                steps = new.shape[1]
                res[f"{label}_batch{batch}"] = {
                    "finished_with_eos": sum(1 for row in new.tolist() if tok.eos_token_id in row),
                    "rows": batch, "valid_json_rows": valid, "tokens_per_row": lens, "steps": steps,
                    "ms_per_step": round(1e3 * secs / max(steps, 1), 2),
                    "grammar_ms_per_step": round(1e3 * proc.time / max(steps, 1), 3),
                    "example": texts[0][:400],
                    "max_list_len": max((len(re.findall(r'", "', t)) for t in texts), default=0),
                    "rows_closed_at_budget": proc.closed}
                print(name, label, batch, {k: v for k, v in res[f"{label}_batch{batch}"].items() if k != "example"},
                      file=sys.stderr, flush=True)
        out["grammar_generate"][name] = res
        del lib
        gc.collect()
    return out


# ----------------------------------------------------------------------------- main

def machine() -> dict:
    cpu = Path("/proc/cpuinfo").read_text()
    flags = next((ln for ln in cpu.splitlines() if ln.startswith("flags")), "")
    return {"cpu": next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("model name")), "?"),
            "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "python": platform.python_version(), "torch": torch.__version__}


def child(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    sys.stderr.write(r.stderr[-4000:])
    if r.returncode:
        return {"error": f"exit {r.returncode}: {r.stderr[-600:]}"}
    return json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--generate-libs", default="xgrammar,llguidance")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--plain-apply", action="store_true", help="generate with plain_apply, not each "
                    "library's own kernel (llguidance's compiles with torch.compile on first use)")
    ap.add_argument("--only-lib", help=argparse.SUPPRESS)
    ap.add_argument("--only-model", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.only_lib:
        print(json.dumps(run_lib(a.only_lib)))
        return
    if a.only_model:
        print(json.dumps(run_model([x for x in a.generate_libs.split(",") if x], a.budget, a.plain_apply)))
        return
    from transformers import __version__ as tv
    record = {"machine": machine(), "transformers": tv, "model_dir": MODEL_DIR,
              "command": "python " + " ".join(sys.argv), "libraries": {},
              "max_tokens_bound_c": max_tokens_bound(SCHEMA_C)}
    for name in a.libs.split(","):
        record["libraries"][name] = child(["--only-lib", name])
    record["model"] = child(["--only-model", "--generate-libs", a.generate_libs, "--budget", str(a.budget)])
    print_table(record)
    if a.out:
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(a.out)


def print_table(record) -> None:
    dec = record.get("model", {}).get("decode", {}).get("batch1", {}).get("ms_per_step")
    print(f"decode step (batch 1, bf16): {dec} ms")
    for cname in constraints():
        print(f"\n{cname}")
        for lib, r in record["libraries"].items():
            c = r.get("constraints", {}).get(cname, {})
            tot = (c.get("fill_us") or 0) + (c.get("apply_us") or 0)
            ratio = f"{tot / (1e3 * dec):.2%}" if dec and c.get("fill_us") is not None else "-"
            print(f"  {lib:20s} compile {c.get('compile_ms')} ms, first mask {c.get('first_mask_ms')} ms, "
                  f"fill {c.get('fill_us')} us + apply {c.get('apply_us')} us per token "
                  f"({ratio} of a decode step), ok={c.get('ok')} {c.get('error', c.get('note', ''))[:80]}")


if __name__ == "__main__":
    main()

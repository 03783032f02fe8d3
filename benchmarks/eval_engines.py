"""The evaluation engines side by side on the core suite, one machine, one run (#21):

    flock /tmp/shoptune-heavy.lock .venv/bin/python benchmarks/eval_engines.py \
        --adapter runs/adapters/diverse-r32.s1/adapter [--suite core] [--dtypes fp32 auto] \
        [--engines builtin llama.cpp vllm builtin+compile]

Each engine scores the same questions with the same trained adapter through `shoptune eval
--engine ...` (builtin: this process, the adapter merged; llama.cpp: the adapter as a LoRA per
request; vLLM: merged), once per dtype. Per engine and dtype: seconds (engine start-up and
generation apart), questions/s, all-around score, the paired difference to the built-in engine of
the same dtype (bootstrap CI over the same questions, `shoptune.eval.paired`), and the share of
answers equal to the built-in engine's. Targets (issue #21): the fastest engine >= 4x the built-in
on a pass; per engine the paired CI includes 0 and |diff| <= 0.01; >= 95% equal answers in fp32.
Writes docs/results/eval_engines.json and eval_engines.png; prints the markdown table. Needs
`make llama-server` and `make vllm` (or $SHOPTUNE_LLAMA_SERVER / $SHOPTUNE_VLLM_PYTHON).

`builtin+compile` (#35) is the built-in engine with `--compile on`, started with an empty inductor
cache, so its pass time includes compiling (target: >= 1.3x the built-in pass; in fp32 a paired
difference of 0 and >= 99% equal answers). `builtin+compile-steady` runs it again in the same
process: dynamo guards a compiled layer on its class, not on the instance, so the new model's
layers reuse the graphs the cold arm compiled and nothing compiles (the compiled engine's steady
state; the cold pass minus this one is what compiling cost). Without --adapter every arm runs the
base model.

Where a built-in pass's time goes (``split`` per built-in arm): every call of the model's forward
is timed, as a prefill (a prompt batch) or a decode step (one new token per row), and as a call
that compiled graphs (dynamo's graph count went up during it) or not; the rest of the pass is
``generate``'s own work (logits processors, stopping, tokenizing). Steady-state seconds per call
compare eager and compiled kernels with compiling left out.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from shoptune import machine
from shoptune._io import write_json
from shoptune.eval.paired import paired_compare
from shoptune.eval.runner import evaluate


class ForwardClock:
    """Times each forward call of the built-in engine's model (see the module docstring)."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {"prefill": [], "decode": [], "prefill_compiling": [],
                                              "decode_compiling": []}
        self.rows: dict[str, int] = {"prefill": 0, "decode": 0}
        self._t = self._graphs = 0

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]

    def attach(self, model) -> None:
        model.register_forward_pre_hook(self._pre, with_kwargs=True)
        model.register_forward_hook(self._post, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self._graphs, self._t = self.graphs(), time.perf_counter()

    def _post(self, module, args, kwargs, output):
        seconds = time.perf_counter() - self._t
        ids = kwargs.get("input_ids", args[0] if args else None)
        kind = "decode" if ids is not None and ids.shape[1] == 1 else "prefill"
        self.rows[kind] += int(ids.shape[0]) if ids is not None else 0
        self.calls[kind + ("_compiling" if self.graphs() > self._graphs else "")].append(seconds)

    def summary(self, generate_s: float) -> dict:
        out = {k: {"calls": len(v), "s": round(sum(v), 1),
                   "ms_per_call": round(1000 * sum(v) / len(v), 2) if v else None}
               for k, v in self.calls.items()}
        out["other_s"] = round(generate_s - sum(sum(v) for v in self.calls.values()), 1)
        out["rows"] = self.rows
        return out


def clocked_backend():
    """Every LocalBackend made from here on gets a :class:`ForwardClock` on its model (the
    clock of the newest is returned by the callable)."""
    from shoptune.eval import backends
    made: list[ForwardClock] = []
    if not getattr(backends.LocalBackend.__init__, "_clocked", False):
        init = backends.LocalBackend.__init__

        def clocked(self, model, *a, **k):
            init(self, model, *a, **k)
            made.append(ForwardClock())
            made[-1].attach(model)
        clocked._clocked = True
        backends.LocalBackend.__init__ = clocked
    return lambda: made[-1] if made else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapter", help="a trained PEFT LoRA folder (default: the base model)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--suite", default="core")
    ap.add_argument("--engines", nargs="+", default=["builtin", "llama.cpp", "vllm"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "auto"])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default="docs/results/eval_engines.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval-engines-"))
    res = {"command": "benchmarks/eval_engines.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if v is not None),
           "machine": machine.describe(), "suite": args.suite, "adapter": args.adapter, "arms": {}}
    eng = args.engines
    if "builtin+compile-steady" in eng and ("builtin+compile" not in eng
                                            or eng.index("builtin+compile") > eng.index("builtin+compile-steady")):
        ap.error("builtin+compile-steady reuses what builtin+compile compiled: list it after builtin+compile")
    rows = {}
    last_clock = clocked_backend()
    for dtype in args.dtypes:
        for engine in args.engines:
            name = f"{engine}/{dtype}"
            print(f"== {name}", flush=True)
            compiled = engine.startswith("builtin+compile")
            if engine == "builtin+compile":  # an empty inductor cache: the pass pays the whole compile
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-", dir=work)
            s = evaluate(model=args.model, adapter=args.adapter, suite=args.suite, out=work / name.replace("/", "-"),
                         engine="builtin" if compiled else engine, dtype=dtype, concurrency=args.concurrency,
                         quiet=True, n_boot=200, compile="on" if compiled else "off")
            rows[name] = [json.loads(x) for x in (work / name.replace("/", "-") / "predictions.jsonl")
                          .read_text().splitlines() if x]
            t = s["timing"]
            res["arms"][name] = {"engine": s["engine"], "overall": round(s["overall"], 4),
                                 "start_s": t["load_s"], "generate_s": t["generate_s"],
                                 "pass_s": round(t["load_s"] + t["generate_s"], 1),
                                 "questions_per_s": t["questions_per_s"]}
            if engine.startswith("builtin") and last_clock() is not None:
                res["arms"][name]["split"] = last_clock().summary(t["generate_s"])
            print(json.dumps(res["arms"][name]), flush=True)
        ref = rows.get(f"builtin/{dtype}")
        for engine in args.engines:
            name = f"{engine}/{dtype}"
            if ref is None or engine == "builtin":
                continue  # (builtin+compile is compared with builtin like the other engines)
            cmp = paired_compare([ref], [rows[name]], n_boot=2000, n_perm=2000)
            a = res["arms"][name]
            b = res["arms"][f"builtin/{dtype}"]
            a["vs_builtin"] = {"diff": round(cmp["overall"]["diff"], 4), "ci95": cmp["overall"]["ci95"],
                               "p": cmp["overall"]["p"],
                               "equal_answers": round(sum(x["model_output"] == y["model_output"]
                                                          for x, y in zip(ref, rows[name])) / len(ref), 4),
                               "speedup_generate": round(b["generate_s"] / a["generate_s"], 2),
                               "speedup_pass": round(b["pass_s"] / a["pass_s"], 2)}
    for dtype in args.dtypes:  # what compiling cost a pass: the cold compiled pass minus the steady one
        cold, steady = (res["arms"].get(f"builtin+compile{x}/{dtype}") for x in ("", "-steady"))
        if cold and steady:
            cold["compile_s"] = round(cold["pass_s"] - steady["pass_s"], 1)
    res["n_questions"] = len(next(iter(rows.values())))
    print("| engine | dtype | start s | generate s | q/s | all-around | vs built-in (paired, 95% CI) | equal answers | speed-up (generate / whole pass) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, a in res["arms"].items():
        engine, dtype = name.split("/")
        v = a.get("vs_builtin")
        vs = (f"{v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" if v and v["ci95"] else "-")
        eq = f"{v['equal_answers']:.1%}" if v else "-"
        sp = f"{v['speedup_generate']:.2f}x / {v['speedup_pass']:.2f}x" if v else "1.00x"
        print(f"| {engine} | {a['engine']['dtype']} | {a['start_s']:.1f} | {a['generate_s']:.1f} | "
              f"{a['questions_per_s']:.2f} | {a['overall']:.4f} | {vs} | {eq} | {sp} |")
    write_json(Path(args.out), res)
    _plot(res, Path(args.out).with_suffix(".png"))


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res["arms"])
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    start = [res["arms"][n]["start_s"] for n in names]
    ax[0].barh(names, start, label="start-up (engine, export, merge)", color="#bbb")
    left = list(start)
    if all("split" in res["arms"][n] for n in names):  # built-in arms only: where generation went
        parts = (("prefill", "prompt forwards", "#4c72b0"), ("decode", "decode steps", "#55a868"),
                 ("compiling", "calls that compiled", "#c44e52"), ("other", "generate's own work", "#8172b2"))
        for key, label, color in parts:
            sp = [res["arms"][n]["split"] for n in names]
            w = [x["other_s"] if key == "other" else
                 x["prefill_compiling"]["s"] + x["decode_compiling"]["s"] if key == "compiling" else x[key]["s"]
                 for x in sp]
            ax[0].barh(names, w, left=left, label=label, color=color)
            left = [a + b for a, b in zip(left, w)]
    else:
        ax[0].barh(names, [res["arms"][n]["generate_s"] for n in names], left=start, label="generation",
                   color="#4c72b0")
    ax[0].set_xlabel(f"seconds per pass ({res['n_questions']} questions)")
    ax[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    ax[0].invert_yaxis()
    ov = [res["arms"][n]["overall"] for n in names]
    ax[1].barh(names, ov, color="#55a868")
    for i, n in enumerate(names):
        v = res["arms"][n].get("vs_builtin")
        ref = res["arms"].get("builtin/" + n.split("/")[1])
        if v and v["ci95"] and ref:  # the built-in score plus the paired CI of the difference
            lo, hi = ref["overall"] + v["ci95"][0], ref["overall"] + v["ci95"][1]
            ax[1].errorbar(ov[i], i, xerr=[[max(0.0, ov[i] - lo)], [max(0.0, hi - ov[i])]], color="k", capsize=3)
    ax[1].set_xlabel("all-around (bars: paired 95% CI vs the built-in engine)")
    ax[1].invert_yaxis()
    fig.suptitle(f"Evaluation engines on {res['machine'].get('cpu', '?')}, {res['machine'].get('cores', '?')} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

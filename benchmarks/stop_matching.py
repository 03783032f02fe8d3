"""Stop-string matching cost per generated token: the old per-string scan vs the automaton (#9 item 5).

    .venv/bin/python benchmarks/stop_matching.py

Feeds a 200-token decoded answer (SmolLM2's tokenizer) to one row's stop handling, token by token,
as the engine does, with 1, 32 (the request limit) and 50,000 stop strings that never match (the
worst case: every step must look at all of them). "before" re-implements the code replaced in
this change: ``text.find(s)`` for every stop string plus the hold-back loop over every string,
each step. "now" is :class:`shoptune.serve.engine.StopMatcher`. Prints microseconds per token.
"""
from __future__ import annotations

import time

from shoptune.models import load_tokenizer
from shoptune.serve.engine import StopMatcher

TEXT = ("Customers who bought this tent also bought a sleeping bag, a camping stove, and a "
        "headlamp. The tent is waterproof, sets up in five minutes, and packs down small. ") * 6


def before(steps: list[str], stops: list[str]) -> None:
    for text in steps:
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return
        end = len(text.rstrip("\ufffd"))
        for s in stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break


def now(steps: list[str], stops: list[str]) -> None:
    m = StopMatcher(stops)
    for text in steps:
        if m.feed(text)[0] >= 0:
            return


def per_token_us(fn, steps, stops, repeat=3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(steps, stops)
        best = min(best, time.perf_counter() - t0)
    return best / len(steps) * 1e6


def main() -> None:
    tok = load_tokenizer("smollm2-135m")
    ids = tok.encode(TEXT, add_special_tokens=False)[:200]
    steps = [tok.decode(ids[:i + 1]) for i in range(len(ids))]
    print(f"{len(steps)} tokens; microseconds per token (best of 3)")
    print("| stop strings | before | now |")
    print("|---|---|---|")
    for n in (1, 32, 50_000):
        stops = [f"#{i:05d}~" for i in range(n)]  # never in the text; share no prefix with it
        print(f"| {n:,} | {per_token_us(before, steps, stops, 1 if n > 1000 else 3):,.0f} | "
              f"{per_token_us(now, steps, stops):,.0f} |")


if __name__ == "__main__":
    main()

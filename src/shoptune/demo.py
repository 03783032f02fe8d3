"""`shoptune demo` / `make demo`.

Until the training recipe lands (issue: multi-task LoRA training), the demo shows the data layer
and task registry at work on the real data, and scores the base model on the ShopBench
development set when the evaluation engine is installed.
"""
from __future__ import annotations

from rich.console import Console


def run_demo(console: Console) -> None:
    from shoptune.data.loaders import load_records
    from shoptune.data.stats import compute_stats
    from shoptune.data.validate import validate_records
    from shoptune.models import DEFAULT_MODEL, load_tokenizer
    from shoptune.tasks import all_cards

    cards = all_cards()
    caps = sorted({c.capability for c in cards.values()})
    console.rule("shoptune demo")
    console.print(f"{len(cards)} task cards over {len(caps)} capabilities: {', '.join(caps)}")
    recs = load_records(["ec-guide", "shopbench-dev"], check=False)
    st = compute_stats(recs, tokenizer=load_tokenizer(DEFAULT_MODEL))
    console.print(f"{st['total_rows']} rows; by capability: {st['by_capability']}")
    console.print(f"duplicates: {st['duplicates']}; input tokens: {st['tokens']['input']}")
    n_ok, issues = validate_records(["ec-guide"])
    console.print(f"EC-Guide validation: {n_ok} valid rows, {len(issues)} rows break the rules "
                  f"(`shoptune data validate data/ec-guide` lists them)")
    console.print("[yellow]Training is not in this build yet: the demo stops at data.[/]")

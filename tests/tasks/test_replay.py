"""The shipped tasks after the task-card redesign (#32): every question of the core suite (the
96 ShopBench dev questions and the EC-Guide test sample) is asked with byte-identical prompts
under every protocol, decoded with the same plan, and its answers parse and score exactly as
before. tests/tasks/data/replay.json.gz was written by tests/tasks/make_replay.py with the code
before the redesign, from a real core-suite run of the base model plus gold, wrong and empty
answers."""
import gzip
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.conftest import needs_shared

FIXTURE = Path(__file__).parent / "data" / "replay.json.gz"


@pytest.fixture(scope="module")
def replay():
    with gzip.open(FIXTURE, "rt", encoding="utf-8") as fh:
        return json.load(fh)


@needs_shared
def test_shipped_tasks_replay_identically(replay):
    from shoptune.decoding import build_prompts
    from shoptune.eval.scoring import score_outputs
    from shoptune.eval.suite import build_suite
    from shoptune.models import load_tokenizer
    from shoptune.tasks import plan_for

    records, _ = build_suite("core")
    old = {q["id"]: q for q in replay["questions"]}
    assert [r.id for r in records] == [q["id"] for q in replay["questions"]] and len(records) == 601
    tok = load_tokenizer("smollm2-135m")
    for protocol in ("starter-kit", "chat", "fewshot"):
        prompts = build_prompts(records, protocol, tok)
        changed = [r.id for r, p in zip(records, prompts)
                   if hashlib.sha1(p.encode("utf-8", "surrogatepass")).hexdigest() != old[r.id]["prompt_sha1"][protocol]]
        assert not changed, (protocol, changed[:5])
    for r in records:
        plan = json.loads(json.dumps(asdict(plan_for(r))))
        assert plan.pop("grammar") is None and plan == old[r.id]["plan"], r.id
    keep = [r for r in records if r.metric != "multilingual-sent-transformer"]
    for kind in ("model", "gold", "wrong", "empty"):
        rows = score_outputs(keep, [old[r.id]["outputs"][kind] for r in keep])
        got = {row["id"]: [row["parsed"], row.get("counts") or row["score"]] for row in rows}
        diff = [(i, got[i], old[i]["scored"][kind]) for i in got if got[i] != old[i]["scored"][kind]]
        assert not diff, (kind, diff[:3])

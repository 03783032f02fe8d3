import json
import os
from pathlib import Path

import pytest

from tests.ci_skips import (pytest_runtest_logreport, pytest_sessionfinish,  # noqa: F401 (hooks)
                             pytest_terminal_summary)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHOPTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
DEV = SHARED / "shopbench-dev" / "development.json"
EC_GUIDE = SHARED / "ec-guide"

needs_shared = pytest.mark.skipif(not DEV.exists(), reason="../shared/data not present")

# a "billion laughs" YAML file: 420 bytes whose aliases expand to 9^9 = 387 million strings
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))


def mc(q="Which?", gold=1, n=4, **kw):
    opts = "\n".join(f"{i}. option {i}" for i in range(n))
    return {"input_field": f"{q}\n{opts}\nAnswer: ", "output_field": gold,
            "task_type": "multiple-choice", "metric": "accuracy", "is_multiple_choice": True,
            "task_name": "task2", "track": "amazon-kdd-cup-24-understanding-shopping-concepts", **kw}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The model cache the suite shares (the repo's .cache when make set it up)."""
    return Path(os.environ.get("SHOPTUNE_CACHE_DIR") or tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random base model (hidden 64) and adapters good and bad for it (see
    make_tiny_fixtures); shared by the serve and export tests."""
    from shoptune.serve.testing import make_tiny_fixtures
    return make_tiny_fixtures(tmp_path_factory.mktemp("tiny"))


EXAMPLE_TASKS = REPO / "examples" / "own-tasks"


@pytest.fixture
def own(tmp_path, monkeypatch):
    """A folder a user works in, own task cards in ./tasks (read by every command)."""
    from shoptune import tasks
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SHOPTUNE_TASKS_PATH", raising=False)
    tasks.reload()
    yield tmp_path
    tasks.reload()


def own_example_tasks(root: Path) -> Path:
    """The worked example's two cards (product_category: label; product_attributes: json), made
    by `tasks new` from examples/own-tasks into ROOT/tasks; returns that folder (for
    SHOPTUNE_TASKS_PATH)."""
    import shutil

    from shoptune.tasks.new import make
    for f in ("products.csv", "attributes.csv"):
        shutil.copy(EXAMPLE_TASKS / f, root / f)
    make("product_category", root / "products.csv", inputs=["title"], label="category",
         tasks_dir=root / "tasks")
    make("product_attributes", root / "attributes.csv", inputs=["title"], json_col="attributes",
         tasks_dir=root / "tasks")
    return root / "tasks"


OWN_INPUTS = ["Oakridge Bamboo Cutting Board, large", "Veltra Electric Kettle, 1.7 L, silver",
              "Trail Running Shoes by Halden - size 42, red/black"]


def check_own_answers(post, models) -> dict:
    """Ask both example tasks through ``post(task, body) -> reply json`` for every model; assert
    each answer is a label / schema-valid JSON; return {(task, model, title): answer}."""
    from jsonschema import validate

    from shoptune.tasks import get_card
    cat, attrs = get_card("product_category"), get_card("product_attributes")
    out = {}
    for model in models:
        for title in OWN_INPUTS:
            r = post("product_category", {"model": model, "input": {"title": title}})
            assert r["answer"] in cat.labels, r
            out["product_category", model, title] = r["answer"]
            r = post("product_attributes", {"model": model, "input": {"title": title}})
            validate(r["answer"], attrs.schema_)
            out["product_attributes", model, title] = r["answer"]
    return out

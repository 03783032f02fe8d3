import json
import os
from pathlib import Path

import pytest

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

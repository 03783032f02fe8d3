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

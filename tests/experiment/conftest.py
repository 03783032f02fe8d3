import pytest
import yaml

# 5 multiple-choice questions (no generation task: no sentence-transformers load, short decodes):
# three ShopBench dev tasks (two of concept understanding, reached by a capability route or the
# base model; one multilingual, a capability the tests never train) and two EC-Guide test-split
# tasks the experiment tests train on (reached by a task route)
MICRO_SUITE = {"name": "micro", "parts": [
    {"name": "dev", "sources": ["shopbench-dev/development.json"], "per_task_cap": 1,
     "include_tasks": ["shopbench_task2", "shopbench_task11", "shopbench_task16"]},
    {"name": "ec", "sources": ["ec-guide"], "split": "test", "per_task_cap": 1,
     "include_tasks": ["ecguide_sa", "ecguide_qprp"]}]}


@pytest.fixture
def micro_suite(tmp_path):
    """A 5-question suite file: the experiment tests score every run, and the tiny suite's 29
    questions (with generation) would cost more than their training."""
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(MICRO_SUITE))
    return path

"""shoptune: make one LLM good at every e-commerce task, evaluate it with the exact ShopBench
rules, and serve it.

Public API::

    from shoptune import Record, load_records, validate_records, tasks, models
"""
from shoptune.records import CAPABILITIES, METRICS, TASK_TYPES, Record
from shoptune.data.loaders import load_records
from shoptune.data.validate import validate_records

__version__ = "0.1.0"
from pathlib import Path as _Path

REPO_CONFIGS = _Path(__file__).parent / "configs"  # shipped configs (also ./configs in the repo)
__all__ = ["CAPABILITIES", "METRICS", "TASK_TYPES", "Record", "load_records", "validate_records",
           "__version__"]

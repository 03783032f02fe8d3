"""Loading, validating, splitting and cleaning ShopBench-format task data."""
from shoptune.data.loaders import DataIssue, DataValidationError, iter_records, load_records
from shoptune.data.validate import validate_records

__all__ = ["DataIssue", "DataValidationError", "iter_records", "load_records", "validate_records"]

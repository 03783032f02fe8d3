"""Experiments as data: a YAML file of cells (training overrides) x seeds, each trained with the
normal recipe and scored on an evaluation suite; a report with paired statistics.

    shoptune experiment run configs/experiments/rank.yaml --out runs/exp/rank
    shoptune experiment report runs/exp/rank
"""
from shoptune.experiment.report import build_report, write_report
from shoptune.experiment.runner import plan, run_experiment
from shoptune.experiment.spec import ExperimentSpec, load_spec

__all__ = ["ExperimentSpec", "build_report", "load_spec", "plan", "run_experiment", "write_report"]

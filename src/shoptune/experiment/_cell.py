"""Child-process entry of one experiment run: ``python -m shoptune.experiment._cell PLAN RUN_ID``."""
import sys

from shoptune.experiment.runner import run_one

if __name__ == "__main__":
    run_one(sys.argv[1], sys.argv[2])

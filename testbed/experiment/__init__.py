"""Experiments: spec (YAML) -> matrix runner -> results store -> report and comparison."""

from testbed.experiment.compare import compare_runs
from testbed.experiment.report import write_report
from testbed.experiment.run import ExperimentInterrupted, run_experiment
from testbed.experiment.spec import SpecError, load_spec

__all__ = [
    "ExperimentInterrupted",
    "SpecError",
    "compare_runs",
    "load_spec",
    "run_experiment",
    "write_report",
]

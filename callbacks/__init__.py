"""Lightning callbacks: adapter export, results report (and, later, TensorBoard figures)."""
from .export import TaskExport
from .report import ResultsReport

__all__ = ["TaskExport", "ResultsReport"]

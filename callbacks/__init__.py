"""Lightning callbacks: layer-selection heatmaps, parameter counts, Decathlon score,
adapter export and the results report."""
from .decathlon import DecathlonScore, decathlon_score
from .export import TaskExport
from .params import TaskParamLogger
from .report import ResultsReport
from .selection import LayerSelectionLogger
from .similarity import TaskSimilarityLogger

__all__ = ["TaskExport", "ResultsReport", "LayerSelectionLogger", "TaskParamLogger", "DecathlonScore", "TaskSimilarityLogger",
           "decathlon_score"]

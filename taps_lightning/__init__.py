"""TAPS: Task Adaptive Parameter Sharing (Wallingford et al., CVPR 2022) for any timm backbone.

The core is plain PyTorch: use it in any training loop. ``taps_lightning.training.lightning_module`` holds
the LightningModule and is imported only on demand.
"""
from .models.baselines import MultiHeadModel
from .core.config import TapsConfig
from .files.export import TaskFileError, base_fingerprint, layout_signature, load_task, merge, save_task, task_metadata
from .models.factory import create_backbone, create_taps_model, load_weights
from .core.gate import gate_open, gated_weight
from .core.inject import inject_taps, strip_classifier
from .core.layers import TapsLayer, create_taps_layer
from .models.taps_model import TapsModel
from .models.multitask import MultiTaskModel
from .core.norms import TaskNorm
from .models.progressive import ProgressiveAdapterModel
from .models.lora import LoRAModel
from .training.recalibrate import recalibrate_norms
from .models.stats import count_params, gate_states, sparsity_loss, total_params_multiple
from .core.task_layer import TaskLayer

__version__ = "0.1.0"

__all__ = [
    "MultiTaskModel", "TapsModel", "ProgressiveAdapterModel", "LoRAModel", "MultiHeadModel", "TapsConfig", "TaskLayer", "TapsLayer", "TaskNorm",
    "create_taps_model", "create_backbone", "load_weights", "create_taps_layer", "inject_taps", "strip_classifier",
    "gate_open", "gated_weight",
    "sparsity_loss", "gate_states", "count_params", "total_params_multiple",
    "recalibrate_norms", "save_task", "load_task", "merge", "task_metadata", "layout_signature", "base_fingerprint", "TaskFileError",
]

"""Fine-tuning tasks with the original config names."""
from .base import Task, dataset_targets
from .pair import MSP
from .property import MultipleBinaryClassification, PropertyPrediction

__all__ = ["MSP", "MultipleBinaryClassification", "PropertyPrediction", "Task", "dataset_targets"]

"""Fine-tuning and pre-training tasks with the original config names."""
from .base import Task, dataset_targets
from .contrast import SequenceStructureContrast
from .pair import MSP
from .pretrain import (AnglePrediction, DihedralPrediction, DistancePrediction, MultiviewContrast,
                       ResidueTypePrediction)
from .property import MultipleBinaryClassification, PropertyPrediction
from .siamdiff import NoiseTransform, SiamDiff

__all__ = ["AnglePrediction", "DihedralPrediction", "DistancePrediction", "MSP", "MultipleBinaryClassification",
           "MultiviewContrast", "NoiseTransform", "PropertyPrediction", "ResidueTypePrediction",
           "SequenceStructureContrast", "SiamDiff", "Task", "dataset_targets"]

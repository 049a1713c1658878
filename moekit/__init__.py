"""moekit: Mixture-of-Experts layers and models in PyTorch."""

from moekit.config import MoEConfig
from moekit.hf.checkpoint import from_pretrained
from moekit.inference.generate import generate
from moekit.layer import MoELayer
from moekit.model import ModelConfig, MoETransformer
from moekit.types import DispatchPlan, MoEOutput, ModelOutput, RoutingDecision

__all__ = [
    "DispatchPlan", "MoEConfig", "MoELayer", "MoEOutput", "ModelConfig", "ModelOutput", "MoETransformer",
    "RoutingDecision", "from_pretrained", "generate",
]
__version__ = "0.1.0"

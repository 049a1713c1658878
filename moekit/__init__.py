"""moekit: Mixture-of-Experts layers and models in PyTorch.

The public names load on first use (PEP 562), so `import moekit` and `moekit --help` do not pay
for torch until a model, layer or checkpoint is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moekit.config import MoEConfig
    from moekit.load import from_pretrained
    from moekit.inference.generate import generate
    from moekit.layer import MoELayer
    from moekit.model import ModelConfig, MoETransformer
    from moekit.soft_layer import SoftMoELayer
    from moekit.types import DispatchPlan, MoEOutput, ModelOutput, RoutingDecision

# public name -> the module that defines it
_EXPORTS = {
    "DispatchPlan": "moekit.types", "MoEConfig": "moekit.config", "MoELayer": "moekit.layer",
    "MoEOutput": "moekit.types", "ModelConfig": "moekit.model", "ModelOutput": "moekit.types",
    "MoETransformer": "moekit.model", "RoutingDecision": "moekit.types",
    "from_pretrained": "moekit.load", "SoftMoELayer": "moekit.soft_layer",
    "generate": "moekit.inference.generate",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if not name.startswith("_"):  # a subpackage, as `moekit.hf` after a bare `import moekit`
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

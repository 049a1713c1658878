"""moekit's initialisation policy for the decoder models it builds from scratch, in one place.

GPT-2 style: every nn.Linear (attention, dense MLPs, shared experts, router gates, LM head) and the
embedding draw normal(0, std) with zero biases, and so do the routed experts' 3-D weights, so that
MoE and dense feed-forwards start alike (a dense-vs-MoE comparison must not hinge on init). Kept as
their modules build them: Mamba mixers (the dt projection has its own initialisation), the
mixture-of-attention experts. The one exception, set last: the noise gate of noisy top-k starts at
zero, as the router builds it (Shazeer et al. 2017: noise std softplus(0) for every token at first).
"""

from __future__ import annotations

import torch
from torch import nn

INIT_STD = 0.02


@torch.no_grad()
def init_decoder(model: nn.Module, std: float = INIT_STD) -> None:
    """Initialise an MoETransformer in place (draws in module order, so a seed fixes every value)."""
    from moekit.layer import MoELayer
    from moekit.model.mamba import MambaMixer

    mamba = {id(m) for mixer in model.modules() if isinstance(mixer, MambaMixer) for m in mixer.modules()}
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module) not in mamba:
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(model.model.embed_tokens.weight, std=std)
    for layer in model.modules():
        if isinstance(layer, MoELayer):
            layer.experts.reset_parameters(std=std)
    # The exception, applied last so every other weight's draw is independent of it.
    for module in model.modules():
        if getattr(module, "noise_gate", None) is not None:
            nn.init.zeros_(module.noise_gate.weight)

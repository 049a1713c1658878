"""The router traits table, ROUTERS and MoEConfig's router Literal agree; config.py needs no torch."""

from __future__ import annotations

import ast
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from moekit.config import MoEConfig
from moekit.routing import ROUTERS
from moekit.traits import ACTIVATIONS, GATED_ACTIVATIONS, ROUTER_TRAITS

ROOT = Path(__file__).resolve().parents[1] / "moekit"


def _literal(name: str) -> tuple:
    hints = typing.get_type_hints(MoEConfig)
    assert name in {f.name for f in fields(MoEConfig)}
    return typing.get_args(hints[name])


def test_table_routers_and_config_literal_agree() -> None:
    assert list(ROUTER_TRAITS) == list(ROUTERS) == list(_literal("router"))
    assert set(_literal("activation")) == set(ACTIVATIONS) and set(GATED_ACTIVATIONS) <= set(ACTIVATIONS)


@pytest.mark.parametrize("router", list(ROUTER_TRAITS))
def test_each_row_builds_and_its_traits_hold(router: str) -> None:
    import torch

    from moekit.soft_layer import make_moe_layer

    traits = ROUTER_TRAITS[router]
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, router=router, z_loss_coef=1e-3, **traits.demo)
    layer = make_moe_layer(cfg)
    out = layer(torch.randn(2, 5, 8), token_ids=torch.randint(0, 10, (2, 5)))
    assert set(out.aux_losses) == set(traits.aux_losses)
    gate = getattr(layer.router, "gate", None)
    assert (gate is not None) == (traits.gate == "linear")
    # The options a row denies are refused by config validation, naming the field.
    denied = {"noisy_gating": True} if not traits.token_choice else {}
    if not traits.jitter:
        denied["jitter_eps"] = 0.1
    if not traits.scales_weights:
        denied["routed_scaling_factor"] = 2.0
    if traits.own_capacity:
        denied["capacity_factor"] = 1.0
    if traits.gate != "linear":
        denied["router_bias"] = True
    for name, value in denied.items():
        with pytest.raises(ValueError, match=name):
            MoEConfig(d_model=8, d_ff=8, num_experts=4, router=router, **traits.demo, **{name: value})
    if traits.replayable:
        layer.router.replay = [out.decision]
        replayed = layer(torch.randn(2, 5, 8), token_ids=torch.randint(0, 10, (2, 5)))
        assert torch.equal(replayed.decision.expert_ids_TK, out.decision.expert_ids_TK)


def _imports(module: str) -> set[str]:
    path = ROOT.parent / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:  # module-level imports (those inside functions run only when called)
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_config_imports_nothing_that_loads_torch() -> None:
    seen, todo = set(), ["moekit.config"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for name in _imports(module):
            assert name.split(".")[0] != "torch", f"{module} imports {name}"
            if name.startswith("moekit."):
                todo.append(name)
    assert "moekit.traits" in seen

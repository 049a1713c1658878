"""Routers: one per file, all returning a `RoutingDecision`, chosen by `MoEConfig.router`."""

from moekit.routing.balanced import SinkhornRouter
from moekit.routing.base import Router
from moekit.routing.expert_choice import ExpertChoiceRouter
from moekit.routing.hash import HashRouter
from moekit.routing.soft import SoftRouter
from moekit.routing.sparsemixer import SparseMixerRouter
from moekit.routing.topk import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "hash": HashRouter,
    "sinkhorn": SinkhornRouter,
    "soft": SoftRouter,
    "sparsemixer": SparseMixerRouter,
}

__all__ = [
    "ROUTERS",
    "ExpertChoiceRouter",
    "HashRouter",
    "Router",
    "SinkhornRouter",
    "SoftRouter",
    "SparseMixerRouter",
    "TopKRouter",
]

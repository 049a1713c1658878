"""Routers: one per file, all returning a `RoutingDecision`, chosen by `MoEConfig.router`."""

from moekit.routing.base import Router
from moekit.routing.topk import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "topk": TopKRouter,
}

__all__ = ["ROUTERS", "Router", "TopKRouter"]

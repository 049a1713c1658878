"""Expert parallelism on CPU processes (gloo): per-layer time split into compute and all-to-all,
bytes exchanged per token against the analytic value, and weak scaling from 1 to 4 processes.

Each world size W runs in its own spawned group of W processes with EP = W (every rank holds
E / W experts and a fixed number of tokens: weak scaling). Per rank and repeat it times one MoE
layer forward (route, dispatch = sort + count exchange + all-to-all, experts, combine =
all-to-all back + weighted sum) and the forward+backward, and counts the rows that leave the rank.
Bytes per token are compared with 2 x k x D x bytes x (fraction of rows leaving the rank): the
fraction as measured, and (W - 1) / W for uniform routing. Medians over repeats, max over ranks
(the slowest rank sets the step). Prints a table and writes benchmarks/results/expert_parallel.json.

    nice -n 10 python benchmarks/expert_parallel.py            # T=2048 tokens per rank
    nice -n 10 python benchmarks/expert_parallel.py --quick    # T=512, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit.config import MoEConfig
from moekit.dispatch.all_to_all import AllToAllDispatcher
from moekit.dispatch.sort import SortDispatcher
from moekit.layer import MoELayer
from moekit.parallel import build_mesh, shard_experts

RESULTS = Path(__file__).parent / "results"
D, F, E, K = 256, 512, 16, 2


class Timed:
    """Wraps a dispatcher: records the wall time of dispatch and combine, and the rows sent."""

    def __init__(self, inner: AllToAllDispatcher | SortDispatcher) -> None:
        self.inner = inner
        self.log: dict[str, float] = {}

    def dispatch(self, x_TD, decision):
        t0 = time.perf_counter()
        out = self.inner.dispatch(x_TD, decision)
        self.log["dispatch_s"] = time.perf_counter() - t0
        splits = out[2].extra.get("input_splits")
        if splits is not None:
            me = dist.get_rank(self.inner.group)
            self.log["rows_sent"] = float(sum(splits))
            self.log["rows_leaving"] = float(sum(splits) - splits[me])
            # The exchange alone: replay one all_to_all_single with the layer's split sizes.
            outs = out[2].extra["output_splits"]
            send_RD = torch.zeros(sum(splits), x_TD.shape[1], dtype=x_TD.dtype)
            recv_RD = torch.empty(sum(outs), x_TD.shape[1], dtype=x_TD.dtype)
            t0 = time.perf_counter()
            dist.all_to_all_single(recv_RD, send_RD, outs, splits, group=self.inner.group)
            self.log["a2a_once_s"] = time.perf_counter() - t0
        return out

    def combine(self, y_RD, plan):
        t0 = time.perf_counter()
        y_TD = self.inner.combine(y_RD, plan)
        self.log["combine_s"] = time.perf_counter() - t0
        return y_TD


def timed_forward(layer: MoELayer, x_TD: torch.Tensor) -> dict[str, float]:
    """One forward with the route / dispatch / experts / combine split, then a backward."""
    log: dict[str, float] = {}
    start = time.perf_counter()
    decision = layer.route(x_TD)
    log["route_s"] = time.perf_counter() - start
    x_RD, counts_e, plan = layer.dispatcher.dispatch(x_TD, decision)
    t0 = time.perf_counter()
    y_RD = layer.experts(x_RD, counts_e)
    log["experts_s"] = time.perf_counter() - t0
    y_TD = layer.dispatcher.combine(y_RD, plan)
    log["forward_s"] = time.perf_counter() - start
    t0 = time.perf_counter()
    y_TD.float().square().mean().backward()
    log["backward_s"] = time.perf_counter() - t0
    log["step_s"] = time.perf_counter() - start
    log.update(layer.dispatcher.log)
    return log


def worker(rank: int, world: int, port: int, tokens: int, repeats: int, out: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = build_mesh(expert_parallel=world)
        torch.manual_seed(0)
        cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
        layer = MoELayer(cfg)
        ep_layer = MoELayer(cfg, router=layer.router,
                            experts=shard_experts(layer.experts, rank=rank, size=world),
                            dispatcher=Timed(AllToAllDispatcher(mesh["ep"].get_group(), num_experts=E)))
        variants = {"all-to-all": ep_layer}
        if world == 1:
            layer.dispatcher = Timed(SortDispatcher())
            variants["sort (1 process)"] = layer
        x_TD = torch.randn(tokens, D, generator=torch.Generator().manual_seed(rank))
        logs: dict[str, list] = {name: [] for name in variants}
        for i in range(repeats + 2):
            for name, lay in variants.items():  # interleaved, repeat by repeat
                for p in lay.parameters():
                    p.grad = None
                dist.barrier()
                log = timed_forward(lay, x_TD)
                if i >= 2:  # two warm-up repeats
                    logs[name].append(log)
        results = {name: {k: statistics.median(lg[k] for lg in ls) for k in ls[0]}
                   for name, ls in logs.items()}
        out[rank] = results
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worlds", default="1,2,4")
    args = parser.parse_args()
    tokens, repeats = (512, 5) if args.quick else (2048, 10)
    bytes_per = torch.tensor([], dtype=torch.float32).element_size()
    rows = []
    for world in [int(w) for w in args.worlds.split(",")]:
        out = mp.Manager().dict()
        mp.spawn(worker, args=(world, free_port(), tokens, repeats, out), nprocs=world, join=True)
        for name in out[0]:
            per_rank = [out[r][name] for r in range(world)]
            slowest = {k: max(pr[k] for pr in per_rank) for k in per_rank[0]}
            row = {"world": world, "ep": world, "variant": name, "tokens_per_rank": tokens, **slowest}
            if "rows_sent" in per_rank[0]:
                leaving = sum(pr["rows_leaving"] for pr in per_rank)
                sent = sum(pr["rows_sent"] for pr in per_rank)
                measured = 2 * leaving * D * bytes_per / (tokens * world)  # dispatch + combine
                row["bytes_per_token"] = measured
                row["analytic_measured_fraction"] = 2 * K * D * bytes_per * (leaving / sent)
                row["analytic_uniform"] = 2 * K * D * bytes_per * (world - 1) / world
                # Forward and backward each exchange twice (dispatch, combine): 4 replays' worth.
                row["a2a_fwd_bwd_s"] = 4 * slowest["a2a_once_s"]
            rows.append(row)
    base = next(r for r in rows if r["world"] == 1 and r["variant"] == "all-to-all")
    print(f"MoE layer D={D} F={F} E={E} top-{K}, fp32, {tokens} tokens per rank, gloo on "
          f"{os.cpu_count()} CPU cores; medians of {repeats}, slowest rank")
    print("times in ms; dispatch/combine include their local sort and weighted sum; a2a = the exchanges "
          "alone (4 per forward+backward), replayed with the layer's splits")
    print(f"{'W':>2} {'variant':<17} {'fwd':>7} {'experts':>8} {'dispatch':>9} {'combine':>8} "
          f"{'fwd+bwd':>8} {'a2a':>7} {'a2a %':>6} {'weak eff':>8} {'B/token':>8} {'analytic':>8} "
          f"{'uniform':>8}")
    for r in rows:
        eff = base["step_s"] / r["step_s"]
        a2a = r.get("a2a_fwd_bwd_s")
        comm = f"{a2a * 1e3:7.1f} {100 * a2a / r['step_s']:6.1f}" if a2a is not None else f"{'':7} {'':6}"
        extra = (f"{r['bytes_per_token']:8.0f} {r['analytic_measured_fraction']:8.0f} "
                 f"{r['analytic_uniform']:8.0f}"
                 if "bytes_per_token" in r else "")
        print(f"{r['world']:>2} {r['variant']:<17} {r['forward_s'] * 1e3:7.1f} {r['experts_s'] * 1e3:8.1f} "
              f"{r['dispatch_s'] * 1e3:9.1f} {r['combine_s'] * 1e3:8.1f} {r['step_s'] * 1e3:8.1f} "
              f"{comm} {eff:8.2f} {extra}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "expert_parallel.json"
    path.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                            "torch": torch.__version__},
                                "shape": {"d_model": D, "d_ff": F, "num_experts": E, "top_k": K},
                                "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""What the trainer asks of the process layout: one process, or ranks on a ("dp", "ep") mesh.

The trainer calls the same methods either way. `SingleProcess` does the one-process thing;
`Distributed` splits each global micro-batch over all ranks, averages gradients (dense parameters
over every rank, expert shards over `dp`, both divided by the world size, so the step equals the
one-process step on the whole batch), takes the gradient norm over all shards, sums the routing
counts before an aux-loss-free bias update, and writes checkpoints as per-rank shards
(torch.distributed.checkpoint, safetensors) that any mesh, or one process, reads back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from moekit.layer import moe_layers
from moekit.parallel.shard import (
    LOAD_COUNTS,
    ExpertShard,
    expert_shard_names,
    full_tensors,
    local_tensors,
    parallelize,
)
from moekit.train import checkpoint as ckpt


def _has_bias(layer: nn.Module) -> bool:
    return getattr(layer.router, "expert_bias", None) is not None


class SingleProcess:
    """The one-process layout: every method is the plain, local operation."""

    is_writer = True
    world_size = 1
    rank = 0

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model as this layout runs it (sharded experts, all-to-all dispatch under Distributed)."""
        return model

    def local_indices(self, idx_B: Tensor) -> Tensor:
        """This rank's share of a global micro-batch's sequence indices."""
        return idx_B

    def reduce_gradients(self, model: nn.Module) -> None:
        """Make every gradient the one-process gradient of the whole batch."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def before_bias_update(self, model: nn.Module) -> None:
        """Make each bias-updating layer's routing counts those of the whole batch."""

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Averages of per-rank means (each rank holds an equal share of the tokens)."""
        return values

    def routing_summaries(self, summaries: list[dict]) -> list[dict]:
        return summaries

    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                        state: Callable[[dict], dict], keep_last: int | None) -> Path:
        """Write checkpoint `step` under `root` (`state(optimizer_meta)` is its state.json); every rank calls it."""
        opt_tensors, opt_meta = ckpt.optimizer_tensors(optimizer)
        return ckpt.save_checkpoint(root, step, tensors={"model": ckpt.model_tensors(model), "optimizer": opt_tensors,
                                                         "rng": ckpt.rng_tensors()},
                                    state=state(opt_meta), keep_last=keep_last)

    def read_checkpoint(self, path: Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[dict[str, dict[str, Tensor]], dict]:
        """A checkpoint's tensors as this process holds them (any layout wrote it), and its state."""
        return ckpt.read_checkpoint(path)

    def on_writer(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the writing rank (files); every rank raises if it failed."""
        fn()

    def barrier(self) -> None:
        pass

    def describe(self) -> dict:
        return {"world_size": 1, "expert_parallel": 1}

    def full_model(self, model: nn.Module, config) -> nn.Module | None:
        """The one-process model (rank 0; None elsewhere); every rank must call it."""
        return model


class Distributed(SingleProcess):
    """Ranks of `mesh` (dims "dp", "ep", spanning the default process group); see the module doc.
    Every rank builds it together (it broadcasts rank 0's PID, which names checkpoint folders)."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.is_writer = self.rank == 0
        self.ep_group = mesh["ep"].get_group()
        self.dp_group = mesh["dp"].get_group()
        self.dp_size = mesh["dp"].size()
        pid = torch.tensor([os.getpid()])
        dist.broadcast(pid, src=0)
        self.writer_pid = int(pid)  # names the checkpoints' temporary folders on every rank

    def prepare(self, model: nn.Module) -> nn.Module:
        return parallelize(model, self.mesh)

    def local_indices(self, idx_B: Tensor) -> Tensor:
        B = idx_B.shape[0]
        if B % self.world_size:
            raise ValueError(f"a micro-batch of {B} sequences does not split over {self.world_size} "
                             f"processes; "
                             f"use a --batch-size divisible by {self.world_size}")
        b = B // self.world_size
        return idx_B[self.rank * b:(self.rank + 1) * b]

    def _split(self, model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        expert_ids = {id(p) for m in model.modules() if isinstance(m, ExpertShard) for p in m.parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        return ([p for p in params if id(p) not in expert_ids], [p for p in params if id(p) in expert_ids])

    def reduce_gradients(self, model: nn.Module) -> None:
        dense, expert = self._split(model)
        params = dense + expert
        # A parameter unused on one rank still gets the others' gradient (zeros here first).
        has_P = torch.tensor([float(p.grad is not None) for p in params])
        dist.all_reduce(has_P, op=dist.ReduceOp.MAX)
        for p, has in zip(params, has_P.tolist()):
            if has and p.grad is None:
                p.grad = torch.zeros_like(p)
        # Each rank's loss is the mean over its 1/N of the tokens: the one-process gradient is
        # the sum over ranks divided by N, for expert shards too (their gradient already holds
        # the contributions of their ep peers' tokens, through the all-to-all backward).
        layout = ((dense, None, self.world_size), (expert, self.dp_group, self.dp_size))
        for group_params, group, size in layout:
            grads = [p.grad for p in group_params if p.grad is not None]
            if not grads:
                continue
            for dtype in {g.dtype for g in grads}:
                same = [g for g in grads if g.dtype == dtype]
                flat = _flatten_dense_tensors(same)
                if size > 1:
                    dist.all_reduce(flat, group=group)
                flat.div_(self.world_size)
                for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
                    g.copy_(reduced)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        dense, expert = self._split(model)
        sq = []
        for group_params in (dense, expert):
            norms = [torch.linalg.vector_norm(p.grad.float()) for p in group_params if p.grad is not None]
            sq.append(torch.stack(norms).square().sum() if norms else torch.zeros(()))
        expert_sq = sq[1].reshape(1).clone()
        dist.all_reduce(expert_sq, group=self.ep_group)  # shards differ over ep, agree over dp
        total = float(torch.sqrt(sq[0].cpu() + expert_sq.cpu()[0]))
        if math.isfinite(max_norm) and math.isfinite(total):
            coef = min(max_norm / (total + 1e-6), 1.0)  # torch.nn.utils.clip_grad_norm_'s rule
            if coef < 1.0:
                for p in dense + expert:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return total

    def before_bias_update(self, model: nn.Module) -> None:
        for layer in moe_layers(model):
            if _has_bias(layer):
                dist.all_reduce(layer.load_counts_E)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        v = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(v)
        return {k: x / self.world_size for k, x in zip(keys, v.tolist())}

    def routing_summaries(self, summaries: list[dict]) -> list[dict]:
        """Per layer: tokens per expert summed over ranks (MaxVio from the sums), the rest averaged."""
        if not summaries:
            return summaries
        counts = torch.tensor([s["tokens_per_expert"] for s in summaries], dtype=torch.float64)
        rest = torch.tensor([[s["dropped_fraction"], s["router_entropy"]] for s in summaries],
                            dtype=torch.float64)
        dist.all_reduce(counts)
        dist.all_reduce(rest)
        rest /= self.world_size
        out = []
        for s, c, r in zip(summaries, counts.tolist(), rest.tolist()):
            c = [int(x) for x in c]
            mean = max(sum(c) / len(c), 1e-9)
            out.append({**s, "tokens_per_expert": c, "max_vio": max(c) / mean - 1.0,
                        "dropped_fraction": r[0], "router_entropy": r[1]})
        return out

    def _optimizer_shards(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, ExpertShard]:
        shard_of = {id(p): m for m in model.modules() if isinstance(m, ExpertShard) for p in m.parameters()}
        flat = [p for g in optimizer.param_groups for p in g["params"]]
        return {i: shard_of[id(p)] for i, p in enumerate(flat) if id(p) in shard_of}

    def _shard_of(self, key: str, model: dict[str, ExpertShard], optimizer: dict[int, ExpertShard]
                  ) -> ExpertShard | None:
        """The expert shard a "<stem>/<name>" checkpoint key belongs to (None: not an expert tensor)."""
        stem, name = key.split("/", 1)
        if stem == "model":
            return model.get(name)
        return optimizer.get(int(name.split(".", 1)[0])) if stem == "optimizer" else None

    def _dtensor(self, t: Tensor) -> DTensor:
        """This rank's expert slice as a DTensor: sharded along dim 0 over ep, replicated over dp."""
        return DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)], run_check=False)

    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                        state: Callable[[dict], dict], keep_last: int | None) -> Path:
        """Each rank writes its own tensors (expert slices; rank 0 also the dense ones, the summed
        routing counters and its RNG) as torch.distributed.checkpoint safetensors shards; rank 0
        then writes state.json and the manifest over every file last and renames the folder."""
        root = Path(root)
        final = root / ckpt.checkpoint_name(step)
        begun: dict[str, Path | None] = {}
        self.on_writer(lambda: begun.update(tmp=ckpt.begin_checkpoint(root, step, self.writer_pid)))
        exists = torch.tensor([float(self.is_writer and begun["tmp"] is None)])
        dist.broadcast(exists, src=0)
        if exists.item():
            return final  # a complete checkpoint of this step is there already
        tmp = ckpt.tmp_folder(root, step, self.writer_pid)
        opt_tensors, opt_meta = ckpt.optimizer_tensors(optimizer)
        model_shards, opt_shards = expert_shard_names(model), self._optimizer_shards(optimizer, model)
        named = {**{f"model/{k}": v for k, v in ckpt.model_tensors(model).items()},
                 **{f"optimizer/{k}": v for k, v in sorted(opt_tensors.items())}}
        mine: dict[str, Tensor] = {}
        for key, t in named.items():  # the same order on every rank: the reductions pair up
            t = t.detach().contiguous().clone()  # own storage: tied and strided tensors save as one each
            shard = self._shard_of(key, model_shards, opt_shards)
            if shard is not None and t.dim() > 0 and t.shape[0] == shard.num_experts:
                mine[key] = self._dtensor(t)
                continue
            if key.endswith(LOAD_COUNTS):
                dist.all_reduce(t)  # per-rank counts; the checkpoint holds the whole batch's
            if self.is_writer:
                mine[key] = t
        try:
            ckpt.write_shards(tmp, mine)
        except BaseException:
            if self.is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

        def commit() -> None:
            try:
                ckpt.check_shards(tmp, set(mine))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            ckpt.commit_checkpoint(root, step, tmp, files={"rng.safetensors": ckpt.tensor_bytes(ckpt.rng_tensors())},
                                   state=state(opt_meta), keep_last=keep_last)

        self.on_writer(commit)
        return final

    def read_checkpoint(self, path: Path, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> tuple[dict[str, dict[str, Tensor]], dict]:
        """This rank's tensors of a checkpoint from any mesh: from a distributed run's shards only the
        slices it holds; from a one-process checkpoint its whole files, sliced here."""
        model_shards, opt_shards = expert_shard_names(model), self._optimizer_shards(optimizer, model)
        layout = ckpt.shard_layout(path)
        if layout is None:
            tensors, state = ckpt.read_checkpoint(path)
            tensors["model"] = local_tensors(model, tensors["model"], self.mesh)
            tensors["optimizer"] = {k: self._local_slice(t, opt_shards.get(int(k.split(".", 1)[0])))
                                    for k, t in tensors["optimizer"].items()}
            return tensors, state
        tensors, state = ckpt.read_checkpoint(path, shards=False)
        targets: dict[str, Tensor] = {}
        for key, (size, dtype) in layout.items():
            shard = self._shard_of(key, model_shards, opt_shards)
            if shard is not None and len(size) > 0 and size[0] == shard.num_global:
                targets[key] = self._dtensor(torch.empty((shard.num_experts, *size[1:]), dtype=dtype))
            else:
                targets[key] = torch.empty(size, dtype=dtype)
        ckpt.read_shards(path, targets, distributed=True)
        for key, t in targets.items():
            stem, name = key.split("/", 1)
            local = t.to_local() if isinstance(t, DTensor) else t
            if name.endswith(LOAD_COUNTS) and not self.is_writer:
                local = torch.zeros_like(local)  # the sum lives on rank 0 alone
            tensors.setdefault(stem, {})[name] = local
        return tensors, state

    @staticmethod
    def _local_slice(t: Tensor, shard: ExpertShard | None) -> Tensor:
        sharded = shard is not None and t.dim() > 0 and t.shape[0] == shard.num_global
        return t[shard.first:shard.first + shard.num_experts] if sharded else t

    def on_writer(self, fn: Callable[[], object]) -> None:
        error: BaseException | None = None
        message = ""
        if self.is_writer:
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 - every rank must learn of it, then it re-raises
                error, message = err, f"{type(err).__name__}: {err}"
        # The outcome travels as JSON bytes (no pickled objects between ranks).
        payload = json.dumps({"error": message}).encode()
        size = torch.tensor([len(payload)])
        dist.broadcast(size, src=0)
        buf = torch.zeros(int(size), dtype=torch.uint8)
        if self.is_writer:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(buf, src=0)
        if error is not None:
            raise error
        message = json.loads(bytes(buf.tolist()).decode())["error"]
        if message:
            kind = ValueError if message.startswith("ValueError") else (
                FileNotFoundError if message.startswith("FileNotFoundError") else RuntimeError)
            raise kind(f"rank 0 failed: {message}")

    def barrier(self) -> None:
        dist.barrier()

    def describe(self) -> dict:
        return {"world_size": self.world_size, "expert_parallel": self.mesh["ep"].size()}

    def full_model(self, model: nn.Module, config) -> nn.Module | None:
        from moekit.model import MoETransformer

        tensors = full_tensors(model, ckpt.model_tensors(model), self.mesh)
        if not self.is_writer:
            return None
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[]):  # its throw-away init must not advance the RNG
            full = MoETransformer(config).to(device)
        ckpt.load_model_tensors(full, tensors, source="the gathered expert shards")
        return full.train(model.training)

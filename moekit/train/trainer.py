"""The training loop: AdamW with warmup + cosine decay, clipping, accumulation, checkpoints, metrics.

`Trainer(model, config=..., train=..., val=..., out_dir=...).fit()` trains a language model whose
forward is `model(tokens_BS, targets_BS=...) -> ModelOutput` (loss, weighted aux-loss sum, routing).
Everything a run depends on (weights, optimizer, schedule position, RNG, router buffers) is in the
checkpoint, and batches are a pure function of (seed, step), so a resumed run is bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moekit.config import check
from moekit.routing.base import detach_decision
from moekit.train import checkpoint as ckpt
from moekit.train.batches import PackedSequences, batch_indices, eval_indices
from moekit.train.metrics import MetricsLog, Progress, RunPlan, summarize_routing
from moekit.train.runfolder import storage_error

if TYPE_CHECKING:
    from moekit.parallel.context import SingleProcess


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient norm; the last good checkpoint is untouched."""


# What a resume does when a TrainConfig field differs from the checkpoint's: these change which
# tokens each step sees, so the resume is refused; every other field (optimiser, schedule, steps,
# bf16, evaluation and checkpoint cadence) is applied from the resumed step on, and said so.
DATA_SETTINGS = ("batch_size", "seq_len", "grad_accum", "seed")
# Metrics only the last step of a run records (its whole-held-out-set evaluation).
FINAL_KEYS = ("full_val_loss", "full_val_moe")
BIAS_UPDATE_SCHEDULES = ("constant", "lr")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation, schedule, data and bookkeeping settings of one training run.

    Args:
        steps: optimizer steps. batch_size: sequences per micro-batch. grad_accum: micro-batches
            per optimizer step. seq_len: tokens per sequence.
        lr: peak learning rate; warmup_steps of linear warmup, then cosine decay to lr * min_lr_ratio.
        weight_decay: AdamW decoupled decay on matrices only (not norms, biases or router biases).
        grad_clip: max global gradient norm (0 disables clipping).
        eval_every / eval_sequences: validation loss every N steps on M validation sequences spread
            evenly over the held-out set (0: the whole held-out set; see `batches.eval_indices`).
            The last step is also evaluated on the whole held-out set (`full_val_loss`, `full_val_moe`).
        checkpoint_every / keep_last: checkpoint every N steps (and at the end), keep the newest K.
        bf16: run forward in bfloat16 autocast.
        router_lr_mult: the MoE routers' weight matrices train at lr x this (their own AdamW group;
            1: no group of their own, the optimizer then has the same two groups as without it).
        bias_update_schedule: the aux-loss-free expert-bias step after each optimizer step:
            "constant" (the MoEConfig's bias_update_rate every step) or "lr" (that rate times the
            step's learning rate over the peak: warmed up, then decayed with the cosine).
    """

    steps: int
    batch_size: int = 16
    seq_len: int = 64
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_sequences: int = 64
    checkpoint_every: int = 100
    keep_last: int = 2
    seed: int = 0
    bf16: bool = False
    router_lr_mult: float = 1.0
    bias_update_schedule: str = "constant"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "keep_last"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, value, "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "eval_sequences", "checkpoint_every", "seed"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, name, value, "must be an integer >= 0")
        check(self.lr > 0, "lr", self.lr, "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1/beta2", (self.beta1, self.beta2),
              "must be in [0, 1)")
        check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        check(isinstance(self.router_lr_mult, (int, float)) and math.isfinite(self.router_lr_mult)
              and self.router_lr_mult > 0, "router_lr_mult", self.router_lr_mult,
              "must be a finite number > 0 (1: routers at the common learning rate)")
        check(self.bias_update_schedule in BIAS_UPDATE_SCHEDULES, "bias_update_schedule",
              self.bias_update_schedule, f"must be one of {', '.join(BIAS_UPDATE_SCHEDULES)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to the floor."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def no_decay(name: str, param: Tensor) -> bool:
    """Norm weights, biases (incl. 2-D expert biases `b_*`) and router biases get no weight decay."""
    leaf = name.rsplit(".", 1)[-1]
    return param.dim() < 2 or leaf == "bias" or leaf.startswith("b_") or "norm" in name.lower()


def is_router(name: str) -> bool:
    """A parameter of an MoE layer's router (its gate, a noise gate), by the module path."""
    return ".router." in f".{name}"


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over groups: decayed matrices, the no-decay rest, and, when `router_lr_mult` != 1 and
    the model has routers, the routers' decayed matrices (trained at lr x router_lr_mult)."""
    decay, skip, router = [], [], []
    split = config.router_lr_mult != 1
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_decay(name, p) else router if split and is_router(name) else decay).append(p)
    groups = [{"params": decay}, {"params": skip}] + ([{"params": router}] if router else [])
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    set_hyperparameters(optimizer, config)
    return optimizer


def set_hyperparameters(optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """AdamW's settings from `config` on every group (decayed matrices, the no-decay rest, the
    routers' matrices if they have a group) and each group's `lr_mult` (1, or router_lr_mult).

    The learning rate is set every step from the schedule (`lr_at`) times `lr_mult`, so not here.
    """
    decays = (config.weight_decay, 0.0, config.weight_decay)
    mults = (1.0, 1.0, config.router_lr_mult)
    for group, weight_decay, mult in zip(optimizer.param_groups, decays, mults, strict=False):
        group.update(weight_decay=weight_decay, betas=(config.beta1, config.beta2), eps=config.eps, lr_mult=mult)


def ensure_fresh(checkpoint_dir: Path) -> None:
    """Refuse to start a new run over an earlier run's checkpoints in `checkpoint_dir`."""
    if ckpt.list_checkpoints(checkpoint_dir):
        raise ValueError(f"{checkpoint_dir} already holds checkpoints; pass --resume to continue "
                         f"that run, or choose a new --out (nothing was overwritten)")


class _StopFlag:
    """Turns the first Ctrl-C into a request to stop at the next step boundary (the second one raises)."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):  # noqa: ARG001
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True

        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


@dataclass
class FitResult:
    step: int
    final_val_loss: float | None
    interrupted: bool
    checkpoint: Path | None
    start_step: int = 0  # the step training began from (a resumed checkpoint's)


def warn_constant_top1_weights(model: nn.Module) -> None:
    """Warn about each top-1 MoE layer whose combine weight is exactly 1 (the chosen score
    renormalised, or softmaxed, over one expert): its router then gets no gradient from the loss and
    learns from the aux losses alone. The Switch Transformer weights the expert by its probability."""
    import warnings

    from moekit.layer import moe_layers

    for i, layer in enumerate(moe_layers(model)):
        cfg = layer.config
        if cfg.router == "topk" and cfg.top_k == 1 and (cfg.normalize_topk or cfg.softmax_after_topk):
            option = "softmax_after_topk" if cfg.softmax_after_topk else "normalize_topk"
            warnings.warn(f"MoE layer {i}: top_k=1 with {option}=True weights every token's expert by exactly 1, "
                          f"so the router gets no gradient from the loss (only from the aux losses); set "
                          f"{option}=False to weight it by its router probability (Switch Transformer)",
                          stacklevel=3)


class Trainer:
    """Trains `model` on packed sequences, writing metrics and checkpoints under `out_dir`.

    Args:
        model: forward(tokens_BS, targets_BS=...) -> ModelOutput; optional update_expert_biases().
        config: the TrainConfig.
        train / val: packed token sequences (val may be None: no validation loss).
        out_dir: run folder: `checkpoints/`, `metrics.jsonl`.
        run_info: JSON-able description of the model (its config); a resumed checkpoint must match it.
        progress: show progress (a bar on a TTY, plain lines otherwise).
        parallel: the process layout (`moekit.parallel.Distributed` under torchrun): every rank
            trains its share of each global micro-batch; rank 0 alone writes files. Default: one process.
        plan: when this run is one of several trained in a row, their RunPlan (one ETA for all).
    """

    def __init__(self, model: nn.Module, *, config: TrainConfig, train: PackedSequences,
                 val: PackedSequences | None, out_dir: str | Path, run_info: dict | None = None,
                 progress: bool = True, label: str = "train",
                 parallel: SingleProcess | None = None, plan: RunPlan | None = None) -> None:
        from moekit.parallel.context import SingleProcess  # here: moekit.parallel imports moekit.train

        self.parallel = parallel if parallel is not None else SingleProcess()
        if train.seq_len != config.seq_len:
            raise ValueError(f"train sequences have seq_len={train.seq_len}, config has {config.seq_len}")
        self.model, self.config, self.train, self.val = model, config, train, val
        self.out_dir = Path(out_dir)
        self.run_info = run_info or {}
        self.progress, self.label, self.plan = progress, label, plan
        self.device = next(model.parameters()).device
        warn_constant_top1_weights(model)
        self.optimizer = build_optimizer(model, config)
        self.step = 0
        self.settings_history: list[dict] = []  # each resume that changed settings: step and changes
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.stop = _StopFlag()

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    # ---- checkpoints ------------------------------------------------------------------------
    def state(self, optimizer_meta: dict) -> dict:
        """The JSON part of a checkpoint: step, settings, optimizer hyper-parameters, data position."""
        return {
            "step": self.step,
            "train_config": asdict(self.config),  # the settings in force since the last change
            "settings_history": self.settings_history,
            "run_info": self.run_info,
            "optimizer": optimizer_meta,
            "scheduler": {"kind": "warmup_cosine", "step": self.step},
            "parallel": self.parallel.describe(),  # informational: any layout resumes any checkpoint
            "data": {"seed": self.config.seed, "next_step": self.step,
                     "batch_size": self.config.batch_size, "grad_accum": self.config.grad_accum,
                     "seq_len": self.config.seq_len, "num_sequences": self.train.num_sequences},
        }

    def save_checkpoint(self) -> Path:
        return self.parallel.save_checkpoint(self.checkpoint_dir, self.step, self.model, self.optimizer,
                                             state=self.state, keep_last=self.config.keep_last)

    def _save_checkpoint_or_say(self) -> Path:
        """save_checkpoint (after the metrics up to this step are on disk), failures said plainly."""
        def write() -> Path:
            self.metrics.sync()
            return self.save_checkpoint()

        return self._write(write, f"write checkpoint {self.step} under {self.checkpoint_dir}")

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything from checkpoint `path`; nothing is changed if it does not fit."""
        tensors, state = self.parallel.read_checkpoint(path, self.model, self.optimizer)
        if state.get("run_info") != self.run_info:
            saved, ours = state.get("run_info") or {}, self.run_info
            diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            raise ValueError(f"checkpoint {path} comes from another architecture or setup (differs in "
                             f"{diff}); resume with the same preset and flags, or use a new --out")
        data = state["data"]
        for key in ("batch_size", "grad_accum", "seq_len", "seed", "num_sequences"):
            ours = self.train.num_sequences if key == "num_sequences" else getattr(self.config, key)
            if data[key] != ours:
                raise ValueError(f"checkpoint {path} was trained with {key}={data[key]}, this run has "
                                 f"{ours}; the batches would differ. Resume with the same data settings")
        ours = asdict(self.config)
        saved = state.get("train_config") or {}
        changed = {k: [saved[k], v] for k, v in ours.items()
                   if k in saved and k not in DATA_SETTINGS and saved[k] != v}
        if len(state["optimizer"]["param_groups"]) != len(self.optimizer.param_groups):
            raise ValueError(f"checkpoint {path} was trained with router_lr_mult="
                             f"{saved.get('router_lr_mult', 1.0)}, this run has {self.config.router_lr_mult}: "
                             f"the routers have their own optimizer group only when it is not 1, so a run "
                             f"cannot switch between 1 and another value; resume with the checkpoint's "
                             f"value or use a new --out")
        ckpt.load_model_tensors(self.model, tensors["model"], source=f"checkpoint {path}")
        ckpt.load_optimizer_tensors(self.optimizer, tensors["optimizer"], state["optimizer"])
        set_hyperparameters(self.optimizer, self.config)  # the saved groups hold the old values
        ckpt.set_rng_tensors(tensors["rng"])
        self.step = int(state["step"])
        self.settings_history = list(state.get("settings_history") or [])
        if changed:
            self.settings_history.append({"from_step": self.step, "changed": changed})
            said = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            print(f"note: resuming {path} with changed settings, applied from step {self.step} on: {said}")

    def ensure_fresh(self) -> None:
        """Refuse to start a new run over an earlier run's checkpoints."""
        ensure_fresh(self.checkpoint_dir)

    def resume(self) -> Path | None:
        """Load the newest complete checkpoint, skipping torn or corrupt ones; None if there is none.

        Raises ValueError when checkpoints exist but none is usable (nothing is overwritten).
        """
        path, skipped = ckpt.latest_checkpoint(self.checkpoint_dir)
        if path is None and skipped:
            raise ValueError(f"no usable checkpoint in {self.checkpoint_dir}: {'; '.join(skipped)}. "
                             f"Nothing was changed; restore the files or start a new --out")
        for note in skipped:
            print(f"warning: {note}")
        if path is not None:
            self.load_checkpoint(path)
        # a finished run extended to more steps: its old last step is no longer the last one
        drop = FINAL_KEYS if self.step < self.config.steps else ()
        self.parallel.on_writer(lambda: self._write(lambda: self.metrics.truncate_after(self.step, drop_at_step=drop),
                                                    f"rewrite {self.metrics.path}"))
        return path

    def last_good_checkpoint(self) -> Path | None:
        return ckpt.latest_checkpoint(self.checkpoint_dir)[0]

    def _after_stop(self) -> str:
        """What is left to resume from, said only as far as it is true."""
        good = self.last_good_checkpoint()
        if good is None:
            return "no checkpoint has been written yet, so there is nothing to resume from"
        return f"the last good checkpoint {good} is intact (continue from it with --resume)"

    def _write(self, write, doing: str):
        """Run `write()`; an OSError (full disk, read-only folder) becomes a StorageError saying so."""
        try:
            return write()
        except OSError as err:
            raise storage_error(err, doing=doing, checkpoint=self.last_good_checkpoint()) from err

    # ---- one step -------------------------------------------------------------------------------
    def _forward(self, micro_step: int):
        idx_B = batch_indices(micro_step, seed=self.config.seed, batch_size=self.config.batch_size,
                              num_sequences=self.train.num_sequences)
        idx_B = self.parallel.local_indices(idx_B)
        inputs_BS, targets_BS = (t.to(self.device) for t in self.train.batch(idx_B))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            return self.model(inputs_BS, targets_BS=targets_BS)

    def train_step(self) -> dict:
        """One optimizer step (with accumulation); returns its metrics record."""
        cfg = self.config
        start, start_cpu = time.perf_counter(), time.process_time()
        self.model.train()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, aux_sum, aux_named = 0.0, 0.0, {}
        decisions: dict[str, list[list]] = {"moe": [], "moa": []}
        for micro in range(cfg.grad_accum):
            out = self._forward(self.step * cfg.grad_accum + micro)
            total = out.loss if out.aux_loss is None else out.loss + out.aux_loss
            if not torch.isfinite(total):
                raise NonFiniteLossError(
                    f"loss became {total.item()} at step {self.step} (lm loss {out.loss.item()}); "
                    f"training stopped and {self._after_stop()}. "
                    f"Lower --lr, keep --grad-clip on, or turn off --bf16")
            (total / cfg.grad_accum).backward()
            loss_sum += out.loss.item() / cfg.grad_accum
            aux_sum += 0.0 if out.aux_loss is None else out.aux_loss.item() / cfg.grad_accum
            # The forward's own named aux losses (with its padding mask), not a recomputation.
            for name, value in out.aux_losses.items():
                aux_named[name] = aux_named.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
            for kind, routing in (("moe", out.routing), ("moa", out.attention_routing)):
                per_layer = [detach_decision(d) for d in routing if d is not None]  # stats only: free the graph
                if not decisions[kind]:
                    decisions[kind] = [[] for _ in per_layer]
                for bucket, decision in zip(decisions[kind], per_layer):
                    bucket.append(decision)
        self.parallel.reduce_gradients(self.model)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = self.parallel.clip_grad_norm(self.model, max_norm)
        if not math.isfinite(grad_norm):
            raise NonFiniteLossError(
                f"gradient norm became {grad_norm} at step {self.step}; training stopped and "
                f"{self._after_stop()}. Lower --lr or turn off --bf16")
        self.optimizer.step()
        if hasattr(self.model, "update_expert_biases"):
            self.parallel.before_bias_update(self.model)
            scale = lr / cfg.lr if cfg.bias_update_schedule == "lr" else 1.0
            self.model.update_expert_biases(scale)
        self.step += 1
        means = self.parallel.mean({"loss": loss_sum, "aux_loss": aux_sum, **aux_named})
        loss_sum, aux_sum = means.pop("loss"), means.pop("aux_loss")
        aux_named = means
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        record = {"step": self.step, "loss": loss_sum, "aux_loss": aux_sum, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": cfg.tokens_per_step / max(elapsed, 1e-9),
                  # per second of this process's CPU time (all its threads): what another process's
                  # load changes far less than wall time, so variants run at different times compare
                  "tokens_per_cpu_s": cfg.tokens_per_step / max(cpu, 1e-9),
                  "tokens": self.step * cfg.tokens_per_step}
        record.update({f"aux/{k}": v for k, v in aux_named.items()})
        record["moe"] = self.parallel.routing_summaries([summarize_routing(ds) for ds in decisions["moe"] if ds])
        if decisions["moa"]:
            record["moa"] = self.parallel.routing_summaries(
                [summarize_routing(ds) for ds in decisions["moa"] if ds])
        return record

    @torch.no_grad()
    def evaluate(self, sequences: int | None = None) -> dict:
        """Validation metrics on the fixed validation sequences (`sequences` of them, evenly spaced;
        default `config.eval_sequences`; 0: the whole held-out set).

        Returns {"val_loss": mean next-token loss, "val_moe": per MoE layer the tokens per expert and
        MaxVio over those sequences (MaxVio_global of Wang et al. 2024, less noisy than one
        training batch)}.
        """
        assert self.val is not None
        self.model.eval()
        idx = eval_indices(self.val.num_sequences, self.config.eval_sequences if sequences is None else sequences)
        total, count = 0.0, 0
        counts: list[Tensor] = []
        for chunk in idx.split(self.config.batch_size):
            inputs_BS, targets_BS = (t.to(self.device) for t in self.val.batch(chunk))
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
                out = self.model(inputs_BS, targets_BS=targets_BS)
            total += out.loss.item() * targets_BS.numel()
            count += targets_BS.numel()
            layer_counts = [d.counts_E.cpu() for d in out.routing if d is not None]
            counts = layer_counts if not counts else [a + b for a, b in zip(counts, layer_counts)]
        self.model.train()
        val_moe = [{"tokens_per_expert": c.tolist(),
                    "max_vio": float(c.max() / c.float().mean().clamp_min(1e-9) - 1)} for c in counts]
        return {"val_loss": total / count, "val_moe": val_moe}

    def _evaluate_whole(self, record: dict) -> dict:
        """The final step's validation on the whole held-out set (the sample's figures if the sample
        already is the whole set): `full_val_loss`, `full_val_moe`."""
        assert self.val is not None
        n = self.val.num_sequences
        whole = (record if len(eval_indices(n, self.config.eval_sequences)) == n
                 else self.evaluate(sequences=0))
        return dict(zip(FINAL_KEYS, (whole["val_loss"], whole["val_moe"])))

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, *, resume: bool = False) -> FitResult:
        """Train to `config.steps`. Ctrl-C saves a checkpoint and returns (interrupted=True).

        Write into `out_dir` from one process at a time (`moekit train` holds a `RunLock`): the
        start removes temporary checkpoint folders that a killed run left behind.
        Raises StorageError when a write fails (full disk, read-only folder).
        """
        cfg = self.config
        if resume:
            self.resume()
        else:
            self.ensure_fresh()
            self.parallel.on_writer(lambda: self._write(lambda: self.metrics.truncate_after(0),
                                                        f"rewrite {self.metrics.path}"))

        def remove_stale() -> None:
            for stale in ckpt.remove_stale_tmp(self.checkpoint_dir):
                print(f"note: removed {stale}, a checkpoint a stopped run did not finish writing")

        self.parallel.on_writer(remove_stale)
        start_step = self.step
        progress = Progress(cfg.steps, start=self.step, label=self.label, enabled=self.progress,
                            every=max(1, cfg.steps // 20), plan=self.plan)
        last_ckpt: Path | None = None
        val_loss: float | None = None
        try:
            with self.stop.installed():
                while self.step < cfg.steps and not self.stop.requested:
                    record = self.train_step()
                    if self.val is not None and ((cfg.eval_every and self.step % cfg.eval_every == 0)
                                                 or self.step == cfg.steps):
                        record.update(self.evaluate())
                        val_loss = record["val_loss"]
                    if self.val is not None and self.step == cfg.steps:
                        record.update(self._evaluate_whole(record))
                    self.parallel.on_writer(lambda: self._write(
                        lambda: self.metrics.write(record),
                        f"append step {self.step}'s metrics to {self.metrics.path}"))
                    if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) \
                            or self.step == cfg.steps:
                        last_ckpt = self._save_checkpoint_or_say()
                    info = f"loss {record['loss']:.3f}" + (
                        f" val {record['val_loss']:.3f}" if "val_loss" in record else "")
                    progress.update(self.step, info)
                if self.stop.requested:
                    last_ckpt = self._save_checkpoint_or_say()
                    print(f"\ninterrupted: saved {last_ckpt}; continue with --resume")
        finally:
            progress.close()
        return FitResult(self.step, val_loss, self.stop.requested, last_ckpt, start_step)

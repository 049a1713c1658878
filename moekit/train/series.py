"""Several training runs one after another on the same data: `moekit compare` and `moekit sweep`.

Each run (one model at one seed) trains into its own folder under `out_dir/runs/`, resuming what
it finds there, so rerunning the same command continues where it stopped. One RunPlan gives the
progress display "run i of n" and one ETA for all the runs.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.model.accounting import active_params, num_params
from moekit.model.config import ModelConfig
from moekit.train.metrics import RunPlan, read_metrics
from moekit.train.run import PreparedData, build_model, config_json
from moekit.train.runfolder import RunLock
from moekit.train.trainer import TrainConfig, Trainer

if TYPE_CHECKING:
    from moekit.parallel.context import SingleProcess


@dataclass(frozen=True)
class RunSpec:
    """One run of a series: `group` names the model (a variant, a sweep point), `seed` the repeat,
    `lr` its peak learning rate (None: the series' TrainConfig's)."""

    group: str
    seed: int
    model: ModelConfig
    description: str
    lr: float | None = None

    def folder_name(self, base_seed: int) -> str:
        """`<group>` for the base seed (so a one-seed run keeps its folder), else `<group>.seed<N>`."""
        return self.group if self.seed == base_seed else f"{self.group}.seed{self.seed}"


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active non-embedding params + attention scores (Kaplan et al.
    2020, eq. 2.2 tripled for forward + backward): 6N + 6 L S D. The active parameters include
    each MoE layer's router (D x E, and a noise gate's), so routing is counted."""
    n_active = active_params(config, embedding=False)
    return 6.0 * n_active + 6.0 * config.n_layers * seq_len * config.d_model


def check_seeds(seeds: list[int]) -> list[int]:
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds} is invalid: give one or more different integers >= 0")
    return seeds


def train_series(specs: list[RunSpec], *, train: TrainConfig, data: PreparedData, out_dir: Path,
                 progress: bool, parallel: SingleProcess) -> dict[str, dict]:
    """Train every spec (seed from the spec, the rest from `train`), resuming finished ones.

    Returns {group: {"metrics": {seed: records}, "total_params", "active_params",
    "flops_per_token", "description", "model"}} in the order of `specs`.
    """
    runs: dict[str, dict] = {}
    plan = RunPlan(total_steps=train.steps * len(specs), runs=len(specs))
    for spec in specs:
        mc = spec.model
        run_dir = out_dir / "runs" / spec.folder_name(train.seed)
        config = replace(train, seed=spec.seed, lr=spec.lr if spec.lr is not None else train.lr)
        model = parallel.prepare(build_model(mc, seed=spec.seed))
        trainer = Trainer(model, config=config, train=data.train, val=data.val, out_dir=run_dir,
                          run_info={"variant": spec.group, "model": config_json(mc)}, progress=progress,
                          label=f"{spec.group:>16} s{spec.seed}", parallel=parallel, plan=plan)
        if progress:
            print(f"[{plan.describe()}] {spec.group} seed {spec.seed}: {spec.description}; "
                  f"{num_params(mc):,} parameters, {active_params(mc):,} active", flush=True)
        started = time.monotonic()
        with RunLock(run_dir) if parallel.is_writer else nullcontext():
            result = trainer.fit(resume=(run_dir / "checkpoints").is_dir())
        if result.interrupted:
            raise KeyboardInterrupt(f"interrupted during {spec.group} seed {spec.seed}; rerun the same "
                                    f"command to resume")
        plan.finish_run(train.steps, trained=result.step - result.start_step, seconds=time.monotonic() - started)
        entry = runs.setdefault(spec.group, {
            "metrics": {}, "total_params": num_params(mc), "active_params": active_params(mc),
            "flops_per_token": flops_per_token(mc, train.seq_len), "description": spec.description,
            "model": mc})
        entry["metrics"][spec.seed] = read_metrics(run_dir / "metrics.jsonl")
    return runs


"""`moekit train`: train a preset (or a scaled catalog architecture) on a corpus, resumably."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from moekit.model.config import ModelConfig
    from moekit.parallel.context import SingleProcess
    from moekit.train.presets import Preset
    from moekit.train.trainer import TrainConfig

# flag -> TrainConfig field, for the settings a user can override on the command line.
TRAIN_FLAGS = {
    "steps": int, "batch_size": int, "seq_len": int, "grad_accum": int, "lr": float,
    "warmup_steps": int, "weight_decay": float, "grad_clip": float, "eval_every": int,
    "eval_sequences": int, "checkpoint_every": int, "keep_last": int, "seed": int,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny | small | catalog:NAME (default tiny)")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics, final model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--corpus", type=Path, default=None,
                   help="folder or file of UTF-8 text (default: the fetched Shakespeare corpus)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where `moekit data fetch` put the corpus")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default: the preset's)")
    for flag, kind in TRAIN_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), type=kind, default=None,
                       help=f"override the preset's {flag}")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass")
    p.add_argument("--init-from", type=Path, default=None,
                   help="sparse upcycling: start from this dense run folder, checkpoint or final model")
    p.add_argument("--upcycle-noise", type=float, default=0.0,
                   help="relative noise added to each upcycled expert copy (default 0: exact copies)")
    p.add_argument("--device", default="cpu",
                   help="torch device (default cpu; cuda: cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--expert-parallel", type=int, default=None, metavar="EP",
                   help="under torchrun: shard each MoE layer's experts over EP ranks (data over all ranks)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from moekit.parallel import check_launch, init_from_environment, shutdown
    from moekit.train.presets import get_preset

    preset = get_preset(args.preset)
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    config = replace(preset.train, **overrides, bf16=args.bf16 or preset.train.bf16)
    vocab_size = args.vocab_size or preset.vocab_size
    model_config = preset.model(vocab_size).replace(max_seq_len=config.seq_len)
    # Process layout first: sizes that do not divide fail here, before any data or model work.
    check_launch(expert_parallel=args.expert_parallel, batch_size=config.batch_size,
                 num_experts=model_config.moe.num_experts if model_config.moe is not None else None)
    parallel, device = init_from_environment(expert_parallel=args.expert_parallel, device=args.device)
    try:
        return _train(args, preset, config, model_config, vocab_size, parallel, device)
    finally:
        shutdown()


def _train(args: argparse.Namespace, preset: Preset, config: TrainConfig, model_config: ModelConfig,
           vocab_size: int, parallel: SingleProcess, device: torch.device) -> int:
    """The run itself, on every rank of `parallel` (rank 0 alone prints and writes files)."""
    from moekit.train.run import build_model, config_json, prepare_data, save_final
    from moekit.train.tokenizer import save_tokenizer
    from moekit.train.trainer import NonFiniteLossError, Trainer, ensure_fresh

    say = print if parallel.is_writer else (lambda *a, **k: None)
    if not args.resume:
        ensure_fresh(args.out / "checkpoints")
    holder: dict = {}

    def prepare() -> None:
        holder["data"] = prepare_data(args.corpus, seq_len=config.seq_len, vocab_size=vocab_size,
                                      out_dir=args.out if args.resume else None, cache_dir=args.cache_dir)

    parallel.on_writer(prepare)  # rank 0 trains the tokenizer; the others read it once it is saved
    model = build_model(model_config, seed=config.seed, device=device)
    if args.init_from is not None:
        from moekit.train.upcycle import upcycle_from

        upcycle_from(model, args.init_from, noise=args.upcycle_noise, seed=config.seed)
    # Saved before training (a resumed run must tokenize alike), after every check that can refuse.
    parallel.on_writer(lambda: save_tokenizer(holder["data"].tokenizer, args.out))
    data = holder["data"] if "data" in holder else prepare_data(
        args.corpus, seq_len=config.seq_len, vocab_size=vocab_size, out_dir=args.out,
        cache_dir=args.cache_dir)
    model = parallel.prepare(model)  # expert shards and all-to-all dispatch over the mesh
    trainer = Trainer(model, config=config, train=data.train, val=data.val, out_dir=args.out,
                      run_info={"preset": preset.name, "model": config_json(model_config)},
                      progress=not args.quiet and parallel.is_writer, parallel=parallel)
    if not args.quiet:
        total, active = model_config.num_params(), model_config.active_params()
        layout = "" if parallel.world_size == 1 else (
            f", {parallel.world_size} processes (expert parallel {parallel.describe()['expert_parallel']})")
        say(f"{data.corpus.describe()}\n{preset.name}: {total:,} parameters ({active:,} active), "
            f"{data.train.num_sequences:,} training sequences of {config.seq_len} tokens{layout}")
    try:
        result = trainer.fit(resume=args.resume)
    except NonFiniteLossError as err:
        raise ValueError(str(err)) from err
    if result.interrupted:
        return 130
    full = parallel.full_model(model, model_config)  # every rank takes part in the gathers
    parallel.on_writer(lambda: save_final(full, model_config, data.tokenizer, args.out / "final",
                                          model_type=preset.hf_model_type))
    val = "" if result.final_val_loss is None else f", final validation loss {result.final_val_loss:.4f}"
    say(f"trained {result.step} steps{val}; model in {args.out / 'final'}, "
        f"metrics in {args.out / 'metrics.jsonl'}")
    return 0

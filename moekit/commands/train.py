"""`moekit train`: train a preset (or a scaled catalog architecture) on a corpus, resumably."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from moekit.tasks import add_task_arguments, run_task

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
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_task_arguments(p, "train")


def run(args: argparse.Namespace) -> int:
    from moekit.train.presets import get_preset
    from moekit.train.run import build_model, config_json, prepare_data, save_final
    from moekit.train.tokenizer import save_tokenizer
    from moekit.train.trainer import NonFiniteLossError, Trainer

    if args.task != "lm":
        return run_task(args, "train", list(TRAIN_FLAGS))
    preset = get_preset(args.preset)
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    config = replace(preset.train, **overrides, bf16=args.bf16 or preset.train.bf16)
    vocab_size = args.vocab_size or preset.vocab_size
    data = prepare_data(args.corpus, seq_len=config.seq_len, vocab_size=vocab_size,
                        out_dir=args.out if args.resume else None, cache_dir=args.cache_dir)
    model_config = preset.model(vocab_size).replace(max_seq_len=config.seq_len)
    model = build_model(model_config, seed=config.seed, device=args.device)
    if args.init_from is not None:
        from moekit.train.upcycle import upcycle_from

        upcycle_from(model, args.init_from, noise=args.upcycle_noise, seed=config.seed)
    trainer = Trainer(model, config=config, train=data.train, val=data.val, out_dir=args.out,
                      run_info={"preset": preset.name, "model": config_json(model_config)},
                      progress=not args.quiet)
    if not args.quiet:
        total, active = model_config.num_params(), model_config.active_params()
        print(f"{data.corpus.describe()}\n{preset.name}: {total:,} parameters ({active:,} active), "
              f"{data.train.num_sequences:,} training sequences of {config.seq_len} tokens")
    if not args.resume:
        trainer.ensure_fresh()
    save_tokenizer(data.tokenizer, args.out)  # before training: a resumed run must tokenize alike
    try:
        result = trainer.fit(resume=args.resume)
    except NonFiniteLossError as err:
        raise ValueError(str(err)) from err
    if result.interrupted:
        return 130
    final = save_final(model, model_config, data.tokenizer, args.out / "final",
                       model_type=preset.hf_model_type)
    val = "" if result.final_val_loss is None else f", final validation loss {result.final_val_loss:.4f}"
    print(f"trained {result.step} steps{val}; model in {final}, metrics in {args.out / 'metrics.jsonl'}")
    return 0

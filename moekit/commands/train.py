"""`moekit train`: train a preset (or a scaled catalog architecture) on a corpus, resumably."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path

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


def check_device(name: str) -> None:
    """Refuse a device string torch does not know, or a device this machine does not have."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a torch device ({err}); use cpu, cuda, cuda:N or "
                         f"mps") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name}: this machine has no CUDA device (or this torch build has "
                             f"no CUDA support); use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: there are only {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}")
        return
    try:
        torch.empty(0, device=device)
    except Exception as err:  # torch raises RuntimeError or AssertionError for an absent backend
        raise ValueError(f"--device {name} is not available here ({err}); use --device cpu") from None


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before anything is read or written (preparing the corpus takes a while)."""
    from moekit.hf.io import check_not_a_file
    from moekit.train.tokenizer import check_vocab_size

    if args.vocab_size is not None:
        check_vocab_size(args.vocab_size, "--vocab-size")
    noise = args.upcycle_noise
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"--upcycle-noise {noise} is invalid: must be a finite number >= 0 (the noise std "
                         f"relative to each weight's std; 0 gives exact copies)")
    if noise and args.init_from is None:
        raise ValueError("--upcycle-noise only applies with --init-from DIR (sparse upcycling); pass both "
                         "or neither")
    check_not_a_file(args.out, "--out")
    if args.init_from is not None and not args.init_from.exists():
        raise FileNotFoundError(f"--init-from {args.init_from} does not exist; pass a dense run folder, "
                                f"checkpoint folder or final-model folder")
    check_device(args.device)


def run(args: argparse.Namespace) -> int:
    from moekit.train.presets import get_preset
    from moekit.train.run import check_final
    from moekit.train.runfolder import WRITE_ERRNOS, RunLock, StorageError, storage_error

    preset = get_preset(args.preset)
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    config = replace(preset.train, **overrides, bf16=args.bf16 or preset.train.bf16)
    check_args(args)
    check_final(args.out / "final", overwrite=args.resume)  # before training, not after it
    try:
        with RunLock(args.out):
            return _train(args, preset, config)
    except StorageError as err:
        raise ValueError(str(err)) from err
    except OSError as err:  # a write outside the trainer (tokenizer, final weights)
        if err.errno not in WRITE_ERRNOS:
            raise
        from moekit.train import checkpoint as ckpt

        good = ckpt.latest_checkpoint(args.out / "checkpoints")[0]
        raise ValueError(str(storage_error(err, doing=f"write into {args.out}", checkpoint=good))) from err


def _train(args: argparse.Namespace, preset, config) -> int:
    from moekit.train.run import build_model, config_json, prepare_data, save_final
    from moekit.train.tokenizer import save_tokenizer
    from moekit.train.trainer import NonFiniteLossError, Trainer

    vocab_size = args.vocab_size if args.vocab_size is not None else preset.vocab_size
    data = prepare_data(args.corpus, seq_len=config.seq_len, vocab_size=vocab_size,
                        out_dir=args.out if args.resume else None, cache_dir=args.cache_dir)
    model_config = preset.model(vocab_size).replace(max_seq_len=config.seq_len)
    model = build_model(model_config, seed=config.seed, device=args.device)
    if args.init_from is not None:
        from moekit.train.upcycle import check_parent_tokenizer, upcycle_from

        check_parent_tokenizer(args.init_from, data.tokenizer)
        upcycle_from(model, args.init_from, noise=args.upcycle_noise, seed=config.seed)
    trainer = Trainer(model, config=config, train=data.train, val=data.val, out_dir=args.out,
                      run_info={"preset": preset.name, "model": config_json(model_config)},
                      progress=not args.quiet)
    if not args.quiet:
        from moekit.model.accounting import active_params, num_params

        total, active = num_params(model_config), active_params(model_config)
        print(f"{data.corpus.describe()}\n{preset.name}: {total:,} parameters ({active:,} active), "
              f"{data.train.num_sequences:,} training sequences of {config.seq_len} tokens")
    if not args.resume:
        trainer.ensure_fresh()
    # Before training, once (an identical file is left alone): a resumed run must tokenize alike.
    save_tokenizer(data.tokenizer, args.out)
    try:
        result = trainer.fit(resume=args.resume)
    except NonFiniteLossError as err:
        raise ValueError(str(err)) from err
    if result.interrupted:
        return 130
    final = save_final(model, model_config, data.tokenizer, args.out / "final",
                       model_type=preset.hf_model_type, overwrite=args.resume)
    val = "" if result.final_val_loss is None else f", final validation loss {result.final_val_loss:.4f}"
    print(f"trained {result.step} steps{val}; model in {final}, metrics in {args.out / 'metrics.jsonl'}")
    return 0

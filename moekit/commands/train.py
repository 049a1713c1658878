"""`moekit train`: train a preset (or a scaled catalog architecture) on a corpus, resumably."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from moekit.model.config import ModelConfig
    from moekit.parallel.context import SingleProcess
    from moekit.train.presets import Preset
    from moekit.train.trainer import TrainConfig

from moekit.tasks import add_task_arguments, run_task, set_threads

# flag -> TrainConfig field, for the settings a user can override on the command line.
TRAIN_FLAGS = {
    "steps": int, "batch_size": int, "seq_len": int, "grad_accum": int, "lr": float,
    "warmup_steps": int, "weight_decay": float, "grad_clip": float, "eval_every": int,
    "eval_sequences": int, "checkpoint_every": int, "keep_last": int, "seed": int, "router_lr_mult": float,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.train.data import SPLIT_HELP

    p.add_argument("--preset", default="tiny", help="tiny | small | catalog:NAME (default tiny)")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, metrics, final model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--corpus", type=Path, default=None,
                   help="folder or file of UTF-8 text (default: the fetched Shakespeare corpus); "
                        + SPLIT_HELP.replace("%", "%%"))
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
    add_task_arguments(p, "train")


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
    from contextlib import nullcontext

    from moekit.parallel import check_launch, init_from_environment, shutdown
    from moekit.train.presets import get_preset
    from moekit.train.run import check_final
    from moekit.train.runfolder import WRITE_ERRNOS, RunLock, StorageError, storage_error

    if args.task != "lm":
        return run_task(args, "train", list(TRAIN_FLAGS))
    set_threads(args.threads)
    preset = get_preset(args.preset)
    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    config = replace(preset.train, **overrides, bf16=args.bf16 or preset.train.bf16)
    check_args(args)
    vocab_size = args.vocab_size if args.vocab_size is not None else preset.vocab_size
    model_config = preset.model(vocab_size).replace(max_seq_len=config.seq_len)
    # Process layout first: sizes that do not divide fail here, before any data or model work.
    check_launch(expert_parallel=args.expert_parallel, batch_size=config.batch_size,
                 num_experts=model_config.moe.num_experts if model_config.moe is not None else None)
    check_final(args.out / "final", overwrite=args.resume)  # before training, not after it
    parallel, device = init_from_environment(expert_parallel=args.expert_parallel, device=args.device)
    try:
        # One lock per run folder, held by the writing rank (the others write nothing there).
        with RunLock(args.out) if parallel.is_writer else nullcontext():
            return _train(args, preset, config, model_config, vocab_size, parallel, device)
    except StorageError as err:
        raise ValueError(str(err)) from err
    except OSError as err:  # a write outside the trainer (tokenizer, final weights)
        if err.errno not in WRITE_ERRNOS:
            raise
        from moekit.train import checkpoint as ckpt

        good = ckpt.latest_checkpoint(args.out / "checkpoints")[0]
        raise ValueError(str(storage_error(err, doing=f"write into {args.out}", checkpoint=good))) from err
    finally:
        shutdown()


def _train(args: argparse.Namespace, preset: Preset, config: TrainConfig, model_config: ModelConfig,
           vocab_size: int, parallel: SingleProcess, device: torch.device) -> int:
    """The run itself, on every rank of `parallel` (rank 0 alone prints and writes files)."""
    from moekit.model.accounting import active_params, num_params
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
        from moekit.train.upcycle import check_parent_tokenizer, upcycle_from

        parallel.on_writer(lambda: check_parent_tokenizer(args.init_from, holder["data"].tokenizer))
        upcycle_from(model, args.init_from, noise=args.upcycle_noise, seed=config.seed)
    # Saved once before training (an identical file is left alone; a resumed run must tokenize
    # alike), after every check that can refuse.
    parallel.on_writer(lambda: save_tokenizer(holder["data"].tokenizer, args.out))
    data = holder["data"] if "data" in holder else prepare_data(
        args.corpus, seq_len=config.seq_len, vocab_size=vocab_size, out_dir=args.out,
        cache_dir=args.cache_dir)
    model = parallel.prepare(model)  # expert shards and all-to-all dispatch over the mesh
    trainer = Trainer(model, config=config, train=data.train, val=data.val, out_dir=args.out,
                      run_info={"preset": preset.name, "model": config_json(model_config)},
                      progress=not args.quiet and parallel.is_writer, parallel=parallel)
    if not args.quiet:
        total, active = num_params(model_config), active_params(model_config)
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
                                          model_type=preset.hf_model_type, overwrite=args.resume))
    val = "" if result.final_val_loss is None else f", final validation loss {result.final_val_loss:.4f}"
    say(f"trained {result.step} steps{val}; model in {args.out / 'final'}, "
        f"metrics in {args.out / 'metrics.jsonl'}")
    return 0

"""`moekit prune PATH --corpus C --keep N | --drop-below F --out DIR [--merge]`: drop the least-used experts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a model directory, a run folder of `moekit train`, or a checkpoint")
    p.add_argument("--corpus", required=True,
                   help="text the expert loads and losses are measured on (as for `moekit analyze`)")
    p.add_argument("--labels", default=None, help="as for `moekit analyze` (only the loads matter here)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep", type=int, help="experts kept in every MoE layer (its N most used)")
    how.add_argument("--drop-below", type=float,
                     help="drop experts with less than this fraction of their layer's slots (every layer "
                          "then keeps the largest survivor count)")
    p.add_argument("--merge", action="store_true",
                   help="average each dropped expert into its most co-activated survivor (token-count weighted)")
    p.add_argument("--out", type=Path, required=True, help="folder for the pruned checkpoint and prune.json")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(128, model's))")
    p.add_argument("--sequences-per-domain", type=int, default=32, help="sequences taken per domain (default 32)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: the model's or run's)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where named corpora are cached")


def run(args: argparse.Namespace) -> int:
    import torch

    from moekit.analysis.analyze import analyze
    from moekit.analysis.corpora import domain_batches, labelled_documents
    from moekit.analysis.knockout import eval_loss
    from moekit.analysis.prune import plan_keep, prune_model
    from moekit.analysis.sources import load_model_dir, load_source
    from moekit.commands.analyze import resolve_corpus
    from moekit.train.run import save_final
    from moekit.train.tokenizer import load_tokenizer

    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"--out {args.out} is not empty; choose a new folder (nothing was written)")
    source = load_source(args.path)
    if source.model is None:
        raise ValueError(f"{args.path} is a routing trace; prune needs a model")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else source.tokenizer
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.json found for {args.path}; pass --tokenizer FILE")
    model = source.model
    corpus, labels = resolve_corpus(args.corpus, args.labels, args.cache_dir)
    seq_len = args.seq_len or min(128, getattr(model.config, "max_seq_len", 128))
    data = domain_batches(labelled_documents(corpus, labels),
                          lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                          seq_len=seq_len, max_sequences_per_domain=args.sequences_per_domain)
    analysis = analyze(model, data.batches, data.labels, label_names=data.label_names)
    counts = [torch.tensor(x["load"]["tokens_per_expert"]) for x in analysis.layers]
    coact = [torch.tensor(x["coactivation"]["p_b_given_a"]) for x in analysis.layers]
    keep_ids = plan_keep(counts, keep=args.keep, drop_below=args.drop_below)
    pruned = prune_model(model, keep_ids, merge=args.merge, counts=counts, coactivation=coact)
    base, after = eval_loss(model, data.batches), eval_loss(pruned, data.batches)
    model_type = (getattr(model, "hf_config", None) or {}).get("model_type")
    folder = save_final(pruned, pruned.config, tokenizer, args.out, model_type=model_type)
    reloaded = eval_loss(load_model_dir(folder), data.batches)
    E = model.config.moe.num_experts
    kept_load = [float(c[k].sum() / c.sum().clamp_min(1)) for c, k in zip(counts, keep_ids)]
    report = {"source": str(args.path), "corpus": str(corpus), "num_experts_before": E,
              "num_experts_after": len(keep_ids[0]), "merge": args.merge, "kept": keep_ids,
              "kept_load_fraction": kept_load, "loss_before": base, "loss_after": after,
              "loss_delta": after - base, "loss_reloaded": reloaded}
    (Path(folder) / "prune.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"kept {len(keep_ids[0])} of {E} experts per layer (they took "
          f"{', '.join(f'{f:.1%}' for f in kept_load)} of the slots){' with merging' if args.merge else ''}; "
          f"loss {base:.4f} -> {after:.4f} ({after - base:+.4f}); checkpoint in {folder} "
          f"(reloads to loss {reloaded:.4f})")
    return 0

"""`moekit analyze PATH --corpus C --out DIR`: what do the experts do? Metrics, pictures, HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

NAMED_CORPORA = ("shakespeare", "eld", "code-vs-prose")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path,
                   help="a Hugging Face / moekit model directory, a run folder of `moekit train` or "
                        "`moekit compare` (runs/NAME), a checkpoint folder, or a routing trace file")
    p.add_argument("--corpus", default=None,
                   help="folder or file of UTF-8 text, a `label<TAB>text` file, or a named corpus: "
                        "shakespeare (fetched by `moekit data fetch`), eld (60 languages, fetched on demand), "
                        "code-vs-prose (stdlib Python / eld's English sentences / two Shakespeare plays)")
    p.add_argument("--labels", default=None,
                   help="how documents get domains: file | folder | genre (Shakespeare) | column | script "
                        "(`label<TAB>text` files) | a table file (JSON or `document<TAB>label`); default: "
                        "genre for shakespeare, column for eld and .tsv files, else file")
    p.add_argument("--out", type=Path, required=True, help="folder for analysis.json, PNGs and report.html")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: min(128, model's))")
    p.add_argument("--sequences-per-domain", type=int, default=32,
                   help="sequences taken from each domain, evenly spaced over its documents (default 32)")
    p.add_argument("--knockout", default="auto",
                   help="none | all | N (the N most used experts per layer); auto = all up to 64 "
                        "experts in total, else 4 (default auto)")
    p.add_argument("--knockout-method", default="auto", choices=("auto", "router", "zero"),
                   help="router: mask the expert's logit and renormalise; zero: zero its output")
    p.add_argument("--knockout-sequences", type=int, default=64,
                   help="sequences the knock-out losses are measured on (default 64)")
    p.add_argument("--no-saturation", action="store_true", help="skip router saturation over checkpoints")
    p.add_argument("--min-count", type=int, default=5, help="vocabulary metrics: ids seen fewer times are skipped")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer.json (default: the model's or run's)")
    p.add_argument("--trace", type=Path, default=None, help="also save the routing trace to this file")
    p.add_argument("--sample", default=None,
                   help="domain whose middle sequence is shown coloured by expert (default: the middle one)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the eld corpus is cached (default ~/.cache/moekit/eld)")


def resolve_corpus(corpus: str, labels: str | None, cache_dir: Path | None) -> tuple[Path, str]:
    from moekit.analysis.corpora import build_code_vs_prose, eld_cache_dir, fetch_eld
    from moekit.train.data import default_cache_dir, is_fetched

    shakespeare = default_cache_dir()
    if corpus in ("shakespeare", "code-vs-prose") and not is_fetched(shakespeare):
        raise FileNotFoundError(f"the Shakespeare corpus is not in {shakespeare}; run `moekit data fetch` first")
    if corpus == "shakespeare":
        return shakespeare, labels or "genre"
    eld = cache_dir or eld_cache_dir()
    if corpus == "eld":
        return fetch_eld(eld) / "eld_heldout.tsv", labels or "column"
    if corpus == "code-vs-prose":
        return build_code_vs_prose(eld / "code_vs_prose", shakespeare=shakespeare, eld=fetch_eld(eld)), \
            labels or "folder"
    path = Path(corpus).expanduser()
    return path, labels or ("column" if path.suffix == ".tsv" else "file")


def knockout_setting(value: str, model) -> bool | int:
    from moekit.analysis.knockout import moe_layers_of

    if value == "none":
        return False
    if value == "all":
        return True
    if value == "auto":
        total = sum(layer.config.num_experts for layer in moe_layers_of(model))
        return True if total <= 64 else 4
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"--knockout {value!r} is invalid: use none, all, auto or a number") from None
    if n < 1:
        raise ValueError(f"--knockout {n} is invalid: the number of experts per layer must be >= 1")
    return n


def sample_sequence(trace, label: str | None) -> int:
    """The middle sequence of domain `label` (None: of the whole trace), away from title pages."""
    import torch

    if label is None:
        seqs = torch.unique(trace.sequence_N)
        return int(seqs[len(seqs) // 2])
    if trace.labels_N is None or label not in trace.label_names:
        raise ValueError(f"--sample {label!r} is not a domain of this analysis; domains: {list(trace.label_names)}")
    seqs = torch.unique(trace.sequence_N[trace.labels_N == trace.label_names.index(label)])
    return int(seqs[len(seqs) // 2])


def run(args: argparse.Namespace) -> int:
    from moekit.analysis.analyze import AnalysisConfig, analyze, analyze_trace
    from moekit.analysis.corpora import domain_batches, labelled_documents
    from moekit.analysis.report import write_report
    from moekit.analysis.sources import describe, load_checkpoint_model, load_source
    from moekit.train.tokenizer import load_tokenizer

    source = load_source(args.path)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else source.tokenizer
    decode_ids = None if tokenizer is None else (lambda ids: tokenizer.decode(ids, skip_special_tokens=False))
    decode = None if decode_ids is None else (lambda i: decode_ids([i]))
    config = AnalysisConfig(min_count=args.min_count)
    if source.trace is not None:
        analysis = analyze_trace(source.trace, config, decode=decode)
    else:
        if args.corpus is None:
            raise ValueError("--corpus is required to analyze a model (only a routing trace needs none)")
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer.json found for {args.path}; pass --tokenizer FILE")
        corpus, labels = resolve_corpus(args.corpus, args.labels, args.cache_dir)
        model = source.model
        seq_len = args.seq_len or min(128, getattr(model.config, "max_seq_len", 128))
        docs = labelled_documents(corpus, labels)
        data = domain_batches(docs, lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                              seq_len=seq_len, max_sequences_per_domain=args.sequences_per_domain)
        knock = knockout_setting(args.knockout, model)
        print(f"analyzing {source.kind} {args.path}: {sum(b[0].shape[0] for b in data.batches)} sequences of "
              f"<= {seq_len} tokens in {len(data.label_names)} domains ({labels} labels)")
        if args.knockout_sequences < 1:
            raise ValueError(f"--knockout-sequences {args.knockout_sequences} is invalid: must be >= 1")
        checkpoints = []
        if len(source.checkpoints) >= 2 and not args.no_saturation:
            checkpoints = [(step, load_checkpoint_model(folder)) for step, folder in source.checkpoints]
        analysis = analyze(model, data.batches, data.labels, label_names=data.label_names, config=config,
                           decode=decode, knockout=knock, knockout_method=args.knockout_method,
                           knockout_sequences=args.knockout_sequences, checkpoints=checkpoints)
        analysis.info.update(source=describe(source), corpus=str(corpus), labels=labels, seq_len=seq_len)
    if args.trace is not None:
        analysis.trace.save(args.trace)
    written = write_report(analysis, args.out, decode_ids=decode_ids, title=f"moekit analyze {args.path}",
                           sample_sequence=sample_sequence(analysis.trace, args.sample))
    for layer in analysis.layers:
        dom = layer.get("domain")
        loc = layer["locality"]
        print(f"layer {layer['layer']}: MaxVio {layer['load']['max_vio']:.2f}"
              + ("" if dom is None else f", domain max share {dom['mean_max_share']:.2f} (shuffled "
                 f"{dom['mean_max_share_shuffled']:.2f}, uniform {dom['uniform']:.2f})")
              + f", next token keeps first expert {loc['same_first']:.2f} (random pairs "
                f"{loc['same_first_random_pairs']:.2f})")
    print(f"wrote {len(written)} files to {args.out}: report {written['report.html']}")
    return 0

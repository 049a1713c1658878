"""Where each routed expert's bytes live in a safetensors checkpoint, and reading one expert.

A safetensors file is an 8-byte little-endian header length, a JSON header (per tensor: dtype,
shape, [begin, end) byte offsets into the data that follows), then the raw data. Offloading reads
one expert at a time with `os.preadv` into a staging buffer the store owns, one per reading thread
and reused (never a memory map, whose touched pages would count towards the resident set, nor a
fresh allocation per read, whose pages the kernel would fault in on every miss), and turns it into
moekit's per-expert tensors with the family's own key-mapping rules, so a read expert equals the
loaded model's slice bit for bit. The tensors `read` returns are views of that buffer (a per-expert
checkpoint's (out, in) weight as a transposed view, with no copy): the caller copies them into its
cache slot before the same thread reads again.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from moekit.hf.io import _DTYPES, CheckpointReader
from moekit.hf.rules import Matcher, Rename, Rule, StackExperts, fill

# moekit's routed-expert parameters: model.layers.{i}.mlp.experts.<name>
EXPERT_KEY = re.compile(r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<name>[wb]_\w+)")
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class Span:
    """Bytes [offset, offset + nbytes) of `file` hold a tensor of `shape` and `dtype`."""

    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(file: Path) -> dict[str, Span]:
    """Every tensor of a safetensors file with its absolute byte span (checked against the file size).

    Raises:
        FileNotFoundError / ValueError naming the file when it is missing, not a regular readable
        file, or its header is malformed or points past the end of the file.
    """
    try:
        info = os.stat(file)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{file}: shard missing") from err
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{file}: not a regular file; offloading reads experts from a regular "
                         f"safetensors file at their byte offsets (copy it to a local disk)")
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{file}: {len(head)} bytes, too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n > min(_HEADER_LIMIT, info.st_size - 8):
                raise ValueError(f"{file}: header length {n} is past the end of the file; truncated "
                                 f"or not safetensors")
            header = json.loads(f.read(n))
    except PermissionError as err:
        raise ValueError(f"{file}: not readable ({err.strerror}); offloading reads experts from it "
                         f"on demand, so it must stay readable") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: safetensors header is not valid JSON ({err})") from err
    base = 8 + n
    spans: dict[str, Span] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = _DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{file}: header entry for {key!r} is malformed ({err!r})") from err
        size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        if end - begin != size or base + end > info.st_size:
            raise ValueError(f"{file}: tensor {key!r} spans bytes {begin}..{end} of data, which does not "
                             f"fit its shape {shape} or the file size {info.st_size}; truncated or corrupted")
        spans[key] = Span(file, base + begin, size, dtype, shape)
    return spans


def read_span(span: Span, into: Tensor | None = None) -> Tensor:
    """The span's bytes read with preadv into `into` (uint8, at least span.nbytes) or a new buffer,
    returned as a tensor of the span's dtype and shape."""
    buf = torch.empty(span.nbytes, dtype=torch.uint8) if into is None else into[: span.nbytes]
    view = memoryview(buf.numpy())
    fd = os.open(span.file, os.O_RDONLY)
    try:
        done = 0
        while done < span.nbytes:
            got = os.preadv(fd, [view[done:]], span.offset + done)
            if got <= 0:
                raise ValueError(f"{span.file}: read stopped at byte {span.offset + done}; the file "
                                 f"was truncated after it was opened")
            done += got
    finally:
        os.close(fd)
    return buf.view(span.dtype).view(span.shape)


@dataclass(frozen=True)
class _Part:
    """One rule of one layer: which checkpoint keys it reads, and how expert e's slice is found."""

    rule: Rule
    layer: int
    keys: tuple[str, ...]  # checkpoint keys as the rule asks for them (expert 0 for StackExperts)


class ExpertStore:
    """Reads single routed experts of a checkpoint directory, in moekit's per-expert layout.

    Args:
        path: the checkpoint directory (one safetensors file or shards with an index).
        rules: the family's load rules (() for moekit's own layout: keys are parameter names).
        num_experts: experts per MoE layer, by layer index.
        shapes: per-expert shape of each expert parameter, e.g. {"w_gate_EDF": (D, F)}.
    """

    def __init__(self, path: str | Path, rules: tuple[Rule, ...], num_experts: dict[int, int],
                 shapes: dict[str, tuple[int, ...]]) -> None:
        self.path = Path(path)
        self.num_experts, self.shapes = dict(num_experts), dict(shapes)
        with CheckpointReader(path) as reader:  # checks the index and every header once
            files = {key: reader.file_of(key) for key in reader.keys()}
        self.spans: dict[str, Span] = {}
        for file in sorted(set(files.values())):
            spans = read_header(self.path / file)
            self.spans.update({k: v for k, v in spans.items() if files.get(k) == file})
        self.parts: dict[int, list[_Part]] = {layer: [] for layer in self.num_experts}
        self.expert_keys: set[str] = set()
        self._find_parts(rules)
        self._staging = threading.local()  # each reading thread's buffer (the layer call's, the prefetch's)

    def _find_parts(self, rules: tuple[Rule, ...]) -> None:
        matcher = Matcher(rules)
        seen: set[tuple[Rule, int]] = set()
        for key in self.spans:
            found = matcher.match_hf(key)
            if found is None:
                m = EXPERT_KEY.fullmatch(key)
                if m is None:
                    continue
                rule, layer = Rename(key, key), int(m["layer"])  # moekit's own layout
            else:
                rule, layer, _ = found
                if layer is None or not all(EXPERT_KEY.fullmatch(fill(p, layer=layer))
                                            for p in rule.model_patterns):
                    continue
            if layer not in self.num_experts:
                raise ValueError(f"{self.path}: tensor {key!r} holds experts of layer {layer}, which is not "
                                 f"an MoE layer in config.json; the config contradicts the weights")
            self.expert_keys.add(key)
            if (rule, layer) in seen:
                continue
            seen.add((rule, layer))
            keys = tuple(fill(p, layer=layer, expert=0) for p in rule.hf_patterns)
            self.parts[layer].append(_Part(rule, layer, keys))
        for layer, parts in self.parts.items():
            got = {EXPERT_KEY.fullmatch(fill(p, layer=layer))["name"] for part in parts
                   for p in part.rule.model_patterns}
            if got != set(self.shapes):
                raise ValueError(f"{self.path}: layer {layer}'s routed experts: found {sorted(got)} in the "
                                 f"checkpoint, the model needs {sorted(self.shapes)}; a shard is missing or "
                                 f"config.json contradicts the weights")

    def span(self, part: _Part, key: str, expert: int) -> Span:
        """Expert `expert`'s bytes of checkpoint tensor `key` (as the rule names it)."""
        E = self.num_experts[part.layer]
        if isinstance(part.rule, StackExperts):
            real = fill(part.rule.hf, layer=part.layer, expert=expert)
            if real not in self.spans:
                raise ValueError(f"{self.path}: checkpoint is missing {real!r} (expert {expert} of {E})")
            return self.spans[real]
        full = self.spans[key]
        if not full.shape or full.shape[0] % E:
            raise ValueError(f"{full.file}: tensor {key!r} has shape {full.shape}, whose first dim is not a "
                             f"multiple of num_experts={E}; config.json contradicts the weights")
        step = full.nbytes // E
        return Span(full.file, full.offset + expert * step, step, full.dtype,
                    (full.shape[0] // E, *full.shape[1:]))

    def expert_nbytes(self, layer: int) -> int:
        """Checkpoint bytes of one expert of `layer` (what a cache miss reads)."""
        return sum(self.span(p, k, 0).nbytes for p in self.parts[layer] for k in p.keys)

    def _buffer(self, nbytes: int) -> Tensor:
        """This thread's staging buffer, grown to at least `nbytes` (allocated once per size)."""
        buf = getattr(self._staging, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._staging.buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf

    def read(self, layer: int, expert: int) -> dict[str, Tensor]:
        """Expert `expert` of `layer` as {name: tensor of its per-expert shape}, in the file's dtype:
        views of this thread's staging buffer, valid until its next `read`."""
        if not 0 <= expert < self.num_experts.get(layer, 0):
            raise KeyError(f"no expert {expert} in MoE layer {layer}")
        spans = [[self.span(part, k, expert) for k in part.keys] for part in self.parts[layer]]
        offsets, at = [], 0
        for part_spans in spans:
            offsets.append([])
            for span in part_spans:
                offsets[-1].append(at)
                at += -(-span.nbytes // 64) * 64
        buf = self._buffer(at)
        out: dict[str, Tensor] = {}
        for part, part_spans, part_offsets in zip(self.parts[layer], spans, offsets):
            raw = {k: read_span(span, into=buf[off:]) for k, span, off in zip(part.keys, part_spans, part_offsets)}
            if isinstance(part.rule, StackExperts):  # one (out, in) tensor per expert: a view, no copy
                t = raw[part.keys[0]]
                got = {fill(part.rule.model, layer=layer): (t.transpose(-1, -2) if part.rule.transpose else t)[None]}
            else:
                shapes = {fill(p, layer=layer): (1, *self.shapes[_name(p)]) for p in part.rule.model_patterns}
                got = part.rule.to_model(raw.__getitem__, shapes, layer)
            for model_key, t in got.items():
                name = _name(model_key)
                if tuple(t.shape[1:]) != self.shapes[name]:
                    raise ValueError(f"{self.path}: {part.keys[0]} gives expert {expert} of layer {layer} "
                                     f"the shape {tuple(t.shape[1:])} for {name}, expected "
                                     f"{self.shapes[name]}; config.json contradicts the weights")
                out[name] = t[0]
        return out


def _name(model_key: str) -> str:
    """'model.layers.{layer}.mlp.experts.w_up_EDF' -> 'w_up_EDF'."""
    return model_key.rsplit(".", 1)[-1]

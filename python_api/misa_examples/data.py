"""Real text that every machine has offline, as byte-level tokens, with a held-out split.

- :func:`stdlib_corpus`: the ``.py`` files of the running Python's standard library (code).
  The file list is fixed (sorted relative paths, installed packages excluded) and the split is
  by file: a file is held out when the CRC-32 of its relative path falls in the held-out
  fraction, so the split does not depend on which other files exist.
- :func:`pydoc_topics_corpus`: the English help texts of ``pydoc_data.topics`` (the language
  reference topics behind ``help("if")``), split by topic in the same way. A different kind of
  text from the code: the fine-tuning corpus of the experiments.
- :func:`file_corpus`: the user's own text file; its last part is held out, cut at a line end.

Tokens are bytes (vocabulary 256): no tokenizer to train or download, and the loss is in nats
per byte on every machine.
"""
from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch

VOCAB_SIZE = 256
#: directories of the standard library's folder that are not part of the standard library
#: (installed packages) or are the fine-tuning text (pydoc_data).
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "__pycache__", "pydoc_data")
#: bytes placed between two documents.
SEPARATOR = b"\n\n"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``encode("é") == tensor([195, 169])``."""

    vocab_size = VOCAB_SIZE

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()

    def decode(self, tokens: torch.Tensor) -> str:
        return bytes(tokens.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    """Training and held-out tokens (uint8 tensors of byte values) and where they came from."""

    name: str
    train: torch.Tensor
    heldout: torch.Tensor
    documents: Tuple[int, int]  # (training, held-out) document counts
    checksum: int  # CRC-32 of all bytes, training then held-out: identifies the corpus

    def describe(self) -> str:
        return (f"{self.name}: {self.train.numel() / 1e6:.2f} MB training ({self.documents[0]} documents), "
                f"{self.heldout.numel() / 1e6:.2f} MB held out ({self.documents[1]}), crc32 {self.checksum:08x}")

    def check_fits(self, seq_len: int) -> None:
        """Raises ValueError when either split is too short for one window of `seq_len` tokens."""
        for split in ("train", "heldout"):
            size = getattr(self, split).numel()
            if size <= seq_len:
                raise ValueError(f"corpus {self.name!r}: the {split} split has {size} bytes, fewer than one "
                                 f"window of {seq_len + 1}; give more text or a shorter sequence length")

    def train_batch(self, generator: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
        """[batch, seq_len] int64 windows starting at uniformly random training positions."""
        starts = torch.randint(0, self.train.numel() - seq_len, (batch,), generator=generator)
        return _windows(self.train, starts, seq_len)

    def heldout_batches(self, count: int, batch: int, seq_len: int) -> List[torch.Tensor]:
        """`count` batches of evenly spaced held-out windows: the same every call."""
        total = count * batch
        last = self.heldout.numel() - seq_len
        starts = torch.linspace(0, last, total).long()
        return [_windows(self.heldout, starts[i * batch:(i + 1) * batch], seq_len) for i in range(count)]


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    index = starts[:, None] + torch.arange(seq_len)[None, :]
    return tokens[index].long()


def _split_documents(documents: Iterable[Tuple[str, bytes]], heldout_fraction: float, name: str) -> Corpus:
    """Joins (key, bytes) documents into two token streams; a document is held out when the
    CRC-32 of its key, modulo 10000, is below heldout_fraction * 10000."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction!r}")
    threshold = round(heldout_fraction * 10000)
    parts = {"train": [], "heldout": []}
    for key, data in documents:
        split = "heldout" if zlib.crc32(key.encode("utf-8")) % 10000 < threshold else "train"
        parts[split].append(data)
    if not parts["train"] or not parts["heldout"]:
        empty = "training" if not parts["train"] else "held-out"
        raise ValueError(f"corpus {name!r}: the {empty} split is empty; use more documents or another "
                         "heldout_fraction")
    train, heldout = SEPARATOR.join(parts["train"]), SEPARATOR.join(parts["heldout"])
    return Corpus(name, _tensor(train), _tensor(heldout), (len(parts["train"]), len(parts["heldout"])),
                  zlib.crc32(heldout, zlib.crc32(train)))


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def stdlib_files(root: Optional[str] = None) -> List[str]:
    """Sorted relative paths of the standard library's ``.py`` files under `root` (default:
    ``sysconfig.get_paths()["stdlib"]``), without installed packages and pydoc_data."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"standard library folder {root!r} not found")
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]
        found += [os.path.relpath(os.path.join(folder, f), root) for f in files if f.endswith(".py")]
    return sorted(p.replace(os.sep, "/") for p in found)


def stdlib_corpus(heldout_fraction: float = 0.05, root: Optional[str] = None) -> Corpus:
    """The standard library's Python source (about 30 MB for CPython 3.11), split by file."""
    root = root or sysconfig.get_paths()["stdlib"]
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"no .py files under {root!r}")

    def documents():
        for rel in files:
            with open(os.path.join(root, rel), "rb") as f:
                yield rel, f.read()

    return _split_documents(documents(), heldout_fraction, "python-stdlib")


def pydoc_topics_corpus(heldout_fraction: float = 0.1) -> Corpus:
    """The English help topics of ``pydoc_data.topics`` (about 0.46 MB), split by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise FileNotFoundError("this Python has no pydoc_data.topics (some distributions strip it); "
                                "give your own text for fine-tuning instead") from exc
    return _split_documents(((key, topics[key].encode("utf-8")) for key in sorted(topics)),
                            heldout_fraction, "pydoc-topics")


def file_corpus(path: str, heldout_fraction: float = 0.1) -> Corpus:
    """The bytes of `path`; the last `heldout_fraction` is held out, starting after a newline."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {path!r} not found")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction!r}")
    with open(path, "rb") as f:
        data = f.read()
    cut = int(len(data) * (1.0 - heldout_fraction))
    newline = data.find(b"\n", cut)
    if 0 <= newline < len(data) - 1:
        cut = newline + 1
    train, heldout = data[:cut], data[cut:]
    if not train or not heldout:
        raise ValueError(f"{path!r} holds {len(data)} bytes: too little text to hold some out")
    return Corpus(os.path.basename(path), _tensor(train), _tensor(heldout), (1, 1),
                  zlib.crc32(heldout, zlib.crc32(train)))

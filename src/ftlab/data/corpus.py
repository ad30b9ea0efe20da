"""A tokenized pretraining corpus on disk, and `ftlab prepare-corpus` that builds it.

    DIR/
        tokens.bin    every document's token ids, back to back (uint16 when the vocabulary fits, else uint32)
        index.jsonl   one line per document: {"doc", "id", "category", "split", "offset", "length", "bytes"}
        splits.json   {"train": [doc, ...], "val": [...], "test": [...]}  (row numbers of index.jsonl)
        meta.json     tokenizer (name, hash), dtype, vocab size, settings, documents/tokens/bytes per split
                      and category; written last

Why this layout: windows are read straight from a memmap (nothing is loaded), and a window's (document,
offset) names its text. Documents are tokenized without special tokens (no BOS/EOS): a training window
never crosses a document boundary (`ftlab.data.windows`).

* Splits are decided per document by a hash of (seed, document id): deterministic for a seed, independent of
  the order of the input and of the number of workers, and computed before tokenizing, so
  `--max-examples-per-split` skips the rest cheaply.
* Tokenization runs in worker processes on chunks of documents; the main process writes the results in
  input order as they come back, with at most a few chunks in flight, so memory does not grow with the
  corpus.
* Everything is written into a temp directory beside DIR and renamed at the end: a killed or failed
  preparation leaves no DIR that looks complete (meta.json is its last file).
* `bytes` (UTF-8 bytes of a document's text) gives bits per byte: a window of n tokens of a document is
  counted as n x bytes/length bytes of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ftlab.data.jsonl import iter_jsonl, json_type
from ftlab.errors import UserError

log = logging.getLogger("ftlab")

SPLITS = ("train", "val", "test")
FILES = ("tokens.bin", "index.jsonl", "splits.json", "meta.json")  # meta.json last: it marks completeness
FORMAT = 1
CHUNK_DOCS = 64  # documents per worker task


# -- tokenizer identity ------------------------------------------------------------------------------
def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of what decides token ids (vocabulary, merges, normalizer, pre-tokenizer, added tokens).

    The backend's JSON without its padding/truncation state, which batching changes without changing ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
    else:  # a slow tokenizer: its vocabulary (ids of every piece)
        spec = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def split_of(seed: int, doc_id: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a document: a hash of (seed, id) mapped to [0, 1), then val, test, train by fraction."""
    h = int.from_bytes(hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()[:8], "big") / 2 ** 64
    if h < val_fraction:
        return "val"
    if h < val_fraction + test_fraction:
        return "test"
    return "train"


# -- reading a prepared corpus -------------------------------------------------------------------------
@dataclass
class Corpus:
    """A prepared corpus opened for reading: tokens as a memmap, the index as arrays."""

    path: Path
    meta: dict[str, Any]
    tokens: np.memmap
    ids: list[str]
    categories: list[str]          # category of every document
    offset: np.ndarray             # int64 per document
    length: np.ndarray             # int64 per document
    nbytes: np.ndarray             # int64 per document (UTF-8 bytes of its text)
    splits: dict[str, np.ndarray]  # split -> document numbers

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Corpus":
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"corpus {path}: not found; build it with: ftlab prepare-corpus INPUT --out {path}")
        meta = read_json_file(path / "meta.json", what="corpus meta.json (prepare-corpus writes it last; "
                              "without it the corpus is incomplete)")
        for key in ("dtype", "vocab_size", "tokens", "documents", "tokenizer"):
            if key not in meta:
                raise UserError(f"{path / 'meta.json'}: missing {key!r}; prepare the corpus again")
        dtype = np.dtype(meta["dtype"])
        bin_path = path / "tokens.bin"
        size = bin_path.stat().st_size if bin_path.is_file() else None
        expected = int(meta["tokens"]) * dtype.itemsize
        if size != expected:
            got = "missing" if size is None else f"{size} bytes"
            raise UserError(f"{bin_path}: {got}, but meta.json says {meta['tokens']} {dtype.name} tokens "
                            f"({expected} bytes); a truncated copy? copy or prepare the corpus again")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(int(meta["tokens"]),)) if expected else \
            np.zeros(0, dtype=dtype)
        ids, cats, off, ln, nb, split_of_doc = [], [], [], [], [], []
        for lineno, row in iter_jsonl(path / "index.jsonl"):
            try:
                ids.append(str(row["id"]))
                cats.append(str(row["category"]))
                off.append(int(row["offset"]))
                ln.append(int(row["length"]))
                nb.append(int(row.get("bytes", 0)))
                split_of_doc.append(row.get("split"))
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"{path / 'index.jsonl'}:{lineno}: bad index row ({type(e).__name__}: {e})") from None
        if len(ids) != int(meta["documents"]):
            raise UserError(f"{path / 'index.jsonl'}: {len(ids)} documents, meta.json says {meta['documents']}; "
                            "prepare the corpus again")
        offset, length = np.asarray(off, dtype=np.int64), np.asarray(ln, dtype=np.int64)
        if len(ids) and int((offset + length).max()) > int(meta["tokens"]):
            bad = int(np.argmax(offset + length > int(meta["tokens"])))
            raise UserError(f"{path / 'index.jsonl'}: document {bad} ends at token {int(offset[bad] + length[bad])}, "
                            f"beyond tokens.bin ({meta['tokens']} tokens)")
        raw = read_json_file(path / "splits.json", what="corpus splits.json")
        splits = {s: np.asarray(raw.get(s, []), dtype=np.int64) for s in SPLITS}
        return cls(path, meta, tokens, ids, cats, offset, length, np.asarray(nb, dtype=np.int64), splits)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def doc_tokens(self, doc: int) -> np.ndarray:
        return self.tokens[self.offset[doc]:self.offset[doc] + self.length[doc]]

    def check_token_ids(self, vocab_size: int, docs: np.ndarray | None = None, chunk: int = 1 << 24) -> None:
        """Every token id (of `docs`, or of the whole file) is below `vocab_size`; else one line naming the
        first offending offset, its document and category. Runs in chunks: nothing is loaded at once."""
        ranges = [(0, len(self.tokens))] if docs is None else merged_ranges(self.offset[docs], self.length[docs])
        for start, end in ranges:
            for a in range(start, end, chunk):
                block = np.asarray(self.tokens[a:min(a + chunk, end)])
                if block.size and int(block.max()) >= vocab_size:
                    at = a + int(np.argmax(block >= vocab_size))
                    doc = int(np.searchsorted(self.offset, at, side="right") - 1)
                    raise UserError(f"{self.path / 'tokens.bin'}: token id {int(self.tokens[at])} at offset {at} "
                                    f"(document {doc} {self.ids[doc]!r}, category {self.categories[doc]!r}, "
                                    f"position {at - int(self.offset[doc])}) is beyond the model's vocabulary of "
                                    f"{vocab_size}; was the corpus prepared with another tokenizer?")


def merged_ranges(offsets: np.ndarray, lengths: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) token ranges covering the given documents, sorted and merged where they touch."""
    out: list[list[int]] = []
    for o, n in sorted(zip(offsets.tolist(), lengths.tolist())):
        if out and o <= out[-1][1]:
            out[-1][1] = max(out[-1][1], o + n)
        else:
            out.append([o, o + n])
    return [(a, b) for a, b in out]


def read_json_file(path: Path, what: str) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: missing {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}); prepare the corpus again") from None


# -- preparing a corpus -----------------------------------------------------------------------------------
@dataclass
class PrepareSettings:
    input: str
    out: str
    tokenizer: str = "smollm2-135m-instruct"
    text_field: str = "text"
    category_field: str = "category"
    id_field: str = "id"
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    max_examples_per_split: int | None = 50
    workers: int = 2
    hf_config: str | None = None
    hf_split: str = "train"
    s3_bucket: str | None = None
    s3_prefix: str = ""
    s3_endpoint: str | None = None
    overwrite: bool = False


def check_settings(s: PrepareSettings) -> None:
    for name in ("val_fraction", "test_fraction"):
        v = getattr(s, name)
        if not 0 <= v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in [0, 1); got {v}")
    if s.val_fraction + s.test_fraction >= 1:
        raise UserError(f"--val-fraction + --test-fraction must be below 1 (something must be left to train on); "
                        f"got {s.val_fraction + s.test_fraction}")
    if s.max_examples_per_split is not None and s.max_examples_per_split < 1:
        raise UserError(f"--max-examples-per-split must be >= 1; got {s.max_examples_per_split}")
    if s.workers < 0:
        raise UserError(f"--workers must be >= 0; got {s.workers}")
    out = Path(s.out)
    if out.exists() and not s.overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file")


def source_identity(s: PrepareSettings) -> dict[str, Any]:
    """What the input was: a file by name and content hash, a datasets id by id, config and split."""
    path = Path(s.input)
    if path.exists():
        if path.is_dir():
            raise UserError(f"{path}: is a directory, not a JSONL file")
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"file": path.name, "sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    if s.input.endswith((".jsonl", ".json")) or s.input.startswith((".", "/", "~")):
        raise UserError(f"{s.input}: file not found")
    return {"datasets_id": s.input, "config": s.hf_config, "split": s.hf_split}


def prepare_corpus(s: PrepareSettings) -> dict[str, Any]:
    """Build the corpus at s.out (or fetch it from S3 when a matching one is there); returns its meta."""
    from ftlab.models.load import load_tokenizer, resolve_model_path

    check_settings(s)
    out = Path(s.out)
    tokenizer = load_tokenizer(resolve_model_path(s.tokenizer))
    settings = {"source": source_identity(s), "tokenizer": {"name": s.tokenizer, "sha256": tokenizer_hash(tokenizer)},
                "text_field": s.text_field, "category_field": s.category_field, "id_field": s.id_field,
                "seed": s.seed, "val_fraction": s.val_fraction, "test_fraction": s.test_fraction,
                "max_examples_per_split": s.max_examples_per_split, "format": FORMAT}
    store = None
    if s.s3_bucket:
        from ftlab.data.s3 import S3Store

        store = S3Store(s.s3_bucket, s.s3_prefix, s.s3_endpoint)
        meta = fetch_from_s3(store, settings, out)
        if meta is not None:
            return meta
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        meta = write_corpus(s, tmp, tokenizer, settings)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("corpus written to %s: %s", out, summary_line(meta))
    if store is not None:
        store.upload(out, FILES)  # meta.json last
        log.info("corpus uploaded to %s", store.where())
    return meta


def fetch_from_s3(store: Any, settings: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """Download a complete corpus with these settings from `store` (an `ftlab.data.s3.S3Store`) into `out`
    (temp dir, then rename); None when the store has none at its prefix."""
    meta = store.remote_meta()
    if meta is None:
        log.info("no corpus at %s: preparing it here (uploaded when done)", store.where())
        return None
    differs = first_difference(meta.get("settings", {}), settings)
    if differs:
        raise UserError(f"{store.where()} holds a corpus prepared with other settings ({differs}); use another "
                        "--s3-prefix, or remove it there")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        store.download([name for name in FILES if name != "meta.json"], tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        Corpus.open(tmp)  # sizes agree with meta.json, or one line says what is wrong
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("corpus downloaded from %s to %s", store.where(), out)
    return meta


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """'key: A != B' for the first setting that differs (nested dicts walked), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} there, {b!r} here"


def publish(tmp: Path, out: Path) -> None:
    """Move the finished temp dir into place; an old corpus (with --overwrite) is moved aside first."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the corpus is an ordinary directory
    if out.exists():
        from ftlab.models.load import discard_dir

        discard_dir(out)
    os.replace(tmp, out)


def summary_line(meta: dict[str, Any]) -> str:
    per = ", ".join(f"{s} {meta['splits'][s]['documents']} docs / {meta['splits'][s]['tokens']} tokens"
                    for s in SPLITS)
    return f"{meta['documents']} documents, {meta['tokens']} tokens ({meta['dtype']}); {per}"


# -- reading documents ----------------------------------------------------------------------------------
Doc = tuple[str, str, str, str]  # (where, id, category, text)


def iter_documents(s: PrepareSettings) -> tuple[Iterator[Doc], int | None, str]:
    """(documents, total for the progress bar, its unit). JSONL is streamed line by line."""
    path = Path(s.input)
    if path.is_file():
        with path.open("rb") as f:  # a fast count of lines, for the progress bar's total
            lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
        return jsonl_documents(s, path), lines, "doc"
    return hub_documents(s)


def jsonl_documents(s: PrepareSettings, path: Path) -> Iterator[Doc]:
    for lineno, row in iter_jsonl(path):
        where = f"{path}:{lineno}"
        yield where, *document_fields(row, s, where, default_id=str(lineno))


def document_fields(row: dict, s: PrepareSettings, where: str, default_id: str,
                    category_names: list[str] | None = None) -> tuple[str, str, str]:
    """(id, category, text) of one input row; a missing or mistyped field is one line naming file:line."""
    for field in (s.text_field, s.category_field):
        if field not in row or row[field] is None:
            raise UserError(f"{where}: missing field {field!r} (the corpus needs text in {s.text_field!r} and a "
                            f"category in {s.category_field!r}; set them with --text-field/--category-field)")
    text, cat = row[s.text_field], row[s.category_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {s.text_field!r} must be a string; got {json_type(text)}")
    if category_names is not None and isinstance(cat, int) and not isinstance(cat, bool):
        cat = category_names[cat]  # a datasets ClassLabel
    if isinstance(cat, bool) or not isinstance(cat, (str, int)) or cat == "":
        raise UserError(f"{where}: field {s.category_field!r} must be a non-empty string; got "
                        f"{json_type(cat) if cat != '' else 'an empty string'}")
    doc_id = row.get(s.id_field)
    return (str(doc_id) if isinstance(doc_id, (str, int)) and not isinstance(doc_id, bool) else default_id,
            str(cat), text)


def hub_documents(s: PrepareSettings) -> tuple[Iterator[Doc], int | None, str]:
    from ftlab.hub import require_hub

    require_hub(s.input, hint="pass a local JSONL file instead")
    import datasets

    try:
        ds = datasets.load_dataset(s.input, s.hf_config, split=s.hf_split)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"{s.input}: cannot load split {s.hf_split!r}: {str(e).splitlines()[0]}") from None
    feature = ds.features.get(s.category_field)
    names = list(feature.names) if hasattr(feature, "names") else None
    where0 = f"{s.input}[{s.hf_split}]"

    def docs() -> Iterator[Doc]:
        for i, row in enumerate(ds):
            where = f"{where0} row {i}"
            yield where, *document_fields(row, s, where, default_id=str(i), category_names=names)

    return docs(), len(ds), "doc"


# -- tokenizing in workers -----------------------------------------------------------------------------------
_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_json: str) -> None:
    """A worker holds only the Rust tokenizer (`tokenizers`), rebuilt from the main process's own: starting
    one then takes a fraction of a second instead of ~4 s of importing torch and transformers."""
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode(texts: list[str]) -> list[np.ndarray]:
    """The ids `encode_texts` gives with the transformers tokenizer (it calls this same backend)."""
    return [np.asarray(e.ids, dtype=np.int64) for e in _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)]


def encode_texts(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int64) for x in ids]


class Encoder:
    """Encodes chunks of texts in worker processes (or in-process with workers=0); results come back in order,
    with at most 2 x workers chunks in flight (memory stays bounded whatever the corpus size)."""

    def __init__(self, tokenizer: Any, workers: int):
        self.tokenizer, self.pool = tokenizer, None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if workers > 0 and backend is None:
            log.warning("the tokenizer has no fast (Rust) backend: encoding in this process, not in %d workers",
                        workers)
            workers = 0
        if workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            # spawn: a forked copy of a process that already ran the tokenizer's thread pool can deadlock
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                            initargs=(backend.to_str(),))
        self.in_flight: deque = deque()
        self.limit = max(2 * workers, 1)

    def submit(self, meta: list, texts: list[str]) -> list[tuple[list, list[np.ndarray]]]:
        """Queue one chunk; returns the chunks finished by now, in input order."""
        if self.pool is None:
            return [(meta, encode_texts(self.tokenizer, texts))]
        self.in_flight.append((meta, self.pool.submit(_encode, texts)))
        done = []
        while len(self.in_flight) > self.limit or (self.in_flight and self.in_flight[0][1].done()):
            m, fut = self.in_flight.popleft()
            done.append((m, fut.result()))
        return done

    def drain(self) -> list[tuple[list, list[np.ndarray]]]:
        out = [(m, fut.result()) for m, fut in self.in_flight]
        self.in_flight.clear()
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class CorpusWriter:
    """Appends encoded documents to tokens.bin / index.jsonl / per-split lists, counting as it goes."""

    def __init__(self, tmp: Path, vocab: int):
        self.tmp, self.vocab, self.dtype = tmp, vocab, token_dtype(vocab)
        self.bin = (tmp / "tokens.bin").open("wb")
        self.index = (tmp / "index.jsonl").open("w", encoding="utf-8")
        self.split_files = {sp: (tmp / f".split_{sp}.txt").open("w") for sp in SPLITS}
        self.counts: dict[str, dict[str, dict[str, int]]] = {
            sp: defaultdict(lambda: {"documents": 0, "tokens": 0, "bytes": 0}) for sp in SPLITS}
        self.doc = self.offset = self.empty = 0

    def write(self, results: list[tuple[list, list[np.ndarray]]]) -> None:
        for meta, arrays in results:
            for (where, doc_id, cat, split, nbytes), ids in zip(meta, arrays):
                if ids.size and (int(ids.max()) >= self.vocab or int(ids.min()) < 0):
                    raise RuntimeError(f"{where}: the tokenizer produced id {int(ids.max())} outside its "
                                       f"vocabulary of {self.vocab}")
                if not ids.size:  # an empty text: nothing to train on
                    self.empty += 1
                    continue
                self.bin.write(ids.astype(self.dtype).tobytes())
                row = {"doc": self.doc, "id": doc_id, "category": cat, "split": split, "offset": self.offset,
                       "length": int(ids.size), "bytes": int(nbytes)}
                self.index.write(json.dumps(row, ensure_ascii=False) + "\n")
                self.split_files[split].write(f"{self.doc}\n")
                c = self.counts[split][cat]
                c["documents"] += 1
                c["tokens"] += int(ids.size)
                c["bytes"] += int(nbytes)
                self.doc += 1
                self.offset += int(ids.size)

    def close(self) -> None:
        for f in (self.bin, self.index, *self.split_files.values()):
            f.close()

    def write_splits(self) -> None:
        """splits.json streamed from the per-split lists (no list of every document is held in memory)."""
        with (self.tmp / "splits.json").open("w") as out:
            out.write("{")
            for i, sp in enumerate(SPLITS):
                out.write(f'{"," if i else ""}"{sp}": [')
                with (self.tmp / f".split_{sp}.txt").open() as f:
                    for j, line in enumerate(f):
                        out.write(("," if j else "") + line.strip())
                out.write("]")
                (self.tmp / f".split_{sp}.txt").unlink()
            out.write("}\n")


def write_corpus(s: PrepareSettings, tmp: Path, tokenizer: Any, settings: dict[str, Any]) -> dict[str, Any]:
    from tqdm.auto import tqdm

    vocab, limit = len(tokenizer), s.max_examples_per_split
    docs, total, unit = iter_documents(s)
    wanted = [sp for sp in SPLITS if fraction(s, sp) > 0]
    taken = dict.fromkeys(SPLITS, 0)
    started = time.time()
    writer = CorpusWriter(tmp, vocab)
    encoder = Encoder(tokenizer, s.workers)
    # A bar on a terminal; elsewhere (CI, Slurm logs) a log line every 30 s instead of bar redraws.
    bar = tqdm(total=total, unit=unit, desc="tokenize", mininterval=1.0, disable=None)
    read, last_log = 0, time.time()
    try:
        meta_chunk: list = []
        texts: list[str] = []
        for where, doc_id, cat, text in docs:
            read += 1
            nbytes = len(text.encode("utf-8", "surrogatepass"))
            bar.update(1)
            if bar.disable and time.time() - last_log > 30:
                last_log = time.time()
                log.info("tokenize: %d of %s documents read, %d written", read, total or "?", writer.doc)
            split = split_of(s.seed, doc_id, s.val_fraction, s.test_fraction)
            if limit is not None:
                if taken[split] >= limit:
                    if all(taken[sp] >= limit for sp in wanted):
                        break  # every split is full: the rest of the input is not read
                    continue
                taken[split] += 1
            meta_chunk.append((where, doc_id, cat, split, nbytes))
            texts.append(text)
            if len(texts) >= CHUNK_DOCS:
                writer.write(encoder.submit(meta_chunk, texts))
                meta_chunk, texts = [], []
        if texts:
            writer.write(encoder.submit(meta_chunk, texts))
        writer.write(encoder.drain())
    finally:
        bar.close()
        encoder.close()
        writer.close()
    if writer.doc == 0:
        raise UserError(f"{s.input}: no documents with text (read {read} rows)")
    writer.write_splits()
    meta = build_meta(s, settings, writer, vocab, tokenizer, time.time() - started, read)
    from ftlab.runs.rundir import write_json

    write_json(tmp / "meta.json", meta)  # last: its presence marks a complete corpus
    return meta


def build_meta(s: PrepareSettings, settings: dict[str, Any], w: CorpusWriter, vocab: int, tokenizer: Any,
               seconds: float, read: int) -> dict[str, Any]:
    splits = {}
    for sp in SPLITS:
        cats = {c: dict(v) for c, v in sorted(w.counts[sp].items())}
        splits[sp] = {"documents": sum(v["documents"] for v in cats.values()),
                      "tokens": sum(v["tokens"] for v in cats.values()),
                      "bytes": sum(v["bytes"] for v in cats.values()), "categories": cats}
    return {"format": FORMAT, "tokenizer": settings["tokenizer"]["name"],
            "tokenizer_sha256": settings["tokenizer"]["sha256"], "vocab_size": vocab, "dtype": w.dtype.name,
            "eos_token_id": tokenizer.eos_token_id, "special_tokens": "none added (documents are not joined)",
            "documents": w.doc, "tokens": w.offset, "empty_documents_skipped": w.empty,
            "rows_read": read, "limited": s.max_examples_per_split is not None,
            "categories": sorted({c for sp in SPLITS for c in w.counts[sp]}), "splits": splits,
            "settings": settings, "seconds": round(seconds, 2), "workers": s.workers,
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}


def fraction(s: PrepareSettings, split: str) -> float:
    return {"val": s.val_fraction, "test": s.test_fraction}.get(split, 1 - s.val_fraction - s.test_fraction)

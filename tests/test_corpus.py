"""`ftlab prepare-corpus`: tokens.bin / index.jsonl / splits.json / meta.json, workers, limits, S3 round trip.

The S3 test runs against a real S3-compatible server (moto's standalone server on loopback), not a mock object.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from ftlab.cli import main
from ftlab.data.corpus import Corpus, PrepareSettings, prepare_corpus, split_of, token_dtype
from ftlab.errors import UserError
from tests.pretrain_helpers import write_corpus_jsonl

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
def settings(tmp: Path, **kw) -> PrepareSettings:
    src = tmp / "in.jsonl"
    if not src.exists():
        write_corpus_jsonl(src)
    base = dict(input=str(src), out=str(tmp / "corpus"), workers=0, max_examples_per_split=None,
                val_fraction=0.2, test_fraction=0.1)
    base.update(kw)
    return PrepareSettings(**base)


def test_corpus_files_agree_with_the_tokenizer(tmp_path, embedded_tokenizer):
    meta = prepare_corpus(settings(tmp_path))
    c = Corpus.open(tmp_path / "corpus")
    rows = [json.loads(line) for line in (tmp_path / "in.jsonl").read_text().splitlines()]
    assert meta["documents"] == len(rows) == len(c.ids)
    assert meta["dtype"] == "uint16" and c.tokens.dtype == np.uint16 and meta["vocab_size"] == len(embedded_tokenizer)
    for doc, row in enumerate(rows):  # input order kept, every document's ids exactly the tokenizer's
        assert c.ids[doc] == row["id"] and c.categories[doc] == row["category"]
        want = embedded_tokenizer(row["text"], add_special_tokens=False).input_ids
        assert c.doc_tokens(doc).tolist() == want
        assert c.nbytes[doc] == len(row["text"].encode())
    assert int(c.length.sum()) == meta["tokens"] == len(c.tokens)
    # splits: each document once, as the hash says; counts per split and category add up
    every = np.concatenate([c.splits[s] for s in ("train", "val", "test")])
    assert sorted(every.tolist()) == list(range(len(rows)))
    for s in ("train", "val", "test"):
        for d in c.splits[s]:
            assert split_of(0, c.ids[d], 0.2, 0.1) == s
        cats = meta["splits"][s]["categories"]
        assert sum(v["documents"] for v in cats.values()) == len(c.splits[s])
        assert sum(v["tokens"] for v in cats.values()) == int(c.length[c.splits[s]].sum())
    assert len(c.splits["val"]) > 0 and len(c.splits["test"]) > 0
    assert meta["tokenizer"] == "smollm2-135m-instruct" and len(meta["tokenizer_sha256"]) == 64
    assert not list(tmp_path.glob(".corpus.tmp-*"))  # the temp dir was renamed


def test_splits_are_deterministic_by_seed_and_workers_change_nothing(tmp_path):
    prepare_corpus(settings(tmp_path, out=str(tmp_path / "a")))
    prepare_corpus(settings(tmp_path, out=str(tmp_path / "b"), workers=2))
    prepare_corpus(settings(tmp_path, out=str(tmp_path / "c"), seed=1))
    for name in ("tokens.bin", "index.jsonl", "splits.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "splits.json").read_bytes() != (tmp_path / "c" / "splits.json").read_bytes()


def test_max_examples_per_split_limits_each_split(tmp_path):
    meta = prepare_corpus(settings(tmp_path, max_examples_per_split=3))
    assert [meta["splits"][s]["documents"] for s in ("train", "val", "test")] == [3, 3, 3]
    assert meta["limited"] and meta["rows_read"] < 60


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_a_bad_line_leaves_no_corpus_behind(tmp_path):
    src = write_corpus_jsonl(tmp_path / "in.jsonl", n=200)
    with src.open("a") as f:
        f.write(json.dumps({"id": "x", "text": "no category here"}) + "\n")
    with pytest.raises(UserError, match=r"in.jsonl:201: missing field 'category'"):
        prepare_corpus(settings(tmp_path))
    assert not (tmp_path / "corpus").exists() and not list(tmp_path.glob(".corpus*"))


def test_existing_output_needs_overwrite(tmp_path):
    prepare_corpus(settings(tmp_path))
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        prepare_corpus(settings(tmp_path))
    prepare_corpus(settings(tmp_path, overwrite=True, seed=3))
    assert json.loads((tmp_path / "corpus" / "meta.json").read_text())["settings"]["seed"] == 3


def test_truncated_tokens_and_ids_beyond_the_vocabulary_are_found(tmp_path):
    prepare_corpus(settings(tmp_path))
    c = Corpus.open(tmp_path / "corpus")
    c.check_token_ids(c.vocab_size)  # all fine
    with pytest.raises(UserError, match=r"token id \d+ at offset \d+ \(document \d+ 'doc\d+'"):
        c.check_token_ids(100)
    bin_path = tmp_path / "corpus" / "tokens.bin"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-10])
    with pytest.raises(UserError, match="meta.json says"):
        Corpus.open(tmp_path / "corpus")


def test_cli_prepare_corpus(tmp_path, capsys):
    src = write_corpus_jsonl(tmp_path / "in.jsonl")
    code = main(["prepare-corpus", str(src), "--out", str(tmp_path / "c"), "--max-examples-per-split", "5",
                 "--workers", "0", "--text-field", "text", "--category-field", "category"])
    assert code == 0
    assert "train 5 docs" in capsys.readouterr().out  # the input (60 rows, 5% val) runs out before val has 5


# -- S3 against a real S3-compatible server on loopback --------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's standalone S3 server (from moto[server]) on a free loopback port; stopped after the module."""
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def test_s3_upload_after_then_download_before(tmp_path, s3_server, aws_env, caplog):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="corpora")
    s3 = dict(s3_bucket="corpora", s3_prefix="arxiv/v1", s3_endpoint=s3_server)
    prepare_corpus(settings(tmp_path, out=str(tmp_path / "built"), **s3))
    keys = sorted(o["Key"] for o in boto3.client("s3", endpoint_url=s3_server)
                  .list_objects_v2(Bucket="corpora")["Contents"])
    assert keys == [f"arxiv/v1/{n}" for n in ("index.jsonl", "meta.json", "splits.json", "tokens.bin")]
    caplog.clear()
    with caplog.at_level("INFO", logger="ftlab"):
        prepare_corpus(settings(tmp_path, out=str(tmp_path / "fetched"), **s3))
    assert "downloaded from s3://corpora/arxiv/v1" in caplog.text
    for name in ("tokens.bin", "index.jsonl", "splits.json", "meta.json"):
        assert (tmp_path / "built" / name).read_bytes() == (tmp_path / "fetched" / name).read_bytes(), name
    # another setting at the same prefix is refused, not mixed
    with pytest.raises(UserError, match="prepared with other settings \\(seed: 0 there, 5 here\\)"):
        prepare_corpus(settings(tmp_path, out=str(tmp_path / "other"), seed=5, **s3))
    assert not (tmp_path / "other").exists()


@pytest.mark.skipif(not (DATA / "arxiv").is_dir(), reason="needs ../shared/data/arxiv")
def test_real_arxiv_abstracts(tmp_path):
    src = DATA / "arxiv" / "abstracts_2007_first2000.jsonl"
    meta = prepare_corpus(PrepareSettings(input=str(src), out=str(tmp_path / "c"), workers=0,
                                          max_examples_per_split=40, val_fraction=0.1, test_fraction=0.1))
    c = Corpus.open(tmp_path / "c")
    assert [meta["splits"][s]["documents"] for s in ("train", "val", "test")] == [40, 40, 40]
    assert {"astro-ph", "math", "cond-mat"} <= set(meta["categories"])
    assert 50 < float(c.length.mean()) < 400  # abstracts: a few hundred tokens
    assert c.ids[0] == "0704.0001"

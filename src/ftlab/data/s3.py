"""A prepared corpus on S3 (or any S3-compatible store): download before preparing, upload after.

    s3://BUCKET/PREFIX/{tokens.bin, index.jsonl, splits.json, meta.json}

meta.json is uploaded last and downloaded first, so a corpus whose upload was cut short is never taken for
a complete one. A corpus is only downloaded when its settings (source file hash, tokenizer hash, fields,
seed, split fractions, limit) are those asked for; another one at the same prefix is an error, not a silent
mix. The endpoint is configurable (`--s3-endpoint`, else AWS_ENDPOINT_URL / the AWS default); credentials
come from the usual AWS environment or files. Network problems are one line naming the endpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ftlab.errors import UserError

log = logging.getLogger("ftlab")


class S3Store:
    def __init__(self, bucket: str, prefix: str = "", endpoint: str | None = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise UserError("--s3-bucket needs boto3: pip install 'ftlab[s3]'") from None
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
        # Few retries and short timeouts: an unreachable endpoint is reported in seconds, not minutes.
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"})
        self.client = boto3.client("s3", endpoint_url=self.endpoint, config=config)

    def where(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a boto3 call; connection, credential and permission problems become one line."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(*args, **kwargs)
        except NoCredentialsError:
            raise UserError(f"{what} {self.where()}: no AWS credentials (set AWS_ACCESS_KEY_ID and "
                            "AWS_SECRET_ACCESS_KEY, or a profile)") from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            if code in ("404", "NoSuchKey"):
                raise FileNotFoundError(self.where()) from None
            raise UserError(f"{what} {self.where()}: {code} ({e.response.get('Error', {}).get('Message', '')})") \
                from None
        except BotoCoreError as e:
            at = self.endpoint or "the default AWS endpoint"
            raise UserError(f"cannot reach S3 at {at} to {what} {self.where()} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from None

    def remote_meta(self) -> dict[str, Any] | None:
        try:
            body = self._call("read", self.client.get_object, Bucket=self.bucket, Key=self.key("meta.json"))
        except FileNotFoundError:
            return None
        try:
            return json.loads(body["Body"].read())
        except ValueError:
            raise UserError(f"{self.where('meta.json')}: not valid JSON") from None

    def fetch_corpus(self, settings: dict[str, Any], out: Path, overwrite: bool = False) -> dict[str, Any] | None:
        """Download a complete corpus with these settings into `out` (temp dir, then rename); None when S3 has
        none at the prefix."""
        from ftlab.data.corpus import FILES, publish

        meta = self.remote_meta()
        if meta is None:
            log.info("no corpus at %s: preparing it here (uploaded when done)", self.where())
            return None
        differs = first_difference(meta.get("settings", {}), settings)
        if differs:
            raise UserError(f"{self.where()} holds a corpus prepared with other settings ({differs}); use another "
                            "--s3-prefix, or remove it there")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            for name in FILES:
                if name == "meta.json":
                    continue
                self._call("download", self.client.download_file, self.bucket, self.key(name), str(tmp / name))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            from ftlab.data.corpus import Corpus

            Corpus.open(tmp)  # sizes agree with meta.json, or one line says what is wrong
            publish(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("corpus downloaded from %s to %s", self.where(), out)
        return meta

    def upload_corpus(self, path: Path) -> None:
        from ftlab.data.corpus import FILES

        for name in FILES:  # meta.json last
            self._call("upload", self.client.upload_file, str(path / name), self.bucket, self.key(name))
        log.info("corpus uploaded to %s", self.where())


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """'key: A != B' for the first setting that differs (nested dicts walked), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} there, {b!r} here"

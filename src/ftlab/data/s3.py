"""A prepared corpus on S3 (or any S3-compatible store): download before preparing, upload after.

    s3://BUCKET/PREFIX/{tokens.bin, index.jsonl, splits.json, meta.json}

meta.json is uploaded last and downloaded first, so a corpus whose upload was cut short is never taken for
a complete one. A corpus is only downloaded when its settings (source file hash, tokenizer hash, fields,
seed, split fractions, limit) are those asked for; another one at the same prefix is an error, not a silent
mix. The endpoint is configurable (`--s3-endpoint`, else AWS_ENDPOINT_URL / the AWS default); credentials
come from the usual AWS environment or files. Network problems are one line naming the endpoint.

This module only reads meta.json and moves named files (`S3Store`); what makes them a corpus (which files,
in which order, the settings check, verifying and publishing a download) is in `ftlab.data.corpus`
(`fetch_from_s3`, `prepare_corpus`), so the dependency goes one way: corpus -> s3.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ftlab.errors import UserError


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

    def download(self, names: tuple[str, ...] | list[str], into: Path) -> None:
        """Download the objects `names` under the prefix into the directory `into`, in that order."""
        for name in names:
            self._call("download", self.client.download_file, self.bucket, self.key(name), str(into / name))

    def upload(self, path: Path, names: tuple[str, ...] | list[str]) -> None:
        """Upload the files `names` of the directory `path` under the prefix, in that order."""
        for name in names:
            self._call("upload", self.client.upload_file, str(path / name), self.bucket, self.key(name))

"""The object-store source's parts alone: store URLs, client settings, listings, reads.

A fake client stands in for opendal where the real server cannot show a case
(ETags and If-Match: rclone without hashing gives none); test_objectstore.py
runs the same source against a real S3 server.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import opendal.exceptions
import pytest

from fusecache.blockio import PyBlockPool
from fusecache.config import SourceConfig
from fusecache.errors import LowerError
from fusecache.objectstore.listing import Entry, listing_of, stat_of
from fusecache.objectstore.location import (
    LocationError,
    client_settings,
    open_client,
    parse_store_url,
)
from fusecache.objectstore.source import ObjectChanged, ObjectSource
from tests.conftest import fusecache_cmd
from tests.ramp import ramp
from tests.test_cli import assert_usage_error

pytestmark = pytest.mark.unit

S3_ENV = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
OSS_ENV = {"ALIBABA_CLOUD_ACCESS_KEY_ID": "LTAIexample", "ALIBABA_CLOUD_ACCESS_KEY_SECRET":
           "oss-s3cr3t", "ALIBABA_CLOUD_SECURITY_TOKEN": "sts-token"}


# --- store URLs --------------------------------------------------------------------

@pytest.mark.parametrize(("url", "bucket", "prefix"), [
    ("s3://models", "models", ""),
    ("s3://models/", "models", ""),
    ("s3://my.bucket-1/sd/checkpoints/", "my.bucket-1", "sd/checkpoints"),
    ("oss://bucket/models", "bucket", "models"),
    ("oss://bucket/a b/ü", "bucket", "a b/ü"),
])
def test_store_urls_parse(url: str, bucket: str, prefix: str) -> None:
    loc = parse_store_url(url)
    assert (loc.scheme, loc.bucket, loc.prefix) == (url.split(":")[0], bucket, prefix)
    assert str(loc) == url.rstrip("/")


@pytest.mark.parametrize(("url", "words"), [
    ("gs://models", "only s3:// and oss://"),
    ("s3://", "not a bucket name"),
    ("s3://Models", "not a bucket name"),
    ("s3://a_b", "not a bucket name"),
    ("s3://ab", "not a bucket name"),
    ("s3://models/a//b", "empty, '.' or '..'"),
    ("s3://models/a/../b", "empty, '.' or '..'"),
    ("s3://models/x?versionId=1", "no query"),
])
def test_bad_store_urls_say_why(url: str, words: str) -> None:
    with pytest.raises(LocationError, match=words.replace("?", r"\?").replace(".", r"\.")):
        parse_store_url(url)


@pytest.mark.parametrize(("endpoint", "words"), [
    ("oss-cn-hangzhou.aliyuncs.com", "not an http"),
    ("ftp://host", "not an http"),
    ("https://host/models", "host only"),
])
def test_bad_endpoints_say_why(endpoint: str, words: str) -> None:
    with pytest.raises(LocationError, match=words):
        parse_store_url("s3://models", endpoint=endpoint)


def test_bad_region_says_why() -> None:
    with pytest.raises(LocationError, match="not a region"):
        parse_store_url("s3://models", region="us east")


# --- client settings and credentials -----------------------------------------------------

def test_s3_settings_take_credentials_from_the_environment_only() -> None:
    loc = parse_store_url("s3://models/sd", endpoint="http://127.0.0.1:9000/")
    settings = client_settings(loc, {**S3_ENV, "AWS_SESSION_TOKEN": "tok"})
    assert settings == {
        "bucket": "models", "root": "/sd", "endpoint": "http://127.0.0.1:9000",
        "region": "us-east-1", "access_key_id": "AKIDEXAMPLE",
        "secret_access_key": "s3cr3t-value", "session_token": "tok",
        "disable_config_load": "true", "disable_ec2_metadata": "true"}


def test_s3_region_comes_from_the_option_else_the_environment() -> None:
    loc = parse_store_url("s3://models")
    assert client_settings(loc, {**S3_ENV, "AWS_REGION": "eu-west-1"})["region"] == "eu-west-1"
    loc = parse_store_url("s3://models", region="ap-south-1")
    assert client_settings(loc, {**S3_ENV, "AWS_REGION": "eu-west-1"})["region"] == "ap-south-1"


def test_oss_s3_endpoint_uses_virtual_host_requests() -> None:
    loc = parse_store_url("s3://models", endpoint="https://oss-cn-hangzhou.aliyuncs.com")
    assert client_settings(loc, S3_ENV)["enable_virtual_host_style"] == "true"


def test_oss_settings_as_function_compute_passes_them() -> None:
    loc = parse_store_url("oss://bucket/models",
                          endpoint="https://oss-cn-hangzhou-internal.aliyuncs.com")
    settings = client_settings(loc, OSS_ENV)
    assert settings == {
        "bucket": "bucket", "root": "/models",
        "endpoint": "https://oss-cn-hangzhou-internal.aliyuncs.com",
        "access_key_id": "LTAIexample", "access_key_secret": "oss-s3cr3t",
        "security_token": "sts-token"}
    by_region = client_settings(parse_store_url("oss://bucket", region="cn-beijing"), OSS_ENV)
    assert by_region["endpoint"] == "https://oss-cn-beijing.aliyuncs.com"


@pytest.mark.parametrize(("url", "env", "words"), [
    ("s3://models", {}, "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    ("s3://models", {"AWS_ACCESS_KEY_ID": "x"}, "set AWS_ACCESS_KEY_ID"),
    ("oss://models", S3_ENV, "set ALIBABA_CLOUD_ACCESS_KEY_ID"),
    ("oss://models", OSS_ENV, "give --endpoint"),
])
def test_missing_settings_say_which(url: str, env: dict[str, str], words: str) -> None:
    with pytest.raises(LocationError, match=words):
        client_settings(parse_store_url(url), env)


@pytest.mark.parametrize(("url", "env"), [("s3://bucket/models", S3_ENV),
                                          ("oss://bucket/models", OSS_ENV)])
def test_the_client_takes_our_settings_and_shows_no_secret(url: str, env: dict[str, str]
                                                            ) -> None:
    loc = parse_store_url(url, endpoint="https://oss-cn-hangzhou-internal.aliyuncs.com")
    client = open_client(loc, timeout=5, environ=env)  # no request is made
    assert "s3cr3t" not in repr(client) and "sts-token" not in repr(client)


def test_no_secret_in_what_a_location_shows() -> None:
    loc = parse_store_url("oss://bucket/models", endpoint="https://e.aliyuncs.com")
    client_settings(loc, OSS_ENV)
    for text in (str(loc), repr(loc)):
        assert "s3cr3t" not in text and "sts-token" not in text


# --- a fake client -----------------------------------------------------------------------

@dataclass
class FakeMeta:
    content_length: int = 0
    etag: str | None = None
    last_modified: datetime | None = None
    is_dir: bool = False


@dataclass
class FakeEntry:
    path: str
    metadata: FakeMeta


@dataclass
class FakeClient:
    """Objects by key; LIST with a delimiter and ranged GET with If-Match, as S3 does them."""

    objects: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # key: (data, etag)
    markers: set[str] = field(default_factory=set)  # "dir/" objects
    lists: int = 0
    reads: list[tuple[str, int, int, str | None]] = field(default_factory=list)

    def list(self, prefix: str, limit: int | None = None) -> list[FakeEntry]:
        self.lists += 1
        prefix = "" if prefix == "/" else prefix
        out, seen = [], set()
        for key in sorted([*self.objects, *self.markers]):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if not rest:  # the directory's own marker object, as opendal shows it
                out.append(FakeEntry(key, FakeMeta(is_dir=True)))
            elif "/" in rest.rstrip("/") or rest.endswith("/"):
                name = rest.split("/")[0] + "/"
                if name not in seen:
                    seen.add(name)
                    out.append(FakeEntry(prefix + name, FakeMeta(is_dir=True)))
            else:
                data, etag = self.objects[key]
                when = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
                out.append(FakeEntry(key, FakeMeta(len(data), f'"{etag}"', when)))
        return out

    def to_async_operator(self) -> FakeAsyncClient:
        return FakeAsyncClient(self)

    def read(self, key: str, offset: int, size: int, if_match: str | None = None) -> bytes:
        self.reads.append((key, offset, size, if_match))
        data, etag = self.objects[key]
        if if_match is not None and if_match != f'"{etag}"':
            raise opendal.exceptions.ConditionNotMatch("ConditionNotMatch at read")
        return data[offset:offset + size]


@dataclass
class FakeAsyncClient:
    """The fake's asyncio face, which the source lists through."""

    client: FakeClient

    async def list(self, prefix: str, limit: int | None = None) -> AsyncIterator[FakeEntry]:
        entries = self.client.list(prefix, limit)

        async def each() -> AsyncIterator[FakeEntry]:
            for entry in entries:
                yield entry

        return each()


def test_a_listing_has_files_and_prefixes() -> None:
    client = FakeClient({"a.bin": (b"abc", "e1"), "d/x y ü.txt": (b"", "e2"),
                         "d/deeper/z": (b"z", "e3")}, markers={"d/"})
    top = listing_of(client.to_async_operator(), "")  # type: ignore[arg-type]
    assert top == {b"a.bin": Entry(False, 3, 1767323045 * 10**9, "e1"), b"d": Entry(True)}
    inner = listing_of(client.to_async_operator(), "d")  # type: ignore[arg-type]
    assert inner == {"x y ü.txt".encode(): Entry(False, 0, 1767323045 * 10**9, "e2"),
                     b"deeper": Entry(True)}


def test_stat_of_is_read_only_and_the_daemons() -> None:
    st = stat_of(Entry(False, 5000, 7 * 10**9, "e"), 1 << 20)
    assert stat.S_ISREG(st.st_mode) and st.st_mode & 0o222 == 0
    assert (st.st_size, st.st_mtime_ns, st.st_blocks, st.st_rdev) == (5000, 7 * 10**9, 10, 0)
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert stat.S_ISDIR(stat_of(Entry(True), 1 << 20).st_mode)


def _source(client: FakeClient, ttl: float = 60.0) -> ObjectSource:
    config = SourceConfig(list_ttl=ttl)
    return ObjectSource(client, parse_store_url("s3://models"), config)  # type: ignore[arg-type]


async def test_stat_open_and_listdir_share_one_list_per_directory() -> None:
    client = FakeClient({"m/a": (b"a" * 10, "e1"), "m/b": (b"b", "e2")})
    src = _source(client)
    assert sorted(await src.listdir(b"m")) == [b"a", b"b"]
    assert (await src.lstat(b"m/a")).st_size == 10
    _, ident = await src.open(b"m/b")
    assert (ident.size, ident.etag) == (1, b"e2")
    assert client.lists == 2  # the root (for "m" itself) and "m"
    with pytest.raises(FileNotFoundError):
        await src.lstat(b"m/c")
    with pytest.raises(IsADirectoryError):
        await src.open(b"m")
    with pytest.raises(NotADirectoryError):
        await src.listdir(b"m/a")


async def test_reads_are_ranged_gets_with_if_match_cut_into_blocks() -> None:
    size = 3 * 4096 + 100
    client = FakeClient({"f": (ramp(0, size, seed=3), "e1")})
    src, pool = _source(client), PyBlockPool(4096)
    fd, ident = await src.open(b"f")
    blocks = await src.read_blocks(pool, fd, 4096, [4096, 4096, 4096], ident)
    assert [bytes(b) for b in blocks] == [ramp(4096, 4096, seed=3), ramp(8192, 4096, seed=3),
                                         ramp(12288, 100, seed=3)]
    assert client.reads == [("f", 4096, 2 * 4096 + 100, '"e1"')]  # clipped at the end, one GET
    past = await src.read_blocks(pool, fd, 4 * 4096, [4096], ident)
    assert [len(b) for b in past] == [0] and len(client.reads) == 1  # no GET past the end


async def test_a_replaced_object_is_refused_and_its_listing_forgotten() -> None:
    client = FakeClient({"f": (b"old!" * 1024, "e1")})
    src, pool = _source(client), PyBlockPool(4096)
    fd, ident = await src.open(b"f")
    client.objects["f"] = (b"new!" * 1024, "e2")  # replaced, same size, within the TTL
    with pytest.raises(ObjectChanged) as caught:
        await src.read_blocks(pool, fd, 0, [4096], ident)
    assert caught.value.errno == errno.EIO
    _, fresh = await src.open(b"f")  # the next open lists again and sees the new ETag
    assert fresh.etag == b"e2" and fresh.key() != ident.key()
    assert bytes((await src.read_blocks(pool, fd, 0, [4096], fresh))[0]) == b"new!" * 1024


async def test_client_errors_become_oserrors_or_eio() -> None:
    class Failing(FakeClient):
        def list(self, prefix: str, limit: int | None = None) -> list[FakeEntry]:
            raise opendal.exceptions.Unexpected("Unexpected (temporary) at list => boom\nmore")

    src = _source(Failing())
    with pytest.raises(LowerError, match="boom"):
        await src.lstat(b"x")


# --- the command line ------------------------------------------------------------------

@pytest.mark.parametrize(("args", "words"), [
    (["s3://models", "--list-ttl", "0"], "must be a positive number of seconds"),
    (["s3://models", "--endpoint", "127.0.0.1:9000"], "not an http:// or https:// URL"),
    (["s3://models", "--region", "Us East"], "not a region name"),
    (["gs://models"], "only s3:// and oss://"),
])
def test_bad_store_arguments_are_one_line_and_exit_2(args: list[str], words: str,
                                                      tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    res = fusecache_cmd("mount", args[0], str(tmp_path / "mnt"), *args[1:])
    assert_usage_error(res, words)


def test_endpoint_with_a_directory_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    res = fusecache_cmd("mount", str(tmp_path / "src"), str(tmp_path / "mnt"),
                        "--endpoint", "http://127.0.0.1:9000")
    assert_usage_error(res, "--endpoint and --region are for s3:// and oss:// sources")

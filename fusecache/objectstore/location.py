"""Where a bucket is and how to reach it: s3:// and oss:// URLs, credentials, the client.

The client is Apache OpenDAL's Python binding (`opendal`): one well-kept library
with both an `s3` and an Alibaba `oss` service, its own request signing, retries
and timeouts, so fusecache has no HTTP or signing code of its own. Credentials
come from each service's standard environment variables only (never the
command line), go straight into the client's settings, and are never logged:
nothing here puts them in a repr or a message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import opendal

SCHEMES = ("s3", "oss")

# Each service's standard variables: (key id, secret, session token). Function
# Compute passes its role's STS credentials as the ALIBABA_CLOUD_* ones.
CREDENTIAL_ENV = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"),
    "oss": ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
            "ALIBABA_CLOUD_SECURITY_TOKEN"),
}
# The client's setting for each of them.
_CREDENTIAL_KEYS = {
    "s3": ("access_key_id", "secret_access_key", "session_token"),
    "oss": ("access_key_id", "access_key_secret", "security_token"),
}
# S3 signs for a region; a custom endpoint (MinIO, rclone, OSS's S3 API) accepts
# any, and this is what AWS's own tools send when none is set.
DEFAULT_S3_REGION = "us-east-1"

# Retries of a failed request (5xx, throttling, a dropped connection): three,
# 0.2 s then doubling with jitter, at most 4 s apart. The whole call is bounded
# by --source-timeout above the client, so retries never outlast it for a reader.
RETRIES = 3
RETRY_MIN_DELAY = 0.2
RETRY_MAX_DELAY = 4.0

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_REGION_RE = re.compile(r"^[a-z0-9][a-z0-9\-]*$")


class LocationError(ValueError):
    """A store URL, endpoint, region or credential setting that cannot work; one line."""


@dataclass(frozen=True)
class StoreLocation:
    """A bucket and a prefix in it, on one endpoint: what `fusecache mount` serves."""

    scheme: str  # "s3" or "oss"
    bucket: str
    prefix: str = ""  # no leading or trailing slash; "" is the whole bucket
    endpoint: str | None = None
    region: str | None = None

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def key(self, path: bytes) -> str:
        """The key of *path* (bytes relative to the mount's root) below the client's root."""
        return path.decode("utf-8", "surrogateescape")


def is_store_url(text: str) -> bool:
    return "://" in text


def parse_store_url(text: str, endpoint: str | None = None,
                    region: str | None = None) -> StoreLocation:
    """s3://BUCKET[/PREFIX] or oss://BUCKET[/PREFIX]; LocationError says what is wrong."""
    scheme, _, rest = text.partition("://")
    if scheme not in SCHEMES:
        raise LocationError(f"source {text!r}: only s3:// and oss:// URLs are supported, "
                            "or a directory")
    if "?" in rest or "#" in rest:
        raise LocationError(f"source {text!r}: a store URL has no query or fragment")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise LocationError(f"source {text!r}: {bucket!r} is not a bucket name (3-63 "
                            "lowercase letters, digits, dots and hyphens)")
    prefix = prefix.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise LocationError(f"source {text!r}: the prefix has an empty, '.' or '..' part")
    return StoreLocation(scheme, bucket, prefix, check_endpoint(endpoint, scheme),
                         check_region(region))


def check_endpoint(endpoint: str | None, scheme: str) -> str | None:
    if endpoint is None:
        return None
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LocationError(f"--endpoint {endpoint!r} is not an http:// or https:// URL")
    if parts.path.strip("/") or parts.query or parts.fragment:
        raise LocationError(f"--endpoint {endpoint!r}: give the host only, the bucket comes "
                            f"from the {scheme}:// URL")
    return endpoint.rstrip("/")


def check_region(region: str | None) -> str | None:
    if region is not None and not _REGION_RE.match(region):
        raise LocationError(f"--region {region!r} is not a region name (e.g. us-east-1, "
                            "cn-hangzhou)")
    return region


def client_settings(location: StoreLocation, environ: Mapping[str, str] = os.environ
                    ) -> dict[str, str]:
    """The client's settings for *location*, credentials from *environ* (never logged).

    LocationError when the credentials or the endpoint are missing.
    """
    key_id, secret, token = (environ.get(name, "") for name in CREDENTIAL_ENV[location.scheme])
    if not key_id or not secret:
        id_name, secret_name, _ = CREDENTIAL_ENV[location.scheme]
        raise LocationError(f"{location}: set {id_name} and {secret_name} in the environment "
                            "(credentials are never taken from the command line)")
    settings = {"bucket": location.bucket, "root": "/" + location.prefix}
    for name, value in zip(_CREDENTIAL_KEYS[location.scheme], (key_id, secret, token),
                           strict=True):
        if value:
            settings[name] = value
    if location.scheme == "s3":
        settings["region"] = (location.region or environ.get("AWS_REGION")
                              or environ.get("AWS_DEFAULT_REGION") or DEFAULT_S3_REGION)
        # Only what is set here: no ~/.aws files, no instance metadata service.
        settings["disable_config_load"] = "true"
        settings["disable_ec2_metadata"] = "true"
        if location.endpoint:
            settings["endpoint"] = location.endpoint
            host = urlsplit(location.endpoint).hostname or ""
            if host.endswith(".aliyuncs.com"):  # OSS's S3 API answers virtual-host requests only
                settings["enable_virtual_host_style"] = "true"
    else:
        endpoint = location.endpoint or (f"https://oss-{location.region}.aliyuncs.com"
                                         if location.region else None)
        if endpoint is None:
            raise LocationError(f"{location}: give --endpoint (e.g. "
                                "https://oss-cn-hangzhou-internal.aliyuncs.com) or --region")
        settings["endpoint"] = endpoint
    return settings


def open_client(location: StoreLocation, timeout: float, retries: bool = True,
                environ: Mapping[str, str] = os.environ) -> opendal.Operator:
    """The client for *location*: each request bounded by *timeout*, failed ones retried.

    Call it in the process that uses the client, after any fork: the client's
    runtime threads do not survive one.
    """
    import opendal
    from opendal.layers import RetryLayer, TimeoutLayer

    op = opendal.Operator(location.scheme, **client_settings(location, environ))
    # A request that stalls (a hung store) ends with an error after *timeout*, so
    # a thread the daemon gave up on does not stay stuck in it forever.
    op = op.layer(TimeoutLayer(timeout=timeout, io_timeout=timeout))
    if retries:
        op = op.layer(RetryLayer(max_times=RETRIES, factor=2.0, jitter=True,
                                 min_delay=RETRY_MIN_DELAY, max_delay=RETRY_MAX_DELAY))
    return op

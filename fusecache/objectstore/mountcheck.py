"""Before mounting a bucket: ask it for one name, so a wrong setting fails with one line.

Wrong credentials and a missing bucket are the user's input (exit 2); an
endpoint that does not answer is a mount that could not be made (exit 1).
The question runs in a short-lived child process: the client starts runtime
threads, which the daemon forked after it would not have.
"""

from __future__ import annotations

import os
import re
import select
import signal

from fusecache.objectstore.listing import list_one
from fusecache.objectstore.location import LocationError, StoreLocation, open_client


class StoreRefused(Exception):
    """The store refused us (credentials, bucket): bad input, one line."""


class StoreUnreachable(Exception):
    """The store did not answer; one line."""


def check_store(location: StoreLocation, timeout: float) -> None:
    """Raise StoreRefused or StoreUnreachable unless *location* lists with our credentials."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing of it may outlive this block
        code = 1
        try:
            os.close(rfd)
            code, line = _ask(location, timeout)
            os.write(wfd, line.encode(errors="replace"))
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        message = _read_all(rfd, timeout + 10)  # the client's own timeout ends it first
    finally:
        os.close(rfd)
    if message is None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if message is None:
        raise StoreUnreachable(f"{location}: no answer from the store within {timeout:g} s")
    if code == 2:
        raise StoreRefused(message)
    if code != 0:
        raise StoreUnreachable(message or f"{location}: checking the store failed")


def _ask(location: StoreLocation, timeout: float) -> tuple[int, str]:
    """(exit code, one line) for one LIST of *location*."""
    import opendal.exceptions as e

    try:
        list_one(open_client(location, timeout, retries=False).to_async_operator())
    except LocationError as exc:
        return 2, str(exc)
    except e.PermissionDenied as exc:
        return 2, (f"{location}: the store refused our credentials ({_code(exc)}); check "
                   f"{' and '.join(_env_names(location))}")
    except (e.ConfigInvalid, e.NotFound) as exc:
        return 2, f"{location}: {_code(exc)} (is the bucket name and the endpoint right?)"
    except Exception as exc:  # noqa: BLE001 - every other failure is one line for the user
        return 1, f"{location}: no answer from {location.endpoint or 'the store'}: {_cause(exc)}"
    return 0, ""


def _env_names(location: StoreLocation) -> tuple[str, str]:
    from fusecache.objectstore.location import CREDENTIAL_ENV

    key_id, secret, _ = CREDENTIAL_ENV[location.scheme]
    return key_id, secret


def _code(exc: BaseException) -> str:
    """The store's error code (e.g. SignatureDoesNotMatch, NoSuchBucket), else the first line."""
    m = re.search(r'code: "([^"]+)"', str(exc)) or re.search(r"<Code>([^<]+)</Code>", str(exc))
    return m.group(1) if m else str(exc).strip().splitlines()[0]


def _cause(exc: BaseException) -> str:
    """The innermost reason of a client error (e.g. 'Connection refused'), one line."""
    lines = [line.strip() for line in str(exc).splitlines()]
    if "Source:" in lines[:-1]:
        reason = lines[lines.index("Source:") + 1]
        return reason.split("(Connect): ")[-1]
    return lines[0] if lines and lines[0] else type(exc).__name__


def _read_all(fd: int, timeout: float) -> str | None:
    """What the child writes before it exits; None if it is not done within *timeout*."""
    import time

    deadline, data = time.monotonic() + timeout, b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace").strip()
        data += chunk

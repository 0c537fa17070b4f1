"""The two checks every request passes before the app sees it (pure ASGI middleware):

- `BasicAuth`: HTTP Basic credentials (`--api-auth`), compared in constant time. Every
  configured pair is compared, and both the user and the password, whatever the request
  holds, so the time taken says nothing about which part was wrong.
- `BodyLimit`: bodies over `--max-body-mb` get 413 before any of them is parsed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Dict, Optional, Tuple

compare_digest = hmac.compare_digest  # module-level, so a test can count the comparisons


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()  # equal lengths, so compare_digest's time is independent of the input


def _parse_basic(header: Optional[bytes]) -> Tuple[bytes, bytes]:
    """(user, password) from an 'Authorization: Basic ...' header; empty ones when absent or malformed."""
    if not header or not header[:6].lower() == b"basic ":
        return b"", b""
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
    except ValueError:
        return b"", b""
    return user, password


def check_credentials(header: Optional[bytes], credentials: Dict[str, str]) -> bool:
    user, password = _parse_basic(header)
    user_d, password_d = _digest(user), _digest(password)
    ok = False
    for name, secret in credentials.items():
        same_user = compare_digest(user_d, _digest(name.encode()))
        same_password = compare_digest(password_d, _digest(secret.encode()))
        ok |= same_user & same_password  # no short cut: both comparisons always run
    return ok


async def send_json(send, status: int, detail: str, headers=()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BasicAuth:
    def __init__(self, app, credentials: Dict[str, str]):
        self.app, self.credentials = app, dict(credentials)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.credentials:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or ()).get(b"authorization")
        if check_credentials(header, self.credentials):
            return await self.app(scope, receive, send)
        await send_json(send, 401, "missing or wrong user name or password: this server needs HTTP Basic "
                                   "authentication (--api-auth)",
                        [(b"www-authenticate", b'Basic realm="mlx-sdxl"')])


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: int) -> str:
        return (f"the request body is {size:,} bytes or more, over this server's limit of {self.max_bytes:,} bytes "
                f"({self.max_bytes / 2**20:g} MB, --max-body-mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await send_json(send, 400, f"Content-Length {declared[:40]!r} is not a byte count")
            if int(declared) > self.max_bytes:
                return await send_json(send, 413, self._too_large(int(declared)))
        chunks, size = [], 0
        while True:  # read the whole body (at most max_bytes) before the app parses any of it
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_json(send, 413, self._too_large(size))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notices, as the app expects

        await self.app(scope, replay, send)

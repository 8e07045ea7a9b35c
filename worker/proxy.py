"""A thin aiohttp client to Forge on loopback: one session per event loop, kept alive between jobs.

aiohttp is imported with the first session, not with this module: its 0.13 s of imports would otherwise come
before the worker starts the fast boot's lay-out (``worker.boot``), a step of every cold start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker import jsonio

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

CONNECT_TIMEOUT = 5.0
SIDE_TIMEOUT = 5.0  # progress and interrupt: small requests that must not hold a job up


class ForgeDown(Exception):
    """Forge refused the connection or dropped it mid-request."""


class ForgeTimeout(Exception):
    """Forge accepted the request but did not answer within the request timeout."""


@dataclass
class ForgeResponse:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return jsonio.loads(self.body)

    def take_json(self) -> Any:
        """Parse and drop the raw bytes, so a 16 MB answer is not held twice while it travels on.

        A large body is decoded to text and its bytes freed before parsing: the parse then holds
        the text and the result (2x the body) instead of the bytes as well (3x).
        """
        if len(self.body) > jsonio.LARGE:
            text = self.body.decode("utf-8")
            self.body = b""  # the last reference to the bytes
            return jsonio.loads_text(text)
        body, self.body = self.body, b""
        return jsonio.loads(body)


async def _close_at_shutdown(session: aiohttp.ClientSession) -> None:
    try:
        await asyncio.get_running_loop().create_future()  # never set: waits for the loop's shutdown
    finally:
        await session.close()


class Proxy:
    def __init__(self, base_url: str, request_timeout: float) -> None:
        self.base_url = base_url
        self.request_timeout = request_timeout
        # Parsed once per route, not per job (aiohttp parses a URL string on every request: with a new
        # timeout object, about 25 us of the relay's CPU per job). Routes come from ``worker.routes``' fixed set.
        self._urls: dict[str, URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closer: asyncio.Task[None] | None = None  # a strong reference: the loop keeps tasks weakly

    def _client(self) -> aiohttp.ClientSession:
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            # A session belongs to the loop it was made in; RunPod's local API and its job loop differ.
            # Forge gzips answers of 1000 bytes or more for a client that accepts gzip (its GZipMiddleware);
            # aiohttp offers gzip by default. On loopback compression only costs time, and bodies are
            # relayed undecoded: ask for identity.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=8), auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
                timeout=aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=CONNECT_TIMEOUT),
            )
            self._loop = loop
            # Closed when its loop shuts down (asyncio.run cancels every task, also after the SDK's
            # sys.exit at the end of a local test job): no "Unclosed connector" warning at exit.
            self._closer = loop.create_task(_close_at_shutdown(self._session))
        return self._session

    async def request(self, method: str, route: str, payload: dict[str, Any] | None = None, *,
                      timeout: float | None = None, query: Sequence[tuple[str, str]] = ()) -> ForgeResponse:
        import aiohttp  # imported by ``_client`` already: a lookup
        from yarl import URL

        data = None if payload is None else jsonio.dumps(payload)
        headers = {"content-type": "application/json"} if data is not None else None
        session = self._client()
        limit = session.timeout if not timeout else aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT)
        url = self._urls.get(route)
        if url is None:
            url = self._urls[route] = URL(self.base_url + route)
        try:
            async with session.request(method, url, data=data, headers=headers, params=list(query) or None,
                                       timeout=limit) as resp:
                body = await resp.read()
                return ForgeResponse(resp.status, body, resp.content_type)
        except asyncio.TimeoutError:
            seconds = timeout or self.request_timeout
            raise ForgeTimeout(f"no answer from Forge to {method} {route} within {seconds:g} s") from None
        except aiohttp.ClientError as exc:
            raise ForgeDown(f"{method} {route} failed: {type(exc).__name__}: {exc}") from None

    async def progress(self) -> dict[str, Any] | None:
        """Forge's progress report, or None when it does not answer in time."""
        try:
            resp = await self.request("GET", "/sdapi/v1/progress?skip_current_image=true", timeout=SIDE_TIMEOUT)
            value = resp.json() if resp.status == 200 else None
        except (ForgeDown, ForgeTimeout, ValueError):
            return None
        return value if isinstance(value, dict) else None

    async def interrupt(self) -> bool:
        """Ask Forge to stop the running generation; True when it acknowledged."""
        try:
            resp = await self.request("POST", "/sdapi/v1/interrupt", timeout=SIDE_TIMEOUT)
        except (ForgeDown, ForgeTimeout):
            return False
        return resp.status == 200

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

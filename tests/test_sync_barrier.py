"""The sync barrier's request on litestream's control socket (fsm.litestream.LitestreamTool.sync).

The end-to-end tests drive it against the real `litestream replicate` (a checkpoint is in the
bucket the moment it returns: tests/test_s3.py). Here a stand-in server on a unix socket gives
the answers the real one gives only on faults (an error, no answer, a chunked body), and shows
what the request carries: without `wait` the barrier would return before the upload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from fsm import Config
from fsm import litestream as litestream_module
from fsm.errors import ToolError
from fsm.litestream import LitestreamTool
from fsm.logs import get_logger

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def tool(tmp_path: Path) -> LitestreamTool:
    return LitestreamTool(Config(base_dir=tmp_path, local_mode=True, volume_name="vol"),
                          get_logger())


@pytest.fixture
async def serve(tool: LitestreamTool) -> AsyncIterator[Callable[[Handler], Awaitable[None]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> None:
        app = web.Application()
        app.router.add_post("/sync", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, str(tool.layout.litestream_socket)).start()
        runners.append(runner)

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_the_barrier_asks_to_wait_for_the_replica_and_returns_the_txid(
        tool: LitestreamTool, serve: Callable[[Handler], Awaitable[None]]) -> None:
    asked: list[dict[str, Any]] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(await request.json())
        return web.json_response({"status": "synced", "path": asked[-1]["path"], "txid": 42,
                                  "replicated_txid": 42})

    await serve(answer)
    assert await tool.sync(timeout=12.5) == "42"
    assert asked == [{"path": str(tool.layout.metadata_db), "wait": True, "timeout": 13}]


async def test_litestreams_error_is_told_with_its_words(
        tool: LitestreamTool, serve: Callable[[Handler], Awaitable[None]]) -> None:
    async def answer(_request: web.Request) -> web.Response:
        return web.json_response({"error": "sync failed: replica unreachable"}, status=500)

    await serve(answer)
    with pytest.raises(ToolError, match="HTTP 500: sync failed: replica unreachable") as failed:
        await tool.sync()
    assert failed.value.returncode == 1


async def test_no_litestream_on_the_socket_is_an_error_at_once(tool: LitestreamTool) -> None:
    with pytest.raises(ToolError, match="cannot reach litestream's control socket") as failed:
        await asyncio.wait_for(tool.sync(), 5)
    assert failed.value.returncode == 1


async def test_no_answer_in_time_is_a_timeout(
        tool: LitestreamTool, serve: Callable[[Handler], Awaitable[None]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(litestream_module, "SYNC_MARGIN", 0.2)
    never = asyncio.Event()  # no answer

    async def answer(_request: web.Request) -> web.Response:
        await never.wait()
        return web.json_response({})

    await serve(answer)
    try:
        with pytest.raises(ToolError, match="timed out") as failed:
            await asyncio.wait_for(tool.sync(timeout=0.1), 5)
        assert failed.value.returncode is None
    finally:
        never.set()  # else the server's clean-up waits a minute for the handler


async def test_a_chunked_answer_is_read_whole(
        tool: LitestreamTool, serve: Callable[[Handler], Awaitable[None]]) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        text = json.dumps({"status": "no_change", "txid": 7, "replicated_txid": 7})
        for part in (text[:10], text[10:]):
            await response.write(part.encode())
        await response.write_eof()
        return response

    await serve(answer)
    assert await tool.sync() == "7"

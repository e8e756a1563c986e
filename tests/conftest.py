from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from fsm import Config, JuiceFS
from tests.helpers import assert_nothing_left, require_fuse

pytest_plugins = ["tests.s3_server", "tests.db_servers"]  # s3_*, postgres_server, redis_server


@pytest.fixture
def fuse() -> None:
    require_fuse()


@pytest.fixture
def local_config(tmp_path: Path) -> Callable[..., Config]:
    """Config factory for a local-mode volume under this test's tmp dir."""

    def make(base_dir: Path | None = None, **overrides: Any) -> Config:
        values: dict[str, Any] = {"base_dir": base_dir or tmp_path / "vol", "local_mode": True,
                                  "volume_name": "test-volume"}
        values.update(overrides)
        return Config(**values)

    return make


@pytest.fixture
async def jfs(fuse: None, local_config: Callable[..., Config]) -> AsyncIterator[JuiceFS]:
    """A started local-mode volume; stopped afterwards, and checked to leave nothing behind."""
    controller = JuiceFS(local_config())
    await controller.start()
    pids = [p for p in controller.pids.values() if p]
    try:
        yield controller
    finally:
        await controller.stop()
        assert_nothing_left(Path(controller.config.base_dir), pids)

"""Write what bench/bare.sh needs for BASE_DIR, taken from the controller's own adapters so the
bare sequence runs exactly the commands and flags the controller runs:

- BASE_DIR/litestream.yml: LitestreamTool.config_text() (mode 0600, as the controller writes it);
- BASE_DIR/bare.vars: bash arrays with the argv of format, replicate, mount, clone, sync -wait,
  and umount --flush.

    python bench/emit_config.py BASE_DIR [VOLUME_NAME]
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import structlog

from fsm import Config
from fsm.juicefs import JuiceFSTool
from fsm.litestream import LitestreamTool, write_private


def _array(name: str, argv: list[str]) -> str:
    return f"{name}=({' '.join(shlex.quote(a) for a in argv)})"


def emit(base_dir: Path, volume_name: str = "bench-volume") -> Config:
    cfg = Config(base_dir=base_dir, local_mode=True, volume_name=volume_name)
    log: Any = structlog.get_logger("bench")
    jfs, lst = JuiceFSTool(cfg, log), LitestreamTool(cfg, log)
    lay = cfg.layout
    lay.base_dir.mkdir(parents=True, exist_ok=True)
    write_private(lay.litestream_config, lst.config_text())
    # JuiceFSTool.format / clone / umount and LitestreamTool.replicate_child / sync build
    # these same argv inside their methods; mount_argv() is public and used as is.
    variables = [
        _array("FORMAT", [jfs.bin, "format", "--storage", "file", "--bucket", cfg.bucket_url,
                          "--no-update", lay.meta_url, cfg.volume_name]),
        _array("REPLICATE", [lst.bin, "replicate", "-config", str(lay.litestream_config)]),
        _array("MOUNT", jfs.mount_argv()),
        _array("CLONE", [jfs.bin, "clone", "--preserve"]),
        _array("SYNC", [lst.bin, "sync", "-wait", "-timeout", "30",
                        "-socket", str(lay.litestream_socket), str(lay.metadata_db)]),
        _array("UMOUNT", [jfs.bin, "umount", "--flush", str(lay.mount_point)]),
        _array("MKDIRS", [str(lay.cache_dir), str(lay.mount_point), str(lay.local_storage_dir),
                          str(lay.litestream_replica_dir)]),
        f"DB={shlex.quote(str(lay.metadata_db))}",
        f"MP={shlex.quote(str(lay.mount_point))}",
        f"SOCK={shlex.quote(str(lay.litestream_socket))}",
    ]
    (lay.base_dir / "bare.vars").write_text("\n".join(variables) + "\n")
    return cfg


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    emit(Path(sys.argv[1]), *sys.argv[2:])

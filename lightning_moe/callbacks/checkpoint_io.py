"""`AtomicCheckpointIO`: a checkpoint file is either the old one or the complete new one, whatever `$TMPDIR` is.

Lightning's default writer goes through an fsspec transaction that stages the bytes in `$TMPDIR` and
moves them into place: when `$TMPDIR` is on another filesystem the move is a copy, so a kill during
it leaves a truncated `last.ckpt`, and a kill before it leaves a checkpoint-sized orphan in `$TMPDIR`.

Here the bytes are written beside the target and renamed over it (`os.replace` is atomic within a
filesystem), after an fsync. On Linux the file is first an unnamed inode (`O_TMPFILE`): a kill
before it is given a name frees it, so nothing is left behind; it is then linked under a hidden
temporary name in the same folder and renamed. Where `O_TMPFILE` is missing, the hidden temporary
file is created directly. Either way, temporaries a killed process left in that folder (a kill in
the instant between link and rename, or without `O_TMPFILE`) are removed by the next save.
Remote paths (`s3://` ...) keep Lightning's writer.

A write that fails (the disk is full, a quota, a read-only folder) leaves the earlier file as it was and
raises `CheckpointWriteError`, which names the file, the reason and that the earlier checkpoint is kept;
the CLI prints it as one line (lightning_moe/errors.py).

The CLI installs it for every run (lightning_moe/cli.py) unless the trainer is given a CheckpointIO.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, ...); the earlier file at its path, if any, is unchanged."""


TMP_PREFIX = ".tmp-ckpt-"  # hidden temporaries beside the target: .tmp-ckpt-<pid>-<name>
CHUNK = 16 << 20


def _write_all(fd: int, data: memoryview) -> None:
    """Write every byte (os.write may write fewer than asked)."""
    while data:
        written = os.write(fd, data[:CHUNK])
        data = data[written:]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(folder: Path) -> list[Path]:
    """Delete temporaries in `folder` whose writing process is gone; returns what was removed."""
    removed = []
    for path in folder.glob(f"{TMP_PREFIX}*"):
        pid = path.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_bytes(data: bytes | memoryview, target: str | os.PathLike) -> None:
    """Write `data` to `target` so that readers see the old file or the complete new one, never a part."""
    target = Path(target)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphans(folder)
    temp = folder / f"{TMP_PREFIX}{os.getpid()}-{target.name}"
    view = memoryview(data)
    dir_fd = os.open(folder, os.O_RDONLY)
    fd = None
    try:
        if hasattr(os, "O_TMPFILE"):
            try:
                fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o644)
            except OSError:  # the filesystem has no unnamed files (e.g. some network filesystems)
                fd = None
        if fd is not None:
            _write_all(fd, view)
            os.fsync(fd)
            temp.unlink(missing_ok=True)
            # give the complete file a name in the target's folder; dst_dir_fd makes Python call linkat with
            # AT_SYMLINK_FOLLOW, which links the unnamed inode (plain link() would link the /proc symlink)
            os.link(f"/proc/self/fd/{fd}", temp.name, dst_dir_fd=dir_fd)
        else:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _write_all(fd, view)
            os.fsync(fd)
        os.replace(temp, target)
        with contextlib.suppress(OSError):  # some filesystems refuse fsync on a folder; the rename is still atomic
            os.fsync(dir_fd)  # make the rename itself durable
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint format, written atomically beside the target (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        existed = Path(path).is_file()
        try:
            atomic_write_bytes(buffer.getbuffer(), path)
        except OSError as error:
            kept = (f"the earlier {Path(path).name} is kept unchanged" if existed else
                    "nothing was left at that path; the run's earlier checkpoints are kept")
            reason = error.strerror or str(error)
            raise CheckpointWriteError(
                f"checkpoint {path} ({buffer.getbuffer().nbytes} bytes) could not be written ({reason}): {kept}; "
                "free space there (or set ModelCheckpoint's dirpath elsewhere) and resume with --ckpt_path") from error

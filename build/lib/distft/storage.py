"""Where a run lives: a local or shared directory, or a cloud URI (`s3://`, `gs://`, ... through pyarrow).

Ray Train writes checkpoints straight to the storage filesystem. distft's own files (config.yaml, metrics.jsonl,
eval json, train_result.json, summary.json, export/) are written to a local directory first; for a URI that
directory is a staging copy in the distft cache, pushed to the URI with `pyarrow.fs.copy_files` (and pulled back
before a resume), so the same code writes everywhere.
"""

import hashlib
import json
import logging
from pathlib import Path

from distft.errors import UserError
from distft.model import cache_dir

log = logging.getLogger("distft")


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve_filesystem(storage_path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_uri(storage_path):
        return pafs.LocalFileSystem(), str(Path(storage_path).absolute())
    try:
        return pafs.FileSystem.from_uri(storage_path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/NotImplemented/OSError per scheme
        raise UserError(
            f"run.storage_path={storage_path}: pyarrow cannot open it ({type(e).__name__}: {e}). Use a local or "
            "shared path, or a URI pyarrow supports (s3://bucket/prefix, gs://bucket/prefix, file:///abs/path) with "
            "its credentials in the environment"
        ) from e


class RunStorage:
    """One run's directory: `<storage_path>/<name>`, on a local disk or behind a URI."""

    def __init__(self, storage_path: str, name: str, staging_root: Path | None = None):
        self.storage_path = storage_path.rstrip("/")
        self.name = name
        self.remote = is_uri(storage_path)
        self.filesystem, root = resolve_filesystem(self.storage_path)
        self.root = root.rstrip("/")
        self.fs_path = f"{self.root}/{name}"
        if self.remote:
            key = hashlib.sha1(self.uri.encode()).hexdigest()[:12]
            self.local_dir = (staging_root or cache_dir() / "staging") / f"{name}-{key}"
        else:
            self.local_dir = Path(self.fs_path)

    @property
    def uri(self) -> str:
        """The run's location as users see it (a path, or the URI)."""
        return f"{self.storage_path}/{self.name}"

    def location(self, relative: str) -> str:
        """Where a file of the run ends up (for summary.json and logs)."""
        return f"{self.uri}/{relative}" if self.remote else str(self.local_dir / relative)

    def exists(self, relative: str) -> bool:
        import pyarrow.fs as pafs

        info = self.filesystem.get_file_info(f"{self.fs_path}/{relative}")
        return info.type != pafs.FileType.NotFound

    def read_text(self, relative: str) -> str:
        with self.filesystem.open_input_stream(f"{self.fs_path}/{relative}") as f:
            return f.read().decode()

    def completed(self) -> bool:
        """Whether this run finished (its summary.json says `completed`): a finished run is never trained again."""
        return self.exists("summary.json") and json.loads(self.read_text("summary.json")).get("status") == "completed"

    def write_text(self, relative: str, text: str) -> None:
        """Write a file of the run locally and upload it to the run's storage."""
        self.local_dir.mkdir(parents=True, exist_ok=True)
        (self.local_dir / relative).write_text(text)
        self.push(relative)

    def pull(self, *relative: str) -> None:
        """Copy these files of the run (if they exist) into the local directory. No-op for local storage."""
        if not self.remote:
            return
        import pyarrow.fs as pafs

        self.local_dir.mkdir(parents=True, exist_ok=True)
        for rel in relative:
            if self.exists(rel):
                pafs.copy_files(f"{self.fs_path}/{rel}", str(self.local_dir / rel),
                                source_filesystem=self.filesystem, destination_filesystem=pafs.LocalFileSystem())

    def push(self, *relative: str) -> None:
        """Upload these local files or directories to the run's storage. No-op for local storage."""
        if not self.remote:
            return
        import pyarrow.fs as pafs

        for rel in relative:
            src = self.local_dir / rel
            if src.exists():
                dest_dir = f"{self.fs_path}/{rel}" if src.is_dir() else f"{self.fs_path}/{rel}".rsplit("/", 1)[0]
                self.filesystem.create_dir(dest_dir, recursive=True)  # object stores ignore it; local ones need it
                pafs.copy_files(str(src), f"{self.fs_path}/{rel}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.filesystem)

    def checkpoint_dirs(self) -> list[str]:
        """Names of the run's `checkpoint_*` directories, newest step first."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.fs_path, allow_not_found=True)
        names = [i.base_name for i in self.filesystem.get_file_info(selector)
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")]
        return sorted(names, key=checkpoint_sort_key, reverse=True)


def checkpoint_sort_key(name: str) -> tuple[int, str]:
    """checkpoint_000006 and checkpoint_000006-r2 sort by step, then by name."""
    digits = name.removeprefix("checkpoint_").split("-")[0]
    return (int(digits) if digits.isdigit() else -1, name)

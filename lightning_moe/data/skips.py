"""`SkipLog`: every record a DataModule skipped, counted per reason and written one per line to the run.

Two moments skip a record under `skip_bad_records`: setup (a record that fails validation, or a
modality file that fails to decode) and loading (a sample that fails to decode when a batch draws
it; `LlavaDataset.__getitem__` replaces it and the record reaches the main process inside the
batch). Both end here, each record with its file, line, id, reason and problem, plus where it was
met (split, domain, and for loading the global step). The console shows counts; the file holds
every record, as JSON lines:

    {"file": "data/x/train.jsonl", "line": 12, "id": "r12", "reason": "unreadable_image",
     "problem": "...", "split": "train", "domain": "x", "stage": "setup"}

The file is `skipped_records.jsonl` in the run's log directory (`trainer.log_dir`), created at the
first skipped record, so a clean data set writes nothing. Every rank meets the same setup skips,
so only rank 0 writes them; each rank writes the samples it skipped while loading (rank r > 0 to
`skipped_records.rank<r>.jsonl`).
"""

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

FILE_NAME = "skipped_records.jsonl"


class SkipLog:
    """Skipped records in memory (`records`) and, once `set_directory` names the run's folder, in a file."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.path: Path | None = None
        self._rank = 0
        self._written = 0  # records[:_written] are in the file
        self._started = False  # the first write of this run truncates a file left by an earlier run

    def set_directory(self, directory: str | Path | None, rank: int = 0) -> None:
        """Write to `directory` from now on (None: keep the records in memory only)."""
        self._rank = rank
        name = FILE_NAME if rank == 0 else FILE_NAME.replace(".jsonl", f".rank{rank}.jsonl")
        path = None if directory is None else Path(directory) / name
        if path != self.path:
            self.path, self._written, self._started = path, 0, False
            self._flush()  # what was skipped before the folder was known

    def add(self, records: Iterable[dict], **where) -> list[dict]:
        """Append records (dicts with file, line, id, reason, problem), each extended with `where`."""
        added = [{**record, **where} for record in records]
        self.records.extend(added)
        self._flush()
        return added

    def counts(self, stage: str | None = None) -> Counter:
        """Reason -> number of records (of one `stage`, "setup" or "loading", if given)."""
        return Counter(r["reason"] for r in self.records if stage is None or r.get("stage") == stage)

    def _flush(self) -> None:
        if self.path is None or self._written == len(self.records):
            return
        # setup skips are the same on every rank: only rank 0 lists them.
        pending = [r for r in self.records[self._written:] if self._rank == 0 or r.get("stage") != "setup"]
        self._written = len(self.records)
        if not pending:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a" if self._started else "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in pending)
        self._started = True

"""LLaVA-format records: reading JSON / JSONL files and validating each record.

A record is `{"id", "image": "rel/path.png" | [..], "conversations": [{"from": "human" | "gpt"
| "system", "value": "<image>\\n..."}]}`; records without `image` are text-only. Validation is
eager (the DataModule runs it at setup) so a broken dataset fails before training starts, with
an error that names the file, the line and the record id. Every problem has a `reason` so
that the DataModule can skip bad records and still count each kind (nothing dropped silently).
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lightning_moe.tokens import PLACEHOLDERS

# LLaVA speaker names (and the ShareGPT / chat names some datasets use) -> chat-template roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Reasons a record can be rejected; also the keys of the skip counts in a data report.
MALFORMED_JSON = "malformed_json"
MALFORMED_RECORD = "malformed_record"
NO_ASSISTANT_TURN = "no_assistant_turn"
PLACEHOLDER_MISMATCH = "placeholder_mismatch"
PATH_OUTSIDE_ROOT = "path_outside_root"
MISSING_FILE = "missing_file"
UNREADABLE_IMAGE = "unreadable_image"
UNSUPPORTED_MODALITY = "unsupported_modality"
CHAT_TEMPLATE_REJECTED = "chat_template_rejected"


class BadRecordError(ValueError):
    """A record (or a JSON line) that cannot be used; `reason` is one of the constants above."""

    def __init__(self, reason: str, path: str | Path, line: int | None, record_id: str | None, problem: str):
        self.reason, self.path, self.line, self.record_id = reason, str(path), line, record_id
        where = f"{path}:{line}" if line is not None else str(path)
        who = f" record {record_id!r}:" if record_id is not None else ""
        super().__init__(f"{where}:{who} {problem}")


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class ParsedRecord:
    """A validated record: chat messages plus the resolved modality files, in placeholder order."""

    id: str
    messages: list[Message]
    files: dict[str, list[Path]]  # modality -> absolute paths, e.g. {"image": [...]}


def iter_llava_file(path: str | Path) -> Iterator[tuple[int | None, dict | BadRecordError]]:
    """(line, record) per record of a `.jsonl` (one per line) or `.json` (a list) file.

    A malformed JSONL line yields a `BadRecordError` in place of the record so that the caller
    decides whether to raise or skip; a malformed `.json` file cannot be read past the error and
    raises.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file not found: {path}")
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BadRecordError(MALFORMED_JSON, path, e.lineno, None, f"malformed JSON: {e.msg}") from e
        if not isinstance(records, list):
            raise BadRecordError(MALFORMED_JSON, path, None, None, "a .json data file must hold a list of records")
        # a .json list has no per-record lines worth reporting; the id names the record.
        yield from ((None, r) for r in records)
        return
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, BadRecordError(MALFORMED_JSON, path, lineno, None, f"malformed JSON: {e.msg}")


def read_llava_records(path: str | Path) -> list[dict]:
    """All records of a LLaVA `.json` / `.jsonl` file; raises `BadRecordError` on malformed JSON."""
    records = []
    for _, record in iter_llava_file(path):
        if isinstance(record, BadRecordError):
            raise record
        records.append(record)
    return records


def parse_record(
    record: object, root: Path, path: str | Path, line: int | None, supported: tuple[str, ...] = ("image",)
) -> ParsedRecord:
    """Validate one record against `root` and return messages + resolved files, or raise `BadRecordError`.

    `supported` lists the modalities whose files the caller can load; a record that uses another
    one is rejected rather than silently trained without its inputs.
    """
    if not isinstance(record, dict):
        raise BadRecordError(MALFORMED_RECORD, path, line, None, f"a record must be a JSON object, got {type(record).__name__}")
    record_id = str(record["id"]) if "id" in record else f"{Path(path).name}:{line}"

    def bad(reason: str, problem: str) -> BadRecordError:
        return BadRecordError(reason, path, line, record_id, problem)

    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise bad(MALFORMED_RECORD, "'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise bad(MALFORMED_RECORD, f"turn {i} must be {{'from': one of {sorted(ROLES)}, 'value': str}}, got {turn!r}")
        messages.append(Message(ROLES[turn["from"]], turn["value"]))
    if not any(m.role == "assistant" for m in messages):
        raise bad(NO_ASSISTANT_TURN, "no assistant ('gpt') turn, so nothing to train on or to evaluate")

    files: dict[str, list[Path]] = {}
    root_abs = Path(os.path.abspath(root))
    for modality, placeholder in PLACEHOLDERS.items():
        entry = record.get(modality)
        names = [] if entry is None else [entry] if isinstance(entry, str) else entry
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad(MALFORMED_RECORD, f"'{modality}' must be a path or a list of paths, got {entry!r}")
        n_placeholders = sum(m.content.count(placeholder) for m in messages)
        if n_placeholders != len(names):
            raise bad(
                PLACEHOLDER_MISMATCH,
                f"{n_placeholders} {placeholder} placeholder(s) in the text but {len(names)} {modality} file(s)",
            )
        if not names:
            continue
        if modality not in supported:
            raise bad(UNSUPPORTED_MODALITY, f"has {modality} inputs, which this dataset does not load")
        resolved = []
        for name in names:
            # A lexical check ('..' and absolute paths): symlinks placed inside the root are the
            # user's choice (image folders are often linked in) and are followed.
            file = Path(os.path.normpath(root_abs / name))
            if not file.is_relative_to(root_abs):
                raise bad(PATH_OUTSIDE_ROOT, f"{modality} path {name!r} leaves the dataset root {root}")
            if not file.is_file():
                raise bad(MISSING_FILE, f"{modality} file {name!r} not found under {root}")
            resolved.append(file)
        files[modality] = resolved
    return ParsedRecord(record_id, messages, files)


def check_image(file: Path) -> None:
    """Raise `OSError` (PIL's errors are subclasses) unless `file` looks like a readable image.

    `verify()` reads the whole file and checks its structure (PNG chunk checksums, a truncated
    end) without decoding pixels, which keeps setup fast on large real datasets; a file that
    still fails to decode later raises in `LlavaDataset.__getitem__`, naming the record.
    """
    with Image.open(file) as image:
        image.verify()

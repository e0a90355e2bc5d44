"""LLaVA-format records: reading JSON / JSONL files and validating each record.

A record is `{"id", "image": "rel/path.png" | [..], "conversations": [{"from": "human" | "gpt"
| "system", "value": "<image>\\n..."}]}`; records without `image` are text-only. Every registered
modality (`lightning_moe/modalities/`) has its field beside `image`, named after it (`audio`: a clip or
a list of clips, one per `<audio>`; `video`: one per `<video>`), and any of them may be absent. A
modality whose items are files takes a path or a list of paths. One whose items are frame sequences
(video) takes a directory of frame images (natural name order) or a list of frame files in temporal
order; several items are a list of those. A flat list of strings is read from what the paths are: all
directories, one item each; all files, the frames of ONE item.

Validation is eager (the DataModule runs it at setup) so a broken dataset fails before training
starts, with an error that names the file, the line and the record id. Every problem has a
`reason` so that the DataModule can skip bad records and still count each kind (nothing dropped
silently); a skipped record is kept as a `SkippedRecord` (file, line, id, reason, problem) so that
every one of them can be listed, not only counted.

Modality paths are untrusted input: each is resolved, symbolic links included, and must end
under the dataset root, so a record (or a link placed in the root) cannot make training read
`/etc/passwd` or any file outside the data set.
"""

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_moe.modalities import MediaItem, frame_files, modalities

# LLaVA speaker names (and the ShareGPT / chat names some datasets use) -> chat-template roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Generous bounds on one record (a LLaVA conversation has a few turns and a few thousand characters): a
# record past them is a bad record, so that one hostile record cannot stall setup.
MAX_TURNS = 1000
MAX_CHARACTERS = 1_000_000

# Reasons a record can be rejected; also the keys of the skip counts in a data report.
MALFORMED_JSON = "malformed_json"
MALFORMED_RECORD = "malformed_record"
NO_ASSISTANT_TURN = "no_assistant_turn"
PLACEHOLDER_MISMATCH = "placeholder_mismatch"
PATH_OUTSIDE_ROOT = "path_outside_root"  # '..' or an absolute path
LINK_OUTSIDE_ROOT = "link_outside_root"  # a symbolic link (file or directory) that leads out of the root
MISSING_FILE = "missing_file"
NOT_A_FILE = "not_a_file"  # a directory, FIFO or device where a media file is expected
INVALID_PATH = "invalid_path"  # a media path the system refuses: a NUL byte, a name too long, an unreadable folder
INVALID_UTF8 = "invalid_utf8"  # a JSONL line that is not UTF-8
TOO_MANY_TURNS = "too_many_turns"  # more turns than the DataModule's `max_turns_per_record`
TOO_MANY_CHARACTERS = "too_many_characters"  # more text than its `max_characters_per_record`
DUPLICATE_ID = "duplicate_id"  # an id met before (in any split or domain), with `duplicate_ids: error`


def unreadable_reason(modality_name: str) -> str:
    """The reason of an item that fails to decode: `unreadable_image`, `unreadable_audio`, ..."""
    return f"unreadable_{modality_name}"


UNREADABLE_IMAGE = unreadable_reason("image")  # fails to decode (unreadable_audio, ... for other modalities)
CHAT_TEMPLATE_REJECTED = "chat_template_rejected"


def where(path: str | Path, line: int | None, record_id: str | None) -> str:
    """`file:line: record 'id':`, the prefix every message about a record starts with."""
    place = f"{path}:{line}" if line is not None else str(path)
    who = f" record {record_id!r}:" if record_id is not None else ""
    return f"{place}:{who}"


class DataError(ValueError):
    """The data cannot be used as configured (a bad record, a domain left without samples); the message names the
    file, record or domain and the problem, so it is all a user needs to see."""


class BadRecordError(DataError):
    """A record (or a JSON line) that cannot be used; `reason` is one of the constants above."""

    def __init__(self, reason: str, path: str | Path, line: int | None, record_id: str | None, problem: str):
        self.reason, self.path, self.line, self.record_id, self.problem = reason, str(path), line, record_id, problem
        super().__init__(f"{where(path, line, record_id)} {problem}")


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out under `skip_bad_records`: where it is, which it is and why (one line of the skip file)."""

    file: str
    line: int | None  # None in a `.json` list file, where the id names the record
    id: str | None  # None when the line is not even a JSON object
    reason: str  # one of the reason constants above
    problem: str

    @classmethod
    def from_error(cls, error: BadRecordError) -> "SkippedRecord":
        return cls(error.path, error.line, error.record_id, error.reason, error.problem)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class ParsedRecord:
    """A validated record: chat messages plus the resolved modality files, in placeholder order."""

    id: str
    messages: list[Message]
    # modality -> its items in placeholder order, real (symlink-free) paths under the root: a Path per
    # file item (image, audio), a tuple of frame Paths per frame-sequence item (video), e.g. {"image": [...]}
    files: dict[str, list[MediaItem]]


def human_turn(text: str, counts: dict[str, int]) -> str:
    """A first human turn as the shipped data write it: one placeholder line per item (`counts`: modality ->
    items), modalities in registration order (image, audio, video, ...), then `text`: `"<image>\\n<audio>\\nQ"`."""
    return "".join(f"{s.placeholder}\n" * counts.get(s.name, 0) for s in modalities()) + text


def prompt_record(prompt: str, media: dict[str, list[str | list[str]]], record_id: str = "prompt") -> dict:
    """A record that asks `prompt` about `media` (modality -> items in a record's own format), with an empty
    answer turn: what generation from a prompt validates with `parse_record`, as a data set's records are."""
    counts = {modality: len(items) for modality, items in media.items()}
    return {"id": record_id, **{m: items for m, items in media.items() if items},
            "conversations": [{"from": "human", "value": human_turn(prompt, counts)}, {"from": "gpt", "value": ""}]}


def iter_llava_file(path: str | Path) -> Iterator[tuple[int | None, dict | BadRecordError]]:
    """(line, record) per record of a `.jsonl` (one per line) or `.json` (a list) file.

    A malformed JSONL line yields a `BadRecordError` in place of the record so that the caller
    decides whether to raise or skip; a malformed `.json` file cannot be read past the error and
    raises.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "not found"
        raise FileNotFoundError(f"LLaVA data file {what}: {path}")
    if path.suffix == ".json":
        data = path.read_bytes()
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRecordError(INVALID_UTF8, path, data.count(b"\n", 0, e.start) + 1, None,
                                 f"not UTF-8 at byte offset {e.start} ({e.reason}); re-encode the file as UTF-8") from e
        except json.JSONDecodeError as e:
            raise BadRecordError(MALFORMED_JSON, path, e.lineno, None, f"malformed JSON: {e.msg}") from e
        except RecursionError as e:
            raise BadRecordError(MALFORMED_JSON, path, None, None, "malformed JSON: nested too deeply") from e
        if not isinstance(records, list):
            raise BadRecordError(MALFORMED_JSON, path, None, None, "a .json data file must hold a list of records")
        # a .json list has no per-record lines worth reporting; the id names the record.
        yield from ((None, r) for r in records)
        return
    offset = 0  # of the line in the file, in bytes
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, BadRecordError(INVALID_UTF8, path, lineno, None,
                                             f"not UTF-8 at byte offset {start + e.start} ({e.reason})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, BadRecordError(MALFORMED_JSON, path, lineno, None, f"malformed JSON: {e.msg}")
            except RecursionError:
                yield lineno, BadRecordError(MALFORMED_JSON, path, lineno, None, "malformed JSON: nested too deeply")


def read_llava_records(path: str | Path) -> list[dict]:
    """All records of a LLaVA `.json` / `.jsonl` file; raises `BadRecordError` on malformed JSON."""
    records = []
    for _, record in iter_llava_file(path):
        if isinstance(record, BadRecordError):
            raise record
        records.append(record)
    return records


@functools.lru_cache(maxsize=64)
def _real_path(absolute: str) -> Path:
    """`realpath` of an absolute root, once per root rather than once per record."""
    return Path(os.path.realpath(absolute))


def _sequence_entries(entry: object) -> list[str | list[str]] | None:
    """The frame sequences (videos) of a record's entry before resolving paths (None: malformed).

    A string is one sequence (a directory); a list holding a list is several, each a directory
    or a frame list; a flat list of strings is returned as it is, to be read as several directories
    or as one sequence's frames once the paths are resolved (`parse_record`).
    """
    if entry is None:
        return []
    if isinstance(entry, str):
        return [entry]
    if not isinstance(entry, list) or not entry:
        return None
    if all(isinstance(e, str) for e in entry):
        return list(entry)
    if all(isinstance(e, str) or (isinstance(e, list) and e and all(isinstance(f, str) for f in e)) for e in entry):
        return list(entry)
    return None


def _frame_sequence(entry: str | list[str], modality: str, resolve, bad) -> tuple[Path, ...]:
    """One frame sequence's (a video's) frame files (real paths under the root), from a directory or a frame list."""
    if isinstance(entry, list):
        frames = tuple(resolve(modality, name, "frame") for name in entry)
        for name, frame in zip(entry, frames):
            if not frame.is_file():
                raise bad(MALFORMED_RECORD, f"{modality} frame {name!r} is not a file (a frame list names image "
                                            f"files; a directory is a {modality} of its own)")
        return frames
    directory = resolve(modality, entry, "directory")
    if not directory.is_dir():  # a lone file: a sequence of one frame
        return (directory,)
    frames = frame_files(directory)
    if not frames:
        raise bad(MISSING_FILE, f"{modality} directory {entry!r} holds no frame images")
    for frame in frames:
        # a frame that is a link out of the root is refused like any other path
        if not resolve(modality, f"{entry}/{frame.name}", "frame").is_file():
            raise bad(NOT_A_FILE, f"{modality} frame {_shown(f'{entry}/{frame.name}')} is not a regular file (a "
                                  "directory, FIFO or device)")
    return tuple(Path(os.path.realpath(f)) for f in frames)


def _shown(name: str, limit: int = 120) -> str:
    """`repr(name)`, cut to `limit` characters for a hostile (say 5,000-character) path."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def parse_record(record: object, root: Path, path: str | Path, line: int | None, max_turns: int | None = None,
                 max_characters: int | None = None) -> ParsedRecord:
    """Validate one record against `root` and return messages + resolved files, or raise `BadRecordError`.

    `max_turns` / `max_characters` (None: no limit) bound a record's turns and the characters of its turns' text,
    so that one hostile record cannot stall setup."""
    if not isinstance(record, dict):
        raise BadRecordError(MALFORMED_RECORD, path, line, None, f"a record must be a JSON object, got {type(record).__name__}")
    record_id = str(record["id"]) if "id" in record else f"{Path(path).name}:{line}"

    def bad(reason: str, problem: str) -> BadRecordError:
        return BadRecordError(reason, path, line, record_id, problem)

    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise bad(MALFORMED_RECORD, "'conversations' must be a non-empty list")
    if max_turns is not None and len(turns) > max_turns:
        raise bad(TOO_MANY_TURNS, f"{len(turns)} turns, more than max_turns={max_turns}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise bad(MALFORMED_RECORD, f"turn {i} must be {{'from': one of {sorted(ROLES)}, 'value': str}}, got {turn!r}")
        messages.append(Message(ROLES[turn["from"]], turn["value"]))
    characters = sum(len(m.content) for m in messages)
    if max_characters is not None and characters > max_characters:
        raise bad(TOO_MANY_CHARACTERS, f"{characters} characters of text, more than max_characters={max_characters}")
    if not any(m.role == "assistant" for m in messages):
        raise bad(NO_ASSISTANT_TURN, "no assistant ('gpt') turn, so nothing to train on or to evaluate")

    files: dict[str, list[MediaItem]] = {}
    root_abs = Path(os.path.abspath(root))  # not cached: a relative root depends on the working directory
    root_real = _real_path(str(root_abs))

    def resolve(modality: str, name: str, what: str) -> Path:
        """The real path of `name`, refused if it leaves the root (by '..', absolute, or a symbolic link)."""
        if "\0" in name:
            raise bad(INVALID_PATH, f"{modality} path {_shown(name)} holds a NUL byte")
        file = Path(os.path.normpath(root_abs / name))
        if not file.is_relative_to(root_abs):
            raise bad(PATH_OUTSIDE_ROOT, f"{modality} path {_shown(name)} leaves the dataset root {root}")
        # A link inside the root (to a file or to a folder on the way) may lead anywhere; the
        # real path decides. The root itself may be a link: it is resolved too.
        real = Path(os.path.realpath(file))
        if not real.is_relative_to(root_real):
            raise bad(
                LINK_OUTSIDE_ROOT,
                f"{modality} path {_shown(name)} is a symbolic link (or lies under one) that resolves to {real}, "
                f"outside the dataset root {root_real}; copy the file into the root, or choose a root "
                "that holds it",
            )
        try:
            exists = real.exists()
        except OSError as e:  # a name too long for the file system, ...
            raise bad(INVALID_PATH, f"{modality} path {_shown(name)} cannot be read: {e.strerror or e}") from e
        if not exists:
            raise bad(MISSING_FILE, f"{modality} {what} {_shown(name)} not found under {root}")
        return real  # later reads open the checked path, not the link

    for spec in modalities():
        try:
            files.update(_modality_items(spec, record, messages, root, resolve, bad))
        except OSError as e:  # a name too long, a folder that cannot be listed, ...
            name = _shown(e.filename) if isinstance(e.filename, str) else "a path"
            raise bad(INVALID_PATH, f"{spec.name} path {name} cannot be read: {e.strerror or e}") from e
    return ParsedRecord(record_id, messages, files)


def _modality_items(spec, record: dict, messages: list[Message], root: Path, resolve, bad) -> dict[str, list[MediaItem]]:
    """{modality: its items} of one registered modality in a record ({} when it has none); raises `bad(...)`."""
    modality, placeholder = spec.name, spec.placeholder
    entry = record.get(modality)
    if spec.item == "frames":
        sequences = _sequence_entries(entry)
        if sequences is None:
            raise bad(MALFORMED_RECORD, f"'{modality}' must be a directory, a list of frame files, or a list of "
                                        f"those (one per {placeholder}), got {entry!r}")
    else:
        sequences = None
        names = [] if entry is None else [entry] if isinstance(entry, str) else entry
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise bad(MALFORMED_RECORD, f"'{modality}' must be a path or a list of paths, got {entry!r}")
    if sequences and all(isinstance(v, str) for v in sequences):
        # a flat list of strings: directories (an item each) or the frames of one item, as the files say
        kinds = {resolve(modality, name, "path").is_dir() for name in sequences}
        if kinds == {False}:
            sequences = [sequences]
        elif len(kinds) > 1:
            raise bad(MALFORMED_RECORD, f"'{modality}' mixes directories and files: {sequences!r}; one "
                                        f"{modality} is a directory or a list of frame files, several are a "
                                        "list of those")
    n_placeholders = sum(m.content.count(placeholder) for m in messages)
    count = len(sequences) if sequences is not None else len(names)
    if n_placeholders != count:
        raise bad(
            PLACEHOLDER_MISMATCH,
            f"{n_placeholders} {placeholder} placeholder(s) in the text but {count} "
            f"{f'{modality}(s)' if spec.item == 'frames' else f'{modality} file(s)'}",
        )
    if not count:
        return {}
    if sequences is None:
        items: list[MediaItem] = []
        for name in names:
            real = resolve(modality, name, "file")
            if not real.is_file():
                raise bad(NOT_A_FILE, f"{modality} file {_shown(name)} is not a regular file (a directory, FIFO "
                                      "or device)")
            items.append(real)
    else:
        items = [_frame_sequence(sequence, modality, resolve, bad) for sequence in sequences]
    return {modality: items}

"""One clear message for the errors a user fixes (a missing path, a damaged checkpoint, a config typo).

`explain(error)` returns that message, or None when the error looks like a bug (which then keeps
its traceback). The CLI prints it instead of a traceback (lightning_moe/cli.py, `--debug` shows the
traceback). Errors raised while jsonargparse instantiates a class reach here as text wrapped in
"Does not validate against any of the Union subtypes" and followed by a dump of the parsed
Namespace; the original message is dug out of that text and the dump dropped. A value of the wrong
type is reported by jsonargparse at the innermost of nested "Parser key" lines; `_wrong_type` puts the
full key back together (`data.init_args.batch_size: expected int, got 'four'`). Lightning's own refusals
of a setting (`MisconfigurationException`, e.g. `trainer.max_steps: -5`) and a checkpoint that could not be
written (`CheckpointWriteError`: a full disk) print as they are: they name the setting or the file.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import sys
import zipfile
from pathlib import Path
from types import TracebackType

from lightning_moe.callbacks.checkpoint_io import CheckpointWriteError
from lightning_moe.data.records import DataError
from lightning_moe.safe_load import DamagedFileError, UnsafeFileError


class CheckpointMismatchError(ValueError):
    """`--ckpt_path` names a checkpoint of another method or stage than the config's."""


# errors whose message already names what is wrong (our own code raises them with the path or key)
_USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, UnsafeFileError,
                DamagedFileError, CheckpointMismatchError, DataError, CheckpointWriteError)
_CHECKPOINT_ERRORS = (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, ValueError, OSError)
# lines of jsonargparse's wrapping that say nothing about the cause
_NOISE = re.compile(r"Does not validate against any of the|Given value|Not a valid subclass|Namespace\(|^Subtypes:|^Errors:|"
                    r"Expected a <class|Problem with given class_path|^\s*- |Subclass types expect|"
                    r"Does not validate against|Type <class|Parser key|Unable to load config")


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and its causes, outermost first (jsonargparse raises its Union error from the real one)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def _frame_local(error: BaseException, function: str, name: str, file_suffix: str = "") -> object | None:
    """Local `name` of the innermost call of `function` (in a file ending with `file_suffix`) in `error`'s traceback."""
    found = None
    tb: TracebackType | None = error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == function and code.co_filename.endswith(file_suffix) and name in tb.tb_frame.f_locals:
            found = tb.tb_frame.f_locals[name]
        tb = tb.tb_next
    return found


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a torch checkpoint (missing, empty, truncated), or None if it looks whole."""
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return None
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return f"is truncated or not a torch checkpoint ({size} bytes, no complete zip archive)"
    return None


def _from_argument_error(text: str) -> str:
    """The cause inside jsonargparse's text, without the Union wrapping or the Namespace dump."""
    text = text.split("Namespace(", 1)[0]
    key = re.search(r'Parser key "([^"]+)"', text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not _NOISE.search(line)]
    # the innermost cause is the last useful line (jsonargparse nests "Problem with ...: <cause>")
    for line in reversed(useful or lines):
        cause = re.sub(r"^.*?(?:Problem with given class_path [^:]+:|instantiating [^:]+:)\s*", "", line)
        if cause:
            cause = cause.rstrip(" :")
            return f"{key.group(1)}: {cause}" if key and key.group(1) not in cause else cause
    return text.strip()[:500]


_EXPECTED = re.compile(r"Expected a (?P<type>.+?)\. Got value: (?P<value>.*)$")
_EXPECTED_CLASS = re.compile(r"Expected a <class '(?P<type>\w+)'>$")  # its value is on a "Given value:" line
_GIVEN_VALUE = re.compile(r"Given value: (?P<value>.*?)(?:\. Got value:.*)?$")
_NOT_OF_TYPE = re.compile(r"Not of type \w+: ")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
# a key whose value is a class with its own arguments (`class_path` + `init_args`), or a dataclass (its fields)
_CLASS_VALUE = re.compile(r"Problem with given class_path '(?P<path>[^']+)'|expects a function or a callable class")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" -"))


def _is_dataclass_path(path: str | None) -> bool:
    """Whether `path` names a dataclass of a module already imported (jsonargparse imported it to parse it)."""
    if path is None:
        return False
    module, _, name = path.rpartition(".")
    return dataclasses.is_dataclass(getattr(sys.modules.get(module), name, None))


def _wrong_type(text: str) -> str | None:
    """`key: expected T, got 'value'` for a config value of the wrong type (jsonargparse names the type and the
    value at the innermost of its nested "Parser key" lines, without the full key), or None for another error."""
    lines = text.splitlines()
    found = []  # (indent, line number, what is expected, the value given; None: that line says both)
    for i, line in enumerate(lines):
        stripped = line.strip(" -")
        if (m := _EXPECTED.search(stripped)) and "NoneType" not in m["type"]:
            found.append((_indent(line), i, m["type"], repr(m["value"])))
        elif _NOT_OF_TYPE.search(stripped):  # a restricted type: its check says the value and what is wrong
            found.append((_indent(line), i, stripped, None))
        elif (m := _EXPECTED_CLASS.fullmatch(stripped)) and m["type"] != "NoneType":
            given = next((g for g in map(_GIVEN_VALUE.search, lines[i:]) if g), None)
            found.append((_indent(line), i, m["type"], repr(given["value"]) if given else "another value"))
    if not found:
        return None
    depth, at, expected, value = max(found, key=lambda f: f[:2])
    keys: list[str] = []
    argument_of = None  # what the keys gathered so far are the arguments of: "class" (init_args) or "dataclass"
    for line in reversed(lines[:at]):  # the enclosing lines: each less indented than the one it encloses
        if not line.strip() or _indent(line) >= depth:
            continue
        depth = _indent(line)
        for key in reversed(_PARSER_KEY.findall(line)):
            keys[:0] = [key, "init_args"] if argument_of == "class" else [key]
            argument_of = None
        if m := _CLASS_VALUE.search(line):
            argument_of = "dataclass" if _is_dataclass_path(m["path"]) else "class"
    if not keys:
        return None
    if value is None:
        return f"{'.'.join(keys)}: {expected}"
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", expected)
    expected = f"one of {literal[1]}" if literal else re.sub(r"<class '(\w+)'>", r"\1", expected)
    return f"{'.'.join(keys)}: expected {expected}, got {value}"


def _explain_one(error: BaseException) -> str | None:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lightning_moe.callbacks.guards import NonFiniteError

    if isinstance(error, (NonFiniteError, MisconfigurationException)):  # Lightning's names the setting
        return str(error)
    checkpoint = _frame_local(error, "load", "f", "torch/serialization.py")
    if isinstance(checkpoint, (str, Path)) and isinstance(error, _CHECKPOINT_ERRORS):
        problem = checkpoint_problem(checkpoint) or f"cannot be read ({type(error).__name__}: {str(error)[:200]})"
        return (f"checkpoint {checkpoint} {problem}: point --ckpt_path (or the stage's `pretrained`) to a complete "
                "checkpoint, e.g. the run's last.ckpt or an earlier epoch's file")
    tokenizer = _frame_local(error, "load_tokenizer", "name_or_path")
    if tokenizer is not None and isinstance(error, (OSError, ValueError)) and not Path(str(tokenizer)).exists():
        return (f"tokenizer {tokenizer} not found: give a tokenizer directory or a Hugging Face tokenizer name "
                "(the shipped one is data/tokenizer)")
    if isinstance(error, _USER_ERRORS):
        return str(error)
    return None


def explain(error: BaseException) -> str | None:
    """The one message to print for a user-fixable `error`, or None (see the module docstring)."""
    from jsonargparse import ArgumentError

    if isinstance(error, SystemExit):
        return None  # --help, --print_config, or an exit that already printed its reason
    chain = _chain(error)
    for cause in reversed(chain):  # the innermost cause says what is wrong
        message = _explain_one(cause)
        if message is not None:
            return message
    if isinstance(error, ArgumentError) and (wrong_type := _wrong_type(str(error))):
        return wrong_type
    wrapped = "Does not validate against any of the Union subtypes" in str(error)
    if wrapped and isinstance(chain[-1], (ValueError, TypeError, KeyError)):
        # a class refused its arguments (our classes raise ValueError naming the key): its own message only
        return str(chain[-1]) if len(chain) > 1 else _from_argument_error(str(error))
    if isinstance(error, ArgumentError):
        return _from_argument_error(str(error))
    return None

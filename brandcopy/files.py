"""Reading and writing files: UTF-8 text, JSONL with file:line:field errors, atomic writes.

Every module reads its text and JSONL inputs and writes its outputs through here:

- ``read_text`` reads UTF-8 (a BOM dropped) and names the first bad line of anything else.
- ``read_jsonl`` reads a data file (every line a JSON object, required fields checked);
  ``read_jsonl_log`` reads an append-only log, leaving out a last line torn by a kill mid-write.
- ``atomic_write_text`` / ``atomic_write_jsonl`` / ``atomic_path`` write through a temporary file
  and a rename, so no reader sees half a file; ``atomic_dir`` does the same for a whole folder
  (a saved model).
"""

import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class NotUTF8Error(ValueError):
    """A text input file is not UTF-8 (GBK from a Chinese Windows editor, or a binary file)."""

    def __init__(self, path, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


class DataFileError(ValueError):
    """A file's content is not what it should be; the message names file, line and field.

    Attributes:
        path: The file.
        line: 1-based line number, or None for the file as a whole.
        field: The field at fault, or None.
        reason: What is wrong, without the location.
    """

    def __init__(self, path, line: int | None, field_name: str | None, reason: str):
        self.path, self.line, self.field, self.reason = str(path), line, field_name, reason
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: field '{field_name}': {reason}" if field_name else f"{where}: {reason}")


# --- reading -------------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file; a leading byte-order mark (Windows Notepad's UTF-8) is dropped.

    Raises:
        NotUTF8Error: The bytes are not UTF-8; the message names the file and the first bad line.
        OSError: The file cannot be read.
    """
    return _decode(path, Path(path).read_bytes())


def _decode(path: str | Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        if err.reason == "unexpected end of data":
            raise NotUTF8Error(path, line, "the file ends in the middle of a character: it was cut off (truncated)") from None
        raise NotUTF8Error(path, line, f"not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}: "
                                       "GBK or a binary file?); save it as UTF-8") from None


def parse_jsonl(path: str | Path, text: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of ``text``, the content of ``path``.

    Raises:
        DataFileError: A line is not valid JSON or not a JSON object.
    """
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFileError(path, number, None, f"not valid JSON ({err.msg}, column {err.colno}): "
                                                    "a truncated or hand-edited file?") from None
        if not isinstance(row, dict):
            raise DataFileError(path, number, None, f"expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def jsonl_rows(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a UTF-8 JSONL file (a BOM dropped).

    Raises:
        DataFileError: The file is not UTF-8, or a line is not a JSON object.
        OSError: The file cannot be read.
    """
    try:
        text = read_text(path)
    except NotUTF8Error as err:
        raise DataFileError(path, err.line, None, err.reason) from None
    return parse_jsonl(path, text)


def read_jsonl(path: str | Path, required: tuple[str, ...] | dict[str, str] = ()) -> list[dict]:
    """Read a JSONL file, checking every row is an object with the required fields.

    Args:
        path: The file (UTF-8; a BOM is dropped).
        required: Field names, or field name -> what it must hold: ``"messages"`` (a non-empty list
            of ``{role, content}`` chat messages) or ``"text"`` (a non-empty string).

    Returns:
        The rows, in file order (empty for a file without rows).

    Raises:
        DataFileError: The file is not UTF-8, or a line is not a JSON object, lacks a field or
            holds the wrong kind of value; the message names file, line and field.
        OSError: The file cannot be read (FileNotFoundError when it does not exist).
    """
    rows = jsonl_rows(path)
    for number, row in rows:
        missing = [name for name in required if name not in row]
        if missing:
            raise DataFileError(path, number, None, f"missing field '{missing[0]}'")
    for number, row in rows:  # the values once every line has its fields: a wrong schema is named first
        for name, kind in (required.items() if isinstance(required, dict) else ()):
            problem = _field_problem(row[name], kind)
            if problem:
                raise DataFileError(path, number, name, problem)
    return [row for _, row in rows]


def _field_problem(value, kind: str) -> str | None:
    """What is wrong with a data-file value of the given kind (None: nothing)."""
    if kind == "text":
        return None if isinstance(value, str) and value.strip() else f"expected a non-empty string, got {value!r:.60}"
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of {{role, content}} messages, got {type(value).__name__} {value!r:.60}"
    for index, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            return f"message {index} is not {{\"role\": str, \"content\": str}}: {message!r:.60}"
    return None


def read_jsonl_log(path: str | Path) -> list[dict]:
    """Rows of an append-only JSONL log (metrics, results), empty when the file does not exist.

    A last line without its newline was torn by a kill mid-write (it may end mid-character): it is
    left out. Any complete line that is not a JSON object is an error.

    Raises:
        DataFileError: A complete line is not UTF-8 or not a JSON object (file and line named).
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    try:
        text = _decode(path, data[: data.rfind(b"\n") + 1])
    except NotUTF8Error as err:
        raise DataFileError(path, err.line, None, err.reason) from None
    return [row for _, row in parse_jsonl(path, text)]


def cut_torn_line(path: str | Path) -> int:
    """Cut a last line without its newline (torn by a kill mid-write) off an append-only log.

    Returns:
        The number of bytes cut (0 when the file ends with a newline or does not exist).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(end)
            os.fsync(handle.fileno())
    return len(data) - end


# --- writing -------------------------------------------------------------------------------------


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed onto it when the block succeeds (removed when it fails).

    The temporary name keeps the suffix, so writers that infer the format from it (matplotlib's
    ``savefig``) write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """An empty folder ``.<name>.partial`` next to ``path`` that replaces ``path`` when the block succeeds.

    A failed or killed block never leaves a half-written folder at ``path`` (a model whose
    ``config.json`` is there but not its weights): what was at ``path`` stays until the new folder
    is complete. The partial folder has a fixed name, so the next try removes what a killed one left.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        shutil.rmtree(path, ignore_errors=True)
        partial.rename(path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename, so no reader sees half a file.

    The file gets the mode any other new file gets (0666 less the umask), not ``mkstemp``'s 0600:
    tools run as another user (LLaMA-Factory in a container) must be able to read it.

    Returns:
        ``path``.
    """
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data
    return Path(path)


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line (UTF-8, not ASCII-escaped), atomically as ``atomic_write_text``."""
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def weights_follow_umask(folder: str | Path, reference: str | Path) -> None:
    """Give every ``*.safetensors`` file under ``folder`` the mode of ``reference`` (a file written with plain ``open``).

    safetensors creates its files with mode 0600 whatever the umask, so weights saved by
    ``save_pretrained`` could not be read by a tool run as another user (a container, a shared folder).
    """
    mode = stat.S_IMODE(Path(reference).stat().st_mode)
    for path in Path(folder).rglob("*.safetensors"):
        path.chmod(mode)

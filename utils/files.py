"""All-or-nothing file writes: a crash or an error never leaves a partial output under its final name."""
import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from utils.errors import UserError

# The names atomic_write gives its temporaries: .NAME.XXXXXXXX.tmp (tempfile's random lowercase characters).
TEMPORARY_NAME = re.compile(r"\..+\.[a-z0-9_]+\.tmp")


def current_umask():
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_write(path, folder=False):
    """Yield a temporary path beside `path` to write (a file, or a folder when folder=True).

    On success it replaces `path` (an existing folder is removed first) with the permissions of any file the user
    writes, the files of a folder too (mkstemp/mkdtemp make them private); on failure it is removed and `path`
    stays as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}."
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if folder else 0o666) & ~current_umask())
        for inner in tmp.rglob("*") if folder else ():  # some writers make their files private
            if inner.is_file():
                os.chmod(inner, 0o666 & ~current_umask())
        if folder and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path, data, announce=False):
    """Write data as indented JSON, atomically; announce=True prints where."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    if announce:
        print(f"Wrote {path}")


def read_json(path, fix="remove it"):
    """The JSON object in a file; a damaged one raises UserError naming it and saying `fix`."""
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error}): {fix}") from error
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, not an object: {fix}")
    return value

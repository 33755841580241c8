"""Folders that the tests of a session share across pytest-xdist workers (no torch here: conftest imports it)."""
import os
import shutil

from filelock import FileLock


def shared_folder(tmp_path_factory, name, build):
    """A folder made once per test session by build(folder), even when test files run in several pytest-xdist
    workers (the first to ask builds it under a lock; the others wait and read it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / name
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder

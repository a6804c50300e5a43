"""The files of one scoring job, checked before anything is written, and the lock that guards them.

A job reads its inputs (the input file, or a BEIR folder's queries, corpus and run files), the
model and the head. It writes OUTPUT and its companions, all beside OUTPUT: `OUTPUT.partial`
(JSONL and TREC drafts), `OUTPUT.parts/` and `OUTPUT.parts.old/` (Parquet parts),
`OUTPUT.checkpoint.json`, `OUTPUT.summary.json`, `OUTPUT.lock`, plus the rejects file
(`OUTPUT.rejects.jsonl`, or `--rejects`) and its own `REJECTS.lock`. Before the job touches any
of them, `check_job_files` makes sure that:

- every input is a regular file (a BEIR `-i` may be a folder): a job reads its input again to
  resume, so a pipe, `/dev/stdin` or a device is refused with the fix, "write it to a file first";
- every written path is absent or a regular file (the parts folders: absent or a folder), never
  a symbolic link, a device, a fifo or a socket, so nothing but a plain file is ever replaced;
- no written path is, or aliases, an input, the model, the head or another written path: two
  paths alias when they resolve to the same path (symlinks followed) or name the same inode
  (a hard link).

`JobLock` then holds an exclusive `fcntl.flock` on `OUTPUT.lock` and `REJECTS.lock` for the
life of the job, so a second job on the same output (or rejects file) fails at once, before it
changes anything. The kernel drops the lock when the process dies, SIGKILL included, so a
crashed job never blocks the rerun that resumes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reranker.errors import RerankerError
from reranker.jobs.readers import beir_files, detect_input_format

PARTIAL, PARTS, PARTS_OLD = ".partial", ".parts", ".parts.old"
CHECKPOINT, SUMMARY, REJECTS, LOCK = ".checkpoint.json", ".summary.json", ".rejects.jsonl", ".lock"

STREAM_FIX = ("a job reads its input again to resume after a crash, so streams are not supported: "
              "write it to a file first (e.g. `... > input.jsonl`) and pass that file")


def beside(path: Path, suffix: str) -> Path:
    """The companion of `path` named `path` + `suffix`, in the same folder."""
    return path.with_name(path.name + suffix)


def hidden_files(path: Path) -> list[tuple[str, Path]]:
    """(what, path) of every file `--save-hidden PATH` writes: the array, the index, and their drafts."""
    from head.hidden_states import index_path  # the `head` package loads torch: not for a job without hidden states

    index = index_path(path)
    return [("hidden-state file", path), ("hidden-state draft", beside(path, PARTIAL)),
            ("hidden-state index", index), ("hidden-state index draft", beside(index, PARTIAL))]


@dataclass(frozen=True)
class JobFiles:
    """Every path a job on `output` may write; `flag` says which option chose each."""

    output: Path
    rejects: Path
    rejects_given: bool = False
    hidden: Path | None = None  # `--save-hidden`: the hidden-state .npy, written with its index (`hidden_files`, jobs/hidden.py)

    @classmethod
    def of(cls, output: Path, rejects: Path | None = None, hidden: Path | None = None) -> JobFiles:
        for flag, path in (("-o/--output", output), ("--rejects", rejects), ("--save-hidden", hidden)):
            if path is not None and Path(path).name in ("", ".", ".."):
                # `-o .` or `-o /`: a folder, whose companions (`OUTPUT.partial`, ...) have no name to extend
                raise RerankerError(f"{flag} {path} names a folder; give a file path, e.g. {Path(path) / 'scores.jsonl'}")
        return cls(Path(output), Path(rejects) if rejects is not None else beside(Path(output), REJECTS), rejects is not None,
                   Path(hidden) if hidden is not None else None)

    @property
    def partial(self) -> Path:
        return beside(self.output, PARTIAL)

    @property
    def parts(self) -> Path:
        return beside(self.output, PARTS)

    @property
    def checkpoint(self) -> Path:
        return beside(self.output, CHECKPOINT)

    @property
    def summary(self) -> Path:
        return beside(self.output, SUMMARY)

    @property
    def locks(self) -> list[Path]:
        """`OUTPUT.lock`, then `REJECTS.lock` (and `HIDDEN.lock`): a job on either refuses to share it."""
        return [beside(self.output, LOCK), beside(self.rejects, LOCK)] + ([beside(self.hidden, LOCK)] if self.hidden else [])

    def hidden_written(self) -> list[tuple[str, Path]]:
        """(what, path) of the `--save-hidden` files: the .npy, its index, their drafts (none without it)."""
        return hidden_files(self.hidden) if self.hidden is not None else []

    def written(self) -> list[tuple[str, Path, bool]]:
        """(what, path, is a folder) of every path the job may create, replace or remove."""
        o = self.output
        return [("output", o, False), ("draft", self.partial, False), ("parts folder", self.parts, True),
                ("old parts folder", beside(o, PARTS_OLD), True), ("checkpoint", self.checkpoint, False),
                ("summary", self.summary, False), ("rejects file", self.rejects, False),
                ("lock file", self.locks[0], False), ("rejects lock file", self.locks[1], False)] + \
            [(what, p, False) for what, p in self.hidden_written()] + \
            ([("hidden-state lock file", self.locks[2], False)] if self.hidden else [])

    def flag(self, what: str) -> str:
        if what.startswith("hidden-state"):
            return "--save-hidden"
        return "--rejects" if what.startswith("rejects") and self.rejects_given else "-o"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "pipe (FIFO)"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"


def _why(e: OSError) -> str:
    return "a symbolic link loop" if e.errno == errno.ELOOP else (e.strerror or str(e))


def check_input(what: str, path: Path, folder_ok: bool = False) -> None:
    """`path` can be read again on resume: a regular file (or a folder, where `folder_ok`)."""
    if str(path) == "-":
        raise RerankerError(f"the {what} cannot be stdin ('-'): {STREAM_FIX}")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise RerankerError(f"{what if what.endswith('file') else what + ' file'} not found: {path}") from None
    except OSError as e:
        raise RerankerError(f"cannot read the {what} {path}: {_why(e)}") from None
    if stat.S_ISREG(st.st_mode) or (folder_ok and stat.S_ISDIR(st.st_mode)):
        return
    if stat.S_ISDIR(st.st_mode):
        raise RerankerError(f"the {what} {path} is a folder; give a file")
    raise RerankerError(f"the {what} {path} is a {_kind(st.st_mode)}, not a regular file: {STREAM_FIX}")


def check_written(files: JobFiles, what: str, path: Path, folder: bool) -> None:
    """`path` is absent, or what the job writes there: a regular file (or a real folder)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise RerankerError(f"cannot use {path} as the {what}: {_why(e)}; choose another {files.flag(what)}") from None
    mode = st.st_mode
    if stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        target = os.readlink(path)
        raise RerankerError(f"the {what} {path} is a symbolic link (to {target}); only regular files are written: "
                            f"give the real path, or choose another {files.flag(what)}")
    need = "a folder" if folder else "a regular file"
    raise RerankerError(f"the {what} {path} exists and is a {_kind(mode)}, not {need}; only regular files are "
                        f"written: choose another {files.flag(what)}")


def file_identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """(the path with symlinks resolved, (device, inode) when it exists): equal parts mean one file."""
    try:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


def same_file(a: tuple[str, tuple[int, int] | None], b: tuple[str, tuple[int, int] | None]) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def check_job_files(files: JobFiles, reads: list[tuple[str, Path]]) -> None:
    """Refuse a job whose written paths are special files or alias each other or what it reads.

    `reads` is (what, path) of every file read: inputs (and a BEIR folder), model and head.
    Raises `RerankerError` naming both paths and the option to change; changes nothing.
    """
    written = files.written()
    for what, path, folder in written:
        check_written(files, what, path, folder)
    ids = [(what, path, file_identity(path)) for what, path, _ in written]
    for what, path, ident in ids:
        for other, other_path in reads:
            if same_file(ident, file_identity(other_path)):
                raise RerankerError(f"the {what} {path} is the {other} {other_path} (the same file): the job would "
                                    f"overwrite it; choose another {files.flag(what)}")
    for i, a in enumerate(ids):
        for b in ids[:i]:
            if same_file(a[2], b[2]):
                (what, path, _), (other, other_path, _) = (b, a) if files.flag(b[0]) == "--rejects" else (a, b)
                raise RerankerError(f"the {what} {path} is also the job's {other} {other_path}; "
                                    f"choose another {files.flag(what)}")


class JobLock:
    """Exclusive locks (`fcntl.flock`) on a job's lock files, held from `acquire` to `release`.

    A second job on the same output fails at once with a message naming it. The lock files
    are removed on release, while still locked; a job that locked a file just removed (or
    replaced) finds that the path no longer names its file, and tries again.
    """

    ATTEMPTS = 50

    def __init__(self, files: JobFiles) -> None:
        self.files = files
        self._held: list[tuple[Path, int]] = []

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            for path, what in zip(self.files.locks, ("lock file", "rejects lock file", "hidden-state lock file")):
                self._held.append((path, self._lock(path, what)))
        except BaseException:
            self.release()
            raise

    def _lock(self, path: Path, what: str) -> int:
        flag = self.files.flag(what)
        with writing(path, what, flag):
            path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(self.ATTEMPTS):
            with writing(path, what, flag):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    name = ("the rejects file " + str(self.files.rejects) if what.startswith("rejects") else
                            "the hidden-state file " + str(self.files.hidden) if what.startswith("hidden") else self.files.output)
                    raise RerankerError(f"{name} is in use: another `reranker score` job{holder} holds {path}; wait "
                                        f"for it to finish, or choose another {self.files.flag(what)}") from None
                raise RerankerError(f"cannot lock {path}: {_why(e)}") from None
            if _names(path, fd):  # else a finishing job removed it before unlocking: lock the new one
                try:
                    with writing(path, what, flag):
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                except BaseException:
                    os.close(fd)
                    raise
                return fd
            os.close(fd)
        raise RerankerError(f"cannot lock {path}: it keeps being replaced; is another job starting and stopping on it?")

    def release(self) -> None:
        """Remove the lock files, then unlock them (so a waiting job never locks a stale file)."""
        while self._held:
            path, fd = self._held.pop()
            with contextlib.suppress(OSError):
                if _names(path, fd):
                    path.unlink()
            os.close(fd)


def _names(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _read_pid(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextlib.contextmanager
def writing(path: Path, what: str = "", flag: str = "-o") -> Iterator[None]:
    """Turn an OSError while writing `path` into a `RerankerError` naming it and the fix (`flag`: the option naming it)."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (BlockingIOError, InterruptedError)):
            raise
        fix = {errno.ENOSPC: "free some space, then rerun the same command to resume",
               errno.EDQUOT: "free some space, then rerun the same command to resume",
               errno.EROFS: f"the file system is read-only: choose another {flag}",
               errno.EACCES: f"the folder must be writable: fix its permissions or choose another {flag}",
               errno.EPERM: f"the folder must be writable: fix its permissions or choose another {flag}"}.get(
                   e.errno, "rerun the same command to resume once it is fixed")
        name = f"the {what} {path}" if what else str(path)
        raise RerankerError(f"cannot write {name}: {e.strerror or e}; {fix}") from e


def input_reads(input: Path | None, input_format: str | None, queries: Path | None = None, corpus: Path | None = None,
                run: Path | None = None) -> list[tuple[str, Path]]:
    """(what, path) of everything a job reads for these input arguments, each checked by
    `check_input`: the paths given, and for BEIR the queries, corpus and run files found."""
    reads: list[tuple[str, Path]] = []
    for what, p in (("input", input), ("queries file", queries), ("corpus file", corpus), ("run file", run)):
        if p is not None:
            check_input(what, Path(p), folder_ok=what == "input")
            reads.append((what, Path(p)))
    fmt = detect_input_format(input, input_format, beir_files=any(x is not None for x in (queries, corpus, run)))
    if fmt == "beir":
        for what, p in zip(("BEIR queries", "BEIR corpus", "BEIR run"), beir_files(input, queries, corpus, run)):
            check_input(what, p)
            reads.append((what, p))
    elif input is None:
        raise RerankerError(f"no input file given for the {fmt} format; pass -i INPUT")
    elif os.path.isdir(input):
        raise RerankerError(f"the input {input} is a folder, but a {fmt} input is one file; give the file "
                            "(or --input-format beir for a BEIR folder)")
    return reads


def input_files(reads: list[tuple[str, Path]]) -> list[Path]:
    """The files among `reads` (not a BEIR folder), each once, in order: what a job's fingerprint hashes."""
    seen: dict[str, Path] = {}
    for _, p in reads:
        if os.path.isfile(p):
            seen.setdefault(os.path.realpath(p), p)
    return list(seen.values())

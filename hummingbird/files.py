"""Writing a folder the writer owns whole (``hummingbird convert``'s output) so that a reader finds the
previous version or the new one, never a mix.

A folder is written under a temporary name beside its destination, made durable (each file and
folder fsync'ed, so a power cut after the swap cannot leave unwritten data under the final name),
given the modes the user's umask asks for (safetensors writes its files 0600 through a temporary
file), and only then renamed into place; an existing destination is renamed aside first and
deleted last.

``save_pretrained`` keeps diffusers' own in-place writer: a diffusers folder is shared (variants saved
one after another, a README, saving into ".", a mount point or a linked folder), which a swapped-in
folder would lose or could not replace.
"""
import errno
import glob
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path


def _rename_into(tmp: Path, dst: Path):
    """os.rename, which never replaces a file or a non-empty folder: one there is reported as existing."""
    try:
        os.rename(tmp, dst)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(f"{dst} appeared while it was written; not replaced (use overwrite)") from err
        raise


_WINDOWS = os.name == "nt"


def fsync(path: Path):
    if _WINDOWS and os.path.isdir(path):  # Windows cannot open a folder (PermissionError) nor sync one
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _set_modes(tmp: Path):
    """Modes as the user's umask asks: that of ``tmp``, made by mkdir (folders; files without x)."""
    folder_mode = tmp.stat().st_mode & 0o777
    for root, dirs, files in os.walk(tmp):
        for name in files:
            os.chmod(os.path.join(root, name), folder_mode & 0o666)
        for name in dirs:
            os.chmod(os.path.join(root, name), folder_mode)


def _sync(tmp: Path):
    for root, _, files in os.walk(tmp):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync(Path(root, name))
        fsync(Path(root))


def move_into_place(tmp: Path, dst: Path, overwrite: bool):
    """Move the finished ``tmp`` folder to ``dst``. ``dst`` is checked again right here, because it
    may have appeared since the caller checked: then it is an error unless ``overwrite``, in which case
    it is renamed aside, ``tmp`` renamed in, and only then the old one deleted."""
    if not (dst.exists() or dst.is_symlink()):
        _rename_into(tmp, dst)
        fsync(dst.parent)
        return
    if not overwrite:
        raise FileExistsError(f"{dst} appeared while it was written; not replaced (use overwrite)")
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    try:
        os.rename(dst, old / dst.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        _rename_into(tmp, dst)
    except BaseException:
        os.rename(old / dst.name, dst)  # put the old one back (if this fails, it is kept in `old`)
        old.rmdir()
        raise
    fsync(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def check_destination(dst, overwrite: bool) -> Path:
    """``dst`` as an absolute path ("." has no name to write beside it), once it is known that
    :func:`write_folder` may write it: absent, or there and ``overwrite``; never a dangling link."""
    dst = Path(os.path.abspath(dst))
    if dst.is_symlink() and not dst.exists():
        raise FileExistsError(f"{dst} is a dangling symbolic link; remove it or choose another destination")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; choose another destination or overwrite it")
    return dst


def _warn_about_leftovers(dst: Path):
    """A writer killed outright (SIGKILL, power cut) leaves its temporary folder, or, between the two
    renames of an overwrite, the previous version aside: named here, not deleted (another writer may
    be at work on them)."""
    left = sorted(dst.parent.glob(f".{glob.escape(dst.name)}.tmp-*")) + sorted(
        dst.parent.glob(f".{glob.escape(dst.name)}.old-*"))
    if left:
        warnings.warn(f"left by an interrupted write of {dst.name} (delete what you do not need; an .old- folder "
                      f"holds a previous {dst.name}): {', '.join(p.name for p in left)}", stacklevel=3)


def write_folder(dst, fill, overwrite: bool = False) -> Path:
    """Run ``fill(tmp)`` on a new temporary folder beside ``dst`` and move it into place (see the module
    docstring). Returns the destination's absolute path."""
    dst = check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _warn_about_leftovers(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()  # not mkdtemp: its mode 0700 would become the folder's, whatever the user's umask
    try:
        fill(tmp)
        _set_modes(tmp)
        _sync(tmp)
        move_into_place(tmp, dst, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


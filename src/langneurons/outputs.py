"""Safe outputs: every command checks where it will write before it does any work.

The rules (each refusal is one :class:`~langneurons.errors.UserError` line naming the problem and the fix):

* the output is not under ``/proc``, ``/sys`` or ``/dev`` and is not a device, FIFO or socket;
* its parent exists, or can be created under an existing, writable directory (an ancestor that is a
  file is refused); nothing is created by the check itself;
* it is not an input of the same command, and not inside an input directory (statistics, model,
  corpus, data, run directories). A directory named in ``shared`` may hold the output (``bridge select
  --probes DIR --out DIR``) as long as no file the command writes is one of its inputs;
* an existing result is not replaced silently: a file output that exists needs ``--overwrite``; a
  directory output lists the files it writes (``writes``) and, with a ``key``
  (:func:`command_key`), the same command may rerun over its own results (its JSON results record
  the key as ``command_key``) while another one needs ``--overwrite``.

The writes themselves are atomic and verified (:mod:`langneurons.atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from .errors import UserError

__all__ = ["check_file", "check_dir", "command_key", "ensure_dir", "inside", "lang_inputs", "special_reason",
           "KEY_FIELD"]

#: Field of a result JSON that records the key of the command that wrote it.
KEY_FIELD = "command_key"
#: Pseudo file systems no result belongs on.
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")
#: Argument names that do not change what a command computes (left out of :func:`command_key`).
_NOT_IN_KEY = {"func", "method_module", "quiet", "overwrite", "out", "device", "device_map", "batch_size",
               "eval_batch_size", "threads", "checkpoint_every", "cache_dir", "no_cache", "workers"}

Input = Union[str, os.PathLike, tuple, None]


# ---------------------------------------------------------------------------------------------- helpers
def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(path))))


def _inside(child: str, parent: str) -> bool:
    return child != parent and child.startswith(parent.rstrip(os.sep) + os.sep)


def inside(path, directory) -> bool:
    """Whether ``path`` lies strictly inside ``directory`` (symbolic links and ``..`` resolved)."""
    return _inside(_real(path), _real(directory))


def special_reason(path) -> Optional[str]:
    """Why ``path`` cannot hold a result (a system path, a device, a FIFO...), or None."""
    real = _real(path)
    try:
        mode = os.stat(real).st_mode
    except OSError:
        mode = None
    if mode is not None:
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return "is a device"
        if stat.S_ISFIFO(mode):
            return "is a FIFO (named pipe)"
        if stat.S_ISSOCK(mode):
            return "is a socket"
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return "is not a regular file"
    for root in _SYSTEM_ROOTS:
        if real == root or _inside(real, root):
            return f"is under {root}, a system directory"
    return None


def _normalise(inputs: Iterable[Input]) -> list[tuple[str, Path]]:
    """``[(label, path)]`` of the inputs that exist on disk (model ids, ``hf:`` specs and None dropped)."""
    out = []
    for item in inputs:
        label, path = item if isinstance(item, tuple) else ("input", item)
        if path is None or str(path) == "" or str(path).startswith("hf:"):
            continue
        p = Path(os.path.expanduser(str(path)))
        if p.exists():
            out.append((label, p))
    return out


def lang_inputs(specs: Optional[Sequence[str]], label: str = "corpus", option: str = "--lang") -> list[tuple[str, str]]:
    """The local paths of ``--lang CODE=SOURCE`` arguments (comma-joined lists; ``hf:`` left out)."""
    out = []
    for spec in specs or []:
        if "=" not in str(spec):
            continue
        code, source = str(spec).split("=", 1)
        for part in (p.strip() for p in source.split(",")):
            if part and not part.startswith("hf:"):
                out.append((f"{option} {code.strip()} {label}", part))
    return out


def _check_parent(out: Path, option: str, shown: str) -> None:
    """The nearest existing ancestor is a writable directory (missing ones are created later)."""
    probe = Path(os.path.expanduser(str(out))).parent
    while not os.path.lexists(probe):
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{option} {shown}: {probe} is a file, not a directory; choose a path inside a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{option} {shown}: directory {probe} is not writable; choose a writable location")


def _check_target(out: Path, option: str, shown: str) -> None:
    reason = special_reason(out)
    if reason:
        raise UserError(f"{option} {shown} {reason}; write to a regular file in a directory of yours")
    _check_parent(out, option, shown)


def _check_not_input(target: Path, inputs, shared, option: str, shown: str, what: str) -> None:
    """``target`` (a file the command writes) is no input and lies in no (non-shared) input directory."""
    rt = _real(target)
    shared_real = {_real(s) for s in shared if s is not None}
    for label, path in inputs:
        ri = _real(path)
        if rt == ri:
            raise UserError(f"{option} {shown} is the input {label} {path}; write {what} elsewhere")
        if path.is_dir() and _inside(rt, ri) and ri not in shared_real:
            raise UserError(f"{option} {shown} is inside the input {label} {path}; write {what} elsewhere")


# ---------------------------------------------------------------------------------------------- the checks
def check_file(out, *, inputs: Iterable[Input] = (), overwrite: bool = False, option: str = "--out",
               what: str = "the output", shared: Iterable = ()) -> Path:
    """Check a file output before any work; return it as a Path. Nothing is created."""
    out = Path(out)
    shown = str(out)
    if out.is_dir():
        raise UserError(f"{option} {shown} is a directory; give a file name such as {out / 'out.json'}")
    _check_target(out, option, shown)
    shared = list(shared)
    _check_not_input(out, _normalise(inputs), shared, option, shown, what)
    if os.path.lexists(out) and not overwrite:
        raise UserError(f"{option} {shown} exists; pass --overwrite to replace it, or choose another file name")
    return out


def _key_of(path: Path) -> Optional[str]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc.get(KEY_FIELD) if isinstance(doc, dict) else None


def check_dir(out, *, inputs: Iterable[Input] = (), shared: Iterable = (), writes: Iterable[str] = (),
              key: Optional[str] = None, keyed: Optional[Iterable[str]] = None, overwrite: bool = False,
              option: str = "--out", what: str = "the results") -> Path:
    """Check a directory output before any work; return it as a Path. Nothing is created.

    ``writes``: names (relative to ``out``) of the files the command writes. ``keyed``: those of
    them (JSON) that record ``key`` (default: every ``.json`` of ``writes``). Existing files of
    ``writes`` need ``overwrite`` unless every existing keyed file holds ``key`` (the same command
    run again) and at least one does.
    """
    out = Path(out)
    shown = str(out)
    reason = special_reason(out)
    if reason:
        raise UserError(f"{option} {shown} {reason}; give a directory of yours")
    if os.path.lexists(out) and not out.is_dir():
        ins = _normalise(inputs)
        for label, path in ins:
            if _real(path) == _real(out):
                raise UserError(f"{option} {shown} is the input {label} {path}; write {what} elsewhere")
        raise UserError(f"{option} {shown} is a file; give a directory")
    _check_parent(out, option, shown)
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"{option} {shown} is not writable; choose a writable directory")
    ins = _normalise(inputs)
    shared = [s for s in shared if s is not None]
    shared_real = {_real(s) for s in shared}
    ro = _real(out)
    for label, path in ins:
        ri = _real(path)
        if path.is_dir() and ri not in shared_real and (ro == ri or _inside(ro, ri)):
            where = "is" if ro == ri else "is inside"
            raise UserError(f"{option} {shown} {where} the input {label} {path}; write {what} elsewhere")
        if not path.is_dir() and ro == ri:
            raise UserError(f"{option} {shown} is the input {label} {path}; write {what} elsewhere")
    writes = list(writes)
    existing = []
    for name in writes:
        target = out / name
        reason = special_reason(target)
        if reason:
            raise UserError(f"{option} {shown}: {target} {reason}; remove it or choose another directory")
        if target.is_dir():
            raise UserError(f"{option} {shown}: {target} is a directory where a file is written; "
                            "remove it or choose another directory")
        _check_not_input(target, ins, shared, option, shown, what)
        if os.path.lexists(target):
            existing.append(target)
    if existing and not overwrite:
        keyed = {str(n) for n in (keyed if keyed is not None else [w for w in writes if str(w).endswith(".json")])}
        mine = [t for t in existing if str(t.relative_to(out)) in keyed]
        foreign = [t for t in mine if key is None or _key_of(t) != key]
        if not mine or foreign:
            first = (foreign or existing)[0]
            raise UserError(f"{option} {shown} already holds {first.name} from another run; pass --overwrite "
                            "to replace it, or choose another directory")
    return out


def command_key(args, **extra) -> str:
    """A digest of what a command computes: its arguments (paths made absolute) without the ones
    that only change speed or output (``--device``, ``--batch-size``, ``--quiet``, ``--out``...)."""
    def norm(v):
        if isinstance(v, Path):
            return _real(v)
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, (str, int, float, bool)) or v is None:
            return v
        return str(v)
    doc = {k: norm(v) for k, v in sorted(vars(args).items()) if k not in _NOT_IN_KEY}
    doc.update({k: norm(v) for k, v in extra.items()})
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def ensure_dir(directory, option: str = "--out") -> Path:
    """Create ``directory`` (and its parents) after the checks passed; an OSError is one line."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create directory {directory} for {option} ({e.strerror}); "
                        "choose a location inside a writable directory") from None
    return directory

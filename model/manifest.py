"""The artifacts' manifest: the sha256 of every file a served model is read from.

``streamrec train`` seals what it writes (``seal``): ``manifest.json`` lists
``card.json``, ``vocab.json``, ``candidates.npz`` and every ONNX file the card
names, by path relative to the model directory, with their digests.  Serving
checks the whole directory at load (``Manifest.check``: it serves whole or not
at all) and reads each file it uses through the manifest (``Manifest.read``),
so the bytes it serves are the bytes that were sealed.  Refused, each with an
error that names the file: a file whose digest differs (damaged, cut short,
replaced after sealing), a sealed file that is not there, a file the card
names or serving reads that the manifest does not list, and a path that
leaves the directory (absolute, with ``..``, or a symlink pointing out).
``card.json`` is sealed as bytes, like the others: it decides which model serves
and which file each variant is, so any edit to it needs a seal.

What it does not do: whoever can write the directory can write a new manifest
too.  It catches corruption, partial copies and a card pointing elsewhere, not
a deliberate swap (a signature would; not done).

>>> import tempfile
>>> d = Path(tempfile.mkdtemp())
>>> card = b'{"chosen": "m", "variants": [{"name": "m", "onnx": "m.onnx"}]}'
>>> for name, data in [(CARD_FILE, card), ("m.onnx", b"x"), (VOCAB_FILE, b"v"), (INDEX_FILE, b"i")]:
...     _ = (d / name).write_bytes(data)
>>> sorted(seal(d).digests)
['candidates.npz', 'card.json', 'm.onnx', 'vocab.json']
>>> Manifest.load(d).read("m.onnx")
b'x'
>>> _ = (d / "m.onnx").write_bytes(b"y")
>>> Manifest.load(d).read("m.onnx")
Traceback (most recent call last):
...
streamrec.model.manifest.DigestMismatch: m.onnx in ... is not the file that was sealed ...
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Final

import orjson

MANIFEST_FILE: Final = "manifest.json"
CARD_FILE: Final = "card.json"
VOCAB_FILE: Final = "vocab.json"
INDEX_FILE: Final = "candidates.npz"
ALGORITHM: Final = "sha256"
FORMAT: Final = 1


class ManifestError(RuntimeError):
    """Artifacts that do not match their manifest; ``path`` names the file, ``reason`` the kind."""

    reason: ClassVar[str] = "manifest"

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class NotSealed(ManifestError):
    """The directory has no manifest."""

    reason = "not_sealed"


class MalformedManifest(ManifestError):
    """The manifest is not one this code writes."""

    reason = "malformed"


class Unlisted(ManifestError):
    """A file serving reads, or the card names, is not in the manifest."""

    reason = "unlisted"


class Missing(ManifestError):
    """A sealed file is not there: an incomplete copy."""

    reason = "missing"


class DigestMismatch(ManifestError):
    """A file's bytes are not the ones sealed."""

    reason = "digest"


class OutsideDirectory(ManifestError):
    """A path that leaves the model directory: absolute, with ``..``, or a symlink out."""

    reason = "outside"


def named_files(card: dict[str, Any]) -> list[str]:
    """The ONNX file of every variant the card names (baselines name none)."""
    return sorted({v["onnx"] for v in card.get("variants", []) if v.get("onnx")})


def served_files(card: dict[str, Any]) -> list[str]:
    """Every file serving reads: the card, the vocabulary, the candidate index, the models."""
    return [CARD_FILE, VOCAB_FILE, INDEX_FILE, *named_files(card)]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Manifest:
    """A model directory's sealed digests; ``read`` returns a file's bytes only if they match.

    ``root`` is the directory as resolved when the manifest was read: a symlink
    repointed meanwhile does not mix files of two versions.
    """

    root: Path
    digests: dict[str, str]  # relative POSIX path -> sha256 hex

    @classmethod
    def load(cls, model_dir: Path) -> Manifest:
        root = Path(os.path.realpath(model_dir))
        try:
            document = orjson.loads((root / MANIFEST_FILE).read_bytes())
        except FileNotFoundError:
            raise NotSealed(
                MANIFEST_FILE,
                f"no {MANIFEST_FILE} in {model_dir}: the flow serves only artifacts sealed with "
                "their sha256 digests, as `streamrec train` writes them; after checking files "
                f"changed by hand, seal them with `streamrec model seal {model_dir}`",
            ) from None
        except orjson.JSONDecodeError as err:
            raise MalformedManifest(
                MANIFEST_FILE, f"{MANIFEST_FILE} in {model_dir} is not JSON ({err})"
            ) from None
        files = document.get("files") if isinstance(document, dict) else None
        if (
            not isinstance(document, dict)
            or document.get("algorithm") != ALGORITHM
            or document.get("format") != FORMAT
            or not isinstance(files, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
        ):
            raise MalformedManifest(
                MANIFEST_FILE,
                f"{MANIFEST_FILE} in {model_dir} is not a format-{FORMAT} {ALGORITHM} manifest "
                f"(expected {{'format': {FORMAT}, 'algorithm': '{ALGORITHM}', 'files': "
                f"{{path: hex}}}}); seal again with `streamrec model seal {model_dir}`",
            )
        for name in files:
            _inside(root, name)
        return cls(root, dict(files))

    def path(self, name: str) -> Path:
        """Where ``name`` is, once it is known to stay inside the directory."""
        return _inside(self.root, name)

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def read(self, name: str) -> bytes:
        """The bytes of ``name``, if it is inside the directory, listed, and as sealed."""
        path = self.path(name)
        expected = self.digests.get(name)
        if expected is None:
            raise Unlisted(
                name,
                f"{name} is not in {self.root / MANIFEST_FILE}: a file written after sealing is "
                f"not served; if it is meant, seal again with `streamrec model seal {self.root}`",
            )
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise Missing(
                name,
                f"{name} is sealed in {self.root / MANIFEST_FILE} but is not there: an "
                "incomplete copy; copy the artifacts again",
            ) from None
        found = digest(data)
        if found != expected:
            raise DigestMismatch(
                name,
                f"{name} in {self.root} is not the file that was sealed (sha256 {found[:16]}…, "
                f"the manifest says {expected[:16]}…): damaged, cut short or replaced since; "
                "copy the artifacts again, or if the change is meant, seal again with "
                f"`streamrec model seal {self.root}`",
            )
        return data

    def check(self, card: dict[str, Any]) -> None:
        """Every file serving reads or ``card`` names is listed, and every listed file is as
        sealed: a directory serves whole, or not at all."""
        for name in served_files(card):
            self.path(name)
            if name not in self.digests:
                raise Unlisted(
                    name,
                    f"{name} is read by serving but not in {self.root / MANIFEST_FILE}; if it "
                    f"is meant, seal again with `streamrec model seal {self.root}`",
                )
        for name in self.digests:
            self.read(name)


def seal(model_dir: Path) -> Manifest:
    """Write ``model_dir``'s manifest: the digest of every file ``served_files`` names.

    Refuses (``OutsideDirectory``) a card naming a file outside the directory, and
    raises ``FileNotFoundError`` for a file it names that is not there.  The manifest
    is replaced atomically: a reader sees the old one or the new one, and a manifest
    hard-linked from another directory is left as it was.
    """
    root = Path(os.path.realpath(model_dir))
    card = orjson.loads((root / CARD_FILE).read_bytes())
    digests = {name: digest(_inside(root, name).read_bytes()) for name in served_files(card)}
    document = {"format": FORMAT, "algorithm": ALGORITHM, "files": dict(sorted(digests.items()))}
    fd, staged = tempfile.mkstemp(dir=root, prefix=f".{MANIFEST_FILE}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
        os.chmod(staged, 0o644)  # mkstemp makes it private; the flow may run as another user
        os.replace(staged, root / MANIFEST_FILE)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    return Manifest(root, digests)


def verify(model_dir: Path) -> Manifest:
    """Check ``model_dir`` against its manifest (``Manifest.check``), as serving does at load;
    raises the first ``ManifestError`` found."""
    manifest = Manifest.load(model_dir)
    manifest.check(orjson.loads(manifest.read(CARD_FILE)))
    return manifest


def _inside(root: Path, name: str) -> Path:
    """``root / name`` if ``name`` is relative, has no ``..`` and resolves inside ``root``."""
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or not pure.parts:
        raise OutsideDirectory(
            name,
            f"{name!r} is not a path inside the model directory {root}: artifacts are named "
            "by relative paths without '..'",
        )
    path = root.joinpath(*pure.parts)
    real = os.path.realpath(path)
    if os.path.commonpath([str(root), real]) != str(root):
        raise OutsideDirectory(
            name,
            f"{name} in {root} leads outside it (to {real}): artifacts are read from inside "
            "the model directory only; copy the file in",
        )
    return path

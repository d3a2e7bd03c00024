"""The artifacts' manifest: what serving reads is what was sealed, from inside its directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from streamrec.cli import cli
from streamrec.model.manifest import (
    MANIFEST_FILE,
    DigestMismatch,
    MalformedManifest,
    ManifestError,
    Missing,
    NotSealed,
    OutsideDirectory,
    Unlisted,
    digest,
    seal,
    served_files,
    verify,
)
from streamrec.model.serving import Recommender, read_card
from streamrec.settings import Settings

ARTIFACTS = Settings().model_dir
CARD = read_card(ARTIFACTS)
CHOSEN = CARD["chosen"]
SERVED_ONNX = next(v["onnx"] for v in CARD["variants"] if v["name"] == CHOSEN)


def sealed_copy(where: Path) -> Path:
    """The committed artifacts, hard-linked (their manifest with them): sealed as committed."""
    copy = where / "model"
    shutil.copytree(ARTIFACTS, copy, copy_function=os.link)
    return copy


def rewrite(path: Path, data: bytes) -> None:
    """New bytes in a new file: the hard-linked original keeps its own."""
    path.unlink()
    path.write_bytes(data)


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rewrite(path, bytes(data))


def edit_card(model_dir: Path, **changes: object) -> dict[str, object]:
    """Change the card's top level, or (``onnx=``) the chosen variant's file; not sealed."""
    card = read_card(model_dir)
    onnx = changes.pop("onnx", None)
    card.update(changes)
    if onnx is not None:
        for row in card["variants"]:
            if row["name"] == card["chosen"]:
                row["onnx"] = onnx
    rewrite(model_dir / "card.json", orjson.dumps(card))
    return card


def write_manifest(model_dir: Path, files: dict[str, str]) -> None:
    """A manifest written by hand, as a tool that checks nothing would write it."""
    document = {"format": 1, "algorithm": "sha256", "files": files}
    rewrite(model_dir / MANIFEST_FILE, orjson.dumps(document))


def digests_of(model_dir: Path, names: list[str]) -> dict[str, str]:
    return {name: digest((model_dir / name).read_bytes()) for name in names}


def test_the_committed_artifacts_are_sealed_with_relative_paths() -> None:
    manifest = verify(ARTIFACTS)
    assert sorted(manifest.digests) == sorted(served_files(CARD))
    assert {"card.json", "vocab.json", "candidates.npz", SERVED_ONNX, "teacher.onnx"} <= set(
        manifest.digests
    )
    document = orjson.loads((ARTIFACTS / MANIFEST_FILE).read_bytes())
    assert document["algorithm"] == "sha256" and document["format"] == 1
    assert all("/" not in name and ".." not in name for name in document["files"])
    assert document["files"][SERVED_ONNX] == digest((ARTIFACTS / SERVED_ONNX).read_bytes())


def test_one_byte_flipped_in_the_middle_of_the_served_onnx_is_refused(tmp_path: Path) -> None:
    model_dir = sealed_copy(tmp_path)
    flip_middle_byte(model_dir / SERVED_ONNX)
    with pytest.raises(DigestMismatch, match="is not the file that was sealed") as refused:
        Recommender.load(model_dir)
    assert refused.value.path == SERVED_ONNX
    with pytest.raises(DigestMismatch):
        verify(model_dir)


@pytest.mark.parametrize("name", ["card.json", "vocab.json", "candidates.npz"])
def test_every_other_file_serving_reads_is_checked_too(tmp_path: Path, name: str) -> None:
    model_dir = sealed_copy(tmp_path)
    flip_middle_byte(model_dir / name)
    with pytest.raises(DigestMismatch) as refused:
        Recommender.load(model_dir)
    assert refused.value.path == name


def test_a_damaged_file_of_another_variant_refuses_the_whole_directory(tmp_path: Path) -> None:
    # A directory serves whole or not at all: a damaged teacher.onnx means a bad copy.
    model_dir = sealed_copy(tmp_path)
    flip_middle_byte(model_dir / "teacher.onnx")
    with pytest.raises(DigestMismatch, match="teacher.onnx"):
        Recommender.load(model_dir)  # the chosen variant, not the teacher
    with pytest.raises(DigestMismatch, match="teacher.onnx"):
        verify(model_dir)


def test_a_sealed_file_that_is_not_there_is_refused_as_an_incomplete_copy(
    tmp_path: Path,
) -> None:
    model_dir = sealed_copy(tmp_path)
    (model_dir / "candidates.npz").unlink()
    with pytest.raises(Missing, match="incomplete copy") as refused:
        Recommender.load(model_dir)
    assert refused.value.path == "candidates.npz"


@pytest.mark.parametrize("where", ["parent", "absolute"])
@pytest.mark.parametrize("listed", [False, True])
def test_a_card_naming_a_file_outside_the_directory_is_refused(
    tmp_path: Path, where: str, listed: bool
) -> None:
    model_dir = sealed_copy(tmp_path)
    elsewhere = tmp_path / "elsewhere.onnx"
    shutil.copyfile(ARTIFACTS / SERVED_ONNX, elsewhere)  # a model that would load
    named = "../elsewhere.onnx" if where == "parent" else str(elsewhere)
    card = edit_card(model_dir, onnx=named)
    with pytest.raises(OutsideDirectory):
        seal(model_dir)  # sealing never vouches for it
    files = digests_of(model_dir, [n for n in served_files(card) if n != named])
    if listed:
        files[named] = digest(elsewhere.read_bytes())
    write_manifest(model_dir, files)
    with pytest.raises(OutsideDirectory, match="elsewhere.onnx") as refused:
        Recommender.load(model_dir)
    assert refused.value.path == named


@pytest.mark.parametrize("name", [SERVED_ONNX, "vocab.json", "teacher.onnx"])
def test_a_file_missing_from_the_manifest_is_refused(tmp_path: Path, name: str) -> None:
    # teacher.onnx: not read when the chosen variant serves, but named by the card.
    model_dir = sealed_copy(tmp_path)
    files = orjson.loads((model_dir / MANIFEST_FILE).read_bytes())["files"]
    del files[name]
    write_manifest(model_dir, files)
    with pytest.raises(Unlisted, match="streamrec model seal") as refused:
        Recommender.load(model_dir)
    assert refused.value.path == name


def test_a_symlink_leaving_the_directory_is_refused_even_to_the_same_bytes(
    tmp_path: Path,
) -> None:
    model_dir = sealed_copy(tmp_path)
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(ARTIFACTS / SERVED_ONNX, outside)  # its digest matches the manifest's
    (model_dir / SERVED_ONNX).unlink()
    (model_dir / SERVED_ONNX).symlink_to(outside)
    with pytest.raises(OutsideDirectory, match="leads outside") as refused:
        Recommender.load(model_dir)
    assert refused.value.path == SERVED_ONNX
    with pytest.raises(OutsideDirectory):
        seal(model_dir)


def test_a_model_directory_served_through_a_symlink_is_read_where_it_resolves(
    tmp_path: Path,
) -> None:
    current = tmp_path / "current"
    current.symlink_to(sealed_copy(tmp_path))
    assert Recommender.load(current).version == Recommender.load(ARTIFACTS).version


def test_a_directory_without_a_manifest_is_refused_with_the_command_that_seals_it(
    tmp_path: Path,
) -> None:
    model_dir = sealed_copy(tmp_path)
    (model_dir / MANIFEST_FILE).unlink()
    with pytest.raises(NotSealed, match=f"streamrec model seal {model_dir}"):
        Recommender.load(model_dir)


@pytest.mark.parametrize(
    "document",
    [
        b"{not json",
        b'{"format": 1, "algorithm": "md5", "files": {}}',
        b'{"format": 2, "algorithm": "sha256", "files": {}}',
        b'{"format": 1, "algorithm": "sha256", "files": ["card.json"]}',
    ],
)
def test_a_manifest_of_another_kind_is_refused(tmp_path: Path, document: bytes) -> None:
    model_dir = sealed_copy(tmp_path)
    rewrite(model_dir / MANIFEST_FILE, document)
    with pytest.raises(MalformedManifest):
        Recommender.load(model_dir)


def test_streamrec_model_seal_makes_a_deliberate_change_servable(tmp_path: Path) -> None:
    model_dir = sealed_copy(tmp_path)
    committed = (ARTIFACTS / MANIFEST_FILE).read_bytes()
    edit_card(model_dir, chosen="teacher")
    with pytest.raises(DigestMismatch, match="card.json"):
        Recommender.load(model_dir)

    sealed = CliRunner().invoke(cli, ["model", "seal", str(model_dir)])
    assert sealed.exit_code == 0, sealed.output
    assert f"sealed {len(served_files(CARD))} files" in sealed.output
    rec = Recommender.load(model_dir)
    assert rec.version.startswith("teacher@")
    assert len(rec.recommend([list(rec.vocab.items[:3])], k=5)[0]) == 5
    assert (ARTIFACTS / MANIFEST_FILE).read_bytes() == committed  # the hard link untouched
    checked = CliRunner().invoke(cli, ["model", "verify", str(model_dir)])
    assert checked.exit_code == 0 and "match their manifest" in checked.output


def test_streamrec_model_verify_names_the_file_that_differs(tmp_path: Path) -> None:
    model_dir = sealed_copy(tmp_path)
    flip_middle_byte(model_dir / "vocab.json")
    result = CliRunner().invoke(cli, ["model", "verify", str(model_dir)])
    assert result.exit_code == 1
    assert "vocab.json" in result.output and "not the file that was sealed" in result.output


def test_streamrec_model_seal_refuses_a_card_pointing_outside_and_says_why(
    tmp_path: Path,
) -> None:
    model_dir = sealed_copy(tmp_path)
    edit_card(model_dir, onnx="/etc/passwd")
    result = CliRunner().invoke(cli, ["model", "seal", str(model_dir)])
    assert result.exit_code == 1
    assert "cannot seal" in result.output and "/etc/passwd" in result.output


def test_every_refusal_is_a_manifest_error_with_its_own_reason() -> None:
    kinds = [NotSealed, MalformedManifest, Unlisted, Missing, DigestMismatch, OutsideDirectory]
    assert all(issubclass(kind, ManifestError) for kind in kinds)
    assert len({kind.reason for kind in kinds}) == len(kinds)

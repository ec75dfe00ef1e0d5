"""The project's photos: the Kodak files are the published ones, split as KODAK.md fixes, and no held-out photo
is also a training photo (by content, whatever its name)."""

import hashlib
from pathlib import Path

from photos import DATA, HELDOUT, PHOTOS

HELD_OUT_KODAK = {f"kodim{i:02d}.png" for i in (3, 6, 9, 12, 15, 18, 21, 24)}  # every third image


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def published_hashes() -> dict[str, str]:
    lines = (DATA / "kodak.sha256").read_text().split("\n")
    return {name: digest for digest, name in (line.split() for line in lines if line.strip())}


def test_the_kodak_list_is_the_published_one():
    hashes = published_hashes()
    assert sorted(hashes) == [f"kodim{i:02d}.png" for i in range(1, 25)]
    assert hashes["kodim01.png"].startswith("a56e27cb")  # the value other projects pin (KODAK.md)


def test_the_kodak_photos_are_split_as_fixed_and_unchanged():
    hashes = published_hashes()
    train = {p.name: sha256(p) for p in PHOTOS.glob("kodim*")}
    held = {p.name: sha256(p) for p in HELDOUT.glob("kodim*")}
    assert set(held) == HELD_OUT_KODAK
    assert set(train) == set(hashes) - HELD_OUT_KODAK
    assert {**train, **held} == hashes


def test_no_heldout_photo_is_a_training_photo():
    train = {sha256(p): p.name for p in PHOTOS.iterdir()}
    held = {sha256(p): p.name for p in HELDOUT.iterdir()}
    assert len(train) == 25 and len(held) == 10  # 9 + 16 Kodak; 2 + 8 Kodak (each file's bytes distinct)
    assert not train.keys() & held.keys(), [held[h] for h in train.keys() & held.keys()]

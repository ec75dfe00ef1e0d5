"""The photos the tests read: the repository's own, so that a plain clone runs the suite."""

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
PHOTOS = DATA / "photos"  # the training photos
HELDOUT = DATA / "heldout"  # the held-out photos (chelsea.png, coffee.png, ...)

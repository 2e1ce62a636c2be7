"""Which files are images, and the EXIF orientation they ask to be shown in."""

import io
import warnings
from pathlib import Path

import pytest
from PIL import Image

from mnpo.data.image_files import exif_orientation_of, is_image_file


def tagged(value, fmt="JPEG"):
    exif = Image.Exif()
    if value is not None:
        exif[0x0112] = value  # Orientation
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buffer, fmt, exif=exif)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("value", range(1, 9))
def test_orientation_tags_are_read(value):
    assert exif_orientation_of(tagged(value)) == value
    assert exif_orientation_of(tagged(value, "PNG")) == value


@pytest.mark.parametrize("value", [None, 0, 9, 300])
def test_a_missing_or_invalid_tag_means_as_stored(value):
    assert exif_orientation_of(tagged(value)) == 1


def test_a_damaged_exif_block_means_as_stored(monkeypatch):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buffer, "JPEG")
    data = buffer.getvalue()
    payload = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\xff\xff\xde\xad"  # an IFD cut short
    damaged = data[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns "Corrupt EXIF data"
        image = Image.open(io.BytesIO(damaged))
        assert exif_orientation_of(image) == 1
        image.load()
    assert image.size == (8, 6)  # the pixels are fine

    def broken():
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(image, "getexif", broken)
    assert exif_orientation_of(image) == 1


def test_image_files_by_extension_not_hidden():
    assert is_image_file(Path("a/b.JPG")) and is_image_file(Path("x.webp")) and is_image_file(Path("x.tiff"))
    assert not is_image_file(Path("a/.b.jpg")) and not is_image_file(Path("notes.txt"))
    assert not is_image_file(Path("archive.jpg.zip"))

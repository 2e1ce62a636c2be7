"""Tests of the headless-Chromium harness in tests/browser.py."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import browser
from browser import is_blank, render, require_chromium

# Small viewports keep each Chromium run around a second.
W, H = 400, 300


def _page(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "page.html"
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head>"
                    f"<body style='margin:0;background:#fff'>{body}</body></html>", encoding="utf-8")
    return path


def _save(im: Image.Image, tmp_path: Path, name: str = "im.png") -> Path:
    path = tmp_path / name
    im.save(path)
    return path


def test_render_runs_scripts_and_screenshots(tmp_path: Path) -> None:
    require_chromium()
    page = _page(tmp_path, """
        <div style="width:200px;height:120px;background:#c03030"></div>
        <script>
          const el = document.createElement("p");
          el.id = "added-by-" + "script";
          el.textContent = "hello";
          document.body.appendChild(el);
        </script>""")
    png = tmp_path / "shot.png"
    dom = render(page, png, width=W, height=H)
    assert 'id="added-by-script"' in dom
    with Image.open(png) as im:
        assert im.size == (W, H)
    assert not is_blank(png)


def test_render_empty_page_is_blank(tmp_path: Path) -> None:
    require_chromium()
    png = tmp_path / "shot.png"
    render(_page(tmp_path, ""), png, width=W, height=H)
    assert is_blank(png)


def test_render_embedded_png(tmp_path: Path) -> None:
    require_chromium()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 90, 200)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    png = tmp_path / "shot.png"
    render(_page(tmp_path, f"<img src='{uri}' width='64' height='64'>"), png, width=W, height=H)
    assert not is_blank(png)
    with Image.open(png) as im:
        assert im.convert("RGB").getpixel((32, 32)) == (20, 90, 200)


def test_render_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        render(tmp_path / "absent.html", tmp_path / "shot.png")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_is_blank_single_colour(tmp_path: Path, mode: str) -> None:
    assert is_blank(_save(Image.new(mode, (50, 40), 200), tmp_path))


def test_is_blank_content(tmp_path: Path) -> None:
    im = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(im).rectangle((10, 10, 40, 30), fill="black")
    assert not is_blank(_save(im, tmp_path))


def test_is_blank_near_uniform_noise(tmp_path: Path) -> None:
    # Two colours one level apart: not a single colour, but the spread is below 1.0.
    im = Image.new("RGB", (100, 100), (128, 128, 128))
    for x in range(0, 100, 2):
        im.putpixel((x, 0), (129, 129, 129))
    assert is_blank(_save(im, tmp_path))


def test_is_blank_tiny_speck(tmp_path: Path) -> None:
    # One black pixel in 1280 x 2400 white is below the default tolerance; a 10 x 10
    # square is not, and a strict tolerance catches the single pixel too.
    im = Image.new("RGB", (1280, 2400), "white")
    im.putpixel((5, 5), (0, 0, 0))
    speck = _save(im, tmp_path, "speck.png")
    assert is_blank(speck)
    assert not is_blank(speck, tolerance=0.01)
    ImageDraw.Draw(im).rectangle((100, 100, 109, 109), fill="black")
    assert not is_blank(_save(im, tmp_path, "square.png"))


def _fake_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    exe = tmp_path / "fake-chromium"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(0o755)
    monkeypatch.setattr(browser, "find_chromium", lambda: str(exe))


def test_render_reports_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_chromium(tmp_path, monkeypatch, "echo 'dbus/bus.cc noise' >&2; echo 'it broke' >&2; exit 3")
    with pytest.raises(RuntimeError, match=r"exited with 3: .*fake-chromium(.|\n)*it broke") as err:
        render(_page(tmp_path, ""), tmp_path / "shot.png")
    assert "dbus" not in str(err.value).split("stderr (tail):")[1]


def test_render_reports_missing_screenshot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_chromium(tmp_path, monkeypatch, "echo '<html></html>'")
    with pytest.raises(RuntimeError, match="wrote no screenshot"):
        render(_page(tmp_path, ""), tmp_path / "shot.png")


def test_render_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_chromium(tmp_path, monkeypatch, "sleep 30")
    with pytest.raises(RuntimeError, match="timed out"):
        render(_page(tmp_path, ""), tmp_path / "shot.png", timeout=0.5)


def test_require_chromium_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser, "find_chromium", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="make test"):
        require_chromium()

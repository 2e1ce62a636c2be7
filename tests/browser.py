"""Headless Chromium harness for tests that render a self-contained HTML file.

``render`` loads a local HTML file in headless Chromium, saves a screenshot and
returns the DOM as it stands after the page's scripts ran; ``is_blank`` tells
whether a screenshot shows nothing; ``require_chromium`` skips a test where no
Chromium is installed (``make browser`` installs Debian's where it can).

Chromium runs as root here, without network, GPU or D-Bus: hence ``--no-sandbox``
and friends below. Its stderr is full of harmless ``dbus/...`` errors; they are
left out of the stderr tail quoted when a run fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image, ImageStat

#: Looked for on PATH, in order, after ``/usr/bin/chromium``.
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")

#: Flags for a headless, offline, throw-away run (the profile dir is added per run).
#: ``--disable-dev-shm-usage``: Debian's launcher means to add it when /dev/shm is small
#: but its check breaks when ``findmnt`` prints more than one line; containers often
#: have a 64 MB /dev/shm.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)

_SKIP_REASON = ("Chromium is not installed (apt-get install chromium); `make test` installs it "
                "where it can: see Makefile target `browser`")


def find_chromium() -> str | None:
    """Path of a Chromium (or Chrome) executable, or None if there is none."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_chromium() -> str:
    """Chromium's path; skips the calling test where Chromium is not installed."""
    exe = find_chromium()
    if exe is None:
        pytest.skip(_SKIP_REASON)
    return exe


def _stderr_tail(stderr: str, lines: int = 20) -> str:
    kept = [line for line in stderr.splitlines() if "dbus/" not in line]
    return "\n".join(kept[-lines:])


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str]:
    """Runs ``cmd`` in its own process group (killed whole on timeout)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise RuntimeError(f"Chromium timed out after {timeout} s: {' '.join(cmd)}\n"
                           f"stderr (tail):\n{_stderr_tail(err.decode(errors='replace'))}")
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def render(html_path: str | os.PathLike[str], out_png: str | os.PathLike[str], *,
           width: int = 1280, height: int = 2400, timeout: float = 120,
           virtual_time_ms: int | None = 5000) -> str:
    """Renders ``html_path`` in headless Chromium; returns the DOM after scripts ran.

    The viewport (``width`` x ``height`` CSS pixels) is saved as a PNG to ``out_png``.
    ``virtual_time_ms`` (``--virtual-time-budget``) lets timers and other pending work
    of the page run that much virtual time before the capture; None waits for load only.
    Screenshot and DOM come from one Chromium run; a second run with ``--dump-dom``
    alone is made only if the first printed no DOM. Raises RuntimeError (naming the
    command, return code and stderr tail) if Chromium fails, writes no screenshot or
    prints no DOM, or runs past ``timeout`` seconds.
    """
    html = Path(html_path).resolve()
    if not html.is_file():
        raise FileNotFoundError(html)
    exe = find_chromium()
    if exe is None:
        raise RuntimeError(_SKIP_REASON)
    png = Path(out_png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)

    with tempfile.TemporaryDirectory(prefix="mnpo-chromium-", ignore_cleanup_errors=True) as tmp:
        # Chromium keeps crash reports and dconf state under XDG dirs, not the profile:
        # point those at the temp dir too, so nothing lands in $HOME.
        env = dict(os.environ, XDG_CONFIG_HOME=tmp, XDG_CACHE_HOME=tmp)
        base = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={Path(tmp) / 'profile'}"]
        if virtual_time_ms is not None:
            base.append(f"--virtual-time-budget={int(virtual_time_ms)}")
        url = html.as_uri()

        cmd = [*base, f"--window-size={width},{height}", f"--screenshot={png}", "--dump-dom", url]
        rc, dom, err = _run(cmd, env, timeout)
        if rc != 0 or not png.is_file():
            problem = f"exited with {rc}" if rc != 0 else f"wrote no screenshot to {png}"
            raise RuntimeError(f"Chromium {problem}: {' '.join(cmd)}\n"
                               f"stderr (tail):\n{_stderr_tail(err)}")
        if not dom.strip():
            cmd = [*base, f"--window-size={width},{height}", "--dump-dom", url]
            rc, dom, err = _run(cmd, env, timeout)
            if rc != 0 or not dom.strip():
                raise RuntimeError(f"Chromium printed no DOM (exit {rc}): {' '.join(cmd)}\n"
                                   f"stderr (tail):\n{_stderr_tail(err)}")
    return dom


def is_blank(png_path: str | os.PathLike[str], *, tolerance: float = 1.0) -> bool:
    """Whether an image shows (nearly) a single colour.

    Rule: after conversion to RGB, the image is blank if it has one distinct colour,
    or if the standard deviation of all its pixel values (R, G and B pooled) is below
    ``tolerance``. With the default 1.0, black on white counts as content once it
    covers more than about 1.5e-5 of the area (some 47 pixels of a 1280 x 2400 shot).
    """
    with Image.open(png_path) as im:
        rgb = im.convert("RGB")
    if rgb.getcolors(1) is not None:
        return True
    stat = ImageStat.Stat(rgb)
    n = sum(stat.count)
    mean = sum(stat.sum) / n
    var = max(0.0, sum(stat.sum2) / n - mean * mean)
    return var ** 0.5 < tolerance

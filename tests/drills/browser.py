"""Headless Chromium for the UI drill: Debian's ``chromium`` + ``chromium-driver``, driven by Selenium.

When they are missing and we are root with apt-get (CI), ``ensure_chromium()`` installs the two
Debian packages first, as the distributed drills install PostgreSQL (``MODELROUTE_INSTALL_CHROMIUM=0``
turns that off); otherwise, or when apt-get fails, the drill is skipped with the reason. Nothing is
downloaded by Selenium itself: the browser and driver paths are given explicitly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

PACKAGES = ("chromium", "chromium-driver")
#: Headless, no sandbox (root in a container), and nothing that reaches out to the network by itself.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


def _installed() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


#: Why the UI drill cannot run here, or None: checked before its Airflow stack starts.
MISSING_REASON = (
    None
    if _installed()
    or (
        os.environ.get("MODELROUTE_INSTALL_CHROMIUM") != "0" and shutil.which("apt-get") and os.geteuid() == 0
    )
    else f"chromium is not installed: apt-get install {' '.join(PACKAGES)} (as root, the drill installs "
    "them itself unless MODELROUTE_INSTALL_CHROMIUM=0)"
)


def ensure_chromium() -> tuple[str, str]:
    """The paths of chromium and chromedriver, installing Debian's packages if needed (or skip)."""
    found = _installed()
    if found:
        return found
    if MISSING_REASON:
        pytest.skip(MISSING_REASON)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES])
    for step in steps:
        done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium: {' '.join(step)} failed: {done.stderr[-500:]}")
    found = _installed()
    if not found:
        pytest.skip(f"apt-get installed {PACKAGES} but chromium or chromedriver is not on PATH")
    return found


@contextmanager
def headless_chromium() -> Iterator[Any]:
    """A Selenium driver for a fresh headless Chromium profile, quit (and its profile removed) after."""
    pytest.importorskip("selenium", reason="selenium (the test dependency group) drives the browser")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = ensure_chromium()
    profile = Path(tempfile.mkdtemp(prefix="modelroute-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)

"""index.html opens from disk in a real browser (headless Chromium) with every chart loaded.

Without Chromium the browser test skips, with its reason, on a developer's machine; under CI (CI=true, as .ci/run
sets it, after installing Debian's chromium) it fails, so that CI never passes with the browser check unrun.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping

import pytest

from properties.checks.test_streaming import _lora_file
from verify.cli import main
from verify.models import qwen_image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
         " document.body.dataset.images = imgs.length + ':' + imgs.filter(i => i.complete && i.naturalWidth > 0)"
         ".length; });</script>")


NO_CHROMIUM = "no Chromium installed (Debian package 'chromium'); .ci/run installs it"


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """CI=true (or 1, yes): the same rule that picks the ci Hypothesis profile."""
    return environ.get("CI", "").lower() in ("1", "true", "yes")


def chromium(which: Callable[[str], str | None] = shutil.which, environ: Mapping[str, str] = os.environ) -> str:
    """The Chromium binary; without one, fail under CI and skip (with the reason) elsewhere."""
    found = which("chromium") or which("chromium-browser")
    if found:
        return found
    if in_ci(environ):
        pytest.fail(f"{NO_CHROMIUM}; under CI (CI={environ['CI']}) the browser test must run, not skip", pytrace=False)
    pytest.skip(NO_CHROMIUM)


def _outcome(call: Callable[[], object]) -> BaseException | None:
    """What `call` raised, a pytest skip or fail included (caught here, so a skip cannot pass for a pass)."""
    try:
        call()
    except (pytest.skip.Exception, pytest.fail.Exception) as e:
        return e
    return None


@pytest.mark.parametrize("ci", ["true", "1", "TRUE", "yes"])
def test_without_chromium_ci_fails_instead_of_skipping(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    outcome = _outcome(lambda: chromium(which=lambda name: None))
    assert isinstance(outcome, pytest.fail.Exception) and f"CI={ci}) the browser test must run" in str(outcome), outcome


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_without_chromium_outside_ci_skips_with_its_reason(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    outcome = _outcome(lambda: chromium(which=lambda name: None))
    assert isinstance(outcome, pytest.skip.Exception) and str(outcome) == NO_CHROMIUM, outcome


@pytest.mark.parametrize("ci", ["true", "false"])
def test_an_installed_chromium_is_used_in_and_outside_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    assert chromium(which={"chromium-browser": "/usr/bin/chromium-browser"}.get) == "/usr/bin/chromium-browser"
    assert chromium(which=lambda name: f"/opt/{name}") == "/opt/chromium"


def test_every_chart_loads_in_headless_chromium(tmp_path):
    browser = chromium()
    _lora_file(tmp_path, qwen_image.model_config("tiny"))
    out = tmp_path / "report"
    assert main(["report", "--lora", str(tmp_path / "lora.safetensors"), "--dtypes", "fp64,fp32,bf16",
                 "--out", str(out)]) == 0
    page = out / "probe.html"
    page.write_text((out / "index.html").read_text().replace("</body>", PROBE + "</body>"))
    dom = subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-images="(\d+):(\d+)"', dom)
    assert found, "the page did not finish loading in Chromium"
    total, loaded = map(int, found.groups())
    charts = {p.name for p in out.glob("*.png")}
    assert total == len(charts) == 4, (total, charts)
    assert loaded == total, f"{total - loaded} of {total} charts did not load"

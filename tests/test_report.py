"""The report renders its clusters in a real headless browser; labels are escaped."""

import html as html_module
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from diffmine.report import ReportConfig, render, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_has_every_label_its_clusters_and_the_comparison(trained_run):
    path = write_report(trained_run, ReportConfig(clusters=4))
    html = path.read_text()
    for label in trained_run.labels:
        assert f"<h2>{label}</h2>" in html
    assert html.count('class="row cluster"') >= len(trained_run.labels) * 2
    for kind in ("top", "least", "random"):
        assert f'data-kind="{kind}"' in html
    assert "data:image/png;base64," in html and "src=\"http" not in html  # self-contained
    assert '"resolution": 64' in html_module.unescape(html)  # the settings used


def test_label_names_are_escaped():
    context = {"title": "t", "labels": [{"name": "<script>alert(1)</script>", "prompt": "A <b>", "clusters": [],
                                         "examples": [], "compare": [], "images": 0, "mean_typicality": 0.0}],
               "settings": "{}", "problems": [], "problem_count": 0, "evaluation": None, "crop_px": 64}
    html = render(context)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make browser` installs it)")
def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    path = write_report(trained_run, ReportConfig(clusters=4))
    url = path.resolve().as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="row cluster"') >= len(trained_run.labels) * 2
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, f"--screenshot={shot}", "--window-size=1200,900", url],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    # crops and heat maps drawn: far from a blank page, with many distinct colours
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 200

"""`ddpmkit report`: one self-contained HTML page, opened in a real headless browser (Debian's
chromium, through Playwright): it loads with no console errors, every image renders, the
screenshot is not blank, and the numbers on the page are those of eval.json, analysis.json and
metrics.jsonl."""

import io
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import small_run
from PIL import Image, ImageStat

from ddpmkit.cli import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _run(runner, out, tiny_args, digit_cache, *extra):
    args = small_run(max_steps=None)  # whole epochs: a grid and an eval each
    r = runner.invoke(cli, ["run", "--out", str(out), *args, "--epochs", "2", "--grid-every", "1",
                            "--metric", "digit-score", "--eval-every", "1", "--eval-samples", "12",
                            "--sampler", "ddim", "--steps", "4", "--set", f"metric.cache_dir={digit_cache}", *extra])
    assert r.exit_code == 0, r.output
    return out


def test_report_of_two_runs_in_a_headless_browser(tmp_path, tiny_args, digit_cache):
    runner = CliRunner()
    a = _run(runner, tmp_path / "a", tiny_args, digit_cache)
    b = _run(runner, tmp_path / "b", tiny_args, digit_cache, "--lr", "1e-3")
    r = runner.invoke(cli, ["analyze", str(a), "-n", "16", "--sampler", "ddim", "--steps", "3", "--no-progress",
                            "--device", "cpu", "--set", f"metric.cache_dir={digit_cache}"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["report", str(a)])
    assert r.exit_code == 0, r.output
    page = (a / "report.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained
    assert page.count("data:image/png;base64,") >= 7  # loss, metrics, 2 epoch grids, samples, forward, analysis
    r = runner.invoke(cli, ["report", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "is not a run directory (no config.json)" in r.stderr
    out = tmp_path / "report.html"
    r = runner.invoke(cli, ["report", str(a), str(b), "--out", str(out)])
    assert r.exit_code == 0, r.output
    if CHROMIUM is None:
        pytest.skip("no chromium here (.ci/run installs Debian's chromium): the page was not opened in a browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a test extra) is not installed")

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
        page.goto(out.as_uri(), wait_until="load")
        images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        cells = page.evaluate("""Array.from(document.querySelectorAll('td[data-key]')).map(td =>
            [td.closest('section').id, td.dataset.run, td.dataset.key, td.dataset.value, td.textContent])""")
        shot = page.screenshot(full_page=True)
        browser.close()

    assert problems == []
    assert len(images) >= 12 and all(done and width > 0 for _, done, width in images), images
    shot = Image.open(io.BytesIO(shot)).convert("L")
    stat = ImageStat.Stat(shot)
    assert shot.size[1] > 2000 and stat.stddev[0] > 20 and len(shot.getcolors(1 << 16)) > 50  # not blank

    # the numbers on the page are the files' numbers
    final = json.loads((a / "eval.json").read_text())["results"]
    analysis = json.loads((a / "analysis" / "analysis.json").read_text())["results"]
    losses = [json.loads(l)["loss"] for l in (a / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    shown = {(sec, int(run), key): (float(value), text) for sec, run, key, value, text in cells}
    for key, value in final.items():
        assert shown[("run-0", 0, key)] == (value, f"{value:.6g}")
        assert shown[("comparison", 0, key)][0] == value
    for key, value in analysis.items():
        if not key.startswith("digit_is_class_"):
            assert shown[("run-0", 0, "analysis." + key)][0] == value
    assert {"memorized_share", "nn_distance_median"} <= set(analysis)
    assert shown[("run-0", 0, "final loss")][0] == losses[-1]
    b_final = json.loads((b / "eval.json").read_text())["results"]
    assert shown[("comparison", 1, "digit_is")][0] == shown[("run-1", 1, "digit_is")][0] == b_final["digit_is"]

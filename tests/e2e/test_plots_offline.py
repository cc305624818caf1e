"""`dvc plots show` / `dvc plots diff` with the offline template, drawn by a real Chromium with the network cut.

DVC's default page loads vega from cdn.jsdelivr.net and stays blank offline; `.dvc/plots/offline.html`
(scripts/build_plots_template.py) inlines vega, vega-lite and vega-embed and renders marks as SVG.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

from tests.conftest import ROOT, run

TEMPLATE = ROOT / ".dvc/plots/offline.html"
SFT_PLOTS = ("metrics/sft/loss.json", "metrics/sft/learning_rate.json", "metrics/sft/grad_norm.json")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Per chart: its div id, how many SVG roots, how many drawn line/bar/point marks (a path with a real shape),
# and the values in the legend (the revisions of a diff).
CHARTS_JS = """() => [...document.querySelectorAll('div.vega-embed')].map(d => ({
    id: d.id,
    svgs: d.querySelectorAll('svg.marks').length,
    marks: [...d.querySelectorAll('g.mark-line path, g.mark-rect path, g.mark-symbol path')]
        .filter(p => (p.getAttribute('d') || '').length > 10).length,
    legend: [...d.querySelectorAll('g.role-legend-label text')].map(t => t.textContent),
}))"""


def dvc(proj: Path, *args: str):
    return run([sys.executable, "-m", "dvc", *args], proj)


def use_offline_template(proj: Path) -> None:
    """What the real repo has: the template in .dvc/plots/ and `plots.html_template` in .dvc/config."""
    (proj / ".dvc/plots").mkdir(exist_ok=True)
    shutil.copy(TEMPLATE, proj / ".dvc/plots/offline.html")
    dvc(proj, "config", "plots.html_template", "plots/offline.html")


def render_offline(html: Path, screenshot: Path, expected_charts: int) -> tuple[list[dict], list[str]]:
    """Open a plots page in headless Chromium where every request that is not a local file is refused."""
    from playwright.sync_api import sync_playwright

    refused: list[str] = []
    errors: list[str] = []

    def only_local(route):
        url = urlparse(route.request.url)
        if url.scheme in ("file", "data", "blob") or url.hostname in ("localhost", "127.0.0.1"):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.route("**/*", only_local)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(html.as_uri())
            page.wait_for_function(
                f"document.querySelectorAll('div.vega-embed svg.marks').length >= {expected_charts}",
                timeout=30_000,
            )
            charts = page.evaluate(CHARTS_JS)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert not errors, f"page errors: {errors}"
    return charts, refused


def test_plots_show_draws_sft_curves_offline(project, tmp_path):
    proj = project()
    use_offline_template(proj)
    dvc(proj, "repro", "sft")

    shown = dvc(proj, "plots", "show", *SFT_PLOTS)  # no --html-template: .dvc/config names the template
    html = proj / "dvc_plots/index.html"
    assert html.as_uri() in shown.stdout
    page = html.read_text()
    assert "cdn.jsdelivr.net" not in page and "vegaEmbed(" in page and "vega@5.33.1" in page

    charts, refused = render_offline(html, tmp_path / "plots.png", expected_charts=2)
    assert refused == []  # the page asked for nothing outside the file
    drawn = {c["id"]: c for c in charts}
    for plot in ("metrics/sft/learning_rate.json", "metrics/sft/grad_norm.json"):
        chart = drawn[plot.replace("/", "_").replace(".", "_")]
        assert chart["svgs"] == 1 and chart["marks"] >= 1, chart
    assert (tmp_path / "plots.png").stat().st_size > 10_000

    # The loss curve is the one that matters. DVC only plots files whose rows all have the same keys; a
    # file mixing train rows {step, loss} and eval rows {step, eval_loss} fails to load, and DVC drops it.
    assert drawn["metrics_sft_loss_json"]["marks"] >= 1, (
        f"no sft loss curve; dvc plots show said: {shown.stderr}"
    )
    assert "WARNING" not in shown.stderr, shown.stderr


def test_plots_diff_shows_both_revisions_offline(project, tmp_path):
    proj = project()
    use_offline_template(proj)
    dvc(proj, "repro", "sft")
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "baseline"], proj)
    dvc(proj, "exp", "run", "--name", "lr-low", "-S", "sft.learning_rate=1.0e-3", "sft")

    targets = ("--targets", "metrics/sft/learning_rate.json", "metrics/sft/grad_norm.json")
    dvc(proj, "plots", "diff", "HEAD", "lr-low", "--html-template", str(TEMPLATE), *targets)
    data = json.loads(dvc(proj, "plots", "diff", "HEAD", "lr-low", "--json", *targets).stdout)["data"]
    (plot,) = data["metrics/sft/learning_rate.json"]
    assert set(plot["revisions"]) == {"HEAD", "lr-low"}
    lrs = {(p["rev"], p["step"]): p["learning_rate"] for p in plot["content"]["data"]["values"]}
    assert lrs[("lr-low", 2)] < lrs[("HEAD", 2)]  # peak after warm-up: 1e-3 vs the tiny profile's 1e-2

    charts, refused = render_offline(proj / "dvc_plots/index.html", tmp_path / "diff.png", expected_charts=2)
    assert refused == []
    for chart in charts:
        assert chart["marks"] >= 2, chart  # one line per revision
        assert {"HEAD", "lr-low"} <= set(chart["legend"]), chart

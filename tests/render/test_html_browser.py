"""The HTML pages of a real tiny run, rendered by headless Chromium: no console error, no request beyond the
file itself, every heatmap and figure drawn (non-blank in a screenshot), the table sorts, and the side-by-side
page carries every run's label in every figure."""

from __future__ import annotations

import pytest
from headless import Browser, blank_fraction, chromium_path, save

FIGURES_JS = """JSON.stringify(Array.from(document.querySelectorAll('svg.figure')).map(function(e){
  var r = e.getBoundingClientRect(), f = e.closest('figure');
  return {kind: e.getAttribute('class').split(' ')[1], key: f ? f.dataset.key : '', x: r.left + scrollX,
          y: r.top + scrollY, w: r.width, h: r.height, text: e.textContent,
          open: !e.closest('details') || e.closest('details').open,
          cells: e.querySelectorAll('rect.cell').length, nm: e.querySelectorAll('rect.cell.nm').length};}))"""


@pytest.fixture(scope="module")
def browser():
    b = Browser(chromium_path())
    yield b
    b.close()


def _check_page(browser, path, name: str) -> list[dict]:
    import json

    page = browser.open(path.as_uri())
    # open the folded sections so that every figure is laid out and can be photographed
    page.evaluate("document.querySelectorAll('details').forEach(function(d){d.open = true;})")
    errors = page.console_errors()
    assert not errors, f"{name}: console errors {errors}"
    requests = page.requests()
    assert requests == [path.as_uri()], f"{name}: requests beyond the page itself: {requests}"
    figures = json.loads(page.evaluate(FIGURES_JS))
    assert figures, f"{name}: no figure on the page"
    full = page.screenshot()
    save(full, f"{name}.png")
    for i, f in enumerate(figures):
        assert f["w"] > 100 and f["h"] > 60, f"{name}: figure {f['key']} is not laid out: {f}"
        img = page.screenshot({"x": f["x"], "y": f["y"], "width": f["w"], "height": f["h"]})
        white, colours = blank_fraction(img)
        assert white < 0.97 and colours > 8, f"{name}: figure {f['kind']} {f['key']} looks blank ({white:.3f} white)"
        if f["kind"] == "heatmap":
            assert f["cells"] > 0
            # a heatmap's cells carry colours: the painted area has more than a handful of them
            assert colours > 12, f"{name}: heatmap {f['key']} has {colours} colours"
        save(img, f"{name}/{i:02d}-{f['kind']}-{f['key']}.png")
    return figures


def test_comparison_page_renders_offline_with_every_figure(browser, tiny_run):
    figures = _check_page(browser, tiny_run.pair_page, "pair")
    kinds = {(f["kind"], f["key"]) for f in figures}
    for key in ("update_sparsity", "max_principal_angle", "spectral_drift", "density", "low_magnitude_overlap"):
        assert ("heatmap", key) in kinds, f"no heatmap of {key}"
    assert ("bars", "localization") in kinds and ("bars", "update_sparsity") in kinds
    # both fine-tunes are in every heatmap, on one scale (one colour bar per figure)
    for f in figures:
        if f["kind"] == "heatmap":
            assert "SFT" in f["text"] and "RLVR" in f["text"]


def test_trajectory_page_marks_the_locking_onset(browser, tiny_run):
    figures = _check_page(browser, tiny_run.traj_page, "trajectory")
    keys = {f["key"] for f in figures}
    assert {"stable_rank", "final_subspace_similarity", "locking_onset"} <= keys
    sim = next(f for f in figures if f["kind"] == "lines" and f["key"] == "final_subspace_similarity")
    assert "onset step" in sim["text"] and "threshold 0.9" in sim["text"]


def test_side_by_side_page_carries_every_label_and_sorts(browser, tiny_run):
    import json

    figures = _check_page(browser, tiny_run.side_page, "side_by_side")
    page = browser.open(tiny_run.side_page.as_uri())
    header = page.evaluate("document.querySelector('#headline thead').textContent")
    for label in tiny_run.side_labels[:2]:
        assert label in header
    assert tiny_run.side_labels[2] in page.evaluate("document.body.textContent")
    for f in figures:
        pair_figure = tiny_run.side_labels[2] not in f["text"]  # the trajectory has its own update_sparsity map
        if f["kind"] == "heatmap" and f["open"] and f["key"] in ("update_sparsity", "spectral_drift") and pair_figure:
            assert all(lb in f["text"] for lb in tiny_run.side_labels[:2]), f"{f['key']} lacks a run label"
    # the table sorts by a column when its header is clicked (the page's only script)
    first = """(function(){var t = document.getElementById('rows-pairs'); var th = Array.from(t.tHead.rows[0].cells)
      .find(function(c){return c.textContent.indexOf('spectral_drift') === 0;}); th.click();
      var i = Array.from(t.tHead.rows[0].cells).indexOf(th);
      return JSON.stringify(Array.from(t.tBodies[0].rows).map(function(r){return r.cells[i].dataset.v;}));})()"""
    values = [float(v) for v in json.loads(page.evaluate(first)) if v is not None]
    assert values == sorted(values) and len(values) > 10
    assert not page.console_errors()

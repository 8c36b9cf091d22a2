"""README.md and docs/: every internal link resolves (the file, and the heading an anchor names),
every picture they show exists, and the README stays a five-minute read that opens with the
commands."""
import os
import re

from conftest import ROOT

PAGES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))
                               if name.endswith(".md"))


def anchors(path):
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens (a repeated heading gets -1, -2, ...)."""
    seen, out, inside_code = {}, set(), False
    for line in open(os.path.join(ROOT, path)):
        if line.startswith("```"):
            inside_code = not inside_code
        if inside_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def links(path):
    """The (file, anchor) of each markdown link and picture of a page, outside code blocks."""
    text = re.sub(r"```.*?```", "", open(os.path.join(ROOT, path)).read(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+://", target):
            file, _, anchor = target.partition("#")
            yield file, anchor


def test_every_internal_link_and_picture_resolves():
    broken = []
    for page in PAGES:
        for file, anchor in links(page):
            target = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
            if not os.path.exists(os.path.join(ROOT, target)):
                broken.append(f"{page}: {file} (no such file)")
            elif anchor and anchor not in anchors(target):
                broken.append(f"{page}: {file}#{anchor} (no such heading)")
    assert not broken, broken
    assert sum(1 for page in PAGES for _ in links(page)) > 20  # the pages do link


def test_the_readme_is_short_and_opens_with_the_install_and_a_run():
    lines = open(os.path.join(ROOT, "README.md")).read().splitlines()
    head = "\n".join(lines[:40])
    assert len(lines) <= 300
    assert "pip install -r requirements.txt" in head and "mocov2_asym.py" in head and "pytest -q tests" in head


def test_the_ci_runs_the_readmes_install_and_test_commands():
    readme, ci = (open(os.path.join(ROOT, p)).read() for p in ("README.md", ".ci/run"))
    for command in (".venv/bin/pip install -r requirements.txt", ".venv/bin/python -m pytest -q tests"):
        assert command in readme and command in ci


def test_the_tutorial_runs_end_to_end_in_its_fast_mode(tmp_path):
    """docs/tutorial.py --fast as a plain script: every step's output, each made by the project's own
    code (the gallery, both runs' monitors, Fig. 2 on the trained and the random encoder, the
    gradient noise, the published study read back); and its cells in the percent format."""
    import subprocess
    import sys
    out = tmp_path / "tutorial"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "tutorial.py"), "--fast", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "gallery" / "views.png").read_bytes()[:4] == b"\x89PNG"
    for run in ("baseline", "asym"):
        records = [line for line in open(out / run / "log.jsonl") if "v_source" in line]
        assert len(records) == 2, run  # before training and at the end
    for fig2 in ("fig2_trained", "fig2_random"):
        assert "pairs of designs in the paper's order" in (out / fig2 / "variance.md").read_text()
    noise = (out / "grad_noise" / "gradient_noise.md").read_text()
    assert "| MultiCrop target |" in noise and "| MeanEnc (1,3) |" in noise
    if os.path.exists(os.path.join(ROOT, "docs", "table1", "results-12ep.jsonl")):
        assert "Spearman rho" in (out / "table1" / "table.md").read_text()
    cells = open(os.path.join(ROOT, "docs", "tutorial.py")).read().split("\n# %%")
    assert len(cells) > 10 and sum(cell.startswith(" [markdown]") for cell in cells) >= 6

"""The student's and instructor's view in a real browser: JupyterLab + Chromium (Playwright).

Runs lab 1 through the JupyterLab UI (QUICK on), moves the attention explorer's slider,
presses nbgrader's Validate button, and opens the formgrader on graded submissions.
Screenshots land in the work folder. Run with `make test-browser`.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB = "01-attention"
CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make system)")]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A private copy of the course with graded sample submissions, and JupyterLab serving it."""
    base = tmp_path_factory.mktemp("browser")
    course = base / "course"
    for part in ("labs", "solutions", "grading", "tests/fixtures"):
        shutil.copytree(ROOT / part, course / part)
    shots = ROOT / "work" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    for where in ("labs", "solutions"):  # the student sets QUICK = True for a quick pass
        path = course / where / LAB / "attention.ipynb"
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if "parameters" in cell.metadata.get("tags", []):
                cell.source = re.sub(r"(?m)^QUICK = .*$", "QUICK = True", cell.source)
        nbformat.write(nb, path)
    settings = base / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)  # render every cell (no windowing), so the test can find outputs
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    news = base / "lab-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {**os.environ, "LLMLAB_ROOT": str(course), "LLMLAB_WORK": str(course / "work"),
           "JUPYTERLAB_SETTINGS_DIR": str(base / "lab-settings"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-c", "from llmlab.grading import samples; from pathlib import Path; "
                    f"samples.write('{LAB}', Path('{course}/subs'))"], env=env, check=True)
    _script_submission(course / "subs" / "xss" / "attention.ipynb", course / "solutions" / LAB / "attention.ipynb")
    subprocess.run([sys.executable, "-m", "llmlab.cli", "grade", LAB, str(course / "subs"), "--no-progress"],
                   env=env, check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    log = open(base / "jupyter.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={course}", "--allow-root",
         f"--LabApp.workspaces_dir={base / 'workspaces'}",
         "--LabApp.news_url=", "--ServerApp.disable_check_xsrf=False"],
        cwd=course / "grading", env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield {"root": course, "url": f"http://127.0.0.1:{port}", "token": token, "shots": shots}
    server.terminate()
    server.wait(timeout=30)


XSS = ("<img src=x onerror=\"document.title='XSS'\"> <svg onload=\"document.title='XSS'\"></svg> "
       "[click me](javascript:document.title='XSS')")


def _script_submission(dest: Path, solution: Path) -> None:
    """The solution, with scripts in its written answer and in what a solution cell prints."""
    nb = nbformat.read(solution, as_version=4)
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "markdown" and meta.get("solution"):
            cell.source = "My answer. " + XSS
        elif cell.cell_type == "code" and meta.get("grade_id") == "masks":
            cell.source += "\nprint('<script>document.title=\"XSS\"</script><img src=x onerror=\"document.title=\\'XSS\\'\">')"
    dest.parent.mkdir(parents=True)
    nbformat.write(nb, dest)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, course, path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{course['url']}/lab/tree/{path}?token={course['token']}&reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator, .jp-KernelStatus, #jp-main-statusbar", timeout=60_000)
    page.wait_for_timeout(2000)
    page.screenshot(path=str(course["shots"] / f"open-{path.split('/')[0]}.png"))
    return page


def _run_all_and_save(page, timeout_s: int = 240) -> None:
    page.locator(".jp-NotebookPanel:visible .jp-Notebook").first.click()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline = time.time() + timeout_s
    time.sleep(3)
    while time.time() < deadline:  # running cells show "[*]"
        prompts = page.locator(".jp-NotebookPanel:visible .jp-InputArea-prompt").all_inner_texts()
        if prompts and not any("*" in p for p in prompts):
            break
        time.sleep(1)
    else:
        pytest.fail("cells still running after the time limit")
    page.keyboard.press("Control+s")
    time.sleep(2)


def _run_cells_containing(page, snippets: list[str], timeout_s: int = 120) -> None:
    """Run, one at a time, the first code cell containing each snippet (as a student clicking through)."""
    for snippet in snippets:
        cell = page.locator(".jp-NotebookPanel:visible .jp-CodeCell", has_text=snippet).first
        cell.scroll_into_view_if_needed(timeout=60_000)
        cell.locator(".jp-InputArea-editor").click(timeout=60_000)  # edit mode in this cell
        page.keyboard.press("Control+Enter")  # run it
        time.sleep(1)
        deadline = time.time() + timeout_s
        while "*" in cell.locator(".jp-InputArea-prompt").inner_text() and time.time() < deadline:
            time.sleep(0.5)


def _errors(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _explorer_responds(page) -> None:
    widget = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output .widget-slider").last
    widget.scroll_into_view_if_needed(timeout=30_000)
    widget.wait_for(timeout=30_000)
    widget.scroll_into_view_if_needed()
    area = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output:has(.widget-slider)").last
    before = area.locator("img").first.get_attribute("src")
    handle = widget.locator(".noUi-handle, input[type=range], .ui-slider-handle").first
    handle.click()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    deadline = time.time() + 20
    while time.time() < deadline and area.locator("img").first.get_attribute("src") == before:
        time.sleep(0.5)
    assert area.locator("img").first.get_attribute("src") != before, "the explorer did not redraw after the slider moved"


def _validate(page) -> str:
    page.get_by_role("toolbar", name="main area toolbar").get_by_text("Validate", exact=True).click()
    dialog = page.locator(".jp-Dialog-content")
    dialog.wait_for(timeout=120_000)
    page.wait_for_timeout(1000)
    text = dialog.inner_text()
    return text


def test_student_copy_in_the_browser(browser, course):
    page = _open(browser, course, f"labs/{LAB}/attention.ipynb")
    # the setup and the model explorer run before any exercise is solved
    _run_cells_containing(page, ["QUICK = True", "from llmlab import", "AutoModel.from_pretrained", "attention_explorer("])
    page.keyboard.press("Control+s")
    time.sleep(2)
    assert _errors(course["root"] / "labs" / LAB / "attention.ipynb") == []
    _explorer_responds(page)
    page.screenshot(path=str(course["shots"] / "student-explorer.png"))
    verdict = _validate(page)
    page.screenshot(path=str(course["shots"] / "student-validate.png"))
    assert "fail" in verdict.lower() or "error" in verdict.lower(), verdict


def test_solution_in_the_browser(browser, course):
    page = _open(browser, course, f"solutions/{LAB}/attention.ipynb")
    _run_all_and_save(page)
    assert _errors(course["root"] / "solutions" / LAB / "attention.ipynb") == []
    _explorer_responds(page)
    verdict = _validate(page)
    page.screenshot(path=str(course["shots"] / "solution-validate.png"))
    assert "success" in verdict.lower() or "passes" in verdict.lower(), verdict


def test_formgrader_shows_the_graded_submissions(browser, course):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{course['url']}/lab?token={course['token']}")  # logs in (sets the session cookie)
    page.wait_for_selector(".jp-LabShell", timeout=60_000)
    page.goto(f"{course['url']}/formgrader/gradebook/{LAB}/attention")
    try:
        page.wait_for_selector("a.name-shown", state="attached", timeout=60_000)  # names start hidden
    finally:
        page.screenshot(path=str(course["shots"] / "formgrader.png"))
    text = page.content()
    for student in ("solution", "untouched", "partial"):
        assert student in text


def _no_script_ran(page, shot: Path) -> None:
    page.wait_for_timeout(2000)
    page.screenshot(path=str(shot), full_page=False)
    assert page.title() != "XSS", "a script from the student's submission ran"
    assert page.evaluate("document.querySelectorAll('img[onerror], svg[onload], a[href^=\"javascript\"]').length") == 0


def test_a_script_in_an_answer_runs_neither_in_feedback_nor_in_the_formgrader(browser, course):
    feedback = course["root"] / "work" / "feedback" / "xss" / LAB / "attention.html"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(feedback.as_uri())
    page.get_by_text("My answer.").first.wait_for(timeout=30_000)
    _no_script_ran(page, course["shots"] / "feedback-script.png")

    env = {**os.environ, "LLMLAB_ROOT": str(course["root"]), "LLMLAB_WORK": str(course["root"] / "work")}
    found = subprocess.run([sys.executable, "-c", "from llmlab.grading import pipeline\n"
                            f"with pipeline._gradebook() as gb:\n    print(gb.find_submission_notebook('attention', '{LAB}', 'xss').id)"],
                           env=env, capture_output=True, text=True, check=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(f"{course['url']}/lab?token={course['token']}")
    page.wait_for_selector(".jp-LabShell", timeout=60_000)
    page.goto(f"{course['url']}/formgrader/submissions/{found.stdout.strip()}/?index=0")
    page.get_by_text("My answer.").first.wait_for(timeout=60_000)
    _no_script_ran(page, course["shots"] / "formgrader-script.png")


def test_the_chinese_copy_in_the_browser(browser, course):
    page = _open(browser, course, f"labs/zh/{LAB}/attention.ipynb")
    page.locator(".jp-NotebookPanel:visible .jp-RenderedMarkdown", has_text="注意力").first.wait_for(timeout=60_000)
    verdict = _validate(page)
    page.screenshot(path=str(course["shots"] / "student-validate-zh.png"))
    assert "fail" in verdict.lower() or "error" in verdict.lower(), verdict

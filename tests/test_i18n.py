"""The course in Chinese: the message catalogue, the student's language, the translation gate,
the Chinese release and grading a Chinese submission to exactly the English points."""
from __future__ import annotations

import ast
import io
import math
import re
import shutil
import tokenize
from collections import Counter

import nbformat
import pytest
import torch
from conftest import ROOT

from llmlab import checks, course, i18n
from llmlab.grading import pipeline, samples, sanitize

LAB = "01-attention"
CJK = re.compile(r"[\u4e00-\u9fff]")
PLACEHOLDER = re.compile(r"\{[^{}]*\}")
POT = ROOT / "lib" / "llmlab" / "locale" / "llmlab.pot"
PO = ROOT / "lib" / "llmlab" / "locale" / "zh" / "LC_MESSAGES" / "llmlab.po"


def _catalog(path):
    from babel.messages.pofile import read_po

    with open(path, "rb") as f:
        return {m.id: m.string for m in read_po(f) if m.id}


# ----------------------------------------------------------------------------------------
# Which language


@pytest.fixture
def no_language(monkeypatch):
    for var in ("LLMLAB_LANG", "JPY_SESSION_NAME", "LC_ALL", "LC_MESSAGES", "LANG"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_language_comes_from_the_variable_then_the_notebook_then_the_locale(no_language, tmp_path):
    env = no_language
    assert i18n.language() == "en"
    env.setenv("LANG", "zh_CN.UTF-8")
    assert i18n.language() == "zh"
    env.setenv("LC_ALL", "C.UTF-8")  # LC_ALL comes before LANG
    assert i18n.language() == "en"
    nb = nbformat.v4.new_notebook()
    nb.metadata["language"] = "zh"
    nbformat.write(nb, tmp_path / "attention.ipynb")
    env.chdir(tmp_path)  # Jupyter starts the kernel in the notebook's folder, with its path relative to the server root
    env.setenv("JPY_SESSION_NAME", "labs/zh/01-attention/attention.ipynb")
    assert i18n.language() == "zh"
    env.setenv("LLMLAB_LANG", "en")
    assert i18n.language() == "en"
    env.setenv("LLMLAB_LANG", "zh-Hans")
    assert i18n.language() == "zh"


# ----------------------------------------------------------------------------------------
# The catalogue


def test_catalogue_is_extracted_from_the_code():
    from babel.messages.extract import extract_from_dir

    keywords = {"_": None, "N_": None, "ngettext": (1, 2)}
    found = {m for _, _, m, _, _ in extract_from_dir(str(ROOT / "lib" / "llmlab"), [("**.py", "python")], keywords)}
    committed = set(_catalog(POT))
    assert found == committed, ("lib/llmlab/locale/llmlab.pot is out of date: run the pybabel extract + update of "
                                f"lib/llmlab/locale/README.md (new: {sorted(found - committed)[:3]}, "
                                f"gone: {sorted(committed - found)[:3]})")


def test_every_message_has_a_chinese_translation_with_the_same_placeholders():
    zh = _catalog(PO)
    avoid = {bad: term for term, g in i18n.glossary("zh").items() for bad in g["avoid"]}
    for msgid in _catalog(POT):
        ids = msgid if isinstance(msgid, tuple) else (msgid,)
        strings = zh.get(msgid)
        strings = strings if isinstance(strings, tuple) else (strings,)
        assert strings and all(strings), f"no Chinese for {ids[0]!r}"
        for text in strings:
            words = re.findall(r"(?<![\w.=])[a-z]{3,}(?![\w(=.])", PLACEHOLDER.sub(" ", ids[0]))
            assert CJK.search(text) or len(words) < 3, f"{ids[0]!r} -> {text!r} is not Chinese"
            assert sorted(PLACEHOLDER.findall(text)) == sorted(PLACEHOLDER.findall(ids[-1])), (ids[0], text)
            bad = [b for b in avoid if b in text]
            assert not bad, f"{text!r} uses {bad}; the glossary says {[i18n.glossary('zh')[avoid[b]]['zh'] for b in bad]}"


def _scopes(tree):
    """Each function, lambda and comprehension with the names bound and the names called directly in it."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
    for scope in [tree, *(n for n in ast.walk(tree) if isinstance(n, kinds))]:
        stack, bound, called = list(ast.iter_child_nodes(scope)), set(), set()
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                called.add(node.func.id)
            if not isinstance(node, kinds):
                stack.extend(ast.iter_child_nodes(node))
        yield scope, bound, called


def test_translated_messages_are_templates_and_underscore_is_never_rebound():
    for path in sorted((ROOT / "lib" / "llmlab").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("_", "N_"):
                arg = node.args[0] if node.args else None
                literal = isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                marked = node.func.id == "_" and isinstance(arg, ast.Name)  # a message marked with N_ where it is defined
                assert literal or marked, \
                    f"{path.name}:{node.lineno}: _() takes one plain string (format after: _('... {{x}}').format(x=...))"
        for scope, bound, called in _scopes(tree):
            if scope is not tree:
                assert not ("_" in bound and "_" in called), \
                    f"{path.name}:{scope.lineno}: `_` is assigned in a scope that translates with it"


# ----------------------------------------------------------------------------------------
# Hints in the student's language (labs 1 and 5)


def _sdpa(scale_by_sqrt_d: bool):
    def scaled_dot_product_attention(q, k, v, mask=None):
        scores = q @ k.transpose(-2, -1)
        if scale_by_sqrt_d:
            scores = scores / math.sqrt(q.size(-1))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        return weights @ v

    return scaled_dot_product_attention


def _filter_logits(keep_largest: bool):
    def filter_logits(logits, top_k=None, top_p=1.0):
        if top_k is not None:
            k = min(top_k, logits.size(-1))
            kth = torch.topk(logits if keep_largest else -logits, k, dim=-1).values[..., -1:]
            drop = logits < kth if keep_largest else logits > -kth
            logits = logits.masked_fill(drop, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop_sorted = probs.cumsum(-1) - probs >= top_p
            logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
        return logits

    return filter_logits


@pytest.mark.parametrize("check, wrong, right, english, chinese", [
    (checks.check_sdpa, _sdpa(False), _sdpa(True), "missing the 1/sqrt(d) scale", "分数缺少 1/sqrt(d) 缩放"),
    (checks.check_filter_logits, _filter_logits(False), _filter_logits(True), "keeps the k SMALLEST logits",
     "保留了最小的 k 个 logits"),
], ids=["lab1-sdpa", "lab5-filter-logits"])
def test_hints_speak_the_students_language(no_language, capsys, check, wrong, right, english, chinese):
    with pytest.raises(AssertionError) as failure:
        check(wrong)
    assert english in str(failure.value) and not CJK.search(str(failure.value))
    no_language.setenv("LLMLAB_LANG", "zh")
    with pytest.raises(AssertionError) as failure:
        check(wrong)
    assert chinese in str(failure.value), str(failure.value)
    check(right)
    tick = capsys.readouterr().out.strip().splitlines()[-1]
    assert tick.startswith("✓ ") and CJK.search(tick), tick


def test_grading_notes_speak_the_submissions_language(no_language):
    from llmlab.grading import sandbox

    limits = {"memory_mb": 2048, "cpu_s": 60}
    assert sandbox.explain_error("MemoryError", limits) == "out of memory (limit 2 GiB)"
    no_language.setenv("LLMLAB_LANG", "zh")
    assert sandbox.explain_error("MemoryError", limits) == "内存不足（限制 2 GiB）"
    assert "sys.exit/os._exit" in sandbox._describe_exit(3, limits) and CJK.search(sandbox._describe_exit(3, limits))
    zh = nbformat.writes(nbformat.v4.new_notebook(metadata={"language": "zh"})).encode()
    assert pipeline.submission_language({"a.ipynb": "a.ipynb was not submitted", "b.ipynb": zh}) == "zh"
    assert pipeline.submission_language({"a.ipynb": b"not json"}) == "en"


# ----------------------------------------------------------------------------------------
# The gate, on a copy of lab 1 with a made-up translation


def _fake_translation(lab: str) -> dict:
    """A translation that keeps every formula, code span, URL and number: the English under a Chinese heading."""
    cells = {}
    for name, todo in i18n.skeleton(lab).items():
        cells[name] = {cid: {"en": w["en"], "text": "【中文】" + w["english"]} if "english" in w else
                       {"en": w["en"], "comments": {c: "中文：" + c for c in w["english_comments"]}}
                       for cid, w in todo.items()}
    return {"lab": lab, "language": "zh", "notebooks": cells}


@pytest.fixture
def course_copy(tmp_path, monkeypatch):
    """A course holding lab 1 only (solutions, released labs, grading config, glossary), with a translation."""
    root = tmp_path / "course"
    for part in ("grading", f"solutions/{LAB}", f"labs/{LAB}"):
        shutil.copytree(ROOT / part, root / part)
    (root / "i18n" / "zh").mkdir(parents=True)
    shutil.copy(ROOT / "i18n" / "zh" / "glossary.json", root / "i18n" / "zh")
    monkeypatch.setenv("LLMLAB_ROOT", str(root))
    monkeypatch.setenv("LLMLAB_WORK", str(tmp_path / "work"))
    i18n.path(LAB, "zh").write_text(i18n.dumps(_fake_translation(LAB)), encoding="utf-8")
    return root


def _edit(cell_id: str, change) -> None:
    data = i18n.load(LAB, "zh")
    change(data["notebooks"]["attention.ipynb"], cell_id)
    i18n.path(LAB, "zh").write_text(i18n.dumps(data), encoding="utf-8")


def _errors() -> list[str]:
    return [p.message for p in i18n.gate(LAB, "zh") if p.error]


def _text(cells, cid, old, new):
    assert old in cells[cid]["text"]
    cells[cid]["text"] = cells[cid]["text"].replace(old, new, 1)


def test_gate_passes_a_complete_translation_and_fails_each_kind_of_damage(course_copy):
    assert _errors() == []
    assert i18n.untranslated_labs("zh") == []
    _edit("sdpa-intro", lambda c, cid: c[cid].update(en="0" * 16))
    assert any(e.startswith("stale") for e in _errors())
    _edit("sdpa-intro", lambda c, cid: c[cid].update(en=i18n.skeleton(LAB)["attention.ipynb"][cid]["en"]))
    assert _errors() == []
    _edit("sdpa-intro", lambda c, cid: _text(c, cid, r"\sqrt{d}", r"\sqrt{n}"))
    assert any(e.startswith("formulas differ") for e in _errors())
    _edit("sdpa-intro", lambda c, cid: _text(c, cid, r"\sqrt{n}", r"\sqrt{d}"))
    _edit("sdpa-intro", lambda c, cid: _text(c, cid, "standard deviation of 8", "standard deviation of 9"))
    assert [e for e in _errors() if e.startswith("numbers differ")] == ["numbers differ from the English: missing ['8'], extra ['9']"]
    _edit("sdpa-intro", lambda c, cid: _text(c, cid, "standard deviation of 9", "standard deviation of 8"))
    _edit("intro", lambda c, cid: _text(c, cid, "`torch.nn.MultiheadAttention`", "torch.nn.MultiheadAttention"))
    assert any(e.startswith("code spans differ") for e in _errors())
    _edit("intro", lambda c, cid: c.pop(cid))
    assert any(e.startswith("missing") for e in _errors())
    _edit("parameters", lambda c, cid: c[cid]["comments"].pop(next(iter(c[cid]["comments"]))))
    assert any(e.startswith("comments not translated") for e in _errors())


def test_spans_are_read_left_to_right_like_markdown():
    found = i18n.protected("a `$` sign, then `$` again, and $x^2$ with 3 apples")
    assert found["code spans"] == Counter({"`$`": 2}) and found["formulas"] == Counter({"$x^2$": 1})
    assert found["numbers"] == Counter({"3": 1})


def test_gate_warns_when_a_glossary_term_is_translated_two_ways(course_copy):
    _edit("sdpa-intro", lambda c, cid: c[cid].update(text=c[cid]["text"] + "\n\n遮罩"))
    problems = i18n.gate(LAB, "zh")
    assert not any(p.error for p in problems)
    assert [p.message for p in problems if not p.error] == ["glossary: 'mask' translated two ways: 遮罩 besides '掩码'"]


def _strip_comments(source: str) -> str:
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type != tokenize.COMMENT]
    return tokenize.untokenize((t.type, t.string) for t in tokens)


def test_release_zh_has_the_english_structure_code_and_points(course_copy):
    course.release(LAB, lang="zh")
    english = nbformat.read(course_copy / "labs" / LAB / "attention.ipynb", as_version=4)
    chinese = nbformat.read(course_copy / "labs" / "zh" / LAB / "attention.ipynb", as_version=4)
    assert chinese.metadata["language"] == "zh" and "language" not in english.metadata
    assert chinese.metadata["llmlab"] == english.metadata["llmlab"]
    assert [c.id for c in chinese.cells] == [c.id for c in english.cells]
    translated_code = 0
    for en, zh in zip(english.cells, chinese.cells):
        assert zh.cell_type == en.cell_type and zh.metadata.get("tags") == en.metadata.get("tags")
        meta = lambda c: {k: v for k, v in sanitize.nbgrader_meta(c).items() if k != "checksum"}  # noqa: E731
        assert meta(zh) == meta(en)  # grade_id, points, solution / grade / locked
        assert not zh.get("outputs") and zh.get("execution_count") is None
        if en.cell_type == "code":
            assert _strip_comments(zh.source) == _strip_comments(en.source)
            translated_code += zh.source != en.source
        elif sanitize.is_solution(en):
            assert zh.source == en.source  # the answer stub, identical so an untouched answer scores 0 as in English
        else:
            assert zh.source.startswith("【中文】")
    assert translated_code > 0
    assert [p.name for p in course.notebooks(LAB, "labs")] == ["attention.ipynb"]  # labs/zh is not a lab


def test_release_check_sees_a_stale_or_orphaned_chinese_copy(course_copy):
    course.release(LAB, lang="zh")
    assert course.release_drift() == []
    zh_copy = course_copy / "labs" / "zh" / LAB / "attention.ipynb"
    nb = nbformat.read(zh_copy, as_version=4)
    nb.cells[0].source += "\nedited by hand"
    nbformat.write(nb, zh_copy)
    assert course.release_drift() == [f"labs/zh/{LAB}/attention.ipynb"]
    i18n.path(LAB, "zh").unlink()
    assert course.release_drift() == [f"labs/zh/{LAB}/attention.ipynb (no source in solutions/ or i18n/)"]


# ----------------------------------------------------------------------------------------
# The real course: every translated lab passes the gate (strict), and grades like English


def test_translations_pass_the_gate():
    """CI is strict for every lab that has a translation file; the others are listed as untranslated."""
    print("untranslated (zh):", ", ".join(i18n.untranslated_labs("zh")) or "none")
    errors = [str(p) for lab in i18n.translated_labs("zh") for p in i18n.gate(lab, "zh") if p.error]
    assert errors == [], "\n".join(errors)


def write_chinese_samples(lab: str, dest) -> dict:
    """The Chinese solution, the untouched Chinese copy and every fixture on the Chinese template, like samples.write."""
    lab = course.lab_id(lab)
    translation = i18n.load(lab, "zh")
    expected = {"solution": None, "untouched": None}
    for nb_path in course.notebooks(lab, "labs"):
        zh_path = course.root() / "labs" / "zh" / lab / nb_path.name
        solution = i18n.localize(nbformat.read(course.root() / "solutions" / lab / nb_path.name, as_version=4),
                                 nb_path.name, translation, "zh")
        template = nbformat.read(zh_path, as_version=4)
        for sample, nb in (("solution", solution), ("untouched", template)):
            (dest / sample).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, dest / sample / nb_path.name)
        for name, fx in samples.fixtures(lab).items():
            (dest / name).mkdir(parents=True, exist_ok=True)
            if "raw" in fx:
                (dest / name / nb_path.name).write_text(fx["raw"])
            else:
                nbformat.write(samples.apply(template, fx.get("answers", {})), dest / name / nb_path.name)
            expected[name] = fx.get("expected", {})
    return expected


def english_points(lab: str) -> float:
    """The autograded points of the English template."""
    return sum(float(sanitize.nbgrader_meta(c).get("points", 0)) for p in course.notebooks(lab, "labs")
               for c in nbformat.read(p, as_version=4).cells if sanitize.is_test(c))


@pytest.mark.slow
@pytest.mark.parametrize("lab", i18n.translated_labs("zh") or [pytest.param(LAB, marks=pytest.mark.skip("no lab translated yet"))])
def test_chinese_submissions_grade_exactly_like_english(tmp_path, lab):
    expected = write_chinese_samples(lab, tmp_path / "subs")
    results = pipeline.grade(lab, tmp_path / "subs", workers=2, progress=False)
    assert samples.mismatches(results, expected) == []
    by_name = {r.student: r for r in results}
    assert by_name["solution"].score == by_name["solution"].max_score == english_points(lab)
    assert by_name["untouched"].score == 0
    for name, want in expected.items():
        if want:
            assert {t: by_name[name].tests[t] for t in want} == want, name
    pending = [r for r in results if r.manual_pending]
    for r in pending:  # the grader spoke Chinese: the feedback page's own words and the notes
        page = next((course.work_dir() / "feedback" / r.student / lab).glob("*.html")).read_text(encoding="utf-8")
        assert "由教师评分" in page and any("待教师评分" in n for n in r.notes), r.student

"""Languages: the course in English and Simplified Chinese from one source.

Two kinds of text are translated, each with the ecosystem's tool for it:

- **Notebook text**: one file per lab per language, `i18n/<lang>/<lab>.json`, holds the
  translation of every markdown cell and of the `#` comments of code cells, keyed by cell id,
  each with a hash of the English source it was made from (`digest`). `localize` applies it to
  a solution notebook; `gate` reports missing and stale cells and translations that changed a
  formula, an inline code span, a URL or a number. Code itself is never translated.
- **Messages** (hints of `llmlab.checks`, grading notes, the CLI): gettext catalogues,
  `locale/llmlab.pot` extracted with Babel (`pybabel extract`, keyword `_`) and one
  `locale/<lang>/LC_MESSAGES/llmlab.po` per language. The .po file is the only committed form:
  it is read with Babel and compiled in memory the first time a message is translated, so there
  is no build step and no compiled .mo that can fall out of date with it.

The language of messages (`language`) comes from, in order: $LLMLAB_LANG, the metadata of the
running notebook (`metadata.language`; Jupyter gives the kernel the notebook's path in
$JPY_SESSION_NAME), the locale ($LC_ALL, $LC_MESSAGES, $LANG). The default is English.
"""
from __future__ import annotations

import functools
import gettext
import hashlib
import io
import json
import os
import re
import tokenize
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ENGLISH = "en"
LANGUAGES = ("en", "zh")  # English is the source; every other language is a translation of it
DOMAIN = "llmlab"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"

# Comments that are nbgrader markers or code-only: never listed for translation
SKIP = ("BEGIN SOLUTION", "END SOLUTION", "BEGIN HIDDEN TESTS", "END HIDDEN TESTS", "YOUR CODE HERE", "noqa", "type:")

# ----------------------------------------------------------------------------------------
# Messages: gettext catalogues


def language() -> str:
    """The language messages are shown in: $LLMLAB_LANG, the running notebook's metadata, the locale, else 'en'."""
    chosen = known(os.environ.get("LLMLAB_LANG", ""))
    if chosen:
        return chosen
    session = os.environ.get("JPY_SESSION_NAME")
    if session:
        chosen = _notebook_language(session, os.getcwd())
        if chosen:
            return chosen
    for var in ("LC_ALL", "LC_MESSAGES", "LANG"):  # POSIX order: the first one set decides
        if os.environ.get(var):
            return known(os.environ[var]) or ENGLISH
    return ENGLISH


def known(tag: str) -> str | None:
    """The course's language for a tag: 'zh', 'zh_CN.UTF-8', 'zh-Hans' -> 'zh'; None for a language it does not have."""
    base = re.split(r"[_.@-]", tag.strip().lower(), maxsplit=1)[0]
    return base if base in LANGUAGES else None


@functools.lru_cache(maxsize=64)
def _notebook_language(session: str, cwd: str) -> str | None:
    """metadata.language of the notebook Jupyter named in JPY_SESSION_NAME (a path, maybe relative to the server root)."""
    path = Path(session)
    here = Path(cwd)
    candidates = [path] if path.is_absolute() else [here / path.name, *(d / path for d in (here, *here.parents))]
    for candidate in candidates:
        if candidate.suffix == ".ipynb" and candidate.is_file():
            try:
                meta = json.loads(candidate.read_text(encoding="utf-8")).get("metadata", {})
            except (OSError, ValueError, AttributeError):
                return None
            return known(str(meta.get("language", ""))) if isinstance(meta, dict) else None
    return None


@functools.lru_cache(maxsize=None)
def translations(lang: str) -> gettext.NullTranslations:
    """The message catalogue of `lang`, read from its .po file with Babel (English: the messages as written)."""
    po = LOCALE_DIR / lang / "LC_MESSAGES" / f"{DOMAIN}.po"
    if lang == ENGLISH or not po.is_file():
        return gettext.NullTranslations()
    from babel.messages.mofile import write_mo
    from babel.messages.pofile import read_po

    with open(po, "rb") as f:
        catalog = read_po(f, locale=lang, domain=DOMAIN)
    buf = io.BytesIO()
    write_mo(buf, catalog)  # fuzzy entries are left out, as msgfmt does
    buf.seek(0)
    return gettext.GNUTranslations(buf)


def _(message: str) -> str:
    """Translate one message into the student's language (the catalogue holds templates: format after)."""
    return translations(language()).gettext(message)


def N_(message: str) -> str:
    """Mark a message for the catalogue without translating it yet (tables built at import); `_` it where it is shown."""
    return message


def ngettext(singular: str, plural: str, n: int) -> str:
    """Translate a message with a count: `singular` for n == 1, else `plural` (in English)."""
    return translations(language()).ngettext(singular, plural, n)


# ----------------------------------------------------------------------------------------
# Notebook text: what there is to translate


def digest(source: str) -> str:
    """The hash a translation stores: sha256 of the English cell source (UTF-8), first 16 hex digits."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def _comment_tokens(source: str) -> list[tokenize.TokenInfo]:
    try:
        return [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []


def _comment_key(token: str) -> str:
    return token.lstrip("#").strip()


def _translatable(text: str) -> bool:
    return bool(text) and not text.startswith(SKIP) and re.search(r"[A-Za-z]", text) is not None


def comments(source: str) -> list[str]:
    """The `#` comments of a code cell that are translated (markers and code-only comments left out), in order."""
    keys = [_comment_key(t.string) for t in _comment_tokens(source)]
    return list(dict.fromkeys(k for k in keys if _translatable(k)))


def _cells(lab: str) -> dict[str, list]:
    """{notebook name: its cells} of solutions/<lab>, the one source."""
    import nbformat

    from llmlab import course

    return {p.name: nbformat.read(p, as_version=4).cells for p in course.notebooks(lab, "solutions")}


def skeleton(lab: str) -> dict[str, dict[str, dict]]:
    """{notebook: {cell id: {"en": hash, "english": text} or {"en": hash, "english_comments": [...]}}} to translate."""
    out: dict[str, dict[str, dict]] = {}
    for name, cells in _cells(lab).items():
        todo: dict[str, dict] = {}
        for cell in cells:
            if cell.cell_type == "markdown":
                todo[cell.id] = {"en": digest(cell.source), "english": cell.source}
            elif cell.cell_type == "code" and comments(cell.source):
                todo[cell.id] = {"en": digest(cell.source), "english_comments": comments(cell.source)}
        out[name] = todo
    return out


# ----------------------------------------------------------------------------------------
# Translation files


def path(lab: str, lang: str) -> Path:
    """Where the translation of `lab` into `lang` lives: i18n/<lang>/<lab>.json."""
    from llmlab import course

    return course.root() / "i18n" / lang / f"{course.lab_id(lab)}.json"


def load(lab: str, lang: str) -> dict | None:
    """The translation file of `lab` in `lang` as a dict, or None when the lab has none."""
    p = path(lab, lang)
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def dumps(translation: dict) -> str:
    """A translation file's text, exactly as the format writes it (1-space indent, sorted keys, UTF-8)."""
    return json.dumps(translation, ensure_ascii=False, indent=1, sort_keys=True) + "\n"


def translated_labs(lang: str) -> list[str]:
    """The labs that have a translation file in `lang`, in course order."""
    from llmlab import course

    return [lab for lab in course.labs() if path(lab, lang).is_file()]


def untranslated_labs(lang: str) -> list[str]:
    """The labs with no translation file in `lang` yet."""
    from llmlab import course

    return [lab for lab in course.labs() if not path(lab, lang).is_file()]


def translate_comments(source: str, table: dict[str, str]) -> str:
    """Replace each `#` comment of a code cell found in `table` ({English: translation}); the code stays as it is."""
    lines = source.splitlines(keepends=True)
    for tok in reversed(_comment_tokens(source)):
        new = table.get(_comment_key(tok.string))
        if not new:
            continue
        prefix = re.match(r"#+\s*", tok.string).group()
        (row, start), end = tok.start, tok.end[1]
        line = lines[row - 1]
        lines[row - 1] = line[:start] + prefix + new.strip() + line[end:]
    return "".join(lines)


def localize(nb, name: str, translation: dict, lang: str):
    """A copy of solution notebook `nb` (file `name`) in `lang`: translated text, the same code, cells, ids and metadata.

    A cell whose translation is missing or stale (made from another English text) stays in English,
    so a student never reads an outdated translation; `gate` reports it.
    """
    import copy

    out = copy.deepcopy(nb)
    cells = translation.get("notebooks", {}).get(name, {})
    for cell in out.cells:
        entry = cells.get(cell.get("id"))
        if not isinstance(entry, dict) or entry.get("en") != digest(cell.source):
            continue
        if cell.cell_type == "markdown" and isinstance(entry.get("text"), str):
            cell.source = entry["text"]
        elif cell.cell_type == "code" and isinstance(entry.get("comments"), dict):
            cell.source = translate_comments(cell.source, entry["comments"])
    out.metadata["language"] = lang
    return out


# ----------------------------------------------------------------------------------------
# The gate: missing, stale and damaged translations

# $$display$$, or $inline$ (it may wrap onto the next line, not past a blank line); \$ is a plain dollar
_FORMULA = re.compile(r"\$\$.+?\$\$|(?<!\\)\$(?:[^$\n\\]|\\.|\n(?![ \t]*\n))+?\$", re.S)
_FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)
_CODE = re.compile(r"`(?:[^`\n]|\n(?![ \t]*\n))+`")  # an inline span may wrap onto the next line too
_SPAN = re.compile(f"{_CODE.pattern}|{_FORMULA.pattern}", re.S)
_URL = re.compile(r"https?://[^\s)>\]]+")
_NUMBER = re.compile(r"\d+")


def protected(text: str) -> dict[str, Counter]:
    """What a translation must keep unchanged, as counts: formulas, inline code spans, URLs, digit runs (outside the others)."""
    found: dict[str, Counter] = {}
    # a fenced block may hold translated notes (a diagram's labels): only its URLs and numbers count
    rest = _FENCE.sub(lambda m: re.sub(r"[`$]", " ", m.group()), text)
    # formulas and code spans in one left-to-right pass, whichever starts first (as markdown reads them),
    # so a code span holding a lone `$` does not open a formula
    found["formulas"], found["code spans"] = Counter(), Counter()
    kept = []
    for m in _SPAN.finditer(rest):
        found["code spans" if m.group().startswith("`") else "formulas"][m.group()] += 1
        kept.append((m.start(), m.end()))
    for start, end in reversed(kept):
        rest = rest[:start] + " " + rest[end:]
    for kind, pattern in (("URLs", _URL), ("numbers", _NUMBER)):
        found[kind] = Counter(pattern.findall(rest))
        rest = pattern.sub(" ", rest)
    return found


@dataclass(frozen=True)
class Problem:
    """One finding of the gate: an error fails CI, a warning is printed."""

    lab: str
    where: str  # "notebook.ipynb cell-id", or the file
    message: str
    error: bool = True

    def __str__(self) -> str:
        return f"{'error' if self.error else 'warning'}: {self.lab} {self.where}: {self.message}"


def glossary(lang: str) -> dict[str, dict]:
    """The glossary of `lang`: {English term: {"zh": term, "avoid": [variants]}} (empty when there is none)."""
    from llmlab import course

    p = course.root() / "i18n" / lang / "glossary.json"
    return json.loads(p.read_text(encoding="utf-8"))["terms"] if p.is_file() else {}


def gate(lab: str, lang: str) -> list[Problem]:
    """Check the translation of `lab` into `lang` against solutions/: errors for missing, stale or damaged cells."""
    from llmlab import course

    lab = course.lab_id(lab)
    file = path(lab, lang)
    where = str(file.relative_to(course.root()))
    try:
        translation = load(lab, lang)
    except ValueError as e:
        return [Problem(lab, where, f"not valid JSON ({e})")]
    if translation is None:
        return [Problem(lab, where, "no translation file yet (untranslated)", error=False)]
    problems: list[Problem] = []
    if translation.get("lab") != lab or translation.get("language") != lang:
        problems.append(Problem(lab, where, f'"lab" and "language" must be {lab!r} and {lang!r}'))
    have_all = translation.get("notebooks", {})
    used: dict[str, set[str]] = {}  # glossary term -> renderings to avoid that this lab uses
    for name, todo in skeleton(lab).items():
        have = have_all.get(name, {})
        for cid, want in todo.items():
            at = f"{name} {cid}"
            entry = have.get(cid)
            if not isinstance(entry, dict):
                problems.append(Problem(lab, at, "missing (no translation for this cell)"))
                continue
            if entry.get("en") != want["en"]:
                problems.append(Problem(lab, at, f"stale: the English cell changed after its translation "
                                                 f"(hash {entry.get('en')} -> {want['en']})"))
            if "english" in want:
                text = entry.get("text")
                if not isinstance(text, str) or not text.strip():
                    problems.append(Problem(lab, at, 'no "text" for this markdown cell'))
                    continue
                problems += _compare(lab, at, want["english"], text)
                texts = [text]
            else:
                table = entry.get("comments") if isinstance(entry.get("comments"), dict) else {}
                missing = [c for c in want["english_comments"] if not str(table.get(c, "")).strip()]
                if missing:
                    problems.append(Problem(lab, at, f"comments not translated: {missing[:3]}"))
                texts = [str(v) for v in table.values()]
            for term, g in glossary(lang).items():
                bad = {v for v in g.get("avoid", []) if any(v in t for t in texts)}
                if bad:
                    used.setdefault(term, set()).update(bad)
        for cid in sorted(set(have) - set(todo)):
            problems.append(Problem(lab, f"{name} {cid}", "translates a cell the notebook no longer has", error=False))
    for term, bad in sorted(used.items()):
        problems.append(Problem(lab, where, f"glossary: {term!r} translated two ways: "
                                            f"{', '.join(sorted(bad))} besides {glossary(lang)[term]['zh']!r}",
                                error=False))
    return problems


def _compare(lab: str, at: str, english: str, translated: str) -> list[Problem]:
    """Errors for each kind of protected text (formulas, code, URLs, numbers) a translation changed."""
    out = []
    want, got = protected(english), protected(translated)
    for kind in want:
        if want[kind] != got[kind]:
            lost = sorted((want[kind] - got[kind]).elements())[:5]
            extra = sorted((got[kind] - want[kind]).elements())[:5]
            out.append(Problem(lab, at, f"{kind} differ from the English: missing {lost}, extra {extra}"))
    return out


def todo(lab: str, lang: str) -> dict[str, dict[str, dict]]:
    """The skeleton of only what `lab` still needs in `lang`: cells missing from its file or stale there."""
    have = (load(lab, lang) or {}).get("notebooks", {})
    return {name: {cid: want for cid, want in cells.items()
                   if not isinstance(have.get(name, {}).get(cid), dict)
                   or have[name][cid].get("en") != want["en"]}
            for name, cells in skeleton(lab).items()}


def _main() -> None:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m llmlab.i18n",
                                     description="what a lab's translation still needs, and the gate")
    parser.add_argument("action", choices=["todo", "skeleton", "check"],
                        help="todo: cells missing or stale; skeleton: every cell; check: the gate")
    parser.add_argument("lab")
    parser.add_argument("--lang", default="zh", choices=LANGUAGES[1:])
    args = parser.parse_args()
    if args.action == "check":
        problems = gate(args.lab, args.lang)
        print("\n".join(map(str, problems)) or "ok")
        sys.exit(1 if any(p.error for p in problems) else 0)
    found = todo(args.lab, args.lang) if args.action == "todo" else skeleton(args.lab)
    print(json.dumps(found, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    _main()

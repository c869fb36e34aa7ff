"""Feedback pages that say what is still to come: written answers waiting for the instructor.

nbgrader's feedback scores an answer nobody has graded yet as "0.0 / 2.0", and counts it in the
total, which reads as a lost mark. Until the instructor grades it by hand, the page says
"pending" instead, and the total splits into what was autograded and what is still to come.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

from llmlab.i18n import ngettext


def mark_pending(page: Path, pending: dict[str, float]) -> None:
    """Rewrite one feedback page: each answer in `pending` ({grade_id: points}) reads as pending."""
    text = page.read_text(encoding="utf-8")
    for gid, points in pending.items():
        g = re.escape(html.escape(gid, quote=True))
        label = ngettext("pending: graded by hand ({points:g} point)", "pending: graded by hand ({points:g} points)",
                         1 if points == 1 else 2).format(points=points)
        text = re.sub(rf'(<a href="#{g}">[^<]*</a>) \(Score: [0-9.]+ / [0-9.]+\)', rf"\1 ({label})", text)
        text = re.sub(rf'(<a name="{g}"></a>.*?<span class="pull-right">\s*)Score: [0-9.]+ / [0-9.]+',
                      lambda m: m.group(1) + label[0].upper() + label[1:], text, count=1, flags=re.S)
    total = sum(pending.values())

    def split_total(m: re.Match) -> str:
        got, out_of = float(m.group(2)), float(m.group(3))
        what = ngettext("Score: {got:g} / {autograded:g} autograded, {n} written answer ({total:g} points) to grade by hand",
                        "Score: {got:g} / {autograded:g} autograded, {n} written answers ({total:g} points) to grade by hand",
                        len(pending)).format(got=got, autograded=out_of - total, n=len(pending), total=total)
        return f"{m.group(1)}({html.escape(what)})</h4>"

    text = re.sub(r"(<h4>[^<]*?)\(Score: ([0-9.]+) / ([0-9.]+)\)</h4>", split_total, text, count=1)
    page.write_text(text, encoding="utf-8")

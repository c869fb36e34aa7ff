# nbgrader configuration of the course. `llmlab` loads this file, and so does plain `nbgrader`
# when run from this folder (e.g. `cd grading && nbgrader formgrader`).
import os
from pathlib import Path

c = get_config()  # noqa: F821  (provided by nbgrader's config loader)

root = Path(__file__).resolve().parent.parent
work = Path(os.environ.get("LLMLAB_WORK", root / "work")).resolve()

c.CourseDirectory.root = str(root)
c.CourseDirectory.course_id = "llmlab"  # named, so PostgreSQL's foreign keys find the course row
c.CourseDirectory.source_directory = "solutions"  # instructor notebooks, with solutions and hidden tests
c.CourseDirectory.release_directory = "labs"  # student copies, generated and committed
c.CourseDirectory.submitted_directory = os.path.relpath(work / "submitted", root)
c.CourseDirectory.autograded_directory = os.path.relpath(work / "autograded", root)
c.CourseDirectory.feedback_directory = os.path.relpath(work / "feedback", root)
c.CourseDirectory.db_url = os.environ.get("LLMLAB_GRADEBOOK", f"sqlite:///{work / 'gradebook.db'}")
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "*.png", "*.pt"]

# Released copies: solution blocks become this stub; hidden tests are stripped.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
c.ClearOutput.enabled = True

# Feedback names failing tests but does not show hidden tests' source.
c.GenerateFeedback.preprocessors = [
    "nbgrader.preprocessors.GetGrades",
    "nbconvert.preprocessors.CSSHTMLHeaderPreprocessor",
    "nbgrader.preprocessors.ClearHiddenTests",
]

# The trusted kernel waits on the sandbox, which keeps its own per-cell and per-call deadlines
# (grading/policy.toml); nbgrader's own cell timeout only has to outlast them.
c.Execute.timeout = 1200

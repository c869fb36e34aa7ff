"""The mistake catalogue's marker: `-m grading` selects its `llmlab grade` batches, `-m 'not grading'` the rest."""
from __future__ import annotations


def pytest_configure(config):
    config.addinivalue_line("markers", "grading: grades a lab's catalogue in one `llmlab grade` batch (a minute or two per lab)")

# Thin targets over the `llmlab` CLI. The first target you run creates .venv:
# docker/install-course.sh puts torch==2.13.0 in first, then the course with torch held fixed.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: course test test-browser lab release doctor assets system system-browser clean

$(STAMP): pyproject.toml docker/install-course.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	PYTHON=$(BIN)/python docker/install-course.sh
	touch $(STAMP)

## system: operating-system packages (Debian): bubblewrap for the grading sandbox (course, test). Needs root
## or sudo; without them it only warns. system-browser adds chromium and a CJK font for the browser test.
system:
	@$(call apt_install,$$(command -v bwrap >/dev/null || echo bubblewrap),grading falls back to the process sandbox)

system-browser: system
	@$(call apt_install,$$(command -v chromium >/dev/null || echo chromium) $$(fc-list :lang=zh 2>/dev/null | grep -q . || echo fonts-noto-cjk),the browser test is skipped)

# apt_install(packages, what happens without them): install the Debian packages named, if any, as root or with sudo
define apt_install
missing=$$(echo $(1)); \
  if [ -n "$$missing" ]; then \
    if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
    elif command -v sudo >/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $$missing >/dev/null; \
    else echo "warning: missing $$missing and no root: $(2)"; fi; \
  fi
endef

## course: the main job — the missing assets (downloaded and built beside the rest), release, every lab
## headless in QUICK mode, grade sample submissions; two at once on two cores.
course: $(STAMP) system
	$(BIN)/llmlab course

## test: the test suite (CI runs this), after `llmlab build --missing` has filled the asset cache.
## pytest's "no tests collected" (exit 5) counts as a failure.
test: $(STAMP) system
	$(BIN)/llmlab build --missing
	$(BIN)/python -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

## test-browser: JupyterLab driven by Chromium (Playwright): the student's and instructor's view.
test-browser: $(STAMP) system-browser
	$(BIN)/python -m pip install --quiet "playwright>=1.45"
	$(BIN)/llmlab assets fetch
	$(BIN)/python -m pytest -m browser tests/browser; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

## lab: JupyterLab on the course (student view in labs/).
lab: $(STAMP)
	$(BIN)/llmlab assets fetch
	$(BIN)/jupyter lab --ServerApp.root_dir=labs

release: $(STAMP)
	$(BIN)/llmlab release

doctor: $(STAMP)
	$(BIN)/llmlab doctor

assets: $(STAMP)
	$(BIN)/llmlab assets fetch

clean:
	rm -rf work

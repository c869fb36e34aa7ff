"""`llmlab`: the course's command line (doctor, assets, build, release, run, grade, serve, course).

Every command prints one clear line on failure and exits non-zero: 1 for a failed run or
grade, 2 for bad usage (argparse), 3 for a missing asset or a broken course layout.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from llmlab import assets, course, i18n
from llmlab.i18n import _

EXIT_FAIL, EXIT_SETUP = 1, 3


def _die(message: str, code: int = EXIT_FAIL) -> None:
    print(_("llmlab: error: {message}").format(message=message), file=sys.stderr)
    sys.exit(code)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print versions, device, asset cache and grading sandbox state, with fixes for what is missing."""
    import torch

    from llmlab.grading import sandbox

    problems = []
    print(f"python       {platform.python_version()} ({sys.executable})")
    for pkg in ("torch", "transformers", "tokenizers", "nbgrader", "papermill", "jupyterlab", "ipywidgets"):
        try:
            print(f"{pkg:<12} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            print(f"{pkg:<12} " + _("MISSING"))
            problems.append(_("{pkg} is not installed: run `make test` or `pip install -e .[course,test]`").format(pkg=pkg))
    if torch.__version__.split("+")[0] != "2.13.0":
        problems.append(_("torch {version} installed; the course pins torch==2.13.0").format(version=torch.__version__))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"device       cuda={torch.cuda.is_available()} gpu={gpu} mps={torch.backends.mps.is_available()} "
          f"threads={torch.get_num_threads()}")
    print(f"assets       {assets.home()}")
    for name, asset in assets.REGISTRY.items():
        state = assets.state(name)
        print(f"  {name:<22} {state:<9} {asset.description}")
        if state != "cached":
            problems.append(_("asset {name} {state}: run `{fix}` (`llmlab build --missing` makes them all)")
                            .format(name=name, state=state, fix=asset.fix))
    print(f"sandbox      {sandbox.isolation()}")
    if sandbox.isolation() != "bubblewrap":
        problems.append(_("bubblewrap unavailable: grading uses the weaker process sandbox; run `make system` "
                          "(apt-get install bubblewrap) — see grading/README.md"))
    try:
        print(_("course       {root} labs: {labs}").format(root=course.root(), labs=", ".join(course.labs())))
        print(_("language     {lang} (LLMLAB_LANG, the notebook's metadata, or the locale)").format(lang=i18n.language()))
        drift = course.release_drift() if args.check_release else []
        if drift:
            problems.append(_("labs/ out of sync with solutions/ ({drift}): run `llmlab release`").format(drift=", ".join(drift)))
    except course.CourseError as e:
        problems.append(str(e))
    print("\n" + ("\n".join(f"✗ {p}" for p in problems) if problems else "✓ " + _("everything needed is in place")))
    return EXIT_FAIL if problems else 0


def cmd_assets(args: argparse.Namespace) -> int:
    """List, fetch, verify or locate assets."""
    names = args.names or list(assets.REGISTRY)
    for name in names:
        assets.get(name)  # unknown names fail before any work
    if args.action == "list":
        for name in names:
            a = assets.REGISTRY[name]
            print(f"{name:<22} {assets.state(name):<9} {a.kind:<8} {a.source:<34} hub: {a.hub_id or '-':<40} "
                  f"licence: {a.licence}")
    elif args.action == "fetch":
        for name in names:
            a = assets.REGISTRY[name]
            cached = assets.is_cached(name)
            if a.builder and not cached and not args.names:  # fetching "all" skips what the course builds
                print(f"{name}: {assets.state(name)} ({a.fix})")
                continue
            start = time.perf_counter()
            path = assets.fetch(name, force=args.force)
            done = "already cached" if cached and not args.force else f"ready in {time.perf_counter() - start:.1f} s"
            print(f"{name}: {done} -> {path}")
    elif args.action == "verify":
        failures = []
        for name in names:
            if assets.state(name) == "not built" and not args.names:
                print(f"{name}: not built yet ({assets.REGISTRY[name].fix})")
                continue
            try:
                assets.verify(name)
                print(f"{name}: ok")
            except assets.AssetError as e:
                print(f"{name}: FAILED")
                failures.append(str(e))
        if failures:
            _die("; ".join(failures), EXIT_SETUP)
    elif args.action == "path":
        for name in names:
            print(assets.resolve(name))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Build a course-made asset from its registry recipe (flags change it), or fill in every missing asset."""
    if args.missing == bool(args.name):
        _die("name one asset to build, or give --missing (every asset the cache lacks)", 2)
    recipe = {k: v for k, v in (("quick", args.quick), ("seed", args.seed)) if v is not None}
    if args.missing and recipe:
        _die("--missing builds the registry's recipes; --quick, --full and --seed go with a NAME", 2)
    todo = assets.missing() if args.missing else [args.name]
    for name in todo:  # a named downloaded asset goes to `build`, which says to fetch it instead
        _make(name, built=not args.missing or bool(assets.get(name).builder), **recipe)
    if not todo:
        print("every asset is in the cache")
    return 0


def _make(name: str, built: bool, **recipe) -> None:
    """Build asset `name` (with `recipe`) or fetch it, and say where it landed and how long it took."""
    start = time.perf_counter()
    path = assets.build(name, **recipe) if built else assets.fetch(name)
    print(f"{name}: ready in {time.perf_counter() - start:.0f} s -> {path}")


def cmd_release(args: argparse.Namespace) -> int:
    """Generate student copies (labs/, and labs/<lang>/ from i18n/) from solutions/; --check only reports drift."""
    langs = [args.lang] if args.lang else list(i18n.LANGUAGES)
    translations = [lang for lang in langs if lang != i18n.ENGLISH]
    for lang in translations:
        if missing := i18n.untranslated_labs(lang):
            print(f"{lang}: untranslated (no i18n/{lang}/<lab>.json yet): {', '.join(missing)}")
    if args.check:
        problems = [p for lang in translations for lab in i18n.translated_labs(lang) for p in i18n.gate(lab, lang)]
        for p in problems:
            print(p)
        drift = course.release_drift()
        if drift:
            _die(f"labs/ is out of sync with solutions/ and i18n/: {', '.join(drift)}; run `llmlab release`")
        if any(p.error for p in problems):
            _die(f"{sum(p.error for p in problems)} translation error(s) above")
        print("labs/ is in sync with solutions/ and i18n/")
        return 0
    for lang in langs:
        if lang != i18n.ENGLISH and args.lab and not args.lang and not i18n.path(args.lab, lang).is_file():
            continue  # `llmlab release LAB` also writes the translations that lab has
        for path in course.release(args.lab, lang=lang):
            print(f"released {path.relative_to(course.root())}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Execute a lab notebook headless with papermill; fail unless every cell ran."""
    params = {name: course.parse_value(value) for name, value in (args.p or [])}
    if args.quick:
        params["QUICK"] = True
    where = "labs" if args.student else "solutions"
    paths = course.notebooks(args.lab, where)
    if not paths:
        _die(f"{args.lab} has no notebooks in {where}/", EXIT_SETUP)
    for path in paths:
        result = course.run(path, params, out_dir=args.out, progress=not args.no_progress)
        print(_("{notebook}: ok in {seconds:.1f} s -> {out}").format(
            notebook=path.relative_to(course.root()), seconds=result.seconds, out=result.notebook))
    return 0


def cmd_grade(args: argparse.Namespace) -> int:
    """Autograde a folder of submissions (sandboxed), write feedback, a grades CSV and a summary."""
    from llmlab.grading import pipeline

    lab = course.lab_id(args.lab)
    try:
        index, count = (int(x) for x in args.shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        _die(f"--shard must be INDEX/COUNT with 0 <= INDEX < COUNT, got {args.shard!r}", 2)
    if args.workers < 1:
        _die("--workers must be at least 1", 2)
    results = pipeline.grade(lab, args.submissions, workers=args.workers, force=args.force,
                             progress=not args.no_progress, shard=(index, count))
    grades, export = pipeline.write_reports(lab, results)
    print(pipeline.summary(lab, results))
    print(f"\ngrades: {grades}\ngradebook export: {export}\nfeedback: {course.work_dir() / 'feedback'}")
    return EXIT_FAIL if any(r.error for r in results) else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model behind an OpenAI-compatible HTTP API until interrupted."""
    from llmlab import serve

    limits = serve.machine_defaults()  # threads, max_batch, max_queue (4 x batch), max_tokens, timeout_s
    if args.max_batch is not None:
        limits.update(max_batch=args.max_batch, max_queue=4 * args.max_batch)
    given = {"threads": args.threads, "max_queue": args.max_queue, "max_tokens": args.max_tokens,
             "timeout_s": args.timeout}
    limits.update({k: v for k, v in given.items() if v is not None})
    threads = limits.pop("threads")
    config = serve.ServerConfig(model_name=args.model, api_key=args.api_key, **limits)
    serve.run(config, host=args.host, port=args.port, threads=threads, quantize=args.quantize)
    return 0


def cmd_course(args: argparse.Namespace) -> int:
    """The main job: assets, release, every lab headless in QUICK mode, grade sample submissions."""
    from llmlab.grading import samples

    if args.jobs < 1:
        _die("--jobs must be at least 1", 2)
    start = time.perf_counter()
    missing = assets.missing()
    downloads = [n for n in missing if not assets.get(n).builder]
    labs = course.labs()  # a built asset that names none of this course's labs is not built for it
    builds = {n: users for n in missing if assets.get(n).builder
              if (users := tuple(lab for lab in assets.get(n).needed_by or labs if lab in labs))}
    print(f"== {args.jobs} at once: " + (f"download {', '.join(downloads)}; " if downloads else "")
          + "".join(f"build {n} for {', '.join(users)}; " for n, users in builds.items())
          + "release, run every lab (QUICK) and grade its sample submissions")
    if args.jobs > 1:
        os.environ["OMP_NUM_THREADS"] = "1"  # two single-threaded jobs do more on two cores than one with two threads
    fetched = ("fetch",) if downloads else ()  # the builds and every lab wait for the downloads
    tasks = [course.cli_task("fetch", ["assets", "fetch", *downloads])] if downloads else []
    tasks += [course.cli_task(f"build {n}", ["build", n], fetched) for n in builds]  # first: they start the longest chain
    tasks.append(course.cli_task("release", ["release"]))
    behind = {lab: tuple(f"build {n}" for n, users in builds.items() if lab in users) for lab in labs}
    waits = {lab: (*fetched, *behind[lab]) for lab in labs}
    # the labs behind a build first (the longest chain), the others from the last: a short lab ends the queue
    for lab in sorted(labs[::-1], key=lambda lab: not behind[lab]):
        tasks += [course.run_task(lab, path, waits[lab]) for path in course.notebooks(lab)]
        tasks += samples.grade_tasks(lab, course.work_dir() / "samples" / lab, ("release", *waits[lab]),
                                     threads=1 if args.jobs > 1 else os.cpu_count() or 1)
    done = course.run_tasks(tasks, args.jobs)
    reports = [done[f"report {lab}"] for lab in labs]
    print("\n\n".join(table for table, _ in reports))
    print(f"\ncourse done in {time.perf_counter() - start:.0f} s; grades and feedback under {course.work_dir()}")
    failures = [line for _, problems in reports for line in problems]
    if failures:
        _die("sample grades differ from what they deserve: " + "; ".join(failures))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `llmlab` and its commands."""
    parser = argparse.ArgumentParser(prog="llmlab", description="LLM engineering course: labs, assets and grading.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("doctor", help="check versions, device, assets and the grading sandbox")
    p.add_argument("--check-release", action="store_true", help="also check labs/ is in sync with solutions/")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("assets", help="list, fetch, verify or locate models and datasets")
    p.add_argument("action", choices=["list", "fetch", "verify", "path"])
    p.add_argument("names", nargs="*", metavar="NAME", help="asset names (default: all)")
    p.add_argument("--force", action="store_true", help="re-hash a cached asset and fetch it again if it is wrong")
    p.set_defaults(func=cmd_assets)

    p = sub.add_parser("build", help="build a course-made asset into the cache, or every asset it lacks")
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="a built asset of `llmlab assets list` (course-gpt, tool-use-adapter, ...)")
    p.add_argument("--missing", action="store_true",
                   help="fetch or build, with the registry's recipes, every asset not (or no longer) in the cache")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const=True, dest="quick",
                      help="course-gpt: the small CPU-sized model (the registry's recipe)")
    size.add_argument("--full", action="store_const", const=False, dest="quick",
                      help="course-gpt: the full model, for a GPU")
    p.add_argument("--seed", type=int, help="the recipe's seed (same seed, same weights; default: the registry's)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("release", help="generate the student copies in labs/ from solutions/ (nbgrader)")
    p.add_argument("lab", nargs="?", help="lab id, e.g. 01-attention or 1 (default: all)")
    p.add_argument("--check", action="store_true",
                   help="only check labs/ (and labs/<lang>/) are in sync and the translations complete; exit 1 when not")
    p.add_argument("--lang", choices=list(i18n.LANGUAGES),
                   help="release (or check) only this language (default: English and every translation)")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("run", help="execute a lab notebook headless (papermill)")
    p.add_argument("lab", help="lab id, e.g. 01-attention or 1")
    p.add_argument("-p", nargs=2, action="append", metavar=("NAME", "VALUE"), help="set a parameter (Python literal)")
    p.add_argument("--quick", action="store_true", help="QUICK=True: the small CI-sized run")
    p.add_argument("--student", action="store_true", help="run the released student copy instead of the solution")
    p.add_argument("--out", type=Path, help="folder for the executed notebook (default: work/runs/LAB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("grade", help="autograde submissions in a sandbox; feedback, CSV and summary")
    p.add_argument("lab", help="lab id, e.g. 01-attention or 1")
    p.add_argument("submissions", type=Path, help="folder of SUBMISSIONS/<student>/<notebook>.ipynb")
    p.add_argument("--workers", type=int, default=1, help="submissions graded at once (default 1)")
    p.add_argument("--force", action="store_true", help="grade again even where a result exists")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="grade only the I-th of N slices of the students (one Kubernetes Job pod each)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_grade)

    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible HTTP API (lab 5)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="asset name or hub id (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("LLMLAB_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' (default: $LLMLAB_API_KEY, else no key)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the free cores at start)")
    p.add_argument("--max-batch", type=int, help="sequences decoded together (default: 8 on CPU, 32 on a GPU)")
    p.add_argument("--max-queue", type=int, help="requests waiting beyond the batch before 429 (default: 4 x batch)")
    p.add_argument("--max-tokens", type=int, help="cap on a request's max_tokens (default: 512)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="generation deadline of a request, from when it gets a batch slot; queue time not counted "
                        "(default: 300 on CPU, 120 on a GPU)")
    p.add_argument("--quantize", choices=("int8", "int4"),
                   help="weight-only quantized Linear layers, lab 4's formats on torch's packed kernels "
                        "(default: float32 weights)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("course", help="the main job: assets, release, run every lab (QUICK), grade samples")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="notebooks, sample gradings and asset builds run at once, one torch thread each "
                        "(default: 2, or 1 on one core)")
    p.set_defaults(func=cmd_course)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `llmlab` console script."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    try:
        sys.exit(args.func(args))
    except course.NotebookFailed as e:
        _die(str(e))
    except (course.CourseError, assets.AssetError) as e:
        _die(str(e), EXIT_SETUP)
    except KeyboardInterrupt:
        _die("interrupted", 130)


if __name__ == "__main__":
    main()

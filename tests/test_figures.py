"""Every measured figure in README.md and benchmarks/README.md comes from a results file: benchmarks/figures.py
registers each one with its source and how it is computed. These tests recompute every registered figure and find
it in its README, and scan both READMEs for measurement-looking numbers that no entry covers. Reads files only."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")  # no sys.path change
figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(figures)

NUM = r"\d[\d,]*(?:\.\d+)?"
# a number with a unit of measurement, a ratio, a mean ± std, a count of tests
MEASUREMENT = re.compile(
    rf"{NUM}\s*(?:±|\+-)\s*{NUM}"
    rf"|(?<![\w.]){NUM}(?:-{NUM})?\s*(?:x\b|SPS\b|GiB\b|MiB\b|GB\b|ms\b|us\b|s\b|%|episodes/s|steps/s|min\b|nats\b|tests\b|passed\b)"
)
BARE = re.compile(rf"(?<![\w.\-/]){NUM}k?(?![\w.])")  # any number, in a table of results
RESULTS_TABLE = re.compile(r"return|SPS|memory|seconds|score|ratio|steps to|KL|episodes/s|GiB|MiB|ms per", re.I)
HOW = ("register it in benchmarks/figures.py: fig(doc, text, source, compute) with the results file it comes from, "
       "or unsourced(...) with 'no results file' in its text, quoted(...) with where it comes from, not_measured(...) if it is no measurement")


def masked(text: str) -> str:
    """The text with code (fenced blocks, inline `code`) blanked out, offsets kept: flags and commands are no figures."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group())
    return re.sub(r"`[^`\n]*`", blank, re.sub(r"```.*?```", blank, text, flags=re.S))


def measurements(text: str) -> list:
    """(offset, figure) of every measurement-looking number of a doc."""
    code_free = masked(text)
    found = [(m.start(), m.end(), m.group()) for m in MEASUREMENT.finditer(code_free)]
    offset, header = 0, None
    for line in code_free.splitlines(keepends=True):
        if line.startswith("|"):
            if header is None:
                header = line
            elif not set(line.strip()) <= set("|-: ") and RESULTS_TABLE.search(header):
                found += [(offset + m.start(), offset + m.end(), m.group()) for m in BARE.finditer(line)]
        else:
            header = None
        offset += len(line)
    return found


def flat(text: str) -> tuple:
    """The text with each run of whitespace one space (READMEs wrap lines anywhere), and where each character went."""
    out, where = [], []
    for char in text:
        if char.isspace() and out and out[-1] == " ":
            where.append(len(out) - 1)
            continue
        where.append(len(out))
        out.append(" " if char.isspace() else char)
    return "".join(out), where


def spans(doc: str, text: str) -> list:
    """Where the registered figures of doc sit in flat(text), as (start, end)."""
    out = []
    for figure in figures.FIGURES:
        if figure.doc == doc:
            rendered = flat(figure.rendered())[0]
            for m in re.finditer(re.escape(rendered), text):
                end = m.end() if figure.until is None else text.find(flat(figure.until)[0], m.end()) + len(flat(figure.until)[0])
                out.append((m.start(), end if end >= m.end() else m.end()))
    return out


def test_every_registered_figure_is_in_its_readme_as_computed():
    missing = []
    for figure in figures.FIGURES:
        rendered = figure.rendered()
        if flat(rendered)[0] not in flat((ROOT / figure.doc).read_text())[0]:
            missing.append(f"{figure.doc}: {rendered!r} (from {figure.source}) is not in the text: correct the text, or the entry")
    assert not missing, "\n".join(missing)


def test_no_unregistered_measurement_in_the_readmes():
    unregistered = {}
    for doc in (figures.README, figures.BENCH):
        text = (ROOT / doc).read_text()
        flat_text, where = flat(text)
        covered = spans(doc, flat_text)
        for start, end, figure in measurements(text):
            if not any(a <= where[start] and where[end - 1] < b for a, b in covered):
                unregistered.setdefault(f"{doc}:{text.count(chr(10), 0, start) + 1}", []).append(repr(figure))
    lines = [f"{where}: {', '.join(found)} look(s) like a measurement that no results file backs" for where, found in unregistered.items()]
    assert not unregistered, "\n".join(lines) + f"\n{HOW}"


def stamped_file(data: dict) -> bool:
    """A stamp of its own: at the top, or on each run (a file whose runs are kept across invocations)."""
    runs = data.get("runs") or list(data.values())
    return "stamp" in data or bool(runs) and all(isinstance(r, dict) and "stamp" in r for r in runs)


def test_every_source_is_stamped():
    """A results file carries its stamp (benchmarks/stamp.py), or one recovered from git history."""
    recovered = figures.load("stamps_recovered.json")
    unstamped = set()
    for figure in figures.FIGURES:
        for source in figure.source if isinstance(figure.source, tuple) else (figure.source,):
            path = figures.RESULTS / source
            if not path.exists():
                continue
            if path.is_dir():
                runs = [p.parent for p in path.glob("*/seed*/*/metrics.jsonl.gz")]
                stamped = lambda run: any((d / "stamp.json").exists() for d in (run, run.parent)) or str(run.relative_to(figures.RESULTS)) in recovered
                unstamped |= {str(run) for run in runs if not stamped(run)}
            elif source not in recovered and not (path.suffix == ".json" and stamped_file(figures.load(source))):
                unstamped.add(source)
    assert not unstamped, f"results without a stamp: {sorted(unstamped)}"


def test_registered_sources_exist():
    kinds = ("quoted: ", "unsourced", "not measured: ")
    bad = [f.source for f in figures.FIGURES for s in (f.source if isinstance(f.source, tuple) else (f.source,))
           if not s.startswith(kinds) and not (figures.RESULTS / s).exists()]
    assert not bad, f"sources not in benchmarks/results/: {bad}"


def test_every_plot_the_readmes_show_exists():
    missing = []
    for doc in (figures.README, figures.BENCH):
        for path in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (ROOT / doc).read_text()):
            if not ((ROOT / doc).parent / path).exists():
                missing.append(f"{doc}: {path}")
    assert not missing, f"plots the READMEs show that are not there: {missing}"

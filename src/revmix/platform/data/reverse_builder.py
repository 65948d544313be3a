"""``revmix data reverse``: build reverse twins of forward rows with a teacher model (the paper's r1k set).

arXiv 2509.13079 builds its reverse data by asking a strong model to invert each forward item: the forward
answer becomes a given and one original premise becomes the unknown. For each forward item this module

1. prompts the teacher with ``reverse_question.txt`` (``{question}``, ``{solution}``, ``{answer}``) for a
   reply in the form ``Question: ...`` / ``Solution: ...`` / ``Answer: ...``. The ``Answer:`` value is the
   *expected premise*: the teacher itself says which premise it hid and what its value is, because a
   free-text forward question has no machine-readable list of premises to compare against;
2. checks consistency: a second, independent call with ``reverse_check.txt`` (``{question}``) solves the
   reverse question; the item is kept only when that answer (``answers.extract_answer``) is equivalent to
   the expected premise (``answers.is_equivalent`` under ``--answer-kind``, or equal as normalised text);
3. appends two canonical rows sharing ``item_id``: the forward row (``other_response`` = the reverse
   solution) and the reverse row (``other_response`` = the forward solution, ``answer`` = the premise).

Drop reasons: ``unparseable`` (the first reply lacks the format), ``inconsistent`` (the check disagrees or
states no answer), ``endpoint_error`` (the endpoint failed after the generator's retries).

Resumable: each item's rows go to ``OUT`` and each dropped item to ``OUT.dropped.jsonl`` as soon as it
finishes (one ``write`` per item, then flush + fsync). A re-run skips ids already kept in ``OUT`` or
dropped as ``unparseable``/``inconsistent``; ``endpoint_error`` items are retried, since the failure was
the endpoint's, not the item's. A torn last line (a kill mid-write) is cut off on resume. The report
(``OUT.report.json``, also printed) accounts for every forward item of the input (after ``--limit``):
kept + dropped by reason + pending == total.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from collections import Counter
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from revmix.platform.data.loaders import DataError, stable_item_id
from revmix.platform.data.schema import ALL_FIELDS
from revmix.platform.data.validate import FILE, Problem, check_rows, iter_records
from revmix.platform.evaluation.answers import KINDS, extract_answer, is_equivalent, normalize_text
from revmix.platform.generation.protocol import SamplingParams

QUESTION_TEMPLATE = "reverse_question.txt"
CHECK_TEMPLATE = "reverse_check.txt"
QUESTION_FIELDS: tuple[str, ...] = ("{question}", "{answer}")  # {solution} is optional
CHECK_FIELDS: tuple[str, ...] = ("{question}",)
REASONS: tuple[str, ...] = ("unparseable", "inconsistent", "endpoint_error")
FINAL_REASONS: frozenset[str] = frozenset({"unparseable", "inconsistent"})  # not retried on resume
NO_ANSWER = "(not stated; see the solution)"
MAX_LOGGED_CHARS = 4000
_LABEL = r"^[ \t>#*_]*{name}[ \t*_]*:[ \t*_]*"
_QUESTION = re.compile(_LABEL.format(name="question"), re.IGNORECASE | re.MULTILINE)
_SOLUTION = re.compile(_LABEL.format(name="solution"), re.IGNORECASE | re.MULTILINE)
_ANSWER = re.compile(_LABEL.format(name="answer"), re.IGNORECASE | re.MULTILINE)


class ResumeError(ValueError):
    """``OUT`` or its dropped log cannot be resumed from (a corrupt line, half a pair)."""


class TextGenerator(Protocol):
    """What the builder needs of a generator: ``OpenAIGenerator.generate`` (tests pass scripted fakes)."""

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]: ...


# ----------------------------------------------------------------------------------------------- templates


def load_template(path: str | Path | None, default: str, required: tuple[str, ...]) -> str:
    """A prompt template: ``path`` if given, else the shipped ``assets/prompts/<default>``.

    Placeholders are substituted with ``str.replace`` (not ``str.format``), so templates may contain LaTeX
    braces verbatim. A template missing a required placeholder is an error naming the file.
    """
    if path is None:
        text = (resources.files("revmix.assets") / "prompts" / default).read_text(encoding="utf-8")
        where = f"revmix/assets/prompts/{default}"
    else:
        text, where = Path(path).read_text(encoding="utf-8"), str(path)
    missing = [p for p in required if p not in text]
    if missing:
        raise ValueError(
            f"{where}: template lacks placeholder(s) {', '.join(missing)} (required: {required})"
        )
    return text


def fill(template: str, **values: str) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", value)
    return template


# ------------------------------------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class ReverseDraft:
    """The teacher's reverse item: question, worked solution (ending with its Answer line), premise."""

    question: str
    solution: str
    premise: str


def parse_reverse(text: str) -> ReverseDraft | None:
    """``Question:`` ... ``Solution:`` ... ``Answer:`` ... → a draft, or None when any part is missing.

    Labels may be markdown-decorated (``**Question:**``). The premise is the last ``Answer:`` line after
    ``Solution:`` (a ``\\boxed{}`` inside it is unwrapped); the solution keeps that line, so the reverse
    row's response states its own answer like a forward trace does.
    """
    if not isinstance(text, str):
        return None
    q = _QUESTION.search(text)
    s = _SOLUTION.search(text, q.end()) if q else None
    answers = list(_ANSWER.finditer(text, s.end())) if s else []
    if q is None or s is None or not answers:
        return None
    question = text[q.end() : s.start()].strip()
    solution = text[s.end() :].strip()
    premise = extract_answer(text[answers[-1].start() :]) or ""
    if not question or not premise.strip() or not text[s.end() : answers[-1].start()].strip():
        return None
    return ReverseDraft(question, solution, premise.strip())


def consistent(pred: str | None, gold: str, kind: str) -> bool:
    """The check's answer recovers the premise: equivalent under ``kind``, or equal as normalised text."""
    if pred is None:
        return False
    return is_equivalent(pred, gold, kind) or normalize_text(pred) == normalize_text(gold)


# -------------------------------------------------------------------------------------------------- input


def load_forward(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Forward rows of ``path`` and how many reverse rows were ignored.

    Records with ``direction`` are canonical rows (validated in full); records without it are plain
    ``prompt``/``response``[/``answer``/``item_id``/``task``] rows, taken as forward, with ``item_id`` =
    :func:`stable_item_id` of the prompt and ``task`` = the file stem when absent. Any problem raises
    :class:`DataError` naming file, line and field.
    """
    source = str(path)
    if not Path(path).is_file():
        raise DataError(source, [Problem(source, 1, FILE, "expected an existing JSONL file")], 0)
    records: list[tuple[int, Any]] = []
    for line, rec in iter_records(path):
        if isinstance(rec, dict) and "direction" not in rec:
            rec = dict(rec)
            rec["direction"] = "forward"
            prompt = rec.get("prompt")
            if rec.get("item_id") is None and isinstance(prompt, str) and prompt.strip():
                rec["item_id"] = stable_item_id(prompt)
            rec.setdefault("task", Path(path).stem)
            if isinstance(rec.get("answer"), int | float) and not isinstance(rec["answer"], bool):
                rec["answer"] = str(rec["answer"])
        records.append((line, rec))
    if not records:
        raise DataError(source, [Problem(source, 1, FILE, "expected at least one row, found none")], 0)
    result = check_rows(records, source)
    if result.problems:
        raise DataError(source, result.problems, len(records))
    rows = [{f: rec.get(f) for f in ALL_FIELDS} for _, rec in records]
    forward = [r for r in rows if r["direction"] == "forward"]
    return forward, len(rows) - len(forward)


# ------------------------------------------------------------------------------------------------ one item


@dataclass
class Outcome:
    """One item's result: two rows when kept, else a drop reason with the evidence."""

    item_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    teacher_output: str | None = None
    check_output: str | None = None


def build_item(
    generator: TextGenerator,
    row: dict[str, Any],
    question_template: str,
    check_template: str,
    params: SamplingParams,
    kind: str = "math",
) -> Outcome:
    """Run the two teacher calls for one forward row. Endpoint failures become ``endpoint_error``; any
    other exception propagates (a bug or an interrupt must stop the run, not be logged as data)."""
    from revmix.platform.generation.openai_backend import EndpointError

    item_id = row["item_id"]
    answer = row.get("answer") or extract_answer(row["response"]) or NO_ANSWER
    prompt = fill(question_template, question=row["prompt"], solution=row["response"], answer=answer)
    try:
        first = generator.generate([prompt], params)[0][0]
    except EndpointError as err:
        return Outcome(item_id, reason="endpoint_error", detail=f"reverse question: {err}")
    draft = parse_reverse(first)
    if draft is None:
        why = "expected 'Question: ...', 'Solution: ...', 'Answer: ...' in the teacher's reply"
        return Outcome(item_id, reason="unparseable", detail=why, teacher_output=first)
    try:
        check = generator.generate([fill(check_template, question=draft.question)], params)[0][0]
    except EndpointError as err:
        return Outcome(item_id, reason="endpoint_error", detail=f"check: {err}", teacher_output=first)
    pred = extract_answer(check)
    if not consistent(pred, draft.premise, kind):
        detail = f"check answered {pred!r}, expected premise {draft.premise!r} ({kind})"
        return Outcome(
            item_id, reason="inconsistent", detail=detail, teacher_output=first, check_output=check
        )
    fwd = dict(row, other_response=draft.solution)
    rev = {
        "item_id": item_id,
        "direction": "reverse",
        "task": row["task"],
        "prompt": draft.question,
        "response": draft.solution,
        "other_response": row["response"],
        "answer": draft.premise,
    }
    problems = check_rows([(1, fwd), (2, rev)], f"rows built for item {item_id}").problems
    if problems:  # parse_reverse guarantees non-empty fields, so this is a bug, not data
        raise RuntimeError(f"reverse_builder built invalid rows: {problems}")
    return Outcome(item_id, rows=[fwd, rev])


# ------------------------------------------------------------------------------------------ resumable output


def _read_jsonl_tolerant(path: Path) -> list[dict[str, Any]]:
    """Parsed lines of an append log; a torn last line (no newline) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(cut)
    out = []
    for n, line in enumerate(data[:cut].splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ResumeError(f"{path}:{n}: not JSON ({err}); fix or remove the line to resume") from err
    return out


class ResumableWriter:
    """Appends finished items to ``OUT`` / ``OUT.dropped.jsonl`` durably, and knows what is already done."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.dropped_path = Path(f"{out}.dropped.jsonl")
        self.report_path = Path(f"{out}.report.json")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        rows = _read_jsonl_tolerant(self.out)
        dirs: dict[str, set[str]] = {}
        for r in rows:
            dirs.setdefault(r["item_id"], set()).add(r["direction"])
        self.kept = {i for i, d in dirs.items() if d == {"forward", "reverse"}}
        if len(self.kept) != len(dirs):  # one row of a pair only: impossible with one write per item
            raise ResumeError(f"{self.out}: items {sorted(set(dirs) - self.kept)} lack a forward/reverse row")
        self.dropped: dict[str, str] = {}  # item_id -> last reason logged
        for rec in _read_jsonl_tolerant(self.dropped_path):
            self.dropped[rec["item_id"]] = rec["reason"]
        self._lock = threading.Lock()

    def done(self, item_id: str) -> bool:
        return item_id in self.kept or self.dropped.get(item_id) in FINAL_REASONS

    def record(self, outcome: Outcome) -> None:
        if outcome.rows:
            path, text = self.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outcome.rows)
        else:
            entry = {
                "item_id": outcome.item_id,
                "reason": outcome.reason,
                "detail": outcome.detail,
                "teacher_output": _clip(outcome.teacher_output),
                "check_output": _clip(outcome.check_output),
            }
            path, text = self.dropped_path, json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock, open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
            if outcome.rows:
                self.kept.add(outcome.item_id)
            else:
                self.dropped[outcome.item_id] = str(outcome.reason)


def _clip(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_LOGGED_CHARS else text[:MAX_LOGGED_CHARS] + "…"


# -------------------------------------------------------------------------------------------------- driver


def build_reverse(
    forward: list[dict[str, Any]],
    generator: TextGenerator,
    out: str | Path,
    *,
    question_template: str,
    check_template: str,
    params: SamplingParams,
    kind: str = "math",
    concurrency: int = 1,
) -> dict[str, Any]:
    """Process every forward row not yet done, ``concurrency`` items at a time; return the report dict.

    Finished items are written as they complete. If an item raises (anything but an endpoint error), the
    items still queued are cancelled, those already finished stay written, and the exception propagates.
    """
    writer = ResumableWriter(out)
    todo = [r for r in forward if not writer.done(r["item_id"])]
    this_run: Counter[str] = Counter()
    failure: BaseException | None = None
    stop = threading.Event()  # set by the first failing item: queued items must not start after it

    def guarded(row: dict[str, Any]) -> Outcome:
        if stop.is_set():
            raise CancelledError
        try:
            return build_item(generator, row, question_template, check_template, params, kind)
        except BaseException:
            stop.set()
            raise

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:  # finally: an interrupt (Ctrl-C) must cancel the queued items, not run them unrecorded
        futures = [pool.submit(guarded, r) for r in todo]
        for fut in as_completed(futures):
            try:
                outcome = fut.result()
            except CancelledError:
                continue
            except Exception as err:  # re-raised below, after the items finishing meanwhile are saved
                if failure is None:
                    failure = err
                    pool.shutdown(wait=False, cancel_futures=True)
                continue
            writer.record(outcome)
            this_run["kept" if outcome.rows else str(outcome.reason)] += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failure is not None:
        raise failure
    return make_report(forward, writer, this_run, skipped=len(forward) - len(todo))


def make_report(
    forward: list[dict[str, Any]], writer: ResumableWriter, this_run: Counter[str], skipped: int
) -> dict[str, Any]:
    """Final status of every input item (kept, dropped by reason, pending), written next to ``OUT``."""
    ids = [r["item_id"] for r in forward]
    status = Counter(
        "kept" if i in writer.kept else writer.dropped.get(i, "pending") for i in ids
    )  # endpoint_error is the last logged reason of an item still to retry
    report = {
        "out": str(writer.out),
        "dropped_log": str(writer.dropped_path),
        "n_items": len(ids),
        "kept": status["kept"],
        "dropped": {reason: status[reason] for reason in REASONS},
        "pending": status["pending"],
        "this_run": {key: this_run[key] for key in ("kept", *REASONS)},
        "skipped_already_done": skipped,
    }
    tmp = writer.report_path.with_name(writer.report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, writer.report_path)
    return report


def summary(report: dict[str, Any]) -> str:
    dropped = ", ".join(f"{n} {reason}" for reason, n in report["dropped"].items())
    return (
        f"{report['n_items']} forward items: {report['kept']} kept ({2 * report['kept']} rows in "
        f"{report['out']}), dropped: {dropped}, {report['pending']} pending; this run: {report['this_run']}, "
        f"{report['skipped_already_done']} skipped as already done"
    )


# ----------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, help="forward rows: canonical JSONL or plain prompt/response"
    )
    parser.add_argument(
        "--endpoint", required=True, help="OpenAI-compatible base URL, e.g. http://host:8000/v1"
    )
    parser.add_argument("--model", required=True, help="teacher model name served by the endpoint")
    parser.add_argument("--out", required=True, help="output JSONL (appended to; re-run to resume)")
    parser.add_argument("--limit", type=int, help="use only the first N forward items of the input")
    parser.add_argument("--prompt-template", help=f"override assets/prompts/{QUESTION_TEMPLATE}")
    parser.add_argument("--check-template", help=f"override assets/prompts/{CHECK_TEMPLATE}")
    parser.add_argument("--concurrency", type=int, default=8, help="items in flight at once")
    parser.add_argument("--max-tokens", type=int, default=2048, help="per teacher reply")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--answer-kind", default="math", choices=KINDS, help="premise comparison")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--max-retries", type=int, default=3, help="per request, on retryable failures")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))


def run(args: argparse.Namespace, generator: TextGenerator | None = None) -> int:
    """Exit 0 when every item is kept or finally dropped, 1 for bad input or endpoint errors left to
    retry, 2 for usage errors (bad option, template, output path)."""
    cmd = "revmix data reverse"
    if Path(args.out).suffix != ".jsonl":
        print(f"{cmd}: --out must be a .jsonl file (it is appended to), got {args.out!r}", file=sys.stderr)
        return 2
    if (args.limit is not None and args.limit < 1) or args.concurrency < 1:
        print(f"{cmd}: --limit and --concurrency must be >= 1", file=sys.stderr)
        return 2
    try:
        qt = load_template(args.prompt_template, QUESTION_TEMPLATE, QUESTION_FIELDS)
        ct = load_template(args.check_template, CHECK_TEMPLATE, CHECK_FIELDS)
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature)
    except (OSError, ValueError) as err:
        print(f"{cmd}: {err}", file=sys.stderr)
        return 2
    try:
        forward, n_reverse = load_forward(args.input)
    except DataError as err:
        print(err, file=sys.stderr)
        return 1
    forward = forward[: args.limit] if args.limit else forward
    if n_reverse:
        print(f"{args.input}: ignoring {n_reverse} reverse row(s); only forward rows are inverted")
    if generator is None:
        from revmix.platform.generation.openai_backend import OpenAIGenerator

        generator = OpenAIGenerator(
            args.endpoint,
            args.model,
            api_key=args.api_key,
            timeout=args.timeout,
            max_retries=args.max_retries,
            concurrency=1,  # one prompt per call; items run concurrently here
        )
    try:
        report = build_reverse(
            forward,
            generator,
            args.out,
            question_template=qt,
            check_template=ct,
            params=params,
            kind=args.answer_kind,
            concurrency=args.concurrency,
        )
    except ResumeError as err:
        print(f"{cmd}: {err}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"report: {args.out}.report.json; dropped items: {args.out}.dropped.jsonl")
    if report["dropped"]["endpoint_error"] or report["pending"]:
        print(f"{cmd}: endpoint errors left items unfinished; re-run the same command to retry them")
        return 1
    return 0

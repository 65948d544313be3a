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
states no answer), ``check_timeout`` (comparing the answers overran ``--check-timeout``), ``endpoint_error``
(the endpoint failed after the client's retries), ``failed`` (anything else went wrong with the item: the
exception and its traceback are logged). One item's failure never stops the others; only an interrupt
(Ctrl-C) or a write that fails stops the run.

The endpoint is called through the ``openai`` client (``OpenAIGenerator``), whose retries of 408/409/429/5xx
and connection errors wait what the server's ``Retry-After`` asks (seconds or an HTTP date, up to two
minutes; a longer one is not retried) and otherwise back off exponentially with jitter.

Answers are compared in a child process (:class:`AnswerChecker`) killed when it overruns: ``math_verify``'s
own time limit works only on a main thread, and a pathological answer can compute for hours.

Resumable: each item's rows go to ``OUT`` and each dropped item to ``OUT.dropped.jsonl`` as soon as it
finishes (one ``write`` per item, then flush + fsync). A re-run skips ids already kept in ``OUT`` or
dropped for a reason of the item's own (``unparseable``, ``inconsistent``, ``check_timeout``);
``endpoint_error`` and ``failed`` items are tried again. What a kill mid-write leaves at the end of a log is
repaired on resume: a torn last line is cut, a whole last record that lost only its newline is kept, and
a pair cut after its forward row is removed (the item is redone). The report (``OUT.report.json``, also
printed) accounts for every forward item of the input (after ``--limit``): kept + dropped by reason +
pending == total.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from revmix.atomic import atomic_write
from revmix.platform.data.loaders import DataError, load_records, stable_item_id
from revmix.platform.data.validate import FILE, Problem, Record, check_rows, iter_records
from revmix.platform.evaluation.answers import KINDS, extract_answer, normalize_text
from revmix.platform.generation.protocol import SamplingParams

QUESTION_TEMPLATE = "reverse_question.txt"
CHECK_TEMPLATE = "reverse_check.txt"
QUESTION_FIELDS: tuple[str, ...] = ("{question}", "{answer}")  # {solution} is optional
CHECK_FIELDS: tuple[str, ...] = ("{question}",)
REASONS: tuple[str, ...] = ("unparseable", "inconsistent", "check_timeout", "endpoint_error", "failed")
# An item dropped for one of these would be dropped again: a re-run skips it. The others are retried.
FINAL_REASONS: frozenset[str] = frozenset({"unparseable", "inconsistent", "check_timeout"})
RETRIED_REASONS: tuple[str, ...] = tuple(r for r in REASONS if r not in FINAL_REASONS)
CHECK_START_TIMEOUT_S = 120.0  # the checker's start: a Python process importing sympy on a loaded machine
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


def consistent(pred: str | None, gold: str, kind: str, checker: AnswerChecker) -> bool | None:
    """The check's answer recovers the premise: equal as normalised text, or equivalent under ``kind``
    (``answers.is_equivalent``, run by ``checker``); None when the comparison overran its time limit."""
    if pred is None:
        return False
    if normalize_text(pred) == normalize_text(gold):
        return True
    return checker.equivalent(pred, gold, kind)


# The checker child: one JSON ``[pred, gold, kind]`` per input line, one JSON verdict per output line. It
# imports only the light answers module (not this one, which pulls in torch through the data schema).
_CHECKER_CODE = """
import json, sys
from revmix.platform.evaluation.answers import is_equivalent
for line in sys.stdin:
    pred, gold, kind = json.loads(line)
    print(json.dumps(bool(is_equivalent(pred, gold, kind))), flush=True)
"""


class AnswerChecker:
    """``answers.is_equivalent`` in a child process, each comparison bounded by ``timeout_s`` seconds.

    The builder compares answers on worker threads, where ``math_verify`` cannot use its ``signal.alarm``
    time limit, and some answers (``9^{9^{9^{9}}}``) make sympy compute for hours while holding the GIL, so
    no thread of this process could stop it. The child compares on its main thread; when it overruns it is
    killed, the call answers None, and the next call starts a fresh child. Calls are serialised.
    """

    def __init__(self, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ValueError(f"AnswerChecker: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> AnswerChecker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def equivalent(self, pred: str, gold: str, kind: str) -> bool | None:
        """``is_equivalent(pred, gold, kind)``, or None when it took longer than ``timeout_s``."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            verdict = self._ask([pred, gold, kind], self.timeout_s)
            if verdict is None:
                self.close()
            return verdict

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _start(self) -> None:
        """A fresh child, warmed up (sympy imported) under its own, longer time limit."""
        import revmix

        src = str(Path(revmix.__file__).resolve().parents[1])  # the child imports this revmix
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHECKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            env=env,
        )
        if self._ask(["1/2", "0.5", "math"], CHECK_START_TIMEOUT_S) is None:
            self.close()
            raise RuntimeError(f"the answer checker did not start within {CHECK_START_TIMEOUT_S:.0f} s")

    def _ask(self, request: list[str], timeout_s: float) -> bool | None:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
        line = proc.stdout.readline() if ready else None
        if line == "":  # the child died: a crash is not a time-out
            code = proc.wait()
            self._proc = None
            raise RuntimeError(f"the answer checker exited with code {code} while comparing answers")
        return None if line is None else bool(json.loads(line))


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
    rows = load_records(_as_canonical(iter_records(path), Path(path).stem), source).rows
    forward = [r for r in rows if r["direction"] == "forward"]
    return forward, len(rows) - len(forward)


def _as_canonical(records: Iterable[Record], task: str) -> Iterator[Record]:
    """Plain rows (no ``direction``) completed as forward canonical rows; other records unchanged."""
    for line, rec in records:
        if isinstance(rec, dict) and "direction" not in rec:
            rec = dict(rec)
            rec["direction"] = "forward"
            prompt = rec.get("prompt")
            if rec.get("item_id") is None and isinstance(prompt, str) and prompt.strip():
                rec["item_id"] = stable_item_id(prompt)
            rec.setdefault("task", task)
            if isinstance(rec.get("answer"), int | float) and not isinstance(rec["answer"], bool):
                rec["answer"] = str(rec["answer"])
        yield line, rec


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
    traceback: str | None = None  # of a ``failed`` item


def failed_outcome(item_id: str, err: Exception) -> Outcome:
    """An item that raised: logged with the exception and its traceback, and tried again by a re-run."""
    text = "".join(traceback.format_exception(err))
    return Outcome(item_id, reason="failed", detail=f"{type(err).__name__}: {err}", traceback=text)


def build_item(
    generator: TextGenerator,
    row: dict[str, Any],
    question_template: str,
    check_template: str,
    params: SamplingParams,
    checker: AnswerChecker,
    kind: str = "math",
) -> Outcome:
    """Run the two teacher calls for one forward row and compare the answers (under ``checker``'s time
    limit). Endpoint failures become ``endpoint_error``; any other exception propagates (the caller logs it
    as this item's failure)."""
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
    verdict = consistent(pred, draft.premise, kind, checker)
    if not verdict:
        reason = "inconsistent" if verdict is False else "check_timeout"
        detail = f"check answered {_clip(pred, 200)!r}, expected premise {draft.premise!r} ({kind})"
        if verdict is None:
            detail += f": the comparison took longer than {checker.timeout_s:g} s"
        return Outcome(item_id, reason=reason, detail=detail, teacher_output=first, check_output=check)
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


@dataclass(frozen=True)
class LogRecord:
    """One record of an append log: its line number, the byte offset where the line starts, the record."""

    line: int
    offset: int
    data: dict[str, Any]


def read_log(path: Path, required: tuple[str, ...]) -> list[LogRecord]:
    """The records of an append log (each a JSON object with string ``required`` fields), repairing the
    damage a kill mid-write leaves at its end.

    Only the last line may lack its newline. When it does not parse it is torn and is cut off the file; when
    it parses it is whole and only its newline was lost, so the newline is added (the next append must not
    merge with it). Any other line that is not such a record is a :class:`ResumeError` naming it.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last element is what follows the last newline ("" normally)
    records, offset = [], 0
    for number, raw in enumerate(lines, start=1):
        tail = number == len(lines)
        if raw.strip():
            record = _parse_log_line(raw, required)
            if isinstance(record, str):
                if not tail:
                    raise ResumeError(f"{path}:{number}: {record}; fix or remove the line to resume")
                _truncate(path, offset)  # torn by a kill mid-write
                break
            if tail:
                _append_durably(path, b"\n")
            records.append(LogRecord(number, offset, record))
        offset += len(raw) + 1
    return records


def _parse_log_line(raw: bytes, required: tuple[str, ...]) -> dict[str, Any] | str:
    """The record on one line, or why it is not one."""
    try:
        record = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError for bytes cut inside a character
        return f"not JSON ({err})"
    missing = [f for f in required if not isinstance(record, dict) or not isinstance(record.get(f), str)]
    if missing:
        return f"expected a JSON object with string field(s) {', '.join(missing)}"
    return record


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)
        fh.flush()
        os.fsync(fh.fileno())


def _append_durably(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _complete_pairs(path: Path, records: list[LogRecord]) -> set[str]:
    """Ids whose forward and reverse rows are both in ``OUT``; a pair cut after its first row (the file's
    last item) is removed from the file. An incomplete pair anywhere else is a :class:`ResumeError`."""
    rows: dict[str, list[LogRecord]] = {}
    for rec in records:
        rows.setdefault(rec.data["item_id"], []).append(rec)
    complete = {i for i, rs in rows.items() if {r.data["direction"] for r in rs} == {"forward", "reverse"}}
    last = records[-1].data["item_id"] if records else None
    if last is not None and last not in complete and len(rows[last]) == 1:
        _truncate(path, rows.pop(last)[0].offset)  # the kill came between the two rows of one write
    broken = sorted(set(rows) - complete)
    if broken:  # one write per item cannot leave these: the file was edited
        where = ", ".join(f"{i} (line {rows[i][0].line})" for i in broken)
        raise ResumeError(f"{path}: item(s) {where} lack a forward or a reverse row; remove them to resume")
    return complete


class ResumableWriter:
    """Appends finished items to ``OUT`` / ``OUT.dropped.jsonl`` durably, and knows what is already done."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.dropped_path = Path(f"{out}.dropped.jsonl")
        self.report_path = Path(f"{out}.report.json")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.kept = _complete_pairs(self.out, read_log(self.out, ("item_id", "direction")))
        self.dropped: dict[str, str] = {}  # item_id -> last reason logged
        for rec in read_log(self.dropped_path, ("item_id", "reason")):
            self.dropped[rec.data["item_id"]] = rec.data["reason"]
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
                "traceback": _clip(outcome.traceback),
            }
            path, text = self.dropped_path, json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            _append_durably(path, text.encode("utf-8"))
            if outcome.rows:
                self.kept.add(outcome.item_id)
            else:
                self.dropped[outcome.item_id] = str(outcome.reason)


def _clip(text: str | None, limit: int = MAX_LOGGED_CHARS) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit] + "…"


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
    check_timeout: float = 10.0,
) -> dict[str, Any]:
    """Process every forward row not yet done, ``concurrency`` items at a time; return the report dict.

    Finished items are written as they complete. An item that raises is logged as ``failed`` and the run
    goes on. An interrupt (Ctrl-C) or a write that fails cancels the items still queued and propagates;
    the items finished before it stay written.
    """
    writer = ResumableWriter(out)
    todo = [r for r in forward if not writer.done(r["item_id"])]
    this_run: Counter[str] = Counter()
    stop = threading.Event()  # set when the run stops: queued items must not start after it

    def guarded(row: dict[str, Any], checker: AnswerChecker) -> Outcome:
        if stop.is_set():
            raise CancelledError
        try:
            return build_item(generator, row, question_template, check_template, params, checker, kind)
        except Exception as err:  # this item's failure, not the run's: logged, retried by a re-run
            return failed_outcome(row["item_id"], err)
        except BaseException:
            stop.set()
            raise

    with AnswerChecker(check_timeout) as checker:
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
        try:  # finally: an interrupt must cancel the queued items, not run them unrecorded
            futures = [pool.submit(guarded, r, checker) for r in todo]
            for fut in as_completed(futures):
                try:
                    outcome = fut.result()
                except CancelledError:
                    continue
                writer.record(outcome)
                this_run["kept" if outcome.rows else str(outcome.reason)] += 1
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
    return make_report(forward, writer, this_run, skipped=len(forward) - len(todo))


def make_report(
    forward: list[dict[str, Any]], writer: ResumableWriter, this_run: Counter[str], skipped: int
) -> dict[str, Any]:
    """Final status of every input item (kept, dropped by reason, pending), written next to ``OUT``."""
    ids = [r["item_id"] for r in forward]
    status = Counter(
        "kept" if i in writer.kept else writer.dropped.get(i, "pending") for i in ids
    )  # endpoint_error / failed: the last logged reason of an item still to retry
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
    atomic_write(writer.report_path, json.dumps(report, indent=2) + "\n")
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
    parser.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="per request, on 408/409/429/5xx and connection errors (waiting what Retry-After asks)",
    )
    parser.add_argument(
        "--check-timeout",
        type=float,
        default=10.0,
        help="seconds to compare one check answer with its premise; longer drops the item (check_timeout)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("REVMIX_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY",
        help="bearer key of the teacher endpoint (default: $REVMIX_API_KEY, then $OPENAI_API_KEY)",
    )


def run(args: argparse.Namespace, generator: TextGenerator | None = None) -> int:
    """Exit 0 when every item is kept or finally dropped, 1 for bad input or items left to retry (endpoint
    errors, failures), 2 for usage errors (bad option, template, output path, a log that cannot resume)."""
    cmd = "revmix data reverse"
    try:  # usage errors: each is one line on stderr and exit code 2
        if Path(args.out).suffix != ".jsonl":
            raise ValueError(f"--out must be a .jsonl file (it is appended to), got {args.out!r}")
        if (args.limit is not None and args.limit < 1) or args.concurrency < 1:
            raise ValueError("--limit and --concurrency must be >= 1")
        if not 0 < args.check_timeout < float("inf"):
            raise ValueError(
                f"--check-timeout must be a positive number of seconds, got {args.check_timeout}"
            )
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
            check_timeout=args.check_timeout,
        )
    except ResumeError as err:
        print(f"{cmd}: {err}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"report: {args.out}.report.json; dropped items: {args.out}.dropped.jsonl")
    retry = {r: report["dropped"][r] for r in RETRIED_REASONS if report["dropped"][r]}
    if retry or report["pending"]:
        why = ", ".join(f"{n} {r}" for r, n in retry.items()) or f"{report['pending']} pending"
        print(
            f"{cmd}: items left unfinished ({why}; see {args.out}.dropped.jsonl); re-run the same command to retry them"
        )
        return 1
    return 0

"""``revmix data reverse``: parsing, keep/drop accounting, resume, and one run against ``revmix serve``.

The keep path is tested with a scripted teacher (same ``generate`` interface as ``OpenAIGenerator``); the
real-server test only checks the pipeline and the accounting (a random tiny model writes junk).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from revmix.platform.data import reverse_builder as rb
from revmix.platform.data.validate import check_file
from revmix.platform.generation.openai_backend import EndpointError
from revmix.platform.generation.protocol import SamplingParams

# (forward question, forward answer, the premise the teacher hides, reverse question)
ITEMS = [
    (f"What is {a} + {b}?", str(a + b), str(a), f"A number plus {b} equals {a + b}. What is the number?")
    for a, b in ((3, 4), (10, 5), (2, 9), (7, 7))
]


def forward_rows(n: int = 4) -> list[dict]:
    return [
        {
            "item_id": f"i{k}",
            "direction": "forward",
            "task": "toy/add",
            "prompt": q,
            "response": f"Add them. Answer: {ans}",
            "answer": ans,
        }
        for k, (q, ans, _, _) in enumerate(ITEMS[:n])
    ]


class Teacher:
    """Scripted teacher: well-formed reverse items; the check answers ``premise`` (or ``wrong`` for the
    questions listed in ``inconsistent``); ``fail_on_call`` raises ``error`` on that call number (1-based)."""

    def __init__(
        self,
        inconsistent: tuple[str, ...] = (),
        fail_on_call: int | None = None,
        error: BaseException | None = None,
        junk: tuple[str, ...] = (),
    ) -> None:
        self.inconsistent, self.junk, self.fail_on_call = inconsistent, junk, fail_on_call
        self.error: BaseException = error or RuntimeError("teacher crashed")
        self.calls: list[str] = []

    def generate(self, prompts: list[str], params: SamplingParams) -> list[list[str]]:
        assert len(prompts) == 1 and params.max_new_tokens == 64
        self.calls.append(prompts[0])
        if len(self.calls) == self.fail_on_call:
            raise self.error
        for fq, _, premise, rq in ITEMS:
            if "Original problem:" in prompts[0] and fq in prompts[0]:
                if fq in self.junk:
                    return [["I cannot do that."]]
                return [[f"**Question:** {rq}\nSolution: Subtract: it is {premise}.\nAnswer: {premise}"]]
            if "Solve the following" in prompts[0] and rq in prompts[0]:
                return [[f"Work.\nAnswer: {'99' if fq in self.inconsistent else premise}"]]
        raise AssertionError(f"unexpected prompt {prompts[0]!r}")


def build(tmp_path: Path, teacher: Teacher, n: int = 4, concurrency: int = 1) -> dict:
    return rb.build_reverse(
        forward_rows(n),
        teacher,
        tmp_path / "out.jsonl",
        question_template=rb.load_template(None, rb.QUESTION_TEMPLATE, rb.QUESTION_FIELDS),
        check_template=rb.load_template(None, rb.CHECK_TEMPLATE, rb.CHECK_FIELDS),
        params=SamplingParams(max_new_tokens=64),
        concurrency=concurrency,
    )


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def args_for(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    rb.add_arguments(parser)
    base = ["--input", str(tmp_path / "in.jsonl"), "--endpoint", "http://127.0.0.1:1/v1", "--model", "t"]
    return parser.parse_args([*base, "--out", str(tmp_path / "out.jsonl"), "--max-tokens", "64", *extra])


# ----------------------------------------------------------------------------------------------- parsing


def test_parse_reverse_reads_the_three_sections() -> None:
    text = "**Question:** Given 7, find x.\n\n**Solution:** x = 7 - 4.\nso x = 3.\nAnswer: $\\boxed{3}$."
    assert rb.parse_reverse(text) == rb.ReverseDraft(
        "Given 7, find x.", "x = 7 - 4.\nso x = 3.\nAnswer: $\\boxed{3}$.", "3"
    )
    assert rb.parse_reverse("Question: q\nSolution: s\nAnswer: 1\nAnswer: 2").premise == "2"


@pytest.mark.parametrize(
    "text",
    ["", "Question: q\nAnswer: 3", "Solution: s\nAnswer: 3", "Question: q\nSolution: s", "Question:\nSolution: s\nAnswer: 3",
     "Question: q\nSolution:\nAnswer: 3", "Question: q\nSolution: s\nAnswer:  "],
)  # fmt: skip
def test_parse_reverse_rejects_incomplete_replies(text: str) -> None:
    assert rb.parse_reverse(text) is None


def test_template_without_its_placeholder_is_a_usage_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps(forward_rows(1)[0]) + "\n")
    (tmp_path / "t.txt").write_text("Invert {question}.")  # no {answer}
    assert rb.run(args_for(tmp_path, "--prompt-template", str(tmp_path / "t.txt")), Teacher()) == 2
    assert "t.txt: template lacks placeholder(s) {answer}" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- keep / drop paths


def test_consistent_items_become_forward_and_reverse_twins(tmp_path: Path) -> None:
    report = build(tmp_path, Teacher(), n=2, concurrency=2)
    rows = sorted(read(tmp_path / "out.jsonl"), key=lambda r: (r["item_id"], r["direction"]))
    assert [(r["item_id"], r["direction"]) for r in rows] == [
        ("i0", "forward"), ("i0", "reverse"), ("i1", "forward"), ("i1", "reverse")
    ]  # fmt: skip
    fwd, rev = rows[0], rows[1]
    solution = "Subtract: it is 3.\nAnswer: 3"
    assert fwd == {**forward_rows(1)[0], "other_response": solution}
    assert rev == {
        "item_id": "i0",
        "direction": "reverse",
        "task": "toy/add",
        "prompt": ITEMS[0][3],
        "response": solution,
        "other_response": "Add them. Answer: 7",
        "answer": "3",
    }
    assert check_file(tmp_path / "out.jsonl", require_pairs=True).problems == []
    assert report["kept"] == 2 and report["dropped"] == dict.fromkeys(rb.REASONS, 0)
    assert json.loads((tmp_path / "out.jsonl.report.json").read_text()) == report


def test_inconsistent_and_unparseable_items_are_dropped_with_reasons(tmp_path: Path) -> None:
    teacher = Teacher(inconsistent=(ITEMS[1][0],), junk=(ITEMS[2][0],))
    report = build(tmp_path, teacher)
    assert {r["item_id"] for r in read(tmp_path / "out.jsonl")} == {"i0", "i3"}
    dropped = {d["item_id"]: d for d in read(tmp_path / "out.jsonl.dropped.jsonl")}
    assert dropped["i1"]["reason"] == "inconsistent"
    assert dropped["i1"]["detail"] == "check answered '99', expected premise '10' (math)"
    assert dropped["i1"]["check_output"] == "Work.\nAnswer: 99"
    assert dropped["i2"]["reason"] == "unparseable" and dropped["i2"]["teacher_output"] == "I cannot do that."
    assert dropped["i2"]["check_output"] is None
    assert len(teacher.calls) == 7  # the unparseable item never reaches the check
    assert (report["kept"], report["dropped"], report["pending"]) == (
        2, {**dict.fromkeys(rb.REASONS, 0), "unparseable": 1, "inconsistent": 1}, 0
    )  # fmt: skip
    again = build(tmp_path, Teacher())  # final drops are not retried
    assert again["this_run"] == dict.fromkeys(("kept", *rb.REASONS), 0)
    assert again["skipped_already_done"] == 4


# ---------------------------------------------------------------------------------------------- resume


def test_a_crash_loses_nothing_written_and_a_rerun_finishes_without_duplicates(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):  # an interrupt stops the run (an item's own error does not)
        build(tmp_path, Teacher(fail_on_call=5, error=KeyboardInterrupt()))  # items 1-2 take calls 1-4
    assert sorted({r["item_id"] for r in read(tmp_path / "out.jsonl")}) == ["i0", "i1"]
    with open(tmp_path / "out.jsonl", "a") as fh:
        fh.write('{"item_id": "i2", "direc')  # a torn line from a kill mid-write
    teacher = Teacher()
    report = build(tmp_path, teacher)
    rows = read(tmp_path / "out.jsonl")
    assert len(rows) == 8 and len({(r["item_id"], r["direction"]) for r in rows}) == 8
    assert len(teacher.calls) == 4  # only items i2, i3 were asked again
    assert (report["n_items"], report["kept"], report["skipped_already_done"]) == (4, 4, 2)
    assert report["this_run"]["kept"] == 2


def test_endpoint_errors_are_counted_and_retried_by_a_rerun(tmp_path: Path, capsys) -> None:
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in forward_rows(3)))
    flaky = Teacher(fail_on_call=3, error=EndpointError("POST /chat/completions failed after 4 attempts"))
    assert rb.run(args_for(tmp_path, "--concurrency", "1"), flaky) == 1  # item i1's first call fails
    out = capsys.readouterr().out
    assert "3 forward items: 2 kept (4 rows in" in out and "1 endpoint_error" in out and "re-run" in out
    dropped = read(tmp_path / "out.jsonl.dropped.jsonl")
    assert [(d["item_id"], d["reason"]) for d in dropped] == [("i1", "endpoint_error")]
    assert rb.run(args_for(tmp_path), Teacher()) == 0
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert (report["kept"], report["dropped"]["endpoint_error"], report["this_run"]["kept"]) == (3, 0, 1)


def test_plain_rows_get_stable_ids_and_limit_applies(tmp_path: Path, capsys) -> None:
    from revmix.platform.data.loaders import stable_item_id

    plain = [{"prompt": q, "response": f"Answer: {a}", "answer": int(a)} for q, a, _, _ in ITEMS]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    assert rb.run(args_for(tmp_path, "--limit", "2"), Teacher()) == 0
    rows = read(tmp_path / "out.jsonl")
    assert {r["item_id"] for r in rows} == {stable_item_id(ITEMS[0][0]), stable_item_id(ITEMS[1][0])}
    assert {(r["task"], r["direction"], r["answer"]) for r in rows if r["item_id"] == stable_item_id(ITEMS[0][0])} == {
        ("in", "forward", "7"), ("in", "reverse", "3")
    }  # fmt: skip


def test_bad_input_rows_are_named_by_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "in.jsonl").write_text(json.dumps(forward_rows(1)[0]) + '\n{"prompt": "q"}\n')
    assert rb.run(args_for(tmp_path), Teacher()) == 1
    assert "in.jsonl:2: response" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


# ---------------------------------------------------------------------------------- against revmix serve


@pytest.mark.integration
@pytest.mark.slow
def test_end_to_end_against_revmix_serve(ray_local, tmp_path: Path, capsys) -> None:
    from revmix.cli import main
    from revmix.platform.generation.serve import start_server, stop_server
    from revmix.platform.models import resolve_model_path

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in forward_rows(4)))
    url = start_server(resolve_model_path(None, "tiny", 0), host="127.0.0.1", name="teacher", num_cpus=0.5)
    try:
        out = tmp_path / "out.jsonl"
        argv = ["data", "reverse", "--input", str(path), "--endpoint", url, "--model", "teacher"]
        argv += ["--out", str(out), "--limit", "3", "--max-tokens", "8", "--concurrency", "3"]
        assert main(argv) == 0
        report = json.loads(Path(f"{out}.report.json").read_text())
        dropped = read(Path(f"{out}.dropped.jsonl"))
        assert report["n_items"] == 3 and report["dropped"]["endpoint_error"] == 0 and report["pending"] == 0
        assert report["kept"] + report["dropped"]["unparseable"] + report["dropped"]["inconsistent"] == 3
        assert len(read(out)) == 2 * report["kept"] and len(dropped) == 3 - report["kept"]
        assert main(argv) == 0  # resume: nothing left to do
        again = json.loads(Path(f"{out}.report.json").read_text())
        assert again["skipped_already_done"] == 3 and sum(again["this_run"].values()) == 0
        assert len(read(Path(f"{out}.dropped.jsonl"))) == len(dropped)
    finally:
        stop_server()

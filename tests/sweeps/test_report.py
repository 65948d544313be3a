"""The report from a hand-made results table and metrics files: no Ray, no training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from revmix.sweeps import results as res
from revmix.sweeps.report import alp_cross_table, read_metrics, write_report
from revmix.sweeps.spec import parse_sweep
from tests.sweeps.helpers import BASE_RAW, sweep_raw

R_VALUES = (0.0, 0.5, 1.0)
SEEDS = (0, 1)


def _margin(r: float, test_dir: str, seed: int, step: int) -> float:
    """Synthetic ALP margins: training on a direction separates y+/y− on that direction's questions."""
    own = (1 - r) if test_dir == "forward" else r
    return round(own * 1.2 * step / 4 + 0.01 * seed, 6)


def _make_sweep_dir(tmp_path: Path) -> tuple[Path, object]:
    raw = sweep_raw(
        space={
            "stages.0.mix.reverse_fraction": {"grid": list(R_VALUES)},
            "stages.0.objective.name": {"grid": ["sft", "unlikelihood"]},
        },
        seeds=list(SEEDS),
    )
    spec = parse_sweep(raw, tmp_path / "sweep.yaml", base_raw=BASE_RAW)
    (tmp_path / "spec.json").write_text(json.dumps(spec.to_dict()))
    rows = []
    i = 0
    for obj in ("sft", "unlikelihood"):
        for r in R_VALUES:
            for seed in SEEDS:
                tid = f"t_{i:05d}"
                i += 1
                run = tmp_path / "trials" / tid / "run"
                run.mkdir(parents=True)
                with open(run / "metrics.jsonl", "w") as f:
                    for step in range(1, 5):
                        rec = {"stage": 0, "stage_name": "sft", "step": step, "loss": 3.0 - 0.2 * step - r}
                        if obj == "unlikelihood":  # it logs the likelihoods of y+ and y− per step
                            for d in ("forward", "reverse"):
                                c, rej = -1.0 - 0.01 * step * (seed + 1), -1.2 - 0.1 * step
                                rec |= {f"logps/chosen/{d}": 30 * c, f"logps/rejected/{d}": 30 * rej}
                                rec |= {
                                    f"logps/chosen_per_token/{d}": c,
                                    f"logps/rejected_per_token/{d}": rej,
                                }
                                rec[f"entropy/chosen/{d}"] = 1.5 + 0.02 * step
                        if step % 2 == 0:  # ALP at "epoch ends"
                            for d in ("forward", "reverse"):
                                rec[f"alp/{d}/margin"] = _margin(r, d, seed, step)
                        f.write(json.dumps(rec) + "\n")
                acc = 0.4 + 0.2 * r + (0.1 if obj == "unlikelihood" else 0.0) + 0.02 * seed
                final = {
                    "eval/accuracy/synthetic": acc,
                    "eval/accuracy/synthetic/forward": acc - 0.1,
                    "eval/accuracy/synthetic/reverse": acc + 0.1,
                    "final/loss": 2.2 - r,
                }
                for d in ("forward", "reverse"):
                    m = _margin(r, d, seed, 4)
                    final.update(
                        {
                            f"eval/alp/{d}/chosen": -1.0,
                            f"eval/alp/{d}/rejected": -1.0 - m,
                            f"eval/alp/{d}/margin": m,
                        }
                    )
                point = {"stages.0.mix.reverse_fraction": r, "stages.0.objective.name": obj}
                rows.append(
                    res.make_row(
                        spec,
                        tid,
                        point,
                        seed,
                        final=final,
                        status=res.STATUS_OK,
                        error=None,
                        wall_s=1.0,
                        run_dir=f"trials/{tid}/run",
                    )
                )
    rows.append(
        res.make_row(
            spec,
            "t_99999",
            {"stages.0.mix.reverse_fraction": 0.5, "stages.0.objective.name": "sft"},
            2,
            final=None,
            status=res.STATUS_ERROR,
            error="RuntimeError: worker died",
            wall_s=0.5,
            run_dir="trials/t_99999/run",
        )
    )
    table = res.build_table(rows, list(spec.space))
    res.write_table(table, tmp_path)
    return tmp_path, spec


def test_report_has_every_plot_and_is_self_contained(tmp_path: Path):
    out, spec = _make_sweep_dir(tmp_path)
    html_path = write_report(out)  # spec from spec.json, table from results.parquet
    assert html_path == out / "report.html"
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == [
        "accuracy_vs_r_synthetic.png",
        "alp_cross_direction.png",
        "alp_margin_curves.png",
        "likelihood_mechanism.png",  # unlikelihood logged log π(y+), log π(y−)
        "loss_curves.png",
        "metric_by_path.png",
        "objectives.png",  # the objective name is swept
    ]
    for p in (out / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == 7
    assert not re.search(r'src="(?!data:)', page)  # nothing external: the file travels alone
    assert "<li><code>t_99999</code>: RuntimeError: worker died</li>" in page
    assert "<td>forward → forward</td><td>paper</td><td>+0.323</td>" in page  # the paper's table
    assert "<li><b>holds in 2/2 seeds</b> — Same-direction margins" in page
    md = (out / "report.md").read_text()
    assert md.count("](plots/") == 7 and "skipped" not in md
    assert "- unlikelihood · r=0.5: forward: log π(y+) fell while the margin grew in 2/2 seeds" in md
    assert "_ΔALP n/a: stage 0 has no stage before it to measure the drift from_" in md  # one-stage sweep
    assert (
        "| forward → forward | paper | +0.323 |" in md
        and "- **holds in 2/2 seeds** — Same-direction margins" in md
    )
    assert "| t_99999 | ERROR | 0.5 | sft | 2 | — |" in md  # a metric the failed trial never reported


def test_cross_direction_table_values(tmp_path: Path):
    out, spec = _make_sweep_dir(tmp_path)
    table = res.read_table(out)
    ok = table[table["status"] == res.STATUS_OK]
    rows = alp_cross_table(ok)
    # one block per objective; forward-only and reverse-only first, then the mixed fraction
    assert [(r["condition"], r["train"]) for r in rows] == [
        ("sft", "forward-only (r=0)"),
        ("sft", "reverse-only (r=1)"),
        ("sft", "mixed (r=0.5)"),
        ("unlikelihood", "forward-only (r=0)"),
        ("unlikelihood", "reverse-only (r=1)"),
        ("unlikelihood", "mixed (r=0.5)"),
    ]
    fo = rows[0]
    # mean over seeds 0 and 1 of _margin(0, forward, seed, 4) = 1.2 + 0.005
    assert fo["forward/margin"] == pytest.approx(1.205)
    assert fo["reverse/margin"] == pytest.approx(0.005)
    assert fo["forward/rejected"] == pytest.approx(-2.205) and fo["n"] == 2
    assert rows[2]["forward/margin"] == pytest.approx(0.605)


def test_report_without_r_axis_or_eval_skips_with_reasons(tmp_path: Path):
    raw = sweep_raw(
        metric="loss",
        mode="min",
        space={"stages.0.lr": {"grid": [0.001, 0.01]}},
        seeds=[0],
        eval=False,
        description="lr <sweep> & co",
    )
    spec = parse_sweep(raw, tmp_path / "sweep.yaml", base_raw=BASE_RAW)
    rows = []
    for i, lr in enumerate((0.001, 0.01)):
        run = tmp_path / "trials" / f"t{i}" / "run"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(
            "\n".join(json.dumps({"stage": 0, "step": s, "loss": 3.0 - lr * s}) for s in (1, 2, 3))
        )
        rows.append(
            res.make_row(
                spec,
                f"t{i}",
                {"stages.0.lr": lr},
                0,
                final={"final/loss": 3.0 - 3 * lr},
                status=res.STATUS_OK,
                error=None,
                wall_s=1.0,
                run_dir=f"trials/t{i}/run",
            )
        )
    table = res.build_table(rows, list(spec.space))
    write_report(tmp_path, spec=spec, table=table)
    assert "<p>lr &lt;sweep&gt; &amp; co</p>" in (tmp_path / "report.html").read_text()  # text, escaped
    md = (tmp_path / "report.md").read_text()
    assert "accuracy vs reverse fraction: skipped (the trials do not vary the reverse fraction)" in md
    assert "ALP margin over training: skipped" in md
    assert "## Objectives" not in md  # no objective varies
    assert "## final/loss by swept value" in md or "## loss by swept value" in md
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "loss_curves.png",
        "metric_by_path.png",
    ]
    # the best trial (lowest loss: lr 0.01) is listed first
    trials = md.split("## Trials (best first)")[1]
    assert trials.index("| t1 |") < trials.index("| t0 |")


def test_read_metrics_dedupes_resumed_steps_and_counts_across_stages(tmp_path: Path):
    p = tmp_path / "metrics.jsonl"
    lines = [
        {"stage": 0, "step": 1, "loss": 5.0},
        {"stage": 0, "step": 2, "loss": 4.0},
        {"stage": 0, "step": 2, "loss": 3.9},  # re-logged after a resume: the later one wins
        {"stage": 0, "step": 3, "loss": 3.5},
        {"stage": 1, "step": 1, "loss": 0.7},
        {"stage": 1, "step": 2, "loss": 0.6},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"stage": 1, "st')
    recs = read_metrics(p)
    assert [(r["stage"], r["step"], r["global_step"]) for r in recs] == [
        (0, 1, 1),
        (0, 2, 2),
        (0, 3, 3),
        (1, 1, 4),
        (1, 2, 5),
    ]
    assert recs[1]["loss"] == 3.9


def test_report_builds_rows_from_trial_dirs_when_no_table(tmp_path: Path):
    out, spec = _make_sweep_dir(tmp_path)
    for f in ("results.parquet", "results.csv"):
        (out / f).unlink()
    for tdir in (out / "trials").iterdir():  # what a killed sweep leaves: trial.json (+ final.json)
        i = int(tdir.name.split("_")[1])
        r = R_VALUES[(i // 2) % 3]
        obj = "sft" if i < 6 else "unlikelihood"
        point = {"stages.0.mix.reverse_fraction": r, "stages.0.objective.name": obj}
        (tdir / "trial.json").write_text(json.dumps({"trial_id": tdir.name, "point": point, "seed": i % 2}))
        if i % 3:
            (tdir / "final.json").write_text(json.dumps({"final/loss": 1.0}))
    write_report(out)
    md = (out / "report.md").read_text()
    assert "12 trial(s): 4 INCOMPLETE, 8 TERMINATED" in md


MIXES = [
    {"reverse_fraction": 0.5, "mode": "union"},
    {"reverse_fraction": 0.5, "schedule": {"kind": "linear", "start": 0.0, "end": 1.0}},
]


def test_mix_mappings_are_categories_and_long_values_are_cut(tmp_path: Path):
    """A swept mix mapping: points with bars and no line between them; the trials table cuts its text."""
    raw = sweep_raw(space={"stages.0.mix": {"grid": MIXES}}, seeds=[0, 1, 2])
    spec = parse_sweep(raw, tmp_path / "sweep.yaml", base_raw=BASE_RAW)
    rows = []
    for i, (mix, seed) in enumerate((m, s) for m in MIXES for s in (0, 1, 2)):
        acc = 0.3 + 0.1 * MIXES.index(mix) + 0.01 * seed
        rows.append(
            res.make_row(
                spec, f"t{i}", {"stages.0.mix": mix}, seed, final={"eval/accuracy/synthetic": acc},
                status=res.STATUS_OK, error=None, wall_s=1.0, run_dir=f"trials/t{i}/run",
            )
        )  # fmt: skip
    table = res.build_table(rows, list(spec.space))
    write_report(tmp_path, spec=spec, table=table)
    md = (tmp_path / "report.md").read_text()
    section = md.split("## eval/accuracy/synthetic by swept value")[1].split("\n## ")[0]
    assert (
        "the mean and 95% t interval over the 3 trials at each value (seeds × the other swept values)"
        in section
    )
    trials = md.split("## Trials (best first)")[1]
    cells = [c.strip() for line in trials.splitlines() if line.startswith("| t") for c in line.split("|")]
    assert any(c.endswith("…") and len(c) == 40 for c in cells)  # the mix mapping, cut
    assert max(len(c) for c in cells) <= 40

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from revmix.sweeps.plots import draw_metric_by_value

    metric = "eval/accuracy/synthetic"
    fig, (cat, num) = plt.subplots(1, 2)
    draw_metric_by_value(cat, table, "stages.0.mix", metric, numeric=False)
    draw_metric_by_value(num, table.assign(x=[1, 1, 1, 2, 2, 2]), "x", metric, numeric=True)
    # the means' line (marker "o"; the caps are lines of their own, marker "_")
    [cat_line], [num_line] = ([ln for ln in ax.get_lines() if ln.get_marker() == "o"] for ax in (cat, num))
    assert cat_line.get_linestyle() == "None" and num_line.get_linestyle() == "-"  # no line across categories
    assert list(cat_line.get_xdata()) == [0, 1]
    # the bars: mean ± t_{2} · s / √3 with s = 0.01 (seeds 0.30, 0.31, 0.32)
    half = 4.302652729911275 * 0.01 / 3**0.5
    segments = [c for c in cat.collections if hasattr(c, "get_segments")][-1].get_segments()
    assert [s[0][1] for s in segments] == pytest.approx([0.31 - half, 0.41 - half])
    assert [s[1][1] for s in segments] == pytest.approx([0.31 + half, 0.41 + half])
    plt.close(fig)


def test_every_plot_section_states_its_seeds_and_interval(tmp_path: Path):
    out, _ = _make_sweep_dir(tmp_path)
    write_report(out)
    md = (out / "report.md").read_text()
    caption = "Mean of 2 seeds per condition and its 95% Student-t interval over seeds ({})"
    for title, shape in (
        ("Accuracy vs reverse fraction", "bars and band"),
        ("ALP margin over training", "band, per step"),
        ("Training loss", "band, per step"),
    ):
        assert caption.format(shape) in md.split(f"## {title}")[1].split("\n## ")[0], title
    by_value = md.split("## eval/accuracy/synthetic by swept value")[1].split("\n## ")[0]
    # r pools 2 objectives × 2 seeds = 4 trials per value; the objective pools 3 r × 2 seeds = 6
    assert "the mean and 95% t interval over the 4–6 trials at each value" in by_value

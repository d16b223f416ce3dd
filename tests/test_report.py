"""W&B report builder: built offline (--dry-run), never saved, no network."""

from __future__ import annotations

import json

from pipeline.report import build_report, describe_report, eval_keys, main, panel_specs


def panel_metrics(structure: dict) -> dict[str, list[str]]:
    return {
        s["heading"]: [m for p in s["panels"] for m in p["metrics"]] for s in structure["sections"]
    }


def test_default_report_has_every_section_and_key():
    report = build_report("proj", "ent", runs=["r1", "r2"], group="g")
    structure = describe_report(report)
    metrics = panel_metrics(structure)
    assert set(metrics) == {
        "Mutual information estimates",
        "Objective",
        "Online probe and throughput",
        "Evaluation",
    }
    assert {f"mi/{s}/{e}" for s in ("global", "local") for e in ("jsd", "dv", "infonce")} == set(
        metrics["Mutual information estimates"]
    )
    assert {"kl", "loss", "loss/global", "loss/local", "loss/kl"} <= set(metrics["Objective"])
    assert {"probe/knn", "samples_per_s_total"} <= set(metrics["Online probe and throughput"])
    assert set(eval_keys()) | {"eval/table"} == set(metrics["Evaluation"])
    assert "eval/dim/conv/linear" in eval_keys() and "eval/pixels/pixels/knn" in eval_keys()
    filters = structure["sections"][0]["runsets"][0]["filters"]
    assert "'r1'" in filters and "'r2'" in filters and "Group = 'g'" in filters


def test_panels_follow_the_logged_keys():
    specs = dict(
        panel_specs(["step", "loss", "kl", "mi/local/jsd", "mi/global/jsd", "samples_per_s"])
    )
    mi = specs["Mutual information estimates"]
    assert [p[2] for p in mi] == [["mi/global/jsd"], ["mi/local/jsd"]]
    assert "Online probe and throughput" in specs  # throughput alone keeps the section
    assert all(p[0] != "line" or p[2] for panels in specs.values() for p in panels)


def test_cli_dry_run_prints_structure_from_metrics_file(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        json.dumps(
            {
                "step": 1,
                "loss": 0.5,
                "mi/global/infonce": 1.0,
                "mi/local/infonce": 2.0,
                "kl": 3.0,
                "probe/knn": 0.5,
            }
        )
        + "\n"
    )
    assert main(["--dry-run", "--project", "p", "--runs", "abc", "--metrics", str(metrics)]) == 0
    structure = json.loads(capsys.readouterr().out)
    metrics_by_section = panel_metrics(structure)
    assert metrics_by_section["Mutual information estimates"] == [
        "mi/global/infonce",
        "mi/local/infonce",
    ]
    assert "probe/knn" in metrics_by_section["Online probe and throughput"]
    assert structure["project"] == "p"

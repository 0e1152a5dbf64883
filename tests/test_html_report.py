"""report.html: self-contained (no external resource) and shows every part the issue lists."""

from __future__ import annotations

import re

from fuserec.html_report import render

METRICS = {
    "protocol": {"split": "temporal_user", "test_users": 3, "n_items": 5, "ranking": "full catalog"},
    "models": {"ease": {"ndcg@10": 0.14, "diversity@10": 0.3}, "als": {"ndcg@10": 0.15}},
    "fusers": {"stacking": {"ndcg@10": 0.18}},
    "segments": {
        "cold_users": {"ease": {"ndcg@10": 0.1, "n_users": 2}, "stacking": {"ndcg@10": 0.2, "n_users": 2}}
    },
    "significance": {
        "best_fuser": "stacking",
        "best_single": "als",
        "all_users": {
            "n_users": 3,
            "candidate_mean": 0.18,
            "baseline_mean": 0.15,
            "mean_difference": 0.03,
            "ci95": [0.01, 0.05],
            "p_value": 0.001,
            "wilcoxon_p": 0.002,
        },
        "test": "paired",
    },
    "rerank": {
        "scorer": "stacking",
        "curve": [
            {"diversity_weight": 0.0, "novelty_weight": 0.0, "ndcg@10": 0.18, "diversity@10": 0.3},
            {"diversity_weight": 0.5, "novelty_weight": 0.0, "ndcg@10": 0.17, "diversity@10": 0.4},
        ],
    },
}


def test_report_is_self_contained_and_complete() -> None:
    page = render(METRICS, {"cold users": {"ease": 0.7, "als": 0.3}})
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)  # no CDN, no remote asset
    assert "<script" not in page
    for part in ("stacking", "cold_users", "div 0.5", "1.00e-03", "cold users", "0.700"):
        assert part in page, part
    assert page.count("<svg") == 2
    assert "<td>+33.3%</td><td>-5.6%</td>" in page  # the curve's point against no re-ranking


def test_curve_table_says_change_against_no_re_ranking_or_a_dash_without_it() -> None:
    from fuserec.html_report import rerank_table

    curve = METRICS["rerank"]["curve"]
    assert rerank_table(curve).count("<td>+0.0%</td>") == 2
    shifted = rerank_table(curve[1:])  # no point with both weights 0
    assert "<td>-</td><td>-</td>" in shifted and "%" not in shifted.replace("vs none", "")
    assert rerank_table([]) == ""


def test_the_curve_says_how_it_re_ranks_when_metrics_record_it() -> None:
    shape = {"depth": 50, "keep": 4, "order": "score"}
    page = render({**METRICS, "rerank": {**METRICS["rerank"], "shape": shape}}, {})
    assert "top 50 unseen items; the first 4 slots stay as scored" in page
    assert "in the scorer&#x27;s order" in page
    assert "unseen items" not in render(METRICS, {})  # metrics from before the shape was recorded


def test_a_fuser_that_fell_back_says_which_component_it_serves() -> None:
    page = render(METRICS, served_alone={"stacking": "als"})
    assert "serves als alone (lost to it on validation)" in page
    assert "alone" not in render(METRICS)
    sig = {**METRICS["significance"], "best_fuser_served_alone": "ease"}
    assert "stacking (serves ease alone) vs als" in render({**METRICS, "significance": sig})


def test_the_report_stage_reads_the_fallbacks_from_the_fusers_manifests(tmp_path) -> None:
    from fuserec.layout import Layout
    from fuserec.manifest import write_manifest
    from fuserec.stages.report import served_alone

    layout = Layout(tmp_path)
    for name, served in (("gating", "sasrec"), ("stacking", None)):
        (layout.fuser(name)).mkdir(parents=True)
        write_manifest(layout.fuser(name), kind="fuser", name=name, served_alone=served)
    assert served_alone(layout) == {"gating": "sasrec"}


def test_report_without_fusers_or_curve_still_renders() -> None:
    page = render({"protocol": {}, "models": {"ease": {"ndcg@10": 0.1}}})
    assert "ease" in page and "No fuser" in page and "No gating" in page

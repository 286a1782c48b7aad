"""report.md and report.json: the regime, accuracies, every claim's verdict and the run's machine and timings."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

import weightgeo
from weightgeo.train.stats import paired_bootstrap

from .claims import Data, agg
from .conclusion import ci_text, conclusion, headline, link_rows, matched_text, md_cell
from .jobs import json_safe, load_eval
from .measure import half_ulp_over_lr
from .page import report_html
from .plan import Plan


def regime_line(reg: dict) -> str:
    v, c = reg["values"], reg["checks"]
    return (
        f"regime: teacher T=1 {v['teacher_acc_t1']:.3f} (greedy {v['teacher_acc_greedy']:.3f}), anchor T=1 "
        f"{v['anchor_acc_t1']:.3f} (greedy {v['anchor_acc_greedy']:.3f}), reverse KL {v['reverse_kl_nats']:.3f} "
        f"nats/token, response {v['response_tokens']:.1f} tokens, teacher/student params {v['param_ratio']:.2f}, "
        f"SFT last-20% gain {v['sft_last_gain']:+.3f} -> R1 {'pass' if c['R1'] else 'FAIL'}, R2 "
        f"{'pass' if c['R2'] else 'FAIL'}, R3 {'pass' if c['R3'] else 'FAIL'}"
    )


def _accuracy_table(D: Data, results: dict) -> dict:
    """Accuracy of every run reading with a paired-bootstrap CI of its difference to its start (same prompts)."""
    pl = D.plan
    rows = {}
    anchor = load_eval(D.out, "sft_s0", pl.sft_steps)["t1"]
    base = load_eval(D.out, "sft_s0", 0)["t1"]
    for name, r in results.items():
        if r.get("kind") not in ("sft", "opd", "rlvr"):
            continue
        ref = base if r["kind"] == "sft" else anchor
        for reading, a in r["acc"].items():
            if r["kind"] == "sft" and reading != str(r["steps"]):
                continue
            pb = paired_bootstrap(ref, load_eval(D.out, name, reading)["t1"])
            rows[f"{name}@{reading}"] = {**a, "vs_start": pb["diff"], "vs_start_ci95": pb["ci95"]}
    return rows


def write_report(
    out: Path,
    mode: str,
    plan: Plan,
    results: dict,
    regime: dict,
    ev: dict,
    D: Data,
    figures: list,
    wall: float,
    machine: dict,
    figure_captions: dict | None = None,
) -> dict:
    acc = _accuracy_table(D, results)
    train_runs = {n: r for n, r in results.items() if r.get("kind") in ("sft", "opd", "rlvr")}
    mech: dict = {}
    anchor_dir = out / "runs" / "sft_s0" / f"checkpoint-{plan.sft_steps}"
    mech["half_ulp_over_lr_anchor"] = {"lr": 1e-6, "by_type": half_ulp_over_lr(anchor_dir, 1e-6)}
    mech["consistency_c_tilde"] = {
        n[2:]: {"step": r["steps"][-1], "by_type": r["consistency"][str(r["steps"][-1])]}
        for n, r in results.items()
        if n.startswith("m_") and "consistency" in r
    }
    mech["rlvr_steps_without_kept_group"] = {
        n: r["summary"].get("steps_without_kept_group_by_reading") for n, r in train_runs.items() if r["kind"] == "rlvr"
    }
    mech["realised_opd_share"] = {
        n: r["summary"].get("opd_share_mean") for n, r in train_runs.items() if "opd_share_mean" in r["summary"]
    }
    nulls = [n for n in results if n.startswith("m_null_s")]
    if nulls:
        mech["null_final"] = {
            "density": [results[n]["density"][str(results[n]["steps"][-1])]["all"] for n in nulls],
            "fro_mean": [agg(results[n]["fro"][str(results[n]["steps"][-1])]) for n in nulls],
            "srank_mean": [agg(results[n]["srank"][str(results[n]["steps"][-1])]) for n in nulls],
        }
    tracker = next((r["tracker"] for r in train_runs.values() if "tracker" in r), None)
    report = {
        "mode": mode,
        "plan": asdict(plan),
        "regime": {
            **{
                k: regime["values"][k]
                for k in (
                    "teacher_acc_t1",
                    "teacher_acc_greedy",
                    "anchor_acc_t1",
                    "anchor_acc_greedy",
                    "reverse_kl_nats",
                    "response_tokens",
                )
            },
            "checks": regime["checks"],
            "passed": regime["passed"],
        },
        "claims": ev["claims"],
        "regime_details": regime,
        "primary_k": ev["primary_k"],
        "claim_details": ev["details"],
        "rlvr_at_matched_steps": ev["secondary"],
        "accuracy": acc,
        "mechanism": mech,
        "tracker_opd": tracker,
        "timings": {
            "wall_s": round(wall, 1),
            "jobs": {
                n: {"wall_s": r.get("wall_s"), "cpu_s": r.get("cpu_s"), "reused": bool(r.get("reused"))}
                for n, r in results.items()
            },
        },
        "machine": machine,
        "figures": figures,
        "figure_captions": figure_captions or {},
        "weightgeo": weightgeo.__version__,
        "torch": torch.__version__,
    }
    report = json_safe(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    md = report_md(report)
    (out / "report.md").write_text(md + "\n")
    (out / "report.html").write_text(report_html(md, out, plan))
    return report


def _ci_text(ci) -> str:
    return f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else ""


def _fmt(x, p=3):
    return "–" if x is None else f"{x:+.{p}f}" if isinstance(x, float) else str(x)


def claims_md(R: dict) -> list[str]:
    """The claims table with the verdict rule, the links in words and the matched-step reading."""
    L: list[str] = []
    L += [
        "## Claims",
        "",
        "Verdict rule: *reproduced* = the paper's ordering (statistic > 0) holds in every seed "
        "and the 95% CI excludes 0; *contradicted* = the reverse, the same way; *untestable* = a precondition "
        "failed; *inconclusive* otherwise. The statistic is the smallest of the claim's links (each oriented so "
        "that > 0 is the paper's direction); CIs: bootstrap over seeds and matrices (claims 1-5, 7) or seeds and "
        "prompts (6).",
        "",
        "| # | claim | verdict | statistic | 95% CI | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for c in R["claims"]:
        ci = "–" if c["ci95"] is None else f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
        L.append(
            f"| {c['id']} | {c['text']} | **{c['verdict']}** | {_fmt(c['statistic'], 4)} | {ci} | "
            + ", ".join(f"{v:+.4f}" for v in c["per_seed"])
            + " |"
        )
    notes = [f"- {d['id']}: {d['note']}" for d in R["claim_details"] if d.get("note")]
    if notes:
        L += ["", "Notes (each link's statistic, CI and verdict are in the table above):", "", *notes]
    if R["rlvr_at_matched_steps"]:
        L += [
            "",
            f"RLVR read at matched steps ({R['plan']['rlvr_matched']}) instead of {R['plan']['rlvr_steps']}: "
            + "; ".join(
                f"claim {c['id']} {c['verdict']} ({_fmt(c['statistic'], 4)} {_ci_text(c['ci95'])})"
                for c in R["rlvr_at_matched_steps"]
            ),
            "",
        ]
    return L


def report_md(R: dict) -> str:
    reg, rd = R["regime"], R["regime_details"]
    th = rd["thresholds"]
    L = [
        f"# OPD vs SFT vs RLVR on a miniature ({R['mode']} run)",
        "",
        f"{R['machine']['date']}, {R['machine']['cpu']} ({R['machine']['cpu_capability']}), torch {R['torch']}, "
        f"weightgeo {R['weightgeo']}; {R['machine']['jobs']} job(s) x {R['machine']['threads']} thread(s); wall "
        f"{R['timings']['wall_s']:.0f} s; load average at start / end {R['machine']['load_start']} / "
        f"{R['machine']['load_end']}.",
        "",
        "## Conclusion",
        "",
        f"**{headline(R)}**",
        "",
        *[f"- {t}" for t in conclusion(R)],
        "",
        "## Every link (each claim is the smallest of its links; > 0 = the paper's direction)",
        "",
        "| claim | link | statistic | 95% CI | per seed | verdict | RLVR at matched steps |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['claim']} | {md_cell(r['link'])} | {_fmt(r['statistic'], 4)} | {ci_text(r['ci95'])} | "
            + ", ".join(f"{v:+.4f}" for v in r["per_seed"])
            + f" | **{r['verdict']}** | {matched_text(r['matched'])} |"
            for r in link_rows(R)
        ],
        "",
    ]
    L += claims_md(R)
    L += [
        "## Where in the network each method changed weights",
        "",
        "report.html draws layer x module heatmaps of every pair metric for SFT, OPD and RLVR on shared colour "
        "scales; geometry.html is weightgeo's own page of those comparisons (tables, per-module bars, provenance).",
        "",
        "## Regime (checked before any geometry)",
        "",
        "| quantity | measured | required |",
        "|---|---|---|",
        f"| teacher T=1 / greedy accuracy | {reg['teacher_acc_t1']:.4f} / {reg['teacher_acc_greedy']:.4f} | T=1 >= "
        f"{th['teacher_acc_t1_min']} and >= anchor + {th['teacher_gap_min']} (R1) |",
        f"| teacher / student parameters | {rd['teacher_params']:,} / {rd['student_params']:,} = "
        f"{rd['values']['param_ratio']:.2f}x | >= {th['param_ratio_min']}x (R1) |",
        f"| reverse KL(anchor ‖ teacher), anchor's samples | {reg['reverse_kl_nats']:.4f} nats/token (sampled-token "
        f"estimate {rd['kl_sampled_token_estimate']:.4f}) | >= {th['reverse_kl_min']} (R1) |",
        f"| anchor T=1 / greedy accuracy | {reg['anchor_acc_t1']:.4f} / {reg['anchor_acc_greedy']:.4f} (base "
        f"{rd['base_acc']['acc_t1']:.4f} / {rd['base_acc']['acc_greedy']:.4f}) | T=1 in "
        f"{th['anchor_acc_t1_range']} (R2) |",
        f"| SFT T=1 gain, step {rd['sft_reading_80pct']} -> last | {rd['values']['sft_last_gain']:+.4f} (95% CI "
        f"{_fmt(rd['sft_last_gain_ci95'][0], 4)}, {_fmt(rd['sft_last_gain_ci95'][1], 4)}) | > 0, still improving "
        "(R2) |",
        f"| anchor response length | {reg['response_tokens']:.2f} tokens | >= {th['response_tokens_min']} (R3) |",
        "",
        f"Checks: R1 {reg['checks']['R1']}, R2 {reg['checks']['R2']}, R3 {reg['checks']['R3']} -> "
        f"{'passed' if reg['passed'] else 'FAILED: every claim is untestable'}.",
        "",
    ]
    pk = R.get("primary_k")
    if pk:
        L += [
            f"Primary K* = {pk['k']} ({pk['rule']}; stable ranks at 20%: "
            + ", ".join(f"{m} {v:.2f}" for m, v in (pk.get("stable_rank_at_20pct") or {}).items())
            + ").",
            "",
        ]
    L += [
        "",
        "## Accuracy (held-out 1000 prompts x T=1 samples; Δ vs the run's start, paired bootstrap 95% CI)",
        "",
        "| run@step | T=1 | greedy | Δ T=1 vs start | 95% CI |",
        "|---|---|---|---|---|",
    ]
    for n, a in R["accuracy"].items():
        L.append(
            f"| {n} | {a['acc_t1']:.4f} | {a['acc_greedy']:.4f} | {a['vs_start']:+.4f} | "
            f"[{a['vs_start_ci95'][0]:+.4f}, {a['vs_start_ci95'][1]:+.4f}] |"
        )
    M = R["mechanism"]
    ulp = "; ".join(
        f"{t} {v['p10']:.0f} / {v['p50']:.0f} / {v['p90']:.0f}"
        for t, v in M["half_ulp_over_lr_anchor"]["by_type"].items()
    )
    L += [
        "",
        "## Mechanism numbers",
        "",
        f"Half a bf16 ULP / lr (lr = 1e-6) over the anchor's weights, per matrix type (10 / 50 / 90 %): {ulp} steps.",
        "",
        "Consistency C̃(T) = rms(ΔW_fp32) / sqrt(Σ lr_t²) at each stream's last step (≈ 1: random walk; grows "
        "like √T for consistent drift):",
        "",
        "| stream | T | " + " | ".join(_TYPES) + " |",
        "|---|---|" + "---|" * len(_TYPES),
    ]
    for n, c in M["consistency_c_tilde"].items():
        L.append(
            f"| {n} | {c['step']} | "
            + " | ".join(f"{c['by_type'][t]['c_tilde']:.2f}" if t in c["by_type"] else "–" for t in _TYPES)
            + " |"
        )
    if M.get("null_final"):
        nf = M["null_final"]
        L += [
            "",
            "Null (permuted advantages) at its last step, per seed: density "
            + ", ".join(f"{x:.4f}" for x in nf["density"])
            + "; mean ‖ΔW‖_F "
            + ", ".join(f"{x:.2e}" for x in nf["fro_mean"])
            + "; mean stable rank "
            + ", ".join(f"{x:.2f}" for x in nf["srank_mean"])
            + ".",
        ]
    if M.get("realised_opd_share"):
        L += [
            "",
            "Realised OPD share of the mixed advantage (Σ|α A_OPD| / Σ|A|, mean over steps): "
            + ", ".join(f"{n} {v:.3f}" for n, v in M["realised_opd_share"].items())
            + ".",
        ]
    L += [
        "",
        "RLVR steps without any kept group (up to each reading): "
        + "; ".join(f"{n} {v}" for n, v in M["rlvr_steps_without_kept_group"].items())
        + ".",
    ]
    t = R.get("tracker_opd")
    if t:
        L += [
            "",
            f"Live `Tracker` on OPD seed 0 (exact, k={t['k']}) vs offline `rank_curve` on its bf16 checkpoints: "
            f"{t['rows_matched']}/{t['rows_tracker']} rows matched, max relative difference "
            + ", ".join(f"{k} {v:.1e}" for k, v in t["max_rel_diff"].items())
            + ".",
        ]
    L += ["", "## Figures", ""]
    for f in R["figures"]:
        L += [f"![{f}]({f})", "", f"*{R.get('figure_captions', {}).get(f, f)}*", ""]
    return "\n".join(L)


_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "embed_tokens", "embed_positions", "lm_head")

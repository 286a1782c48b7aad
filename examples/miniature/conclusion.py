"""The run's result in plain words, and every link of every claim with its own verdict: what report.md and
report.html open with. Presentation only: every number comes from report.json as written."""

from __future__ import annotations

import statistics

METHODS = ("SFT", "OPD", "RLVR")
# the matrix types whose consistency summarises a stream (the blocks; embeddings and head are listed apart)
BLOCK_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def pair_of(link: str) -> str:
    """Which methods a link compares, in the paper's order ("SFT vs OPD"), or "" when it compares none."""
    found = [m for m in METHODS if m in link]
    return " vs ".join(found) if len(found) == 2 else ""


def link_rows(R: dict) -> list[dict]:
    """One row per link of every claim that was run: claim, link, statistic, CI, per-seed values, verdict,
    and the same link with RLVR read at matched steps where that reading exists."""
    matched = {c["id"]: c.get("links", {}) for c in R.get("rlvr_at_matched_steps") or []}
    rows = []
    for d in R["claim_details"]:
        if d.get("not_run"):
            continue
        for name, v in d["links"].items():
            m = matched.get(d["id"], {}).get(name)
            rows.append(
                {
                    "claim": d["id"],
                    "link": name,
                    "pair": pair_of(name),
                    "statistic": v["statistic"],
                    "ci95": v["ci95"],
                    "per_seed": v["per_seed"],
                    "verdict": v["verdict"],
                    "matched": None if m is None or "RLVR" not in name else m,
                }
            )
    return rows


def _count(rows: list[dict], verdict: str) -> int:
    return sum(r["verdict"] == verdict for r in rows)


def _claims(ids) -> str:
    ids = sorted(set(ids))
    return ("claim " if len(ids) == 1 else "claims ") + ", ".join(str(i) for i in ids)


def _regime(R: dict) -> str:
    reg = R["regime"]
    checks = ", ".join(f"{k} {'pass' if v else 'FAIL'}" for k, v in reg["checks"].items())
    head = "The regime checks pass" if reg["passed"] else "The regime checks FAIL, so every claim is untestable"
    return (
        f"{head} ({checks}): the teacher reaches {reg['teacher_acc_t1']:.3f} T=1 accuracy against the anchor's "
        f"{reg['anchor_acc_t1']:.3f}, the reverse KL is {reg['reverse_kl_nats']:.3f} nats/token and responses are "
        f"{reg['response_tokens']:.1f} tokens long."
    )


PAIR_CLAIMS = (1, 2, 3)  # how much and where the weights moved (one comparison per run)
STREAM_CLAIMS = (4, 5)  # how the update's rank and subspace evolve over training


def _pair_words(rows: list[dict], pair: str) -> str:
    rs = [r for r in rows if r["pair"] == pair]
    n, rep, con = len(rs), _count(rs, "reproduced"), _count(rs, "contradicted")
    if rep == n:
        return f"{pair}: all {n} links reproduced"
    if con == n:
        return f"{pair}: all {n} links reversed"
    return f"{pair}: {rep} of {n} links reproduced, {con} reversed, {n - rep - con} undecided"


def _values(R: dict) -> str:
    """Seed means of the measured quantities behind claims 1-3, as the claims' details carry them."""
    d = {x["id"]: x.get("values", {}) for x in R["claim_details"]}
    parts = []
    for cid, key, name, fmt in (
        (1, None, "unchanged fraction", ".3f"),
        (3, "density", "density", ".3f"),
        (3, "low_mag_overlap", "low-magnitude overlap", ".3f"),
        (2, "nss", "NSS", ".2g"),
    ):
        vals = d.get(cid, {}) if key is None else d.get(cid, {}).get(key, {})
        if isinstance(vals, dict) and vals:
            parts.append(
                f"{name} "
                + ", ".join(f"{m.split('@')[0].upper()} {statistics.mean(v):{fmt}}" for m, v in vals.items() if v)
            )
    return "; ".join(parts)


def _orderings(R: dict, rows: list[dict]) -> list[str]:
    out = []
    pair_rows = [r for r in rows if r["claim"] in PAIR_CLAIMS]
    if pair_rows:
        pairs = [p for p in ("SFT vs OPD", "OPD vs RLVR", "SFT vs RLVR") if any(r["pair"] == p for r in pair_rows)]
        text = "Claims 1-3 (how many weights moved, how far, and where): " + "; ".join(
            _pair_words(pair_rows, p) for p in pairs
        )
        ms = [r["matched"] for r in pair_rows if r["matched"] is not None]
        if ms:
            mrep = sum(m["verdict"] == "reproduced" for m in ms)
            mcon = sum(m["verdict"] == "contradicted" for m in ms)
            text += (
                f"; with RLVR read at matched steps ({R['plan'].get('rlvr_matched')}), its {len(ms)} links: "
                f"{mrep} reproduced, {mcon} reversed, {len(ms) - mrep - mcon} undecided"
            )
        values = _values(R)
        out.append(text + "." + (f" Measured (seed means): {values}." if values else ""))
    for c in R["claims"]:
        if c["id"] in STREAM_CLAIMS and c["statistic"] is not None:
            rs = [r for r in rows if r["claim"] == c["id"]]
            links = ", ".join(f"{r['link']} {r['verdict']}" for r in rs)
            out.append(f"Claim {c['id']} ({c['text']}): {c['verdict']} ({links}).")
    return out


def headline(R: dict) -> str:
    """One sentence: the pattern of the verdicts."""
    if not R["regime"]["passed"]:
        return "In short: the regime checks failed, so no claim can be tested in this run."
    rows = [r for r in link_rows(R) if r["claim"] in PAIR_CLAIMS]
    parts = []
    for pair in ("SFT vs OPD", "OPD vs RLVR"):
        rs = [r for r in rows if r["pair"] == pair]
        if not rs:
            continue
        rep, con = _count(rs, "reproduced"), _count(rs, "contradicted")
        state = (
            "reproduce"
            if rep == len(rs)
            else "are reversed"
            if con == len(rs)
            else f"are mixed ({rep} of {len(rs)} reproduce, {con} reversed)"
        )
        parts.append(f"the paper's {pair} orderings {state}")
    stream = [c for c in R["claims"] if c["id"] in STREAM_CLAIMS and c["statistic"] is not None]
    if stream:
        parts.append("the trajectory claims are " + ", ".join(f"{c['verdict']} ({c['id']})" for c in stream))
    return "In short: " + "; ".join(parts) + "." if parts else ""


def _claim_reading(R: dict, rows: list[dict]) -> list[str]:
    """Why a claim's verdict can differ from most of its links: it needs all of them."""
    out = []
    by_claim: dict[int, list[dict]] = {}
    for r in rows:
        by_claim.setdefault(r["claim"], []).append(r)
    mixed = [
        c["id"]
        for c in R["claims"]
        if c["verdict"] != "reproduced" and any(r["verdict"] == "reproduced" for r in by_claim.get(c["id"], []))
    ]
    if mixed:
        out.append(
            f"A claim counts as reproduced only when all its links are, so {_claims(mixed)} read "
            + " / ".join(sorted({c["verdict"] for c in R["claims"] if c["id"] in mixed}))
            + " as a whole although some of their links are reproduced; the table below gives each link its "
            "own verdict."
        )
    not_run = [c["id"] for c in R["claims"] if c["statistic"] is None and c["verdict"] == "untestable"]
    if not_run:
        out.append(f"Not run in this mode: {_claims(not_run)} (run with --controls).")
    return out


def _mechanism(R: dict) -> list[str]:
    M = R["mechanism"]
    out = []
    ulp = M.get("half_ulp_over_lr_anchor", {}).get("by_type", {})
    med = [v["p50"] for t, v in ulp.items() if t in BLOCK_TYPES]
    if med:
        lr = M["half_ulp_over_lr_anchor"].get("lr")
        out.append(
            f"A median block weight needs {min(med):.0f}-{max(med):.0f} steps of size lr = {lr:g} before its bf16 "
            "value can move (half a bf16 ULP / lr), so the unchanged fraction of a short RL run counts steps as "
            "much as signal."
        )
    ct = M.get("consistency_c_tilde", {})
    parts = []
    for name, c in ct.items():
        vals = [c["by_type"][t]["c_tilde"] for t in BLOCK_TYPES if t in c["by_type"]]
        if vals:
            parts.append(f"{name} {statistics.median(vals):.2f} (T = {c['step']})")
    if parts:
        out.append(
            "Consistency C̃ of the fp32 update on the block matrices (median over types; 1 = a random walk, "
            "√T for a perfectly consistent drift): " + ", ".join(parts) + "."
        )
    med = {
        n: statistics.median([c["by_type"][t]["c_tilde"] for t in BLOCK_TYPES if t in c["by_type"]])
        for n, c in ct.items()
        if any(t in c["by_type"] for t in BLOCK_TYPES)
    }
    rl = {n: v for n, v in med.items() if n.split("_")[0] in ("opd", "rlvr")}
    if rl and any(n.startswith("null") for n in med):
        top = max(rl.values())
        if top < 3:
            out.append(
                f"So per step both RL updates barely rise above the optimizer's random walk (C̃ at most {top:.2f} "
                "against about 1 for the null): their geometry is set by the number of steps and the noise more "
                "than by the teacher's per-token signal."
            )
    return out


def conclusion(R: dict) -> list[str]:
    """The plain-language conclusion, as sentences: the regime, which orderings reproduced and which reversed,
    how the claims' verdicts follow from their links, and what the mechanism numbers say."""
    rows = link_rows(R)
    return [_regime(R), *_orderings(R, rows), *_claim_reading(R, rows), *_mechanism(R)]


def md_cell(text: str) -> str:
    """Text for a Markdown table cell (a | would end the cell)."""
    return text.replace("|", "\\|")


def ci_text(ci) -> str:
    return "–" if not ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def matched_text(m: dict | None) -> str:
    if m is None:
        return ""
    return f"{m['verdict']} ({m['statistic']:+.4f} {ci_text(m['ci95'])})"

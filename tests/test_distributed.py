"""compare() under torchrun with 2 CPU processes (gloo) equals the single-process report."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint

import weightgeo
from weightgeo.distributed import balanced_shards


def _torchrun_report(tmp_path, call: str, *, port: int) -> dict | list[dict]:
    """Run ``r = <call>`` in 2 gloo processes under torchrun; return rank 0's report JSON (a list of them
    when ``call`` returns a list)."""
    out = tmp_path / f"report-{port}"
    script = tmp_path / f"run-{port}.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, weightgeo
        r = {call}
        if int(os.environ["RANK"]) == 0:
            for i, x in enumerate(r if isinstance(r, list) else [r]):
                x.to_json({str(out)!r} + f"-{{i}}.json")
            open({str(out)!r} + ".n", "w").write(str(len(r)) if isinstance(r, list) else "single")
    """)
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(port),
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = (tmp_path / f"report-{port}.n").read_text()
    reports = [
        json.loads((tmp_path / f"report-{port}-{i}.json").read_text()) for i in range(1 if n == "single" else int(n))
    ]
    return reports[0] if n == "single" else reports


def test_balanced_shards_cover_everything_once_and_balance_load():
    weights = [100, 7, 50, 50, 3, 99, 1, 2]
    shards = balanced_shards(weights, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(weights)))
    loads = [sum(weights[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= max(weights)
    assert balanced_shards(weights, 1) == [sorted(range(len(weights)), key=lambda i: (-weights[i], i))]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_give_the_single_process_report(tmp_path):
    base = tiny_llama_state(num_layers=2, hidden=16, intermediate=32, vocab=40)
    g = torch.Generator().manual_seed(3)
    ft = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    b, f = write_hf_checkpoint(tmp_path / "b", base), write_hf_checkpoint(tmp_path / "f", ft)
    dist = _torchrun_report(
        tmp_path, f"weightgeo.compare({str(b)!r}, {str(f)!r}, k=8, rank=4, progress=False)", port=29517
    )
    single = weightgeo.compare(b, f, k=8, rank=4, progress=False)
    assert dist["meta"]["world_size"] == 2
    assert [r["name"] for r in dist["rows"]] == [r["name"] for r in single.rows]
    for x, y in zip(dist["rows"], single.rows):
        for key, val in y.items():
            if isinstance(val, float) and math.isnan(val):
                assert x[key] is None, (y["name"], key)  # JSON null
            elif isinstance(val, float) and math.isinf(val):
                assert x[key] == "inf", (y["name"], key)
            elif isinstance(val, float):
                assert x[key] == pytest.approx(val, rel=1e-5, abs=1e-6), (y["name"], key)
    # Each rank read only its own share, and the shares cover every tensor once.
    shares = [set(r["tensors"]) for r in dist["meta"]["processes"]]
    assert len(shares) == 2 and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {r["name"] for r in single.rows}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_rank_curve_under_two_ranks_equals_single_process(tmp_path):
    base = tiny_llama_state(num_layers=2, hidden=32, intermediate=64, vocab=40, dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    for step in (0, 10, 20):
        write_hf_checkpoint(
            tmp_path / "run" / f"checkpoint-{step}", {k: v + 1e-2 * step * direction[k] for k, v in base.items()}
        )
    dist = _torchrun_report(
        tmp_path, f"weightgeo.rank_curve({str(tmp_path / 'run')!r}, include='linear', k=4, hill_k=3)", port=29518
    )
    single = weightgeo.rank_curve(tmp_path / "run", include="linear", k=4, hill_k=3)
    assert dist["meta"]["world_size"] == 2
    shares = [set(r["matrices"]) for r in dist["meta"]["processes"]]
    assert not shares[0] & shares[1] and shares[0] and shares[1]
    assert [(r["step"], r["name"]) for r in dist["rows"]] == [(r["step"], r["name"]) for r in single.rows]
    for x, y in zip(dist["rows"], single.rows):
        for key in ("stable_rank", "delta_frobenius", "spectral_norm", "hill_alpha", "final_subspace_similarity"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), (y["name"], key)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_compare_many_under_two_ranks_equals_single_process(tmp_path):
    base = tiny_llama_state(num_layers=2, hidden=16, intermediate=32, vocab=40)
    b = write_hf_checkpoint(tmp_path / "b", base)
    fts = []
    for seed in (5, 6):
        g = torch.Generator().manual_seed(seed)
        ft = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
        fts.append(str(write_hf_checkpoint(tmp_path / f"f{seed}", ft)))
    dist = _torchrun_report(
        tmp_path, f"weightgeo.compare_many({str(b)!r}, {fts!r}, k=8, rank=4, progress=False)", port=29519
    )
    single = weightgeo.compare_many(b, fts, k=8, rank=4, progress=False)
    assert len(dist) == 2
    for d, s in zip(dist, single):
        assert d["meta"]["world_size"] == 2 and d["meta"]["ft"] == s.meta["ft"]
        assert [r["name"] for r in d["rows"]] == [r["name"] for r in s.rows]
        for x, y in zip(d["rows"], s.rows):
            for key in ("update_sparsity", "principal_overlap", "spectral_drift", "stable_rank", "density"):
                if key in y:
                    assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (y["name"], key)

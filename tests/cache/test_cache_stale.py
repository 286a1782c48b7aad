"""A cache that cannot serve stale rows: code changes, replaced files and hostile entries are recomputed.

What identifies an entry (docs/caching.md): the input files (path, size, mtime, inode, ctime), the options as a
whole, the numerical policy, the weightgeo version and the code fingerprint of the computing modules. Each test
here serves a run from a cache that should no longer hold for it and checks the re-run recomputes and equals a
fresh, uncached run bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint
from live_factories import PAIR_KW, STREAM_KW, report_json, rows_json, write_run

import weightgeo
from weightgeo.cache import ResultCache

SRC = Path(weightgeo.__file__).resolve().parent


def _pair(tmp: Path, seed: int = 0) -> tuple[Path, Path]:
    base = tiny_llama_state(num_layers=1, hidden=8, intermediate=16, vocab=12, seed=seed)
    g = torch.Generator().manual_seed(7)
    ft = {k: (v.float() + 1e-2 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    return write_hf_checkpoint(tmp / "base", base), write_hf_checkpoint(tmp / "ft", ft)


# ---------------------------------------------------------------------------------------------------------------
# the code fingerprint
def _copy_package(tmp: Path) -> Path:
    dst = tmp / "pkg" / "weightgeo"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_the_fingerprint_follows_code_not_comments_docstrings_or_layout(tmp_path):
    from weightgeo.cache.fingerprint import COMPUTING, code_fingerprint, computing_files

    pkg = _copy_package(tmp_path)
    assert code_fingerprint(pkg) == code_fingerprint()  # the same code, wherever it lies
    kernel = pkg / "metrics" / "drift.py"
    text = kernel.read_text()
    kernel.write_text(text.replace('"""', '"""A docstring edit. ', 1) + "\n# a comment\n\n\n")
    assert code_fingerprint(pkg) == code_fingerprint(), "docstrings, comments and blank lines are not code"
    kernel.write_text(text + "\nEXTRA = 1\n")
    assert code_fingerprint(pkg) != code_fingerprint()
    # every computing module counts, the presentation ones do not
    assert {p.relative_to(SRC).parts[0] for p in computing_files()} >= {"linalg", "metrics", "engine", "checkpoint"}
    assert not any(p.relative_to(SRC).as_posix() in ("cli.py", "report.py", "plot.py") for p in computing_files())
    assert all((SRC / part).exists() for part in COMPUTING)


_RUN = textwrap.dedent(
    """
    import json, sys, weightgeo
    r = weightgeo.compare(sys.argv[1], sys.argv[2], k=4, rank=2, cache=sys.argv[3])
    print(json.dumps({"cache": r.meta["cache"], "rows": json.loads(r.to_json())["rows"], "file": weightgeo.__file__}))
    """
)


def _run_copy(pkg: Path, *args: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pkg.parent), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _RUN, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().parent == pkg.resolve()
    return got


def test_a_rerun_after_a_kernel_change_recomputes_instead_of_serving(tmp_path):
    """A kernel edited in place (as a ``git pull`` or a reinstall does, the version unchanged): the re-run
    recomputes every row with the new kernel; a comment edit keeps serving."""
    pkg = _copy_package(tmp_path)
    base, ft = _pair(tmp_path)
    cache = tmp_path / "cache"
    first = _run_copy(pkg, base, ft, cache)
    n = len(first["rows"])
    assert first["cache"]["rows_computed"] == n
    kernel = pkg / "metrics" / "pair.py"
    text = kernel.read_text()
    kernel.write_text(text + "\n# a comment only\n")
    assert _run_copy(pkg, base, ft, cache)["cache"]["rows_cached"] == n
    edited = text.replace('{"stable_rank": float(sr[i]),', '{"stable_rank": 2 * float(sr[i]),')  # the kernel's line
    assert edited != text
    kernel.write_text(edited)
    again = _run_copy(pkg, base, ft, cache)
    assert again["cache"]["rows_cached"] == 0 and again["cache"]["rows_computed"] == n
    old = {r["name"]: r for r in first["rows"]}
    for row in again["rows"]:
        if row.get("stable_rank"):
            assert row["stable_rank"] == pytest.approx(2 * old[row["name"]]["stable_rank"], rel=1e-12)


def test_an_entry_of_other_code_is_never_served(tmp_path):
    base, ft = _pair(tmp_path)
    old = ResultCache(tmp_path / "c", code="an-older-kernel")
    weightgeo.compare(base, ft, cache=old, **PAIR_KW)
    now = ResultCache(tmp_path / "c")
    r = weightgeo.compare(base, ft, cache=now, **PAIR_KW)
    assert r.meta["cache"]["rows_cached"] == 0 and r.meta["cache"]["hits"] == 0
    info = now.info()
    assert set(info.by_version) == {f"{now.version}+an-older-kernel", info.current}
    pruned = now.prune()
    assert pruned.reasons.get("other version") and set(now.info().by_version) == {info.current}


# ---------------------------------------------------------------------------------------------------------------
# file identity
def _same_size_same_mtime(old: Path, new_content: Path) -> None:
    """``cp -p`` / ``rsync -t``: other bytes of the same size, the old modification time kept."""
    st = old.stat()
    assert new_content.stat().st_size == st.st_size
    shutil.copyfile(new_content, old)
    os.utime(old, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert old.stat().st_mtime_ns == st.st_mtime_ns and old.stat().st_size == st.st_size


@pytest.mark.parametrize("how", ["rewritten in place", "replaced by another file (new inode)"])
def test_a_file_replaced_with_same_size_and_mtime_is_recomputed(tmp_path, how):
    base, ft = _pair(tmp_path)
    _, other = _pair(tmp_path / "other", seed=3)  # the same names and shapes: the same size, other values
    cache = tmp_path / "cache"
    first = weightgeo.compare(base, ft, cache=cache, **PAIR_KW)
    target = ft / "model.safetensors"
    if how.startswith("rewritten"):
        _same_size_same_mtime(target, other / "model.safetensors")
    else:
        st = target.stat()
        target.unlink()
        shutil.copy2(other / "model.safetensors", target)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = weightgeo.compare(base, ft, cache=cache, **PAIR_KW)
    fresh = weightgeo.compare(base, ft, cache=False, **PAIR_KW)
    assert again.meta["cache"]["rows_cached"] == 0
    assert report_json(again) == report_json(fresh) and rows_json(fresh) != rows_json(first)


def test_a_stream_checkpoint_replaced_with_same_size_and_mtime_is_recomputed(tmp_path):
    run = write_run(tmp_path / "run", [0, 10, 20])
    cache = tmp_path / "cache"
    first = weightgeo.rank_curve(run, cache=cache, **STREAM_KW)
    scratch = write_run(tmp_path / "scratch", [30])
    _same_size_same_mtime(run / "checkpoint-20" / "model.safetensors", scratch / "checkpoint-30" / "model.safetensors")
    again = weightgeo.rank_curve(run, cache=cache, **STREAM_KW)
    fresh = weightgeo.rank_curve(run, cache=False, **STREAM_KW)
    assert again.meta["cache"]["spectra_computed"] > 0
    assert report_json(again) == report_json(fresh) and rows_json(fresh) != rows_json(first)


# ---------------------------------------------------------------------------------------------------------------
# entries that cannot be parsed, whatever the way
def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def _resigned(path: Path, row_text: str, tensors_body: bytes | None = None) -> None:
    """A hostile entry with a valid checksum: the row replaced, the sha256 recomputed as the store does."""
    header, body = _header(path)
    meta = header["__metadata__"]
    meta["row"] = row_text
    # the store's checksum: row text, then each tensor's name, dtype, shape and bytes (none in a pair row)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert not tensors, "pair rows hold no tensors"
    meta["sha256"] = hashlib.sha256(row_text.encode()).hexdigest()
    _write(path, header, body if tensors_body is None else tensors_body)


def _hostile(kind: str, path: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "header length beyond the file":
        path.write_bytes((2**63).to_bytes(8, "little") + data[8:])
    elif kind == "deeply nested header":
        text = b"[" * 100_000 + b"]" * 100_000
        path.write_bytes(len(text).to_bytes(8, "little") + text)
    elif kind == "nested metadata values":
        header, body = _header(path)
        header["__metadata__"]["created"] = {"a": [1, 2]}
        _write(path, header, body)
    elif kind == "row of the wrong type":
        _resigned(path, json.dumps([1, 2, 3]))
    elif kind == "row with a key no row has":
        _resigned(path, json.dumps({"stable_rank": 1.0, "__import__": "os"}))
    elif kind == "deeply nested row":
        _resigned(path, "[" * 100_000 + "]" * 100_000)
    elif kind == "a folder in its place":
        path.unlink()
        path.mkdir()
    elif kind == "a FIFO in its place":
        path.unlink()
        os.mkfifo(path)
    else:
        raise AssertionError(kind)


HOSTILE = [
    "truncated",
    "empty",
    "header length beyond the file",
    "deeply nested header",
    "nested metadata values",
    "row of the wrong type",
    "row with a key no row has",
    "deeply nested row",
    "a folder in its place",
    "a FIFO in its place",
]


@pytest.mark.parametrize("kind", HOSTILE)
def test_an_entry_that_cannot_be_parsed_is_counted_and_recomputed(tmp_path, kind):
    if kind == "a FIFO in its place" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    base, ft = _pair(tmp_path)
    cache = ResultCache(tmp_path / "cache")
    weightgeo.compare(base, ft, cache=cache, metrics=["stable_rank"], **PAIR_KW)
    entries = sorted(cache.root.rglob("*.safetensors"))
    assert entries
    for e in entries:
        _hostile(kind, e)
    again = weightgeo.compare(base, ft, cache=cache, metrics=["stable_rank"], **PAIR_KW)
    fresh = weightgeo.compare(base, ft, cache=False, metrics=["stable_rank"], **PAIR_KW)
    assert report_json(again) == report_json(fresh)
    c = again.meta["cache"]
    assert c["rows_cached"] == 0 and c["rows_computed"] == len(entries)
    assert c["corrupt"] + c["misses"] == len(entries) and c["hits"] == 0
    if kind not in ("a folder in its place", "a FIFO in its place"):  # those cannot be overwritten in place
        assert c["corrupt"] == len(entries)
        served = weightgeo.compare(base, ft, cache=cache, metrics=["stable_rank"], **PAIR_KW)
        assert served.meta["cache"]["rows_cached"] == len(entries), "the recomputed rows replaced the bad entries"


@pytest.mark.parametrize("kind", ["truncated", "deeply nested header", "tensors of the wrong shape"])
def test_bad_base_decompositions_and_spectra_are_recomputed(tmp_path, kind):
    base, ft = _pair(tmp_path)
    cache = ResultCache(tmp_path / "cache")
    weightgeo.compare(base, ft, cache=cache, metrics=["spectral_drift"], **PAIR_KW)
    run = write_run(tmp_path / "run", [0, 10, 20])
    weightgeo.rank_curve(run, cache=cache, **STREAM_KW)
    for e in sorted(cache.root.rglob("*.safetensors")):
        if kind != "tensors of the wrong shape":
            _hostile(kind, e)
            continue
        from safetensors.torch import load_file, save_file

        header, _ = _header(e)
        tensors = load_file(str(e))
        if not tensors:
            continue
        bad = {k: torch.cat([v, v[:1]]) for k, v in tensors.items()}  # one value too many, re-signed below
        meta = header["__metadata__"]
        h = hashlib.sha256(meta["row"].encode())
        for name in sorted(bad):
            t = bad[name].contiguous()
            h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().data)
        meta["sha256"] = h.hexdigest()
        meta["data_bytes"] = str(sum(t.numel() * t.element_size() for t in bad.values()))
        save_file(bad, str(e), metadata=meta)
    from safetensors.torch import load_file

    # another fine-tune of the same base: its rows miss, so the base decompositions are looked up
    ft2 = write_hf_checkpoint(
        tmp_path / "ft2", {k: v * 1.5 for k, v in load_file(str(ft / "model.safetensors")).items()}
    )
    pair = weightgeo.compare(base, ft2, cache=cache, metrics=["spectral_drift"], **PAIR_KW)
    curve = weightgeo.rank_curve(run, cache=cache, **STREAM_KW)
    fresh = weightgeo.compare(base, ft2, cache=False, metrics=["spectral_drift"], **PAIR_KW)
    assert rows_json(pair) == rows_json(fresh) and pair.meta["cache"]["bases_cached"] == 0
    assert rows_json(curve) == rows_json(weightgeo.rank_curve(run, cache=False, **STREAM_KW))
    assert pair.meta["cache"]["corrupt"] > 0 and curve.meta["cache"]["corrupt"] > 0
    assert curve.meta["cache"]["spectra_reused"] == 0

"""ResultCache: exact round trips, key sensitivity, corrupt / foreign entries, concurrency, prune / info, location."""

import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from factories import tiny_llama_state, write_hf_checkpoint, write_lora_adapter

from weightgeo.cache import (
    CacheKey,
    ResultCache,
    cacheable,
    canonical_json,
    decode_row,
    default_cache_dir,
    encode_row,
    pack,
    resolve_cache,
    unpack,
)
from weightgeo.checkpoint import open_checkpoint
from weightgeo.errors import WeightgeoError
from weightgeo.linalg.pairwise import base_spectrum
from weightgeo.linalg.svd import Decomposition

POLICY = "policy-test-1"
IDENT = {
    "format": "safetensors",
    "file": {"path": "/x/model.safetensors", "size": 100, "mtime_ns": 5},
    "tensor": "w",
    "dtype": "torch.bfloat16",
    "shape": [4, 4],
    "byte_range": [64, 96],
}


def _key(cache, kind="pair_row", inputs=(IDENT,), **kw):
    kw.setdefault("options", {"k": 4})
    return cache.key(kind, inputs=list(inputs), policy=kw.pop("policy", POLICY), **kw)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def test_round_trip_rows_and_tensors_bit_identical(tmp_path, gen):
    cache = ResultCache(tmp_path)
    row = {
        "name": "layers.0.q_proj.weight",
        "shape": (896, 4864),
        "numel": 4358144,
        "layer": None,
        "principal_overlap": math.nan,
        "gap": math.inf,
        "neg": -0.0,
        "third": 1 / 3,
        "by_step": {10: 0.5, 20: 1},
        "nested": [(1, 2), {"a": [None, True]}],
        "__tuple__": "a reserved-looking key",
    }
    tensors = {
        "S": torch.randn(7, generator=gen, dtype=torch.float64),
        "V": torch.randn(5, 3, generator=gen).to(torch.bfloat16).t(),  # a non-contiguous view
        "nan": torch.tensor([math.nan, -math.inf, -0.0]),
        "mask": torch.tensor([True, False]),
        "idx": torch.arange(3),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
    }
    tensors["shares_S"] = tensors["S"][2:4]  # shares storage with S
    key = _key(cache)
    assert cache.put(key, row, tensors)
    entry = cache.get(key)
    assert entry is not None and entry.kind == "pair_row" and entry.version == cache.version
    back = entry.row
    assert back.keys() == row.keys()
    for k, v in row.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(back[k])
        else:
            assert back[k] == v and type(back[k]) is type(v), k
    assert math.copysign(1.0, back["neg"]) == -1.0 and back["third"] == 1 / 3
    assert set(entry.tensors) == set(tensors)
    for name, t in tensors.items():
        assert _same_bits(entry.tensors[name], t), name
    assert (cache.stats.hits, cache.stats.writes, cache.stats.lookups) == (1, 1, 1)


def test_decompositions_round_trip_through_pack(tmp_path, gen):
    cache = ResultCache(tmp_path)
    W0 = torch.randn(3, 40, 24, generator=gen).to(torch.bfloat16)
    spec = base_spectrum(W0)
    row, tensors = pack(spec.decomposition)
    key = _key(cache, kind="base_decomposition")
    cache.put(key, row, tensors)
    e = cache.get(key)
    dec = unpack(Decomposition, e.row, e.tensors)
    for f in ("S", "vectors", "gram_eigenvalues"):
        assert _same_bits(getattr(dec, f), getattr(spec.decomposition, f))
    assert (dec.shape, dec.small_side, dec.eps) == (
        spec.decomposition.shape,
        spec.decomposition.small_side,
        spec.decomposition.eps,
    )
    assert (dec.refined_mask is None) == (spec.decomposition.refined_mask is None)
    with pytest.raises(WeightgeoError, match="dataclass"):
        pack({"S": 1})


def test_key_sensitivity(tmp_path):
    cache = ResultCache(tmp_path, version="1.0")
    base = _key(cache)
    cache.put(base, {"v": 1})
    same = [
        _key(cache),
        cache.key("pair_row", inputs=[dict(reversed(list(IDENT.items())))], options={"k": 4}, policy=POLICY),
    ]
    assert all(k.digest == base.digest for k in same)  # mapping order does not matter

    @dataclass(frozen=True)
    class Opts:
        k: int = 4

    assert _key(cache, options=Opts()).digest == base.digest  # a dataclass and its dict agree
    changed = {
        "k": _key(cache, options={"k": 8}),
        "option added": _key(cache, options={"k": 4, "side": "left"}),
        "metric set": _key(cache, metrics=["spectral_drift"]),
        "policy": _key(cache, policy="policy-test-2"),
        "kind": _key(cache, kind="base_decomposition"),
        "mtime": _key(cache, inputs=[{**IDENT, "file": {**IDENT["file"], "mtime_ns": 6}}]),
        "size": _key(cache, inputs=[{**IDENT, "file": {**IDENT["file"], "size": 101}}]),
        "header entry": _key(cache, inputs=[{**IDENT, "byte_range": [96, 128]}]),
        "dtype": _key(cache, inputs=[{**IDENT, "dtype": "torch.float32"}]),
        "second input": _key(cache, inputs=[IDENT, IDENT]),
        "version": ResultCache(tmp_path, version="1.1").key(
            "pair_row", inputs=[IDENT], options={"k": 4}, policy=POLICY
        ),
    }
    for what, k in changed.items():
        assert k.digest != base.digest, what
    other = ResultCache(tmp_path, version="1.1")
    assert other.get(changed["version"]) is None and other.stats.misses == 1
    assert all(cache.get(k) is None for k in changed.values() if k is not changed["version"])
    assert _key(cache, metrics=["a", "b"]).digest == _key(cache, metrics=["b", "a"]).digest
    assert cache.key("pair_row", inputs=[IDENT, None], policy=POLICY) is None  # an in-memory side: not cacheable
    for bad in ({"k": torch.ones(1)}, {1: "int key"}, {"f": object()}):
        with pytest.raises(WeightgeoError, match="cache key"):
            _key(cache, options=bad)
    with pytest.raises(WeightgeoError, match="policy"):
        cache.key("pair_row", inputs=[IDENT], policy="")
    assert canonical_json({"b": (1, 2), "a": {3, 1}}) == '{"a":[1,3],"b":[1,2]}'


def test_identity_of_real_checkpoints_tracks_file_and_header(tmp_path):
    sd = tiny_llama_state(num_layers=1, hidden=8, intermediate=16, vocab=20)
    folder = write_hf_checkpoint(tmp_path / "m", sd)
    name = "model.layers.0.self_attn.q_proj.weight"
    with open_checkpoint(folder) as ck:
        first = ck.identity(name)
        assert ck.identity(name) == first and first["file"]["path"] == os.path.realpath(folder / "model.safetensors")
        assert cacheable(ck) and cacheable(folder) and cacheable(str(folder))
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))
    with open_checkpoint(folder) as ck:
        touched = ck.identity(name)
    assert touched != first and touched["byte_range"] == first["byte_range"]
    # Same path, size and mtime, another layout: the header entry tells them apart (and the ctime, below).
    from safetensors.torch import save_file

    a, c = torch.ones(4, 4), torch.zeros(4, 4)
    f = tmp_path / "one.safetensors"
    ids = []
    for other in ("c", "0"):  # "0" sorts before "a": a's bytes move, the file keeps its size
        save_file({"a": a, other: c}, str(f))
        os.utime(f, ns=(1, 1_000_000_000))
        with open_checkpoint(f) as ck:
            ids.append(ck.identity("a"))
    settable = [{k: v for k, v in i["file"].items() if k not in ("inode", "ctime_ns")} for i in ids]
    assert settable[0] == settable[1] and ids[0]["byte_range"] != ids[1]["byte_range"]
    cache = ResultCache(tmp_path / "cache")
    assert cache.key("r", inputs=[ids[0]], policy=POLICY) != cache.key("r", inputs=[ids[1]], policy=POLICY)
    bin_folder = write_hf_checkpoint(tmp_path / "b", sd, fmt="bin")
    with open_checkpoint(bin_folder) as ck:
        assert ck.identity(name)["format"] == "torch" and ck.identity(name)["shape"] == [8, 8]
    with open_checkpoint(sd) as ck:
        assert ck.identity(name) is None and not cacheable(ck)
    with torch.random.fork_rng(devices=[]):  # nn.Linear initialises from the global RNG: leave it untouched
        module = torch.nn.Linear(2, 2)
    assert not cacheable(sd) and not cacheable(module)
    lora = write_lora_adapter(tmp_path / "lora", sd)
    with open_checkpoint(lora, base=folder) as ck:
        ident = ck.identity(name)
        assert ident["format"] == "lora" and ident["base"] == touched and ident["scaling"] == 2.0
        untouched = "model.layers.0.mlp.up_proj.weight"
        assert ck.identity(untouched) == open_checkpoint(folder).identity(untouched)
    with open_checkpoint(lora, base=sd) as ck:
        assert ck.identity(name) is None  # an in-memory base: the merged tensor is not cacheable


def test_truncated_and_tampered_entries_are_ignored_counted_and_recomputed(tmp_path, gen):
    cache = ResultCache(tmp_path)
    tensors = {"V": torch.randn(64, 64, generator=gen, dtype=torch.float64)}
    keys = [_key(cache, options={"k": i}) for i in range(5)]
    for k in keys:
        cache.put(k, {"k": 1.5}, tensors)
    sizes = [cache.path(k).stat().st_size for k in keys]
    with open(cache.path(keys[0]), "r+b") as f:
        f.truncate(sizes[0] // 2)  # data cut short
    with open(cache.path(keys[1]), "r+b") as f:
        f.truncate(5)  # not even the header length
    with open(cache.path(keys[2]), "r+b") as f:
        f.seek(sizes[2] - 3)
        f.write(b"\x01")  # one flipped byte in the tensor data
    data = cache.path(keys[3]).read_bytes()
    cache.path(keys[3]).write_bytes(data.replace(b'\\"k\\":1.5', b'\\"k\\":2.5'))  # row edited, header still JSON
    assert data != cache.path(keys[3]).read_bytes()
    with open(cache.path(keys[4]), "ab") as f:
        f.write(b"junk")  # trailing bytes
    assert [cache.get(k) for k in keys] == [None] * 5
    assert (cache.stats.corrupt, cache.stats.hits, cache.stats.foreign) == (5, 0, 0)
    for k in keys:  # recomputed and stored again: now served
        cache.put(k, {"k": 1.5}, tensors)
    assert all(_same_bits(cache.get(k).tensors["V"], tensors["V"]) for k in keys)
    assert cache.stats.hits == 5


def test_foreign_and_other_version_entries_are_ignored(tmp_path):
    old = ResultCache(tmp_path, version="0.0.9")
    cache = ResultCache(tmp_path, version="0.1.0")
    k_old, k = _key(old), _key(cache)
    old.put(k_old, {"v": "old"})
    assert cache.get(k) is None and cache.stats.misses == 1  # another version: another key, another folder
    cache.path(k).parent.mkdir(parents=True)
    cache.path(k).write_bytes(old.path(k_old).read_bytes())  # an old entry copied under the new key's path
    assert cache.get(k) is None and cache.stats.foreign == 1
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(cache.path(k)))  # some other safetensors file
    assert cache.get(k) is None and cache.stats.foreign == 2
    other = _key(cache, options={"k": 99})
    cache.put(other, {"v": "other"})
    cache.path(k).write_bytes(cache.path(other).read_bytes())  # same version, another key's entry
    assert cache.get(k) is None and cache.stats.foreign == 3
    cache.put(k, {"v": "new"})
    assert cache.get(k).row == {"v": "new"}


def _fill(root: str, worker: int, barrier, n_shared: int, n_own: int, rounds: int) -> None:
    torch.set_num_threads(1)
    cache = ResultCache(root, version="0.1.0")
    g = torch.Generator().manual_seed(0)  # both workers write identical shared entries
    shared = [torch.randn(96, 96, generator=g, dtype=torch.float64) for _ in range(n_shared)]
    barrier.wait()
    for r in range(rounds):  # the shared keys are rewritten while the other worker and the parent read them
        for i in range(n_shared):
            cache.put(_key(cache, options={"shared": i}), {"i": i}, {"V": shared[i]})
            cache.get(_key(cache, options={"shared": (i * 7) % n_shared}))
            if r == 0 and i < n_own:
                cache.put(
                    _key(cache, options={"own": i, "worker": worker}),
                    {"i": i, "worker": worker},
                    {"V": torch.full((96, 96), float(worker * 1000 + i), dtype=torch.float64)},
                )
    if cache.stats.corrupt or cache.stats.foreign or cache.stats.write_errors:
        raise SystemExit(f"worker {worker}: {cache.stats}")


def test_two_processes_fill_one_cache_at_once(tmp_path):
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    barrier = ctx.Barrier(3)
    n_shared, n_own, rounds = 30, 15, 3
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), w, barrier, n_shared, n_own, rounds)) for w in (1, 2)]
    for p in procs:
        p.start()
    reader = ResultCache(tmp_path, version="0.1.0")
    barrier.wait()
    while any(p.is_alive() for p in procs):  # read while both write: never a torn entry
        for i in range(n_shared):
            reader.get(_key(reader, options={"shared": i}))
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert reader.stats.corrupt == 0 and reader.stats.foreign == 0 and reader.stats.hits > 0
    cache = ResultCache(tmp_path, version="0.1.0")
    g = torch.Generator().manual_seed(0)
    for i in range(n_shared):
        e = cache.get(_key(cache, options={"shared": i}))
        assert e is not None and e.row == {"i": i}
        assert _same_bits(e.tensors["V"], torch.randn(96, 96, generator=g, dtype=torch.float64))
    for w in (1, 2):
        for i in range(n_own):
            e = cache.get(_key(cache, options={"own": i, "worker": w}))
            assert e is not None and float(e.tensors["V"][0, 0]) == w * 1000 + i
    info = cache.info()
    assert info.entries == n_shared + 2 * n_own and info.temp_files == 0
    assert (cache.stats.hits, cache.stats.corrupt, cache.stats.foreign) == (n_shared + 2 * n_own, 0, 0)


def test_info_and_prune(tmp_path):
    old, cache = ResultCache(tmp_path, version="0.0.9", code="c"), ResultCache(tmp_path, version="0.1.0", code="c")
    old.put(_key(old), {"v": 0}, {"x": torch.zeros(1000)})
    keys = [_key(cache, options={"k": i}) for i in range(4)]
    for i, k in enumerate(keys):
        cache.put(k, {"v": i}, {"x": torch.zeros(1000)})
        os.utime(cache.path(k), (time.time() - (10 - i) * 86400,) * 2)  # k0 unused for 10 days, k3 for 7
    stale = cache.path(keys[0]).parent / ".0123.abc.tmp"
    stale.write_bytes(b"half an entry")
    os.utime(stale, (time.time() - 7200,) * 2)
    fresh_tmp = cache.path(keys[1]).parent / ".4567.def.tmp"
    fresh_tmp.write_bytes(b"being written right now")
    (tmp_path / "v7").mkdir()
    (tmp_path / "v7" / "x.bin").write_bytes(b"0" * 10)
    info = cache.info()
    assert info.entries == 5 and set(info.by_version) == {"0.0.9+c", "0.1.0+c"}
    assert info.by_version["0.1.0+c"]["entries"] == 4 and info.current == "0.1.0+c" and "(this weightgeo)" in str(info)
    assert info.temp_files == 2 and info.other_formats == ("v7",) and "5 entries" in str(info)
    size = cache.path(keys[0]).stat().st_size
    dry = cache.prune(older_than=timedelta(days=8.5), dry_run=True)
    assert dry.dry_run and dry.removed == 5 and cache.info().entries == 5  # stale tmp, old version, v7, k0, k1
    r = cache.prune(older_than=8.5 * 86400, max_bytes=size + 10)
    assert r.reasons == {"stale temporary": 1, "other version": 2, "older than": 2, "over max_bytes": 1}
    assert [cache.get(k) is not None for k in keys] == [False, False, False, True]  # least recently used went
    assert fresh_tmp.exists() and not stale.exists() and not (tmp_path / "v7").exists()
    assert not old.path(_key(old)).parent.exists()  # emptied folders removed
    assert cache.prune(max_bytes=0).removed == 1 and cache.info().entries == 0
    for bad in ({"older_than": -1}, {"max_bytes": 1.5}, {"older_than": "1d"}):
        with pytest.raises(WeightgeoError, match="prune"):
            cache.prune(**bad)


def test_location_env_and_switches(tmp_path, monkeypatch):
    monkeypatch.delenv("WEIGHTGEO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "weightgeo"
    assert resolve_cache(None).root == tmp_path / "xdg" / "weightgeo"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == Path.home() / ".cache" / "weightgeo"
    monkeypatch.setenv("WEIGHTGEO_CACHE", str(tmp_path / "env"))
    assert resolve_cache(None).root == tmp_path / "env" and resolve_cache(True).root == tmp_path / "env"
    for off in ("0", "off", "OFF", "false", "no"):
        monkeypatch.setenv("WEIGHTGEO_CACHE", off)
        assert resolve_cache(None) is None
        assert resolve_cache(True).root == default_cache_dir()  # an explicit True wins
    monkeypatch.setenv("WEIGHTGEO_CACHE", "")
    assert resolve_cache(None).root == default_cache_dir()
    assert resolve_cache(False) is None
    assert resolve_cache(tmp_path / "given").root == tmp_path / "given"
    c = ResultCache(tmp_path / "obj")
    assert resolve_cache(c) is c
    (tmp_path / "afile").write_text("x")
    for bad in (tmp_path / "afile", "", 3):
        with pytest.raises(WeightgeoError, match="cache="):
            resolve_cache(bad)


def test_an_unwritable_cache_warns_once_and_never_fails(tmp_path):
    (tmp_path / "afile").write_text("x")
    cache = ResultCache(tmp_path / "afile" / "cache")  # a file where a folder should be
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert cache.put(_key(cache), {"v": 1}) is False
        assert cache.put(_key(cache, options={"k": 5}), {"v": 1}) is False
    with pytest.warns(RuntimeWarning, match="cannot read"):
        assert cache.get(_key(cache)) is None
    assert (cache.stats.write_errors, cache.stats.misses) == (2, 1)
    with pytest.raises(WeightgeoError, match="cache row"):
        ResultCache(tmp_path / "ok").put(_key(cache), {"t": torch.ones(1)})  # a tensor in the row is a bug


def test_rows_codec_rejects_what_it_cannot_restore():
    assert decode_row(encode_row({(1, 2): "tuple key", "x": [1.0, None]})) == {(1, 2): "tuple key", "x": [1.0, None]}
    with pytest.raises(WeightgeoError, match="cache row"):
        encode_row({"x": {1, 2}})
    assert isinstance(CacheKey("d", "k", "t"), CacheKey)

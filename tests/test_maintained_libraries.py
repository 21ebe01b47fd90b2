"""Parts now done by maintained libraries (issue 15): same output as the former hand-written code."""

from __future__ import annotations

import numpy as np
import pytest

import dkan
from dkan import _keys as K


@pytest.mark.parametrize("target_sum", [1e4, 50.0, None])
@pytest.mark.parametrize("log", ["log10", "log1p", None])
def test_normalize_through_scanpy_gives_the_former_numbers(target_sum, log):
    """scanpy's normalize_total / log1p(base=10) in float64 give bit-identical float32 targets."""
    sdata = dkan.datasets.toy(n_samples=2, grid_size=5, n_genes=15, seed=3)
    adata = sdata.tables[K.TABLE]
    x = np.asarray(adata.X.todense(), dtype=np.float64)
    x[[0, 7]] = 0  # spots with no counts stay zero
    adata.X = type(adata.X)(x.astype(adata.X.dtype))
    got = dkan.pp.normalize(sdata, target_sum=target_sum, log=log, smooth=False, inplace=False)
    labels = adata.obs[K.SAMPLE].to_numpy()
    expected = np.empty(x.shape, np.float32)
    for lab in np.unique(labels):  # the former hand-written formula, per sample
        y = x[labels == lab]
        lib = y.sum(axis=1, keepdims=True)
        if target_sum is not None:
            y = np.divide(y * target_sum, lib, out=np.zeros_like(y), where=lib > 0)
        y = np.log10(1.0 + y) if log == "log10" else np.log1p(y) if log == "log1p" else y
        expected[labels == lab] = y
    np.testing.assert_array_equal(got, expected)


def _split_toy(drop_genes: int = 5) -> list:
    sdata = dkan.datasets.toy(n_samples=3, grid_size=5, n_genes=12, seed=0)
    parts = [sdata.subset([f"s{i}_image", f"s{i}_spots"], filter_tables=True) for i in range(3)]
    parts[2].tables[K.TABLE] = parts[2].tables[K.TABLE][:, drop_genes:].copy()  # fewer genes: inner != outer
    return parts


@pytest.mark.parametrize("join", ["inner", "outer"])
def test_concat_through_spatialdata_concatenate_keeps_the_former_table(join):
    """Same elements, counts, obs, var and dkan metadata as the former anndata.concat-based merge."""
    import anndata as ad

    from dkan.io._concat import _concat_samples

    parts = _split_toy()
    out = _concat_samples(parts, join=join)
    table = out.tables[K.TABLE]
    expected = ad.concat([p.tables[K.TABLE] for p in parts], join=join, fill_value=0, merge="same")
    assert sorted(out.images) == [f"s{i}_image" for i in range(3)]
    assert sorted(out.shapes) == [f"s{i}_spots" for i in range(3)]
    assert list(table.obs_names) == list(expected.obs_names)
    assert list(table.var_names) == list(expected.var_names)
    assert (table.X != expected.X).nnz == 0
    assert list(table.obs[K.REGION].cat.categories) == [f"s{i}_spots" for i in range(3)]
    assert table.obs[K.SAMPLE].dtype == "category"
    assert table.uns["spatialdata_attrs"]["region"] == [f"s{i}_spots" for i in range(3)]
    assert set(table.uns[K.UNS][K.UNS_READER]) == {"s0", "s1", "s2"}
    assert table.n_vars == (7 if join == "inner" else 12)


def test_concat_renamed_region_columns_and_clashing_names():
    from spatialdata.models import TableModel

    from dkan.io._concat import _concat_samples

    parts = _split_toy(drop_genes=0)
    t = parts[1].tables[K.TABLE].copy()
    t.obs = t.obs.rename(columns={K.REGION: "library", K.INSTANCE: "cell"})
    t.uns.pop("spatialdata_attrs")
    parts[1].tables[K.TABLE] = TableModel.parse(t, region="s1_spots", region_key="library", instance_key="cell")
    table = _concat_samples(parts).tables[K.TABLE]
    assert (table.obs[K.REGION] == "s1_spots").sum() == t.n_obs
    with pytest.raises(ValueError, match="s0_image"):
        _concat_samples([parts[0], parts[0]])


def test_buffer_pool_reuses_a_buffer_only_when_nothing_holds_it():
    import gc

    import torch

    from dkan._features.windows import _BufferPool

    pool = _BufferPool(size=3)
    a = pool.get((4, 3), np.float32)
    address = a.ctypes.data
    tensor = torch.from_numpy(a)[1:]  # a torch view keeps the buffer in use
    del a
    gc.collect()
    b = pool.get((4, 3), np.float32)
    assert b.ctypes.data != address
    view = b[::2]  # so does a numpy view
    del b
    c = pool.get((4, 3), np.float32)
    assert c.ctypes.data not in (address, view.ctypes.data)
    del tensor, view, c
    reused = {pool.get((4, 3), np.float32).ctypes.data for _ in range(3)}
    assert address in reused  # every holder gone: the buffers come back
    assert pool.get((4, 3), np.uint8).dtype == np.uint8 and pool.get((2, 3), np.float32).shape == (2, 3)
    assert len(pool._free) <= 3
    import pickle

    assert pickle.loads(pickle.dumps(pool)).size == 3  # a copy for a worker process starts empty


def test_buffer_pool_does_not_depend_on_reference_counts(monkeypatch):
    """Reference-count values change between CPython versions; the pool must reuse buffers whatever they are."""
    import sys

    from dkan._features.windows import _BufferPool

    monkeypatch.setattr(sys, "getrefcount", lambda obj: 2)  # e.g. an interpreter that counts one fewer reference
    pool = _BufferPool()
    address = pool.get((8, 8), np.uint8).ctypes.data  # handed out and dropped at once
    assert pool.get((8, 8), np.uint8).ctypes.data == address


def test_spot_crops_batches_stay_valid_while_held():
    """A held batch is never overwritten by the next one (its buffers are still owned)."""
    import torch

    sdata = dkan.datasets.toy(n_samples=1, grid_size=4, n_genes=6, seed=0)
    dkan.tl.tile(sdata)
    crops = dkan.tl.SpotCrops(sdata, with_region=True)
    first = crops.read_batch([0, 1, 2])
    kept = {k: v.clone() for k, v in first.items() if torch.is_tensor(v)}
    crops.read_batch([5, 6, 7])
    for key, value in kept.items():
        assert torch.equal(first[key], value), key


class _FakeEutils:
    """In-memory E-utilities (no network): esearch on symbols and aliases (OR queries too), esummary by id."""

    def __init__(self, records: dict[str, dict]) -> None:
        self.records = records
        self.n_requests = 0
        self.calls: list[str] = []

    def request(self, url: str, **_: object) -> dict:
        import re
        import urllib.parse

        self.n_requests += 1
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        tool = parts.path.rsplit("/", 1)[-1].split(".")[0]
        self.calls.append(tool)
        if tool == "esearch":
            wanted = {s.upper() for s in re.findall(r"([^()]+?)\[sym\]", query["term"].replace(" OR ", ""))}
            ids = [
                uid
                for uid, r in self.records.items()
                if {r["name"].upper(), *(a.strip().upper() for a in r.get("otheraliases", "").split(","))} & wanted
            ]
            ids = ids[: int(query["retmax"])]
            return {"esearchresult": {"count": str(len(ids)), "idlist": ids}}
        uids = [u for u in query["id"].split(",") if u in self.records]
        return {"result": {"uids": uids} | {u: self.records[u] for u in uids}}


def _fake_records() -> dict[str, dict]:
    records = {}
    for k in range(100):
        uid = str(1000 + k)
        records[uid] = {"uid": uid, "name": f"GENE{k}", "description": f"gene {k}", "status": "", "summary": f"s{k}"}
    records["1005"]["otheraliases"] = "SHARED, OLD5"
    records["1006"]["otheraliases"] = "SHARED"
    records["999"] = {"uid": "999", "name": "GENE7", "description": "withdrawn", "status": "discontinued"}
    records["998"] = {"uid": "998", "name": "WEIRD NAME", "description": "odd symbol", "status": ""}
    return records


def test_ncbi_descriptions_are_fetched_in_batches(tmp_path):
    """Many symbols per esearch call and same records as the former one-request-per-symbol lookup."""
    from dkan._genetext.ncbi import NCBIClient, _pick

    symbols = [f"GENE{k}" for k in range(100)] + ["OLD5", "SHARED", "WEIRD NAME"] + [f"NONE{k}" for k in range(17)]
    client = NCBIClient(cache_dir=tmp_path / "batched", rate=1e6)
    client.http = fake = _FakeEutils(_fake_records())
    got = client.gene_records(symbols, progress=False)
    assert fake.calls.count("esearch") == 3 + 1  # 119 plain symbols in batches of 50, the odd one alone
    assert fake.n_requests <= 4 + 5

    former = NCBIClient(cache_dir=tmp_path / "former", rate=1e6)
    former.http = old = _FakeEutils(_fake_records())
    hits = {s: former.search(s) for s in symbols}
    recs = former.summaries(sorted({i for ids in hits.values() for i in ids}))
    expected = {s: _pick(s, [recs[i] for i in hits[s] if i in recs]) for s in symbols}
    assert got == expected
    assert old.n_requests > len(symbols) > 10 * fake.n_requests  # one esearch per symbol before
    assert got["GENE7"]["full_name"] == "gene 7"  # the live record, not the withdrawn one
    assert got["OLD5"]["symbol"] == "GENE5" and got["SHARED"]["symbol"] == "GENE5"
    assert got["WEIRD NAME"]["full_name"] == "odd symbol" and got["NONE3"] is None

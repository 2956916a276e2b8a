"""Weights and activations from torch against a real cluster (tensorcache/torch).

- put_state_dict / load_state_dict: bit-exact round trips of a model with
  float32 weights and a bfloat16 buffer, into a module in place, a template
  or a new dict; a revision is immutable; a mismatched target is refused;
- the manifest is the commit point: a writer killed (SIGKILL) after every
  tensor is in the cluster but before its manifest leaves a revision that no
  reader sees; the next writer commits it;
- get_or_load_state_dict: three processes at once, one loader call in all,
  identical results; a revision missing a tensor is refilled, not half-read;
- load_safetensors: three processes at once on a bfloat16 checkpoint, one
  reads the file (one fill), all get exactly the file's tensors;
- ``tensorcache load`` of a bfloat16 checkpoint reads back as bfloat16;
- Memo: three processes, same input, one computation; keys are content
  hashes, the same in every process, different for another dtype;
- stream_layers: a model run with its blocks streamed from the cluster gives
  bit-identical outputs, with never more than lookahead + 1 blocks resident.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

import tensorcache  # noqa: E402
from tensorcache.torch import (  # noqa: E402
    Memo,
    get_or_load_state_dict,
    input_key,
    load_state_dict,
    put_state_dict,
    read_manifest,
    read_state_dict,
    stream_layers,
)

from . import weightsworker  # noqa: E402
from .helpers import poll  # noqa: E402
from .torchmodels import model, tokens  # noqa: E402

pytestmark = pytest.mark.integration


def same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1), b.view(-1))


def test_state_dict_round_trips_bit_exactly(cluster, prefix):
    ref = model(1)
    want = ref.state_dict()
    with tensorcache.connect(cluster.router_address) as c:
        manifest = put_state_dict(c, f"{prefix}rev1/", want)
        assert set(manifest.tensors) == set(want)
        assert manifest.tensors["scale"].dtype == "bfloat16"
        with pytest.raises(tensorcache.VersionConflict, match="immutable"):
            put_state_dict(c, f"{prefix}rev1/", want)

        other = model(2)  # different weights, same architecture
        assert load_state_dict(c, f"{prefix}rev1/", other) is other
        for name, t in other.state_dict().items():
            assert same(t, want[name]), name
        assert torch.equal(other(tokens()), ref(tokens()))

        fresh = read_state_dict(c, f"{prefix}rev1/")
        assert all(same(fresh[n], want[n]) for n in want)
        template = {n: torch.empty_like(t) for n, t in want.items()}
        assert load_state_dict(c, f"{prefix}rev1/", template) is template
        assert all(same(template[n], want[n]) for n in want)

        assert load_state_dict(c, f"{prefix}absent/", model(2)) is None
        with pytest.raises(tensorcache.InvalidArgument, match="missing"):
            load_state_dict(c, f"{prefix}rev1/", model(2, layers=3))
        bad = dict(template)
        bad["scale"] = torch.empty(32, dtype=torch.float32)
        with pytest.raises(tensorcache.InvalidArgument, match="'scale'"):
            load_state_dict(c, f"{prefix}rev1/", bad)


def test_a_writer_killed_before_its_manifest_leaves_nothing_visible(cluster, prefix, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = tmp_path / "ready"
    rev = f"{prefix}rev/"
    writer = ctx.Process(
        target=weightsworker.write_until_manifest,
        args=(cluster.router_address, rev, str(ready)),
    )
    writer.start()
    try:
        poll(lambda: ready.exists() or None, timeout=120, what="the writer to reach its manifest")
        with tensorcache.connect(cluster.router_address) as c:
            want = model(3).state_dict()
            # Every tensor is in the cluster, yet the revision does not exist.
            assert all(c.get(f"{rev}t/{n}") is not None for n in want)
            assert read_manifest(c, rev) is None
            assert load_state_dict(c, rev, model(4)) is None
            writer.kill()
            writer.join(30)
            assert writer.exitcode == -9
            assert read_state_dict(c, rev) is None
            put_state_dict(c, rev, want)  # the next writer commits it
            got = read_state_dict(c, rev)
            assert got is not None and all(same(got[n], want[n]) for n in want)
    finally:
        if writer.is_alive():
            writer.kill()


def test_get_or_load_state_dict_fills_once_cluster_wide(cluster, prefix, tmp_path):
    log = tmp_path / "loads"
    ctx = multiprocessing.get_context("spawn")
    rev = f"{prefix}rev/"
    with ctx.Pool(3) as pool:
        digests = pool.starmap(
            weightsworker.fill_state_dict, [(cluster.router_address, rev, str(log))] * 3
        )
    assert len(log.read_text().split()) == 1  # one loader call in the cluster
    assert len(set(digests)) == 1
    assert digests[0] == weightsworker.digest(model(7).state_dict())

    # A tensor of a committed revision goes missing: the revision is broken,
    # so it is filled again (never served with a hole).
    with tensorcache.connect(cluster.router_address) as c:
        assert c.delete(f"{rev}t/layers.0.mlp.0.weight")
        assert read_state_dict(c, rev) is None
        calls = []
        got = get_or_load_state_dict(c, rev, lambda: calls.append(1) or model(7).state_dict())
        assert calls == [1]
        assert weightsworker.digest(got) == digests[0]


def test_load_safetensors_reads_the_file_once(cluster, prefix, tmp_path):
    ref = {n: t.to(torch.bfloat16) for n, t in model(5).state_dict().items()}
    ref["ids"] = torch.arange(7, dtype=torch.int64)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(ref, str(path))
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        got = pool.starmap(
            weightsworker.read_safetensors, [(cluster.router_address, str(path), f"{prefix}r/")] * 3
        )
    assert {d for d, _ in got} == {weightsworker.digest(ref)}
    assert sum(loads for _, loads in got) == 1  # one process read the file and filled


def test_cli_load_of_a_bfloat16_checkpoint(cluster, prefix, tmp_path):
    ref = {n: t.to(torch.bfloat16) for n, t in model(6).state_dict().items()}
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(ref, str(path))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorcache",
            "load",
            str(path),
            "--prefix",
            f"{prefix}bf/",
            "--router",
            cluster.router_address,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    with tensorcache.connect(cluster.router_address) as c:
        got = read_state_dict(c, f"{prefix}bf/")
        assert got is not None and all(same(got[n], ref[n]) for n in ref)
        assert all(t.dtype == torch.bfloat16 for t in got.values())


def test_memo_computes_once_per_input_cluster_wide(cluster, prefix):
    ns = f"{prefix}act/"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as pool:
        got = pool.starmap(weightsworker.memo_call, [(cluster.router_address, ns)] * 3)
    assert len({d for d, _, _ in got}) == 1
    assert sum(calls for _, calls, _ in got) == 1
    x = torch.arange(1000, dtype=torch.float16).reshape(10, 100)
    keys = {k for _, _, k in got}
    assert keys == {input_key(ns, (x,), {})}  # the same key in every process
    assert input_key(ns, (x.float(),), {}) not in keys  # another dtype, another key
    assert input_key(ns, (x.reshape(100, 10),), {}) not in keys  # another shape
    with tensorcache.connect(cluster.router_address) as c:
        memo = Memo(c, ns, weightsworker.slow_embed)
        out = memo(x)
        assert memo.calls == 0  # a hit
        assert torch.equal(out, weightsworker.slow_embed(x))
        memo(x + 1)
        assert memo.calls == 1
        with pytest.raises(tensorcache.InvalidArgument, match="cannot hash"):
            memo(object())


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_stream_layers_runs_with_at_most_lookahead_plus_one_blocks(cluster, prefix, lookahead):
    ref = model(8, layers=6)
    with torch.no_grad():  # the same kernels as the streamed run (MHA's inference path)
        want = ref(tokens())
    rev = f"{prefix}rev/"
    with tensorcache.connect(cluster.router_address) as c:
        if read_manifest(c, rev) is None:
            put_state_dict(c, rev, ref.state_dict())
        m = model(9, layers=6)  # other weights: they must all come from the cluster
        streamer = stream_layers(c, m, rev, list(m.layers), lookahead=lookahead)
        materialized: list[int] = []

        def count(_mod, _args):  # an independent look, right before each block runs
            materialized.append(sum(all(p.numel() > 0 for p in b.parameters()) for b in m.layers))

        for b in m.layers:
            b.register_forward_pre_hook(count)
        with torch.no_grad():
            for _ in range(2):  # the second forward reuses the wrapped-around prefetches
                assert torch.equal(m(tokens()), want)
        assert max(materialized) == 1  # only the running block holds its weights
        assert streamer.max_resident <= lookahead + 1
        assert streamer.max_resident == min(lookahead, 5) + 1
        assert streamer.fetches >= 12  # every block, every forward, from the cluster
        assert all(p.numel() == 0 for b in m.layers for p in b.parameters())
        streamer.close()


@pytest.mark.gpu
def test_weights_onto_cuda(cluster, prefix):
    """Revisions loaded straight onto a GPU (needs CUDA; skipped without it)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ref = model(10, layers=4)
    with torch.no_grad():
        want = ref(tokens())
    rev = f"{prefix}rev/"
    with tensorcache.connect(cluster.router_address) as c:
        put_state_dict(c, rev, ref.state_dict())
        m = load_state_dict(c, rev, model(11, layers=4), device="cuda:0")
        assert all(t.device.type == "cuda" for t in m.state_dict().values())
        got = read_state_dict(c, rev, device="cuda:0")
        assert all(same(got[n].cpu(), t) for n, t in ref.state_dict().items())
        s = model(12, layers=4).to("cuda:0")
        streamer = stream_layers(c, s, rev, list(s.layers), lookahead=1, device="cuda:0")
        with torch.no_grad():
            out = s(tokens().to("cuda:0"))
        assert streamer.max_resident <= 2
        assert torch.allclose(out.cpu(), want, atol=1e-4)  # GPU kernels: close, not bit-equal
        streamer.close()

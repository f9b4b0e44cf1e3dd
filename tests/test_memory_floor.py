"""bench.memory_floor's synthetic kernels move the bytes they claim to: every element of y written from
x, every tile sum right (under the interpreter on CPU; the timings themselves need a GPU)."""
import pytest
import torch

from bench import memory_floor

TILE = 64


def _inputs(n_tiles=5, tail=17):
    x = torch.randn(n_tiles * TILE + tail, dtype=torch.float16)
    y = torch.full_like(x, float("nan"))
    sums = torch.full((n_tiles + 1,), float("nan"))
    return x, y, sums


def _check(x, y, sums):
    assert torch.equal(y, x)
    expected = torch.nn.functional.pad(x.float(), (0, sums.numel() * TILE - x.numel())).view(-1, TILE).sum(1)
    torch.testing.assert_close(sums, expected)


@pytest.mark.parametrize("lag, programs", [(0, 0), (1, 0), (4, 0), (9, 0), (0, 2), (2, 2), (4, 2), (3, 3)])
def test_reread_copies_every_tile_and_sums_it(lag, programs):
    x, y, sums = _inputs()
    memory_floor.reread(x, y, sums, lag, programs, tile=TILE)
    _check(x, y, sums)


def test_hinted_reread_copies_every_tile_and_sums_it():
    x, y, sums = _inputs()
    memory_floor.reread(x, y, sums, 2, hints=True, tile=TILE)
    _check(x, y, sums)


@pytest.mark.parametrize("reverse, hints", [(False, False), (True, False), (True, True)])
def test_two_kernels_copy_every_tile_and_sum_it(reverse, hints):
    x, y, sums = _inputs()
    memory_floor.two_kernels(x, y, sums, reverse, hints, tile=TILE)
    _check(x, y, sums)


def test_read_only_sums_every_tile_and_writes_nothing():
    x, y, sums = _inputs()
    memory_floor.read_only(x, y, sums, tile=TILE)
    assert y.isnan().all()
    expected = torch.nn.functional.pad(x.float(), (0, sums.numel() * TILE - x.numel())).view(-1, TILE).sum(1)
    torch.testing.assert_close(sums, expected)


def test_rereads_stay_within_x():
    """A re-read distance past x's size would time the two-kernel floor under another label."""
    x = torch.empty(5 * 2**20 // 2, dtype=torch.float16)  # 5 MB
    labels = [label for label, *_ in memory_floor.cases(x, programs=128)]  # 1 MB per round
    assert [label for label in labels if label.startswith("re-read")] == \
        ["re-read 1 MB behind", "re-read 2 MB behind", "re-read 4 MB behind", "re-read 4 MB behind, eviction hints",
         "re-read 1.0 MB behind, same program",
         "re-read 2.0 MB behind, same program", "re-read 4.0 MB behind, same program"]
    assert labels[:2] == ["torch copy_", "copy (one read)"] and labels[-1] == memory_floor.READ_ONLY
    assert len(labels) == 14


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_needs_a_gpu(capsys):
    with pytest.raises(SystemExit):
        memory_floor.main([])
    assert "need a CUDA GPU" in capsys.readouterr().err


def test_run_times_every_case(monkeypatch):
    """run()'s own code on a small shape, the GPU timer replaced by one that checks each case's y: it
    runs only on a lent GPU otherwise."""
    from bench import common

    def timer(fn, min_time, args):
        x, y, sums = args
        y.fill_(float("nan"))
        sums.fill_(float("nan"))
        fn(x, y, sums)
        if fn is memory_floor.read_only:
            assert y.isnan().all() and not sums.isnan().any()
        else:
            assert torch.equal(y, x)
        return 1e-6

    monkeypatch.setattr(memory_floor, "SHAPES", [("small", (1, 32, 2, 32, 32))])  # 128 KiB: 16 tiles
    monkeypatch.setattr(memory_floor, "REREAD_MB", (1 / 16,))  # 8 tiles behind
    monkeypatch.setattr(memory_floor, "sm_count", lambda dev: 2)  # 8 persistent programs
    monkeypatch.setattr(common, "median_seconds_graphed", timer)
    report = common.Report(device="cpu")
    memory_floor.run(report, torch.device("cpu"), 0.0)
    want = [label for label, *_ in memory_floor.cases(torch.empty(65536, dtype=torch.float16), 8)]
    assert [r.impl for r in report.rows] == want and len(want) == 9
    # GroupNorm's bytes (x read, y written), x alone for the read pass
    assert [r.bytes_moved for r in report.rows] == [2 * 65536 * 2] * 8 + [65536 * 2]

"""memguard.plot: the sweeps, the points they choose, the picture, and ``memguard plot``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from memguard import Category, ConfigError, MemoryEstimate, MissingDependencyError, plot
from memguard.cli import EXIT_OK, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIB = 2**20


def fake_estimate(batch_size: int = 1, seq_len: int = 128) -> MemoryEstimate:
    """Memory that grows with batch and sequence as a real step's does: fixed states, then activations."""
    fixed = 600 * MIB
    tokens = batch_size * seq_len
    return MemoryEstimate("formula", {
        Category.PARAMETERS: fixed // 4, Category.GRADIENTS: fixed // 4, Category.OPTIMIZER_STATE: fixed // 2,
        Category.ACTIVATIONS: tokens * 64 * 1024, Category.TEMPORARY: tokens * 8 * 1024,
        Category.OVERHEAD: 540 * MIB,
    }, inputs={"batch_size": batch_size, "seq_len": seq_len})


def test_batch_sizes_reach_past_the_largest_fitting_one():
    sizes = plot.batch_sizes_for(20)
    assert sizes[0] == 1 and sizes == sorted(set(sizes))
    assert {20, 21} <= set(sizes) and max(sizes) == 25
    assert plot.batch_sizes_for(1) == [1, 2]
    assert plot.batch_sizes_for(0) == [1, 2, 4, 8]


def test_seq_lens_double_up_to_twice_the_length():
    assert plot.seq_lens_for(1024) == [128, 256, 512, 1024, 2048]
    assert plot.seq_lens_for(1) == [1, 2]
    assert plot.seq_lens_for(100, points=3) == [50, 100, 200]


def test_sweep_collects_estimates_in_order():
    s = plot.sweep(lambda b: fake_estimate(b), "batch_size", [1, 2, 4])
    assert s.values == (1, 2, 4) and s.stopped is None
    assert s.totals() == [fake_estimate(b).total_bytes for b in (1, 2, 4)]
    series = s.series()
    assert list(series) == list(Category)
    assert series[Category.ACTIVATIONS] == [b * 128 * 64 * 1024 for b in (1, 2, 4)]
    data = s.to_dict()
    assert data["axis"] == "batch_size"
    assert [p["batch_size"] for p in data["points"]] == [1, 2, 4]
    assert data["points"][2]["total_bytes"] == fake_estimate(4).total_bytes
    assert set(data["points"][0]["breakdown"]) == {c.value for c in Category}
    json.dumps(data)


def test_sweep_stops_where_the_model_stops():
    def at(seq: int) -> MemoryEstimate:
        if seq > 512:
            raise ConfigError(f"seq_len={seq} is longer than the model can take")
        return fake_estimate(seq_len=seq)

    s = plot.sweep(at, "seq_len", [128, 256, 512, 1024, 2048], stop_at_error=True)
    assert s.values == (128, 256, 512)
    assert s.stopped == "stopped before seq_len 1024: seq_len=1024 is longer than the model can take"
    with pytest.raises(ConfigError, match="longer"):
        plot.sweep(at, "seq_len", [1024], stop_at_error=True)  # nothing worked: the error stands
    with pytest.raises(ConfigError, match="longer"):
        plot.sweep(at, "seq_len", [512, 1024])


@pytest.mark.parametrize(("axis", "values", "match"), [
    ("width", [1, 2], "unknown sweep axis 'width'"),
    ("batch_size", [], "at least one value"),
    ("batch_size", [2, 1], "increasing"),
    ("batch_size", [0, 1], "positive"),
])
def test_sweep_rejects_bad_arguments(axis, values, match):
    with pytest.raises(ConfigError, match=match):
        plot.sweep(fake_estimate, axis, values)


@pytest.mark.slow
def test_render_writes_a_png_with_two_panels(tmp_path):
    by_batch = plot.sweep(lambda b: fake_estimate(b, 256), "batch_size", plot.batch_sizes_for(12))
    by_seq = plot.sweep(lambda s: fake_estimate(12, s), "seq_len", plot.seq_lens_for(256))
    out = plot.render(by_batch, by_seq, tmp_path / "mem.png", capacity_bytes=4 * 2**30, max_batch=12,
                      gpu_name="T4", title="fake", seq_len=256, batch_size=12)
    data = out.read_bytes()
    assert out == tmp_path / "mem.png"
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert width > 1.8 * height  # two panels side by side


def test_render_one_panel_svg_without_a_gpu(tmp_path):
    by_batch = plot.sweep(fake_estimate, "batch_size", [1])
    out = plot.render(by_batch, None, tmp_path / "mem.svg")
    assert out.read_text().lstrip().startswith("<?xml")


def test_render_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    by_batch = plot.sweep(fake_estimate, "batch_size", [1, 2])
    with pytest.raises(MissingDependencyError, match=r"pip install 'memguard-train\[plot\]'"):
        plot.render(by_batch, None, tmp_path / "mem.png")
    with pytest.raises(MissingDependencyError):
        plot.check_output(tmp_path / "mem.png")


def test_check_output(tmp_path):
    assert plot.check_output(tmp_path / "a.PNG") == tmp_path / "a.PNG"
    with pytest.raises(ConfigError, match=r"ending in \.png"):
        plot.check_output(tmp_path / "a.gif")
    with pytest.raises(ConfigError, match="does not exist"):
        plot.check_output(tmp_path / "nope" / "a.png")


@pytest.mark.slow
def test_memguard_plot_writes_the_file(tmp_path, capsys):
    """End to end on a tiny GPT-2 given as a model directory, against a 1 GiB budget on the CPU."""
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 128,
              "n_positions": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    target = tmp_path / "plot.png"
    code = main(["plot", str(tmp_path), "--seq-len", "32", "--device", "cpu", "--gpu", "4MiB", "--limit", "64",
                 "-o", str(target), "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    data = json.loads(captured.out)
    assert target.read_bytes().startswith(PNG_MAGIC) and target.stat().st_size > 10_000
    assert data["output"] == str(target)
    n = data["max_batch_size"]
    assert 1 <= n <= 64
    points = {p["batch_size"]: p["upper_bytes"] for p in data["batch_sweep"]["points"]}  # what must fit
    assert {1, n} <= set(points)
    assert points[n] <= data["usable_bytes"]
    assert n + 1 not in points or data["capped"] or points[n + 1] > data["usable_bytes"]
    assert [p["seq_len"] for p in data["seq_sweep"]["points"]] == [4, 8, 16, 32, 64]
    assert data["method"] == "formula"  # a sweep takes the formula where it works (GPT-2 here)


def test_memguard_plot_human_output(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # progress is shown on a terminal only
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 128,
              "n_positions": 32}
    (tmp_path / "config.json").write_text(json.dumps(config))
    target = tmp_path / "plot.png"
    code = main(["plot", str(tmp_path / "config.json"), "--seq-len", "32", "--device", "cpu", "--batch-size", "2",
                 "--gpu", "4MiB", "--limit", "16", "-o", str(target)])
    captured = capsys.readouterr()
    assert code == EXIT_OK
    lines = captured.out.splitlines()
    assert lines[0] in (f"wrote {target} (formula estimates)", f"wrote {target} (trace estimates)")
    assert "sequence lengths 4-32 at batch 2" in captured.out
    assert "stopped before seq_len 64" in captured.out  # the model takes at most 32 tokens
    assert target.stat().st_size > 0
    assert "searching the largest batch" in captured.err


def test_memguard_plot_timeline_draws_the_traced_step(tmp_path, capsys):
    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 128, "n_positions": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    target = tmp_path / "timeline.png"
    code = main(["plot", str(tmp_path), "--seq-len", "32", "--batch-size", "2", "--gpu", "4MiB", "--timeline",
                 "-o", str(target), "--json"])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    data = json.loads(captured.out)
    assert target.read_bytes().startswith(PNG_MAGIC) and target.stat().st_size > 10_000
    assert data["method"] == "trace"
    assert max(live for _, _, live in data["timeline"]) == data["peak_bytes"]
    code = main(["plot", str(tmp_path), "--seq-len", "32", "--gpu", "4MiB", "--timeline", "--method", "formula",
                 "-o", str(target)])
    assert code == 2
    assert "--method formula makes no timeline" in capsys.readouterr().err


@pytest.mark.slow
def test_memguard_plot_timeline_needs_no_gpu(tmp_path, capsys):
    """The README's `memguard plot MODEL --timeline -o f.png` on a machine without a GPU (--gpu auto)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _fake_nvml import gpus_seen

    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 128, "n_positions": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    target = tmp_path / "timeline.png"
    code = main(["plot", str(tmp_path), "--seq-len", "32", "--batch-size", "2", "--timeline", "-o", str(target)],
                readers=gpus_seen())
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    assert target.read_bytes().startswith(PNG_MAGIC)
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"wrote {target}: peak ") and lines[0].endswith(" points")
    assert lines[1] == "  no GPU can be read here, so no usable-memory line (--gpu A100-40GB or --gpu 24GiB adds one)"
    # a GPU named on purpose must still be read: cuda:0 is not there
    code = main(["plot", str(tmp_path), "--seq-len", "32", "--timeline", "--gpu", "0", "-o", str(target)])
    assert code == 2
    assert "--gpu 0: no CUDA device can be read" in capsys.readouterr().err
    # --json says there was no device
    code = main(["plot", str(tmp_path), "--seq-len", "32", "--batch-size", "2", "--timeline", "-o", str(target),
                 "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == EXIT_OK and data["device"] is None and data["method"] == "trace"


def test_render_timeline_needs_a_trace(tmp_path):
    est = MemoryEstimate("formula", {Category.ACTIVATIONS: 1})
    with pytest.raises(ConfigError, match="only method='trace' makes one"):
        plot.render_timeline(est, tmp_path / "t.png")

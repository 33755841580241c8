"""The bench's pieces on a tiny setting: the step rows time train_repae.repae_step itself, the table has its rows,
host reads are counted. No timing assertions."""
import statistics

import torch
from accelerate.state import AcceleratorState

import train_repae
from bench import bench_memory, bench_step, harness
from helpers import make_dataset


def test_count_host_reads_counts_item_float_and_bool():
    x, item = torch.ones(2), torch.Tensor.item
    with harness.count_host_reads() as reads:
        x.sum().item()
        float(x[0])
        bool(x[1] > 0)
        x + 1  # no read
    assert reads["reads"] == 3
    assert torch.Tensor.item is item  # restored


def test_repae_rows_time_the_trainers_step(tmp_path, monkeypatch):
    data = make_dataset(tmp_path, resolution=32, per_class=4)
    calls = []
    real_step = train_repae.repae_step

    def counting_step(*args, **kwargs):
        calls.append(1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_repae, "repae_step", counting_step)
    args = bench_step.make_parser().parse_args([
        "--resolution", "32", "--batch-size", "2", "--model", "SiT-T/2", "--vae", "f8d4-tiny", "--enc-type",
        "dinov2-vit-s", "--encoder-depth", "2", "--configs", "current,baseline", "--warmup", "0", "--repeats", "1",
        "--work-dir", str(tmp_path), "--data-dir", str(data)])
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
    rows = bench_step.repae_rows(args)
    # per configuration: one counted (FLOPs, host reads) and one timed step
    assert len(calls) == 2 * 2
    names = [row["name"].strip() for row in rows]
    parts = list(bench_step.PARTS)
    assert names == ["REPA-E step + EMA [current]", *parts, "REPA-E step + EMA [baseline]", *parts]
    step_rows = [row for row in rows if row["name"].startswith("REPA-E")]
    assert all(row["flops"] > 0 and len(row["times"]) == 1 for row in step_rows)
    assert step_rows[1]["host_reads"] > step_rows[0]["host_reads"]  # the baseline reads its logs every step
    lines = [harness.format_row(row) for row in rows]
    assert all(statistics.median(row["times"]) > 0 for row in rows) and len(lines) == len(rows)


def test_memory_child_measures_the_trainers_step(tmp_path):
    data = make_dataset(tmp_path, resolution=32, per_class=4)
    args = bench_memory.make_parser().parse_args([
        "--resolution", "32", "--model", "SiT-T/2", "--vae", "f8d4-tiny", "--enc-type", "dinov2-vit-s",
        "--encoder-depth", "2", "--work-dir", str(tmp_path), "--data-dir", str(data), "--child", "2"])
    AcceleratorState._reset_state(reset_partial_state=True)
    row = bench_memory.measure_child(args)
    assert row["batch"] == 2 and 0 < row["built_mib"] <= row["peak_mib"]


def test_memory_fit_gives_the_largest_batch_within_the_budget():
    rows = [dict(batch=2, peak_mib=5000.0), dict(batch=4, peak_mib=5600.0)]
    fixed, per_image, batch = bench_memory.fit_peak(rows, budget_mib=8192)
    assert (fixed, per_image) == (4400.0, 300.0)
    assert batch == 12  # 4400 + 12 * 300 = 8000 <= 8192 < 8300


def test_profile_prints_the_step_operators(tmp_path, capsys):
    data = make_dataset(tmp_path, resolution=32, per_class=4)
    args = bench_step.make_parser().parse_args([
        "--resolution", "32", "--batch-size", "2", "--model", "SiT-T/2", "--vae", "f8d4-tiny", "--enc-type",
        "dinov2-vit-s", "--encoder-depth", "2", "--work-dir", str(tmp_path), "--data-dir", str(data), "--profile"])
    AcceleratorState._reset_state(reset_partial_state=True)
    bench_step.print_profile(args)
    table = capsys.readouterr().out
    assert "aten::convolution_backward" in table and "aten::_fused_adamw_" in table

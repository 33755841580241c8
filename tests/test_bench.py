"""The bench scripts run as scripts on a tiny setting and are read through what they print: the step table times
the trainers' step and its parts, --profile names the step's operators, the memory table and its fitted line, the
parts of an evaluation during training.
No timing assertions."""
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import TINY_VAE, run_script

TINY = ("--resolution", 32, "--model", "SiT-P/2", "--vae", TINY_VAE, "--enc-type", "dinov2-vit-s",
        "--encoder-depth", 2)
# the REPA-E step's own profiler ranges and the loop's EMA update
PARTS = ("repae/encoder_features", "repae/vae_forward", "repae/vae_update", "repae/discriminator_update",
         "repae/sit_update", "repae/ema")
# one line of harness.print_table: a 46-character name, then median, unit, spread, n, GFLOP, %mm, peak, reads, config
TABLE_ROW = re.compile(r"(?P<name>.{46}) +(?P<median>[\d.]+) (?:ms|img/s) +\S+/ *\S+% +(?P<n>\d+) +(?P<gflop>\S+)"
                       r" +\S+ +\S+ +(?P<reads>\S+)  .*")
MEMORY_ROW = re.compile(r" *(?P<batch>\d+) +(?P<switch>on|off) +(?P<built>\d+) +(?P<peak>\d+) +(?P<step>-?\d+).*")
FIT_LINE = re.compile(r"--grad-checkpointing on: peak = (?P<fixed>-?\d+) MiB \+ (?P<per_image>-?\d+) MiB per image; "
                      r"(largest batch within 4 GiB: -?\d+ \(fitted\)|the peak does not grow with the batch)")
# the smallest runs that show each bench's rows: one counted and one timed step per configuration, two batches
COMMANDS = {
    "step": ("bench/bench_step.py", *TINY, "--batch-size", 2, "--configs", "default,loop-adamw-vae-ckpt",
             "--rows", "repae", "--warmup", 0, "--repeats", 1),
    "profile": ("bench/bench_step.py", *TINY, "--batch-size", 2, "--profile"),
    "memory": ("bench/bench_memory.py", *TINY, "--batch-sizes", "1,2", "--switches", "on", "--budget-gib", 4),
    "eval": ("bench/bench_eval.py", "--model", "SiT-P/2", "--num-samples", 4, "--batch-size", 2, "--num-steps", 2,
             "--metrics", "is"),
}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{command name: future of its CompletedProcess}. The commands start together, each with its own work folder,
    so that their processes' imports and network builds overlap on a machine with several cores."""
    work_dirs = {name: tmp_path_factory.mktemp(name) for name in COMMANDS}
    with ThreadPoolExecutor(len(COMMANDS)) as pool:
        yield {name: pool.submit(run_script, *command, *(["--work-dir", work_dirs[name]] if name != "eval" else []),
                                 subprocess=True)
               for name, command in COMMANDS.items()}


def matching_lines(pattern, output):
    """The matches of pattern on whole lines of output."""
    return [match for match in map(pattern.fullmatch, output.splitlines()) if match]


@pytest.mark.slow
def test_step_table_times_the_trainers_step_and_its_parts(outputs):
    out = outputs["step"].result().stdout
    assert "## training steps (train_repae.repae_step, train_ldm_only.ldm_step)" in out
    rows = matching_lines(TABLE_ROW, out)
    names = [row["name"].strip() for row in rows]
    assert names == ["REPA-E step + EMA [default]", *PARTS, "REPA-E step + EMA [loop-adamw-vae-ckpt]", *PARTS]
    default, loop = rows[0], rows[len(PARTS) + 1]
    # per configuration one counted step (FLOPs, host reads) and one timed step
    assert all(float(row["gflop"]) > 0 and row["n"] == "1" and float(row["median"]) > 0 for row in (default, loop))
    assert int(loop["reads"]) > int(default["reads"])  # the loop AdamW's guard verdicts and the metrics are read
    assert re.search(r"REPA-E step speed-up, loop-adamw-vae-ckpt -> default: [\d.]+x", out)


@pytest.mark.slow
def test_profile_prints_the_step_operators(outputs):
    out = outputs["profile"].result().stdout
    # the 20 operators of most self time; which ones make the cut depends on the machine's load
    operators = [line.split()[0] for line in out.splitlines() if line.strip().startswith("aten::")]
    assert "Self CPU" in out and len(operators) >= 5
    assert {"aten::convolution_backward", "aten::mkldnn_convolution", "aten::_fused_adamw_", "aten::mm",
            "aten::addmm"} & set(operators)


@pytest.mark.slow
def test_memory_rows_measure_built_networks_and_steps(outputs):
    out = outputs["memory"].result().stdout
    assert "## REPA-E step memory, --grad-checkpointing on  (" in out
    rows = matching_lines(MEMORY_ROW, out)
    assert [(row["batch"], row["switch"]) for row in rows] == [("1", "on"), ("2", "on")]
    for row in rows:
        built, peak = int(row["built"]), int(row["peak"])
        assert 0 < built <= peak and abs(int(row["step"]) - (peak - built)) <= 1


@pytest.mark.slow
def test_memory_fit_is_the_line_through_the_measured_peaks(outputs):
    out = outputs["memory"].result().stdout
    peaks = {int(row["batch"]): int(row["peak"]) for row in matching_lines(MEMORY_ROW, out)}
    fit = FIT_LINE.search(out)
    assert fit, out
    fixed, per_image = int(fit["fixed"]), int(fit["per_image"])
    # the printed figures are rounded to whole MiB
    assert all(abs(fixed + per_image * batch - peak) <= 2 for batch, peak in peaks.items())


@pytest.mark.slow
def test_eval_rows_time_each_part_of_an_evaluation(outputs):
    out = outputs["eval"].result().stdout
    names = [row["name"].strip() for row in matching_lines(TABLE_ROW, out)]
    assert names == ["sampling + decoding, s per 1000 samples", "inception features, s per 1000 samples",
                     "the numbers (Frechet distances), s, once"]
    assert re.search(r"an evaluation of K samples: \d+ s per 1,000 samples \+ \d+ s for the numbers", out)

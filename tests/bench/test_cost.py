"""`resbench estimate`: a sweep's GPU-hours from a saved profile (bench.cost)."""
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from bench import cost
from bench.cli import main
from bench.profile_tables import read_reference

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "results" / "reference-profile-h200"


def _row(model, batch, rate, execution="eager", precision="bf16", fmt="channels_last", image_size=224, mode="train"):
    return dict(model=model, mode=mode, status="ok", batch_size=batch, group_size=1, image_size=image_size,
                execution=execution, precision=precision, memory_format=fmt, img_per_s=rate)


def test_hours_are_the_recipes_images_over_the_profiled_rate_of_the_configuration_the_run_would_use():
    profile = pd.DataFrame([
        _row("resnet18", 32, 900.0), _row("resnet18", 32, 1100.0),  # timed twice: the median, 1000
        _row("resnet18", 32, 5000.0, precision="fp32"),  # faster, but not what a run uses
        _row("resnet18", 32, 9000.0, image_size=32),  # another input size
        _row("resnet18", 256, 9000.0),  # the batch of one GPU, not of each of 8
        _row("resnet18", 32, 9000.0, mode="infer"),
        _row("plain34", 32, 400.0, execution="compile"), _row("plain34", 32, 300.0, execution="compile", fmt="nchw"),
    ])
    df = cost.estimate(profile, "he2015-imagenet", depths=(18, 34), seeds=(0, 1, 2), gpus_per_run=8).set_index("net")
    images = 90 * (1_281_167 // 256) * 256  # 90 epochs of the 5,004 steps ImageNet's training images give
    r18 = df.loc["resnet18"]
    assert (r18["batch_per_gpu"], r18["img_per_s_per_gpu"], r18["precision"], r18["runs"]) == (32, 1000.0, "bf16", 3)
    assert r18["images_per_run"] == images
    assert r18["hours_per_run"] == pytest.approx(images / (1000 * 8) / 3600, rel=1e-12)
    assert r18["gpu_hours_per_run"] == pytest.approx(8 * r18["hours_per_run"], rel=1e-12)
    assert r18["gpu_hours"] == pytest.approx(3 * r18["gpu_hours_per_run"], rel=1e-12)
    p34 = df.loc["plain34"]  # no eager row: the fastest it has, and which one that is
    assert (p34["execution"], p34["memory_format"], p34["img_per_s_per_gpu"]) == ("compile", "channels_last", 400.0)
    assert df.loc["resnet34", "execution"] == "not profiled" and pd.isna(df.loc["resnet34", "gpu_hours"])
    assert df.loc["plain18", "execution"] == "not profiled"


def test_the_committed_h200_profile_prices_the_he2015_recipe(tmp_path):
    df = cost.estimate(read_reference(H200), "he2015", models=("resnet",), depths=(20,), seeds=(0, 1))
    row = df.iloc[0]  # a one-GPU run: its CUDA graph row, 61,960 img/s
    assert (row["execution"], round(row["img_per_s_per_gpu"])) == ("cudagraph", 61960)
    assert row["hours_per_run"] == pytest.approx(64_000 * 128 / row["img_per_s_per_gpu"] / 3600, rel=1e-12)
    res = CliRunner().invoke(main, ["estimate", str(H200), "--preset", "he2015", "--depths", "20,32", "--seeds", "0,1"])
    assert res.exit_code == 0, res.output
    total = df["gpu_hours"].sum() + cost.estimate(read_reference(H200), "he2015", models=("plain",), depths=(20,),
                                                  seeds=(0, 1))["gpu_hours"].sum()
    assert f"total: {total:.3g} GPU-hours for 4 runs (2 of 4 nets profiled)" in res.output
    assert "not profiled at batch 128 per GPU: plain32, resnet32" in res.output


def test_estimates_it_cannot_make_say_why():
    profile = pd.DataFrame([_row("resnet20", 128, 1.0, image_size=32)])
    with pytest.raises(ValueError, match="smoke preset trains width-0.5 nets; a profile times width-1 nets"):
        cost.estimate(profile, "smoke")
    with pytest.raises(ValueError, match="batch of 128 does not split over 3 GPUs"):
        cost.estimate(profile, "he2015", gpus_per_run=3)
    bad = CliRunner().invoke(main, ["estimate", "no/such/profile", "--preset", "he2015"])
    assert bad.exit_code == 1 and "PROFILE no/such/profile: no such file or folder" in bad.output


def _decode(workers, per_core, decode_on="workers", rate=None):
    return dict(mode="decode", status="ok", workers=workers, decode_on=decode_on, img_per_s_per_core=per_core,
                img_per_s=rate if rate is not None else per_core * max(workers, 1))


def test_a_decode_profile_says_how_many_cores_feed_each_gpu_and_the_rate_decoding_on_the_gpu_gives():
    profile = pd.DataFrame([_row("resnet18", 32, 1000.0), _row("plain18", 32, 3000.0)])
    decode = pd.DataFrame([_decode(0, 120.0), _decode(8, 100.0), _decode(8, 110.0), _decode(8, None, "device", 2000.0)])
    df = cost.estimate(profile, "he2015-imagenet", depths=(18,), gpus_per_run=8, decode=decode).set_index("net")
    # the per-core rate with the most workers (median of its two rows, 105), not the one-process rate
    assert df.loc["resnet18", "cpu_cores_per_gpu"] == pytest.approx(1000 / 105, rel=1e-12)
    assert df.loc["plain18", "cpu_cores_per_gpu"] == pytest.approx(3000 / 105, rel=1e-12)
    # decoding on the GPU shares its stream with training: an image costs 1/3000 + 1/2000 s there, not the slower
    assert df.loc["plain18", "img_per_s_decoding_on_gpu"] == pytest.approx(1200.0, rel=1e-12)
    assert df.loc["resnet18", "img_per_s_decoding_on_gpu"] == pytest.approx(2000 / 3, rel=1e-12)
    older = pd.DataFrame([_decode(2, 111.0)]).drop(columns="decode_on")  # a profile before device decoding
    df = cost.estimate(profile, "he2015-imagenet", depths=(18,), gpus_per_run=8, decode=older)
    assert df["img_per_s_decoding_on_gpu"].isna().all()
    assert df["cpu_cores_per_gpu"].tolist() == pytest.approx([3000 / 111, 1000 / 111])
    with pytest.raises(ValueError, match="he2015 preset's data sits decoded in memory"):
        cost.estimate(profile, "he2015", decode=decode)
    with pytest.raises(ValueError, match="no rows of decoding by CPU workers"):
        cost.estimate(profile, "imagenette", decode=pd.DataFrame([_decode(8, None, "device", 2000.0)]))


def test_estimate_reads_the_committed_decode_profile_and_refuses_a_grid_profile_for_it():
    decode = ROOT / "results" / "reference-decode-cpu"
    res = CliRunner().invoke(main, ["estimate", str(H200), "--preset", "he2015-imagenet", "--decode",
                                    str(decode / "profile" / "decode-cpu-torch2.14.1.parquet")])
    assert res.exit_code == 0, res.output
    assert "CPU cores per GPU" in res.output and "not profiled at batch 256 per GPU" in res.output
    text = " ".join(res.output.split())  # wrapped at 100 columns
    assert "decode rates: from images of results/decode-sample, timed on Intel(R) Xeon(R) Processor" in text
    assert "is not the training profile's (NVIDIA H200)" in text and "has no --decode-on device row" in text
    both = CliRunner().invoke(main, ["estimate", str(H200), "--preset", "he2015-imagenet", "--decode", str(decode)])
    assert both.exit_code == 1 and "measurements of 2 commits (1d9e505, 31f8426); give one parquet file" in both.output
    bad = CliRunner().invoke(main, ["estimate", str(H200), "--preset", "he2015-imagenet", "--decode", str(H200)])
    assert bad.exit_code == 1 and "lacks the columns workers, img_per_s_per_core" in bad.output
    assert "results/reference-decode-cpu" in bad.output


def test_estimate_names_the_profiles_device_and_prices_a_cpu_profile_in_device_hours_on_lines_of_their_own():
    cpu = ROOT / "results" / "reference-profile-cpu"
    res = CliRunner().invoke(main, ["estimate", str(cpu), "--preset", "he2015", "--kinds", "resnet", "--depths", "20,32"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(map(len, lines)) <= 100  # fits a terminal of 100 columns
    start = next(i for i, ln in enumerate(lines) if ln.startswith("total: "))
    end = next(i for i in range(start, len(lines)) if lines[i].endswith("estimate"))
    total = " ".join(lines[start:end + 1])
    assert "device-hours" in total and "GPU-hours" not in total and "on the profile's CPU (" in total
    # the next line ("not profiled ...") starts a line of its own; a CPU profile's unit is a device
    assert lines[end + 1].startswith("not profiled at batch 128 per device: resnet32")
    assert "img/s per device" in lines[0] and "GPU" not in lines[0]
    gpu = CliRunner().invoke(main, ["estimate", str(H200), "--preset", "he2015", "--depths", "20"])
    assert "GPU-hours" in gpu.output and "on the profile's GPU (NVIDIA H200" in gpu.output

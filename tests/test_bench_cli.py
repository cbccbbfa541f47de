"""``fusediff bench pipeline`` and bench/bench_pipeline.py on a CPU: one-line errors, argument checks, the
pure helpers (selection, speed-up and roofline arithmetic, CSV rows, the report), and the measuring
code run end to end on tiny models with stand-in timers. Speed itself is measured in bench/, not here."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusediff.benchmarks import pipeline as bp
from fusediff.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, f"expected one line on stderr, got {err!r}"
    return err


def test_no_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "pipeline", "--out", str(tmp_path)]) == 1
    assert "needs a CUDA GPU" in _error_line(capsys)
    assert not any(tmp_path.iterdir())


def test_no_diffusers(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert main(["bench", "pipeline", "--out", str(tmp_path)]) == 1
    assert "HF diffusers, which is not installed" in _error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--rows", "fusediff-eager", "bogus"], "unknown row 'bogus'"),
    (["--rows", "fusediff-eager,nope"], "unknown row 'nope'"),
    (["--columns", "unet", "vae,image"], "unknown column 'image'"),
    (["--rows", ","], "no row given"),
    (["--dtype", "fp32"], "invalid choice"),
    (["--steps", "0"], "positive integer"),
])
def test_bad_arguments(capsys, args, message):
    assert main(["bench", "pipeline", *args]) == 2
    assert message in _error_line(capsys)


def test_bench_needs_a_benchmark(capsys):
    assert main(["bench"]) == 2
    assert "required" in _error_line(capsys)


def test_script_help():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pipeline.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--rows" in done.stdout and "bench/results" in done.stdout


def test_parse_and_select():
    assert bp.parse_names(["fusediff-graph,diffusers-patch", "fusediff-eager"], list(bp.ROWS), "row") == \
        ["fusediff-graph", "diffusers-patch", "fusediff-eager"]
    with pytest.raises(ValueError, match="unknown column 'x', 'y'"):
        bp.parse_names("unet,x,y", list(bp.COLUMNS), "column")
    # table order, the baseline always in, diffusers-compile-nchw only on request
    assert bp.select(["fusediff-graph", "diffusers-patch"], bp.ROWS, bp.BASELINE) == \
        ["diffusers-eager", "diffusers-patch", "fusediff-graph"]
    assert bp.select(None, bp.ROWS, bp.BASELINE) == [n for n in bp.ROWS if n != "diffusers-compile-nchw"]
    assert bp.select(["cifar", "unet"], bp.COLUMNS) == ["unet", "cifar"]
    assert bp.select(None, bp.COLUMNS) == list(bp.COLUMNS)


def test_arithmetic():
    assert bp.speedup(40.0, 8.0) == 5.0
    assert bp.speedup("12.3", "4.1") == 3.0
    assert bp.speedup(None, 8.0) == "" and bp.speedup(40.0, "") == "" and bp.speedup(40.0, 0) == ""
    assert bp.tflops(1.6e12, 8.0) == pytest.approx(200.0)  # 1.6 TFLOP in 8 ms
    assert bp.roofline(1.6e12, 8.0, 800.0) == 0.25
    assert bp.roofline(1.6e12, "", 800.0) == "" and bp.roofline(None, 8.0, 800.0) == ""


def _cells():
    return [
        {"impl": "diffusers-eager", "column": "unet", "ms": 40.0, "gpu_ms": 12.0, "flop": 1.6e12, "warmup_s": 0.5},
        {"impl": "diffusers-eager", "column": "t2i", "ms": 2500.0, "flop": 81.0e12, "warmup_s": 3.0},
        {"impl": "fusediff-compile", "column": "unet", "ms": 8.0, "gpu_ms": 6.0, "flop": 1.6e12, "warmup_s": 90.0,
         "max_rel_diff": 1.5e-3, "graph_breaks": 0, "graphs": 1},
        {"impl": "fusediff-graph", "column": "t2i", "flop": 81.0e12, "note": "RuntimeError: boom"},
    ]


def test_make_rows():
    rows = bp.make_rows(_cells(), 800.0, dtype="fp16", steps=50, compile_mode="default",
                        versions={"torch": "2.x", "diffusers": "0.42.1"}, run_id="r1")
    assert all(list(r) == bp.CSV_FIELDS for r in rows)
    base, t2i, ours, failed = rows
    assert (base["speedup"], base["gpu_speedup"], base["max_rel_diff"], base["steps"]) == (1.0, 1.0, "", "")
    assert (base["layout"], base["input_layout"], base["compile_mode"]) == ("contiguous", "contiguous", "")
    assert (t2i["steps"], t2i["timing"], t2i["gflop"]) == (50, "wall", 81000.0)
    assert (ours["speedup"], ours["gpu_speedup"], ours["roofline"], ours["gpu_roofline"]) == (5.0, 2.0, 0.25, 0.333)
    assert (ours["tflops"], ours["max_rel_diff"], ours["graph_breaks"], ours["compile_mode"]) == \
        (200.0, "1.50e-03", 0, "default")
    assert (ours["layout"], ours["input_layout"], ours["mode"], ours["library"]) == \
        ("channels_last", "channels_last", "compile", "fusediff")
    assert (failed["ms"], failed["speedup"], failed["roofline"], failed["note"]) == ("", "", "", "RuntimeError: boom")
    # diffusers-compile runs channels-last models on the contiguous inputs diffusers' pipeline passes
    assert (bp.ROWS["diffusers-compile"].channels_last, bp.ROWS["diffusers-compile"].inputs_channels_last) == \
        (True, False)


def _csv_row(impl, column, ms, speedup, commit="abc", **extra):
    row = {f: "" for f in ["date", "commit", "gpu", *bp.CSV_FIELDS]}
    row.update(date="2026-11-24", commit=commit, gpu="H100", dtype="fp16", impl=impl, column=column, ms=ms,
               speedup=speedup, layout="contiguous", warmup_s="1.0", **extra)
    return row


def test_report(tmp_path, capsys):
    rows = [
        _csv_row("fusediff-graph", "unet", "5.0", "8.0", commit="old"),  # an older commit: ignored
        _csv_row("diffusers-eager", "unet", "40.0", "1.0"),
        _csv_row("fusediff-graph", "unet", "9.0", "4.44"),
        _csv_row("fusediff-graph", "unet", "7.5", "5.33", roofline="0.27"),  # the later row of a pair wins
        _csv_row("diffusers-compile", "unet", "12.0", "3.33", run_id="second call"),
        _csv_row("diffusers-patch", "unet", "33.0", "1.21"),
        _csv_row("fusediff-eager", "vae", "7.0", "3.1"),
        _csv_row("fusediff-graph", "t2i", "500.0", "5.0", steps="50"),
        _csv_row("fusediff-compile", "cifar", "", "", note="Unsupported: boom"),
    ]
    with (tmp_path / bp.CSV_NAME).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["bench", "pipeline", "--report", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| fusediff + CUDA graphs | contiguous | 7.5 ms · 5.33x · 0.27 |" in out
    assert "failed" in out and "Unsupported: boom" in out and "text-to-image: 50 steps" in out
    assert "UNet step, best fusediff row: 7.5 ms, fusediff-graph (target <= 8 ms): met" in out
    assert "speed-up over diffusers eager: 5.33x, fusediff-graph (target >= 3.3x): met" in out
    assert "(diffusers-compile): 1.6x, fusediff-graph (measured in another call than diffusers-compile) " \
           "(target >= 1.5x): met" in out
    assert "VAE decode 512x512, best fusediff row: 7 ms, fusediff-eager (target <= 8 ms): met" in out
    assert "text-to-image 512x512, best fusediff row: 500 ms, fusediff-graph (target <= 450 ms): NOT met" in out
    assert "fusediff.patch over diffusers eager: 1.21x (target >= 1.5x): NOT met" in out


def test_report_without_csv(tmp_path, capsys):
    assert main(["bench", "pipeline", "--report", "--out", str(tmp_path)]) == 1
    assert "no " in _error_line(capsys)


# -- the measuring code on tiny CPU models ---------------------------------------------------------
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 cross_attention_dim=32, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
TINY_CIFAR = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                  attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
                  norm_num_groups=8)


def test_run_tiny_on_cpu(monkeypatch, tmp_path, capsys):
    """The whole command on tiny CPU models (stand-in timers, no CUDA graphs): every cell measured or
    noted, CSV rows appended per row of the table, and the report read back from them."""
    pytest.importorskip("diffusers")
    from fusediff.benchmarks import harness, pipeline_run

    for name, value in (("DEVICE", "cpu"), ("CIFAR_BATCH", 2), ("SD15_UNET", TINY_UNET), ("SD_VAE", TINY_VAE),
                        ("DDPM_CIFAR10_UNET", TINY_CIFAR), ("T2I_REPEAT", 1)):
        monkeypatch.setattr(pipeline_run, name, value)
    monkeypatch.setitem(pipeline_run.DTYPES, "fp32", torch.float32)
    monkeypatch.setattr(bp, "DTYPES", (*bp.DTYPES, "fp32"))
    monkeypatch.setattr(bp, "check_environment", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def once_ms(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def no_graph(*args, **kwargs):
        raise RuntimeError("no CUDA graph on a CPU")

    monkeypatch.setattr(harness, "do_bench_ms", once_ms)
    monkeypatch.setattr(harness, "graph_rotating_ms", no_graph)
    monkeypatch.setattr(harness, "matmul_tflops", lambda: 1.0)
    rows = ["diffusers-eager", "diffusers-patch", "fusediff-eager", "fusediff-graph"]
    assert main(["bench", "pipeline", "--out", str(tmp_path), "--rows", "fusediff-graph,diffusers-patch",
                 "fusediff-eager", "--dtype", "fp32", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("appended") == len(rows)  # one append per row of the table, as it finishes
    with (tmp_path / bp.CSV_NAME).open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["date", "commit", "gpu", *bp.CSV_FIELDS]
    by = {(r["impl"], r["column"]): r for r in table}
    assert sorted(by) == sorted((i, c) for i in rows for c in bp.COLUMNS) and len(table) == len(by)
    for (impl, column), r in by.items():
        what = f"{impl} {column}: {r['note']}"
        assert r["ms"] and r["speedup"] and float(r["gflop"]) > 0, what
        if impl != bp.BASELINE:  # the same weights and inputs: only fp32 rounding apart
            assert float(r["max_rel_diff"]) < 1e-4, what
        if column != "t2i":
            assert "no CUDA-graph time" in r["note"], what
    assert "ran eagerly" in by["fusediff-graph", "unet"]["note"]  # CUDAGraphCallable's fallback, noted
    assert "ran eagerly" in by["fusediff-graph", "t2i"]["note"]  # enable_cuda_graph()'s
    assert by["fusediff-eager", "unet"]["input_layout"] == "channels_last"
    unet, vae, t2i = (float(by[bp.BASELINE, c]["gflop"]) for c in ("unet", "vae", "t2i"))
    assert t2i == pytest.approx(2 * unet + vae, abs=2e-3)  # 2 steps of the UNet + the decode, 3 decimals
    assert main(["bench", "pipeline", "--report", "--out", str(tmp_path)]) == 0
    assert "| fusediff + CUDA graphs | channels_last |" in capsys.readouterr().out


def test_diffusers_pipeline_without_transformers(tmp_path):
    """diffusers' StableDiffusionPipeline through placeholders where transformers is missing (as on the GPU
    machine), run in a process that blocks transformers; it leaves no stub behind."""
    pytest.importorskip("diffusers")
    script = f"""
import sys
sys.modules["transformers"] = None  # every import of transformers fails
import numpy as np, torch
import diffusers
from fusediff.benchmarks.pipeline_run import diffusers_sd_pipeline_class
cls = diffusers_sd_pipeline_class()
assert sys.modules["transformers"] is None and "FromSingleFileMixin" not in vars(diffusers.loaders)
torch.manual_seed(0)
unet = diffusers.UNet2DConditionModel(**{TINY_UNET!r})
vae = diffusers.AutoencoderKL(**{TINY_VAE!r})
pipe = cls(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers.DPMSolverMultistepScheduler(),
           safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
g = torch.Generator().manual_seed(1)
embeds = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
image = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=16, width=16, num_inference_steps=2,
             output_type="np", generator=torch.Generator().manual_seed(0)).images
assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

"""The throughput bench (`python -m wcord_jax.tools.bench`): one JSON line with sane figures, shares where they apply, no
TensorFlow, and a bad command is one `error:` line with exit status 2."""
import json
import os
import subprocess
import sys

import pytest

from wcord_jax import configs, host
from wcord_jax.tools import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.batch_size=8", "--config.dataset.image_size=16", "--config.dataset.num_train=256",
        "--config.wcord.num_negatives=64", "--steps", "2", "--warmup", "1"]
FIELDS = ("method", "teacher", "student", "img_per_s", "ms_per_step", "compile_s", "device_kind", "device_count",
          "backend", "dtype", "batch_size", "steps", "peak_memory_bytes", "sinkhorn_share", "negatives_share")
# The bench as `python -m wcord_jax.tools.bench ARGS`, with TensorFlow made unimportable (as if not installed).
NO_TF = ("import sys\n"
         "for name in ('tensorflow', 'tensorflow_datasets'):\n"
         "    sys.modules[name] = None\n"
         "sys.argv = ['wcord_jax.tools.bench'] + sys.argv[1:]\n"
         "from wcord_jax.tools import bench\n"
         "bench.run()\n")


def _run(*args, no_tensorflow=False):
    cmd = [sys.executable, "-c", NO_TF, *args] if no_tensorflow else [sys.executable, "-m", "wcord_jax.tools.bench", *args]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=300)


def _check_record(r, method, steps=2, batch=8):
    for key in FIELDS:
        assert key in r, key
    assert (r["method"], r["teacher"], r["student"]) == (method, "resnet8", "resnet8")
    assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and r["compile_s"] > 0
    assert abs(r["img_per_s"] * r["ms_per_step"] / 1000.0 - batch) < 0.01 * batch
    assert (r["steps"], r["batch_size"], r["dtype"], r["backend"]) == (steps, batch, "float32", "cpu")
    assert r["device_count"] >= 1 and isinstance(r["device_kind"], str)
    assert r["cpu_model"] == host.cpu_model()  # lscpu's model name, recorded with every figure
    assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
    assert r["final_loss"] is not None  # a finite loss: the step really ran
    assert r["image_shape"] == [16, 16, 3] and r["num_classes"] == 100  # CIFAR-100 shapes unless overridden
    assert r["flops_per_step"] > 0 and r["tflop_per_s"] > 0  # XLA's count, at the measured speed
    assert r["peak_tflop_per_s"] is None  # no known peak for a CPU


@pytest.mark.slow
def test_wcord_bench_prints_one_json_line_with_both_shares_and_needs_no_tensorflow():
    out = _run("--config", "configs/distill.py:wcord,resnet8,resnet8", *TINY, no_tensorflow=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    r = json.loads(lines[0])
    _check_record(r, "wcord")
    assert 0.0 <= r["sinkhorn_share"] <= 1.0 and 0.0 <= r["negatives_share"] <= 1.0
    assert 0.0 <= r["terms_share"] <= 1.0
    assert r["ms_per_step_no_local"] > 0 and r["ms_per_step_no_negatives"] > 0 and r["ms_per_step_no_terms"] > 0
    for variant in ("no_local", "no_negatives", "no_terms"):
        assert f"bench [{variant}]" in out.stderr  # progress on stderr


def test_student_alone_has_no_shares():
    config = configs.distill_config("none", "resnet8", "resnet8")
    config.batch_size, config.dataset.image_size, config.dataset.num_train = 8, 16, 256
    r = bench.run_benchmark(config, steps=2, warmup=1, overridden={"dataset.image_size", "dataset.num_train"})
    _check_record(json.loads(json.dumps(r)), "none")
    assert r["sinkhorn_share"] is None and r["negatives_share"] is None and r["terms_share"] is None


def test_bench_forces_the_synthetic_set_with_cifar100_shapes():
    config = configs.distill_config("crd", "resnet32x4", "resnet8x4")
    config.dataset.name = "cifar100"
    config.dataset.num_classes = 7
    bench.apply_bench_defaults(config, {"dataset.name", "dataset.num_classes"})
    d = config.dataset
    assert (d.name, d.image_size, d.num_channels, d.num_classes, d.num_train) == ("synthetic", 32, 3, 7, 50000)


@pytest.mark.slow
def test_unknown_method_is_one_error_line_and_exit_2():
    out = _run("--config", "configs/distill.py:foo,resnet8,resnet8")
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: ") and "unknown method 'foo'" in lines[0], lines[0]
    assert out.stdout == ""


@pytest.mark.slow
def test_accelerator_script_runs_its_smallest_setting_on_the_cpu(tmp_path):
    """benchmarks/accelerator.sh as a user runs it, in its CPU smoke mode: the speed table with a row per method,
    then the quick study of none, kd, crd and wcord with its table; a bad option is one line, exit 2."""
    from wcord_jax.tools import bench_table

    rows = bench_table.rows()
    assert len(rows) == 48 and rows[0] == {"method": "wcord", "teacher": "resnet32x4", "student": "resnet8x4",
                                           "dtype": "bfloat16", "batch_size": 1024, "steps_per_dispatch": 8}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "accelerator.sh")
    out = subprocess.run(["bash", script, "--smallest", "--out", str(tmp_path / "acc")], cwd=root,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("device: cpu x") and "== (a) step speed" in out.stdout, out.stdout[:500]
    lines = [l for l in out.stdout.split("== (b) accuracy")[0].splitlines() if l.startswith("| ")]
    assert len(lines) == 3 and lines[0].startswith("| method | teacher -> student | dtype | batch")
    records = [json.loads(l) for l in (tmp_path / "acc" / "bench_table.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["wcord", "crd"] and all(r["img_per_s"] > 0 for r in records)
    assert all(r["num_train"] == 4096 for r in records)  # the small set its header names, not the bench's 50,000
    minutes = 240 * 50_000 / records[0]["img_per_s"] / 60
    assert f"{minutes:,.1f} min" in lines[1] and "| wcord | wrn_40_2 -> wrn_16_2 | float32 | 64 | 1 |" in lines[1]
    study_rows = [l.split("|")[1].strip() for l in out.stdout.split("== (b) accuracy")[1].splitlines()
                  if l.startswith("| ") and "---" not in l]
    assert study_rows[1:] == ["none", "kd", "crd", "wcord"], out.stdout[-2000:]
    assert (tmp_path / "acc" / "study" / "results_quick.md").exists()
    bad = subprocess.run(["bash", script, "--smalest"], cwd=root, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: unknown option --smalest; valid:")
    skipped = bench_table.table(records[:1], rows[1:2])
    assert skipped.splitlines()[-1].endswith("| skipped (time budget) | | | | | | |")


def test_step_profile_groups_xla_ops_by_their_call_path(tmp_path):
    """benchmarks/step_profile.py's grouping on an HLO dump and a trace written by hand in XLA:CPU's formats: the
    teacher (no `jvp`), the student's forward and backward, an unnamed weight-gradient convolution, a collective with
    its nested rendezvous counted once, and the wall-time remainder."""
    import gzip
    import importlib.util

    spec = importlib.util.spec_from_file_location("step_profile", os.path.join(ROOT, "benchmarks", "step_profile.py"))
    sp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sp)
    name = 'metadata={op_name="jit(per_device)/shard_map/%s"}'
    hlo_text = "\n".join([
        "%fused_computation.1 (p0: f32[32,8,8,256]) -> f32[32,8,8,256] {",
        "  %c = f32[32,8,8,256]{3,2,1,0} convolution(%p0, %p1), window={size=3x3 pad=1_1x1_1}",
        "}",
        "%fused_computation.2 (p0: f32[64,32,32,32]) -> f32[64,3,3,64] {",
        "  %c = f32[64,3,3,64]{3,2,1,0} convolution(%p0, %p1), window={size=32x32}",
        "}",
        "ENTRY %main {",
        "  %ynn_fusion.1 = f32[32,8,8,256]{3,2,1,0} fusion(%a), kind=kCustom, calls=%fused_computation.1, "
        + name % "ResNet/layer3_0/conv1/conv_general_dilated",
        "  %ynn_fusion.3 = f32[32,8,8,256]{3,2,1,0} fusion(%a), kind=kCustom, calls=%fused_computation.1, "
        + name % "jvp(ResNet)/layer3_0/conv1/conv_general_dilated",
        "  %ynn_fusion.4 = f32[32,8,8,256]{3,2,1,0} fusion(%a), kind=kCustom, calls=%fused_computation.1, "
        + name % "transpose(jvp(ResNet))/layer3_0/conv1/conv_general_dilated",
        "  %ynn_fusion.2 = f32[64,3,3,64]{3,2,1,0} fusion(%a), kind=kCustom, calls=%fused_computation.2",
        "  %add_maximum_fusion.7 = f32[32,8,8,256]{3,2,1,0} fusion(%a), kind=kLoop, calls=%f, "
        + name % "jvp(ResNet)/layer3_0/jit(relu)/max",
        "  %while.9 = (s32[], f32[2]) while(%t), condition=%c, body=%b, " + name % "jvp(vmap())/while",
        "  %all-reduce.2 = (f32[2,64]{1,0}) all-reduce(%x), " + name % "jvp(ResNet)/bn1/psum_invariant",
        "}"])
    hlo = sp.parse_hlo(hlo_text)
    assert hlo["ynn_fusion.1"] == ("f32[32,8,8,256]{3,2,1,0}", "jit(per_device)/shard_map/ResNet/layer3_0/conv1/"
                                   "conv_general_dilated", True)
    assert hlo["add_maximum_fusion.7"][2] is False
    groups = {n: sp.group_of(n, *hlo[n]) for n in hlo if n[0] != "c"}
    assert groups == {"ynn_fusion.1": "teacher forward: convolutions",
                      "ynn_fusion.3": "student forward: convolutions",
                      "ynn_fusion.4": "student backward: input-gradient convolutions",
                      "ynn_fusion.2": "student backward: weight gradients",
                      "add_maximum_fusion.7": "student forward: other ops",
                      "while.9": "the loss, the negatives and other ops",
                      "all-reduce.2": "cross-device sums (incl. waiting)"}

    def ev(n, ts, dur, tid=1):
        return {"ph": "X", "pid": 1, "tid": tid, "name": n, "ts": ts, "dur": dur}

    # One step on 2 devices (threads 1 and 2), microseconds; the rendezvous and the while's body op are nested.
    events = [ev("ThunkExecutor::Execute", 0, 10_000), ev("ynn_fusion.1", 0, 4000), ev("ynn_fusion.2", 4000, 2000),
              ev("all-reduce.2", 6000, 1000), ev("Rendezvous", 6100, 800), ev("while.9", 7000, 1000),
              ev("compare_fusion.5", 7100, 500), ev("ynn_fusion.1", 0, 6000, tid=2), ev("all-reduce.2", 6000, 3000, 2)]
    hlo["compare_fusion.5"] = ("s32[32]", "", False)
    trace = os.path.join(tmp_path, "t.trace.json.gz")
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    table = sp.profile_table(trace, hlo, steps=1, devices=2, wall_ms=10.0)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1] for line in table.splitlines() if line.startswith("| ")}
    # per device: teacher (4 + 6) / 2 = 5 ms, weight gradients 2 / 2, collectives (1 + 3) / 2, while 1 / 2
    assert rows["teacher forward: convolutions"] == "5.0"
    assert rows["student backward: weight gradients"] == "1.0"
    assert rows["cross-device sums (incl. waiting)"] == "2.0"
    assert rows["the loss, the negatives and other ops"] == "0.5"
    assert rows["all traced ops"] == "8.5"
    assert rows["per device, not in a traced op (idle, or a kernel without a trace event)"] == "1.5"


def test_accelerator_table_plans_its_rows_and_formats_them(tmp_path):
    """benchmarks/accelerator.sh's table without timing anything: its rows most important first, each row's config,
    a record's line with the 240-epoch projection (240 x 50,000 images at its speed), and a spent budget skips the
    rest and lists them."""
    from wcord_jax.tools import bench_table

    rows = bench_table.rows()
    assert len(rows) == 2 * 2 * 2 * 3 * 2 and len({json.dumps(r, sort_keys=True) for r in rows}) == len(rows)
    assert rows[0] == {"method": "wcord", "teacher": "resnet32x4", "student": "resnet8x4", "dtype": "bfloat16",
                       "batch_size": 1024, "steps_per_dispatch": 8}
    small = bench_table.rows(smallest=True)
    assert [r["method"] for r in small] == ["wcord", "crd"]
    config = bench_table.config_of(small[1])
    assert (config.method, config.model, config.teacher.model, config.dtype, config.batch_size) == (
        "crd", "wrn_16_2", "wrn_40_2", "float32", 64)
    assert config.dataset.num_train == 4096 and config.crd.nce_k == 1024 and "wcord" not in config  # CRD's alone
    record = dict(rows[0], img_per_s=20_000.0, ms_per_step=51.2, compile_s=30.25, peak_memory_bytes=3 * 2 ** 30,
                  tflop_per_s=123.4, peak_tflop_per_s=989.4)
    lines = bench_table.table([record], rows[1:3]).splitlines()
    assert len(lines) == 2 + 1 + 2 and lines[0].startswith("| method | teacher -> student |")
    assert lines[2] == ("| wcord | resnet32x4 -> resnet8x4 | bfloat16 | 1024 | 8 | 20,000 | 51.20 | 123.40 | 12.5 | "
                        "30.2 | 3.00 | 10.0 min |")  # 12,000,000 images / 20,000 img/s = 600 s
    assert all(l.endswith("| skipped (time budget) | | | | | | |") for l in lines[3:])
    cpu = dict(record, tflop_per_s=0.01, peak_tflop_per_s=None)  # a chip without a known peak
    assert "| 0.01 | n/a |" in bench_table.table([cpu], [])
    records, skipped = bench_table.run_table(-1.0, 2, False, str(tmp_path / "rows.jsonl"))
    assert records == [] and skipped == rows and (tmp_path / "rows.jsonl").read_text() == ""


def test_one_step_s_flops_are_the_same_with_one_or_several_steps_per_dispatch():
    """XLA's cost analysis counts a loop's body once: a dispatch of 2 steps (a lax.scan) reports one step's flops,
    as a dispatch of 1 step (no loop) does, so the bench's TFLOP/s need no division by the steps per dispatch."""
    config = configs.distill_config("kd", "resnet8", "resnet8")
    config.batch_size, config.dataset.image_size, config.dataset.num_train = 8, 16, 256
    flops = {}
    for spd in (1, 2):
        config.steps_per_dispatch = spd
        r = bench.run_benchmark(config, steps=2, warmup=0, shares=False,
                                overridden={"dataset.image_size", "dataset.num_train"})
        flops[spd] = r["flops_per_step"]
    assert flops[1] > 0 and abs(flops[2] - flops[1]) < 0.01 * flops[1], flops
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe", "float32") == 378.0
    assert bench.peak_tflops("TPU v4", "bfloat16") == 275.0 and bench.peak_tflops("cpu", "float32") is None

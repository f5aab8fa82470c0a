"""XLA:CPU start-up settings (`wcord_jax.host`): the device count and oneDNN chosen from the config, the cores and the
CPU's vendor; an explicit XLA_FLAGS wins; bad values are one line with exit status 2."""
import os
import subprocess
import sys

import pytest

from wcord_jax import configs, host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTEL, AMD = "GenuineIntel", "AuthenticAMD"


@pytest.mark.parametrize("cores, batches, expected", [
    (2, (64, 256), 2), (3, (64, 256), 2), (8, (64, 256), 8), (6, (64, 256), 4), (8, (100, 256), 4),
    (1, (64, 256), 1), (4, (7, 256), 1)])
def test_auto_device_count_is_the_largest_divisor_of_the_batch_sizes_up_to_the_cores(cores, batches, expected):
    assert host.auto_cpu_devices(cores, batches) == expected


def test_onednn_auto_follows_the_cpu_vendor():
    assert host.onednn_wanted("auto", INTEL) and not host.onednn_wanted("auto", AMD)
    assert not host.onednn_wanted("auto", "")
    assert host.onednn_wanted("on", AMD) and not host.onednn_wanted("off", INTEL)
    with pytest.raises(ValueError, match="auto, on, off"):
        host.onednn_wanted("yes", INTEL)


def test_cpu_vendor_reads_proc_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nflags\t\t: fpu avx512f\n")
    assert host.cpu_vendor(str(info)) == INTEL
    info.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # an ARM host names no vendor_id
    assert host.cpu_vendor(str(info)) == ""
    assert host.cpu_vendor(str(tmp_path / "missing")) == ""


def _config(**overrides):
    c = configs.teacher_config("resnet8")
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def test_configure_adds_the_flags_the_config_asks_for():
    env = {}
    note = host.configure(_config(), env, cores=2, vendor=AMD)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2"]
    assert "2 CPU devices" in note and "oneDNN off (auto: not an Intel CPU)" in note and host.NOTE == note

    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    host.configure(_config(cpu_devices=3), env, cores=2, vendor=INTEL)
    assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=3",
                                        "--xla_cpu_use_onednn=true"]

    env = {}
    note = host.configure(_config(cpu_devices=1, cpu_onednn="off"), env, cores=16, vendor=INTEL)
    assert "XLA_FLAGS" not in env and "1 CPU device (cpu_devices)" in note and "oneDNN off (off)" in note


def test_explicit_xla_flags_win_and_multi_process_runs_keep_one_device_per_process():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_cpu_use_onednn=false"}
    note = host.configure(_config(cpu_devices=2, cpu_onednn="on"), env, cores=8, vendor=INTEL)
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4 --xla_cpu_use_onednn=false"
    assert "as XLA_FLAGS sets them" in note and "oneDNN as XLA_FLAGS sets it" in note

    env = {"WCORD_DISTRIBUTED": "1"}
    note = host.configure(_config(), env, cores=8, vendor=AMD)
    assert "XLA_FLAGS" not in env and "multi-process" in note


def test_bad_device_count_is_refused():
    with pytest.raises(ValueError, match="cpu_devices must be 0"):
        host.configure(_config(cpu_devices=-1), {}, cores=2, vendor=AMD)


def test_jax_gets_the_devices_configure_chose():
    code = ("from wcord_jax import configs, host\n"
            "import jax\n"  # JAX imported first, as main.py's imports may do: the devices are created later
            "c = configs.teacher_config('resnet8')\n"
            "print(host.configure(c, cores=3))\n"
            "print(len(jax.devices('cpu')))\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2"  # 3 cores, batch 64 and 256: 2 devices


@pytest.mark.parametrize("override, message", [
    ("--config.cpu_onednn=maybe", "cpu_onednn must be one of auto, on, off"),
    ("--config.cpu_devices=-2", "cpu_devices must be 0")])
def test_bad_setting_on_the_command_line_is_one_line_and_exit_2(tmp_path, override, message):
    out = subprocess.run([sys.executable, "-m", "wcord_jax.main", "--config", "configs/teacher.py:resnet8",
                          "--workdir", str(tmp_path / "w"), override], cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert out.returncode == 2 and len(lines) == 1 and message in lines[0], out.stderr

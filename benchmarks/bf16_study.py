"""The main study preset with the students in bfloat16 (activations; parameters and loss inputs stay float32), the
teacher as in the float32 study (copy its teacher_resnet32/ into WORKDIR to reuse it):

    python benchmarks/bf16_study.py WORKDIR [METHOD,METHOD,...] [--seeds=0,1,2]

Writes WORKDIR/results.md (the study's table). The float32 runs are the main preset's
(`python -m wcord_jax.tools.study --config configs/study.py`): keep the two in separate workdirs, since a run's
dtype is not among the settings the study compares when it reuses a finished run.
"""
import sys

from wcord_jax import compile_cache
from wcord_jax import main as cli
from wcord_jax.tools import study

args = [a for a in sys.argv[1:] if not a.startswith("--seeds")]
seeds = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--seeds=")), "0")
workdir = args[0]
cli._setup_logging()
compile_cache.configure()
config = study.study_config("main")
config.seeds = tuple(int(x) for x in seeds.split(","))
config.extra.dtype = "bfloat16"
if len(args) > 1:
    config.methods = tuple(args[1].split(","))
study.run_all(config, workdir)
study.write_report(config, workdir)
print(open(f"{workdir}/results.md").read())

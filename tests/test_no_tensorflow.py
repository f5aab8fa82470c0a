"""The synthetic and idx-file paths must work on machines without TensorFlow or TFDS (many GPU images)."""
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # a fresh interpreter, as a GPU image without TensorFlow has it
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys

    # As if not installed: `import tensorflow` raises ImportError and importlib.util.find_spec returns None.
    for name in ("tensorflow", "tensorflow_datasets"):
        sys.modules[name] = None
    from wcord_jax import configs, train

    c = configs.teacher_config("resnet8")
    c.dataset.name = "synthetic"
    c.dataset.num_train, c.dataset.num_test, c.dataset.image_size = 64, 16, 16
    c.batch_size = c.eval_batch_size = 16
    c.num_epochs, c.num_devices, c.progress_bar = 1, 1, False
    result = train.train_and_evaluate(c, sys.argv[1])
    from wcord_jax import data
    from wcord_jax.data import sources
    if sources.has_idx_files(sources.FASHION_MNIST_IDX_DIR):  # the Debian package's idx files
        f = configs.dataset_config()
        f.name, f.num_train, f.num_test = "fashion_mnist", 100, 10
        assert data.load(f).train.images.shape == (100, 32, 32, 1)
    assert 0.0 <= result["eval/top1"] <= 1.0
    assert not any(m.split(".")[0] in ("tensorflow", "tensorflow_datasets") and sys.modules[m] is not None
                   for m in list(sys.modules))
    print("ok without tensorflow")
""")


def test_training_on_synthetic_data_needs_no_tensorflow(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0 and "ok without tensorflow" in out.stdout, out.stderr[-3000:]

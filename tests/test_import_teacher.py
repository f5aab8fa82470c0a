"""Teachers from PyTorch (`python -m wcord_jax.tools.import_teacher`): a PyTorch network with random weights and random
batch-norm statistics, saved as RepDistiller (or torchvision) saves it, imported, gives PyTorch's eval-mode logits and
feature list; broken files and unsafe pickles are one line with exit status 2; an imported teacher distils.

The PyTorch reference networks below are written here from the structure of RepDistiller's `models/resnet.py` and
`models/wrn.py` and torchvision's `resnet.py` (stem, blocks, shortcuts, pooling, feature taps)."""
import argparse
import os
import pickle
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # small reference networks; no OpenMP threads left spinning beside the JAX tests
nn = torch.nn
F = torch.nn.functional

from wcord_jax import checkpoint as ckpt_lib  # noqa: E402
from wcord_jax import configs, models  # noqa: E402
from wcord_jax.tools import import_teacher


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------------------------------
# PyTorch reference networks


def staged(x, stem, stages, neck, classifier):
    """RepDistiller's feature taps: the stem's output, each stage's output, then the pooled vector (after `neck`)."""
    x = stem(x)
    feats = [x]
    for stage in stages:
        x = stage(x)
        feats.append(x)
    x = F.adaptive_avg_pool2d(neck(x), 1).flatten(1)
    feats.append(x)
    return feats, classifier(x)


class CifarBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth, widths, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for stage, w in enumerate(widths[1:]):
            blocks = []
            for i in range(n):
                blocks.append(CifarBlock(cin, w, 2 if stage > 0 and i == 0 else 1))
                cin = w
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return staged(x, lambda x: F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3),
                      lambda x: x, self.fc)


class WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.same = cin == cout
        self.convShortcut = None if self.same else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.same else self.convShortcut(pre))


class WideGroup(nn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes):
        super().__init__()
        n, c = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1, self.block2, self.block3 = (WideGroup(n, c[0], c[1], 1), WideGroup(n, c[1], c[2], 2),
                                                 WideGroup(n, c[2], c[3], 2))
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = nn.Linear(c[3], num_classes)

    def forward(self, x):
        return staged(x, self.conv1, (self.block1, self.block2, self.block3), lambda x: F.relu(self.bn1(x)), self.fc)


class TorchvisionBlock(CifarBlock):
    pass


class TorchvisionResNet(nn.Module):
    def __init__(self, layers, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for stage, (w, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for i in range(n):
                blocks.append(TorchvisionBlock(cin, w, 2 if stage > 0 and i == 0 else 1))
                cin = w
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = F.max_pool2d(x, 3, 2, 1)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
            feats.append(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        feats.append(x)
        return feats, self.fc(x)


class Vgg(nn.Module):
    def __init__(self, cfg, num_classes):
        super().__init__()
        cin = 3
        for b, widths in enumerate(cfg):
            layers = []
            for w in widths:
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
                cin = w
            setattr(self, f"block{b}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        feats = []
        for b in range(5):
            x = F.relu(getattr(self, f"block{b}")(x))
            feats.append(x)
            if b < 3:  # 32x32 inputs: no pool after block 3
                x = F.max_pool2d(x, 2, 2)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        feats.append(x)
        return feats, self.classifier(x)


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, 4 * planes, 1, bias=False), nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride, bias=False), nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        cin = 64
        for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            blocks = []
            for i in range(n):
                blocks.append(Bottleneck(cin, planes, 2 if stage > 0 and i == 0 else 1))
                cin = 4 * planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(2048, num_classes)

    def forward(self, x):
        return staged(x, lambda x: F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3,
                                                                      self.layer4), lambda x: x, self.linear)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, t):
        super().__init__()
        mid = cin * t
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                  nn.ReLU(), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Half(nn.Module):
    """RepDistiller's `mobile_half`: expansion 6, width 0.5, the features after blocks 0-1, 2, 3-4 and 5-6."""

    def __init__(self, num_classes):
        super().__init__()
        settings = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1)]
        cin = 16
        self.conv1 = nn.Sequential(nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU())
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, c // 2, s if i == 0 else 1, t))
                cin = c // 2
            self.blocks.append(nn.Sequential(*layers))
        self.conv2 = nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(1280, num_classes))

    def forward(self, x):
        b = self.blocks
        stages = (nn.Sequential(b[0], b[1]), b[2], nn.Sequential(b[3], b[4]), nn.Sequential(b[5], b[6]))
        return staged(x, self.conv1, stages, self.conv2, self.classifier)


def shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Block(nn.Module):
    def __init__(self, cin, cout, stride, groups):
        super().__init__()
        mid, self.stride = cout // 4, stride
        self.g = 1 if cin == 24 else groups
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, groups=self.g, bias=False), nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        out = shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes, planes=(240, 480, 960), blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24)
        cin = 24
        for k, (p, n) in enumerate(zip(planes, blocks)):
            layers = []
            for i in range(n):
                layers.append(ShuffleV1Block(cin, p - (cin if i == 0 else 0), 2 if i == 0 else 1, groups))
                cin = p
            setattr(self, f"layer{k + 1}", nn.Sequential(*layers))
        self.linear = nn.Linear(planes[-1], num_classes)

    def forward(self, x):
        return staged(x, lambda x: F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3),
                      lambda x: x, self.linear)


class ShuffleV2Basic(nn.Module):
    def __init__(self, c):
        super().__init__()
        h = c // 2
        self.conv1, self.bn1 = nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h)
        self.conv2, self.bn2 = nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h)
        self.conv3, self.bn3 = nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h)

    def forward(self, x):
        h = x.shape[1] // 2
        x1, x2 = x[:, :h], x[:, h:]
        out = F.relu(self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2))))))))
        return shuffle(torch.cat([x1, out], 1), 2)


class ShuffleV2Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        mid = cout // 2
        self.conv1, self.bn1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False), nn.BatchNorm2d(cin)
        self.conv2, self.bn2 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv4, self.bn4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False), nn.BatchNorm2d(mid)
        self.conv5, self.bn5 = nn.Conv2d(mid, mid, 1, bias=False), nn.BatchNorm2d(mid)

    def forward(self, x):
        a = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        b = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x))))))))
        return shuffle(torch.cat([a, b], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes, channels=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 24, 1, bias=False), nn.BatchNorm2d(24)
        cin = 24
        for k, (c, n) in enumerate(zip(channels, blocks)):
            setattr(self, f"layer{k + 1}", nn.Sequential(ShuffleV2Down(cin, c), *[ShuffleV2Basic(c) for _ in range(n)]))
            cin = c
        self.conv2, self.bn2 = nn.Conv2d(channels[2], channels[3], 1, bias=False), nn.BatchNorm2d(channels[3])
        self.linear = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        return staged(x, lambda x: F.relu(self.bn1(self.conv1(x))), (self.layer1, self.layer2, self.layer3),
                      lambda x: F.relu(self.bn2(self.conv2(x))), self.linear)


VGG = {"vgg8": [[64], [128], [256], [512], [512]], "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
       "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]]}


def reference(name, num_classes):
    if name in VGG:
        return Vgg(VGG[name], num_classes)
    if name == "ResNet50":
        return ResNet50(num_classes)
    if name in ("MobileNetV2", "ShuffleV1", "ShuffleV2"):
        return {"MobileNetV2": MobileNetV2Half, "ShuffleV1": ShuffleNetV1, "ShuffleV2": ShuffleNetV2}[name](num_classes)
    cifar = {"resnet8": (8, (16, 16, 32, 64)), "resnet20": (20, (16, 16, 32, 64)), "resnet56": (56, (16, 16, 32, 64)),
             "resnet110": (110, (16, 16, 32, 64)), "resnet8x4": (8, (32, 64, 128, 256)),
             "resnet32x4": (32, (32, 64, 128, 256))}
    if name in cifar:
        return CifarResNet(*cifar[name], num_classes)
    if name.startswith("wrn_"):
        _, depth, widen = name.split("_")
        return WideResNet(int(depth), int(widen), num_classes)
    return TorchvisionResNet({"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}[name], num_classes)


def randomise(net, seed):
    """Random weights and random batch-norm statistics (so that eval mode really uses them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, nn.Linear):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net.eval()


def save_like_repdistiller(net, path, prefix=""):
    """`train_teacher.py`'s file: {'epoch', 'model', 'accuracy', 'optimizer'} (with an argparse.Namespace and a
    numpy scalar as the published files have), optionally with DataParallel's `module.` prefix."""
    state = {prefix + k: v for k, v in net.state_dict().items()}
    torch.save({"epoch": 240, "model": state, "accuracy": np.float64(79.42), "opt": argparse.Namespace(lr=0.05),
                "optimizer": {}}, path)


# --------------------------------------------------------------------------------------------------------------------
# Equal logits and features


CASES = [  # the six published teachers, then the CRD table's students and torchvision's ResNets
    ("repdistiller", "resnet56", 32), ("repdistiller", "resnet110", 32), ("repdistiller", "resnet32x4", 32),
    ("repdistiller", "wrn_40_2", 32), ("repdistiller", "vgg13", 32), ("repdistiller", "ResNet50", 32),
    ("repdistiller", "resnet8x4", 32), ("repdistiller", "wrn_16_2", 32), ("repdistiller", "vgg8", 32),
    ("repdistiller", "MobileNetV2", 32), ("repdistiller", "ShuffleV1", 32), ("repdistiller", "ShuffleV2", 32),
    ("torchvision", "resnet18", 64)]


FAST_CASES = (("repdistiller", "resnet8x4", 32), ("repdistiller", "wrn_16_2", 32))  # the rest: the whole suite


@pytest.mark.parametrize("source, name, size", [c if c in FAST_CASES else pytest.param(*c, marks=pytest.mark.slow)
                                                for c in CASES])
def test_imported_network_gives_pytorchs_eval_logits_and_features(tmp_path, source, name, size):
    num_classes = 100 if source == "repdistiller" else 1000
    net = randomise(reference(name, num_classes), seed=len(name))
    path = tmp_path / "ckpt.pth"
    if source == "repdistiller":
        save_like_repdistiller(net, path, prefix="module." if name == "resnet56" else "")
    else:
        torch.save(net.state_dict(), path)  # torchvision: a bare state dict
    variables = import_teacher.convert(name, num_classes, import_teacher.read_state_dict(str(path)), size)

    x = np.random.default_rng(0).normal(size=(2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        t_feats, t_logits = net(torch.from_numpy(x))
    logits, feats = models.get_model(name, num_classes).apply(variables, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                                               train=False)
    scale = np.abs(t_logits.numpy()).max()
    np.testing.assert_allclose(np.asarray(logits), t_logits.numpy(), rtol=1e-4, atol=1e-4 * scale)
    assert len(feats) == len(t_feats)
    for f, t in zip(feats, t_feats):
        t = t.numpy()
        t = t.transpose(0, 2, 3, 1) if t.ndim == 4 else t  # NCHW -> NHWC
        np.testing.assert_allclose(np.asarray(f), t, rtol=1e-4, atol=1e-4 * np.abs(t).max())


# --------------------------------------------------------------------------------------------------------------------
# Broken and unsafe files


class _Boom:
    """Unpickling this calls os.system (it would create `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _env():
    """The CPU and XLA's cheap compilation (CI time)."""
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
             " --xla_llvm_disable_expensive_passes=true")
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())


def _cli(*args, timeout=300):
    cmd = [sys.executable, "-m", "wcord_jax.tools.import_teacher", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _one_error_line(out, expected):
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "ran"
    state = randomise(reference("resnet8", 100), 0).state_dict()
    torch.save({"model": state, "payload": _Boom(marker)}, path)
    with pytest.raises(import_teacher.ImportFailed, match="was refused.*never arbitrary code"):
        import_teacher.read_state_dict(str(path))
    with open(tmp_path / "plain.pkl", "wb") as f:  # a plain pickle (not a torch file) with the same payload
        pickle.dump(_Boom(marker), f)
    with pytest.raises(import_teacher.ImportFailed):
        import_teacher.read_state_dict(str(tmp_path / "plain.pkl"))
    assert not marker.exists()  # the payload never ran


def _broken_file(tmp_path, damage):
    path = tmp_path / "ckpt.pth"
    state = randomise(reference("resnet8", 100), 0).state_dict()
    if damage == "missing":
        del state["layer3.0.bn2.running_var"]
    elif damage == "shape":
        state["fc.weight"] = torch.zeros(10, 64)
    elif damage == "extra":
        state["extra.weight"] = torch.zeros(3)
    if damage == "not_a_checkpoint":
        path.write_text("this is not a checkpoint\n")
    elif damage == "unsafe":
        torch.save({"model": state, "payload": _Boom(tmp_path / "ran")}, path)
    elif damage == "no_state_dict":
        torch.save({"epoch": 3}, path)
    else:
        torch.save({"model": state}, path)
    return path


@pytest.mark.parametrize("damage, expected", [
    ("missing", "the checkpoint has no layer3.0.bn2.running_var"),
    ("shape", "fc.weight has shape [10, 64], but resnet8 for 100 classes needs [64, 100]"),
    ("extra", "the checkpoint has tensors resnet8 does not: extra.weight"),
    ("not_a_checkpoint", "is not a PyTorch checkpoint"),
    ("no_state_dict", "holds no state dict"),
])
def test_broken_files_name_what_is_wrong(tmp_path, damage, expected):
    path = _broken_file(tmp_path, damage)
    config = configs.teacher_config("resnet8")
    config.dataset.name = "synthetic"
    with pytest.raises(import_teacher.ImportFailed) as e:
        import_teacher.import_teacher("repdistiller", "resnet8", str(path), str(tmp_path / "w"), config)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()  # nothing written


@pytest.mark.slow  # the command line
def test_a_broken_file_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    path = _broken_file(tmp_path, "unsafe")
    out = _cli("--source", "repdistiller", "--model", "resnet8", "--checkpoint", str(path), "--workdir",
               str(tmp_path / "w"), "--config.dataset.name=synthetic")
    _one_error_line(out, "was refused")
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow  # the command line
def test_unsupported_architecture_names_the_valid_ones(tmp_path):
    out = _cli("--source", "torchvision", "--model", "resnet32x4", "--checkpoint", "x.pth", "--workdir", str(tmp_path))
    _one_error_line(out, "--source torchvision --model resnet32x4: not one of its architectures; valid: resnet18, "
                         "resnet34")


# --------------------------------------------------------------------------------------------------------------------
# From import to distillation


@pytest.mark.slow  # the command line
def test_an_imported_teacher_is_evaluated_and_distils_from_the_command_line(tmp_path):
    net = randomise(reference("resnet8", 10), 3)
    path = tmp_path / "resnet8_vanilla.pth"
    save_like_repdistiller(net, path)
    data = ["--config.dataset.name=synthetic", "--config.dataset.num_classes=10", "--config.dataset.num_train=128",
            "--config.dataset.num_test=64", "--config.dataset.image_size=16", "--config.batch_size=32",
            "--config.eval_batch_size=32", "--config.num_devices=1"]
    teacher = tmp_path / "teacher"
    out = _cli("--source", "repdistiller", "--model", "resnet8", "--checkpoint", str(path), "--workdir",
               str(teacher), *data)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resnet8 on synthetic: test top-1" in out.stderr
    meta = ckpt_lib.load_meta(str(teacher))
    assert meta["source"] == "repdistiller" and meta["model"] == "resnet8" and 0.0 <= meta["eval/top1"] <= 1.0
    imported = ckpt_lib.load_variables(str(teacher))
    np.testing.assert_array_equal(imported["params"]["fc"]["kernel"], net.fc.weight.detach().numpy().T)

    cmd = [sys.executable, "-m", "wcord_jax.main", "--config", "configs/distill.py:crd,resnet8,resnet8", "--workdir",
           str(tmp_path / "student"), f"--config.teacher.checkpoint={teacher}", "--config.num_epochs=1",
           "--config.crd.nce_k=16", *data]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    events = [__import__("json").loads(l) for l in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert abs(events[0]["teacher/top1"] - meta["eval/top1"]) < 1e-6  # the same teacher, the same test split


def test_an_imported_teacher_is_written_as_a_run_with_pytorchs_test_accuracy(tmp_path, monkeypatch):
    """`import_teacher` in this process (the fast tier's run of the command's body): the run it writes holds the
    PyTorch weights, and its logged test top-1 is the top-1 of PyTorch's own eval logits on the normalised test
    split."""
    from wcord_jax import data
    from wcord_jax.data import sources

    net = randomise(reference("resnet8", 10), 5)
    path = tmp_path / "resnet8.pth"
    save_like_repdistiller(net, path)
    config = configs.teacher_config("resnet8")
    config.dataset.name, config.dataset.num_classes, config.dataset.image_size = "synthetic", 10, 16
    config.dataset.num_train, config.dataset.num_test = 64, 48
    config.eval_batch_size, config.num_devices = 16, 1
    monkeypatch.setattr(import_teacher, "_overridden", {"dataset.name", "dataset.num_classes"})  # as --config.X
    meta = import_teacher.import_teacher("repdistiller", "resnet8", str(path), str(tmp_path / "w"), config)

    test = data.load(config.dataset, config.seed).test
    mean, std = sources.normalization("synthetic", 3)
    x = ((np.asarray(test.images, np.float32) - mean) / std).transpose(0, 3, 1, 2)
    with torch.no_grad():
        _, logits = net(torch.from_numpy(x))
    want = float(np.mean(np.argmax(logits.numpy(), -1) == np.asarray(test.labels)))
    assert meta["source"] == "repdistiller" and abs(meta["eval/top1"] - want) < 1e-6
    written = ckpt_lib.load_meta(str(tmp_path / "w"))
    assert written["eval/top1"] == meta["eval/top1"] and written["model"] == "resnet8" and written["num_classes"] == 10
    imported = ckpt_lib.load_variables(str(tmp_path / "w"))
    np.testing.assert_array_equal(imported["params"]["fc"]["kernel"], net.fc.weight.detach().numpy().T)

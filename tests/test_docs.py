"""The README and docs/: every relative link reaches a file (and a heading, when it names one), and every config
key of a teacher and of a distillation run is documented."""
import glob
import os
import re

import pytest

from wcord_jax import configs, distillers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "BENCHMARKS.md")] + \
    sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _headings(path):
    in_code, out = False, set()
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(_anchor(line.lstrip("#")))
    return out


def test_anchor_rule():
    assert _anchor(" Accuracy study on Fashion-MNIST (30 epochs): the main table") == \
        "accuracy-study-on-fashion-mnist-30-epochs-the-main-table"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    text = open(page, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(full), f"{os.path.relpath(page, ROOT)}: broken link {target}"
        if anchor and full.endswith(".md"):
            assert anchor in _headings(full), f"{os.path.relpath(page, ROOT)}: no heading for {target}"


def _flat_keys(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _documented_keys():
    """The config keys named in the first column of the docs' tables: `a.b`, and bare names after a dotted one in
    the same cell take its prefix (`dataset.image_size`, `num_channels`); a bare name in docs/SECTION.md's table
    (wcord.md lists `tau`) is SECTION.name."""
    names = set()
    for page in PAGES:
        section = os.path.splitext(os.path.basename(page))[0]
        for line in open(page, encoding="utf-8"):
            if not line.startswith("| `"):
                continue
            prefix = ""
            for name in re.findall(r"`([\w.]+)`", line.split("|")[1]):
                if "." in name:
                    prefix = name.rpartition(".")[0] + "."
                    names.add(name)
                else:
                    names.update({prefix + name, f"{section}.{name}", name})
    return names


def test_every_config_key_is_documented():
    keys = set(_flat_keys(configs.teacher_config("resnet8")))
    for method in distillers.names():
        keys |= set(_flat_keys(configs.distill_config(method, "resnet8", "resnet8")))
    missing = sorted(keys - _documented_keys())
    assert not missing, f"config keys without a row in the tables of README.md / docs/*.md: {missing}"

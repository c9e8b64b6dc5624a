"""What installing the project ships: every hf_hwbp subpackage, model_patches/ as hf_hwbp.model_patches, no
generic top-level package (model_patches, benchmarks) in the user's site-packages."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_config() -> dict:
    # tomllib is Python 3.11's; on 3.10, the declared minimum, pytest itself depends on its backport tomli.
    tomllib = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_is_listed_and_model_patches_lives_under_hf_hwbp():
    config = _setuptools_config()
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hf_hwbp").rglob("__init__.py")} | {
        "hf_hwbp.model_patches"
    }
    assert set(config["packages"]) == on_disk  # a new subpackage of hf_hwbp must be added to pyproject.toml
    assert config["package-dir"] == {"hf_hwbp.model_patches": "model_patches"}
    assert not any(p.split(".")[0] != "hf_hwbp" for p in config["packages"])


def test_discovery_reads_the_registry_under_the_package_name():
    import hf_hwbp.discovery  # noqa: F401 (imports the registry lazily)
    import hf_hwbp.model_patches as patches

    assert Path(patches.__file__).parent.name == "model_patches"  # the top-level folder, under the package's name
    assert patches.stack_finder("resnet") is not None and "resnet" in patches.supported_model_types()


def test_no_compatibility_shims():
    """The example scripts' helpers live in hf_hwbp.examples only, the trainer module re-exports nothing."""
    for old in ("hf_hwbp.comparison", "hf_hwbp.data", "hf_hwbp.vision_data"):
        assert importlib.util.find_spec(old) is None, old
    import hf_hwbp.trainer

    assert set(hf_hwbp.trainer.__all__) == {"FIDELITY_PREFIX", "HighwayTrainer", "plain_training_arguments"}

"""Layering: the math layers import nothing above them (DESIGN.md: callbacks -> metrics, curvature -> torch)."""

import subprocess
import sys


def loaded_modules(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_metrics_import_neither_sharding_nor_lightning():
    loaded = loaded_modules("hildtools.metrics, hildtools.unwrapping")
    assert not {"hildtools.sharding", "hildtools.callbacks", "hildtools.optimizers", "lightning.pytorch"} & loaded


def test_sharding_still_offers_the_names_it_re_exports():
    from hildtools import sharding, unwrapping

    assert sharding.clean_name is unwrapping.clean_name and sharding.UnwrappingTracer is unwrapping.UnwrappingTracer
    assert sharding.modules_by_name is unwrapping.modules_by_name

"""Shared by the tests: keeping what a test executed for the documentation site."""
import shutil
from pathlib import Path

import pytest

EXECUTED = Path(__file__).resolve().parent.parent / "_proc" / "executed"   # read by tools/build_docs.py


@pytest.fixture(scope="session")
def keep_for_docs():
    "A function copying an executed run notebook to _proc/executed/NAME, whose outputs `make docs` then shows."
    def keep(executed, name:str):
        EXECUTED.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(executed, EXECUTED / name)
    return keep

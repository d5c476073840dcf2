"""Paths the tests use, wherever a test file sits in the tree (tests/ mirrors the package)."""
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BYOM_MODELS = TESTS / "byom_models.py"   # user-model builders, named in recipes as BYOM_MODELS:function

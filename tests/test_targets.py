"""``_target_`` checks at composition: nested classes resolve; errors inside a user's module are reported as is."""

from __future__ import annotations

import sys

import pytest

from sdtp.config import build_pruner, compose
from sdtp.errors import ConfigError
from sdtp.scorers.base import Scorer
from sdtp.targets import import_target


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """``user_pkg.nested`` (a scorer nested in a class) and ``user_pkg.broken`` (imports a missing dependency)."""
    package = tmp_path / "user_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nested.py").write_text(
        "from sdtp.scorers.norm import HiddenNormScorer\n\n\nclass Scorers:\n    class Norm(HiddenNormScorer):\n"
        "        pass\n")
    (package / "broken.py").write_text("import not_installed_dependency  # noqa\n\n\nclass Score:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("user_pkg", "user_pkg.nested", "user_pkg.broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return package


def test_a_class_nested_in_a_class_resolves(user_package):
    assert import_target("pruning.scorer._target_", "user_pkg.nested.Scorers.Norm", Scorer).__qualname__ == \
        "Scorers.Norm"
    target = "pruning.scorer._target_=user_pkg.nested.Scorers.Norm"
    cfg = compose("generate", ["model=tiny-llama", "pruning=norm", target])
    assert type(build_pruner(cfg).scorer).__qualname__ == "Scorers.Norm"  # Hydra builds it too


@pytest.mark.parametrize(("target", "message"), [
    ("user_pkg.broken.Score", r"ModuleNotFoundError: No module named 'not_installed_dependency'"),
    ("user_pkg.nested.Scorers.Nrom", r"AttributeError: type object 'Scorers' has no attribute 'Nrom'"),
    ("user_pkg.nope.Score", r"AttributeError: module 'user_pkg' has no attribute 'nope'"),
    ("no_such_pkg.Score", r"ModuleNotFoundError: No module named 'no_such_pkg'"),
])
def test_an_unimportable_target_names_the_real_cause(user_package, target, message):
    """A missing dependency of an existing module is reported as such, not as a missing class."""
    with pytest.raises(ConfigError, match=r"key: cannot import .*" + message):
        import_target("key", target, Scorer)

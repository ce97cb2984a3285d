"""TorchInductor's generated code is cached under the user's home (0700), not in a shared /tmp folder."""

import os
import stat

import pytest

from hrmspec.caches import private_inductor_cache


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    return tmp_path


def test_inductor_caches_in_a_private_folder_of_the_home(home):
    path = private_inductor_cache()
    assert path == home / ".cache" / "hrmspec" / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_a_cache_folder_the_user_chose_is_kept(home, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(home / "mine"))
    assert private_inductor_cache() == home / "mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(home / "mine")


def test_a_link_in_place_of_the_folder_is_not_taken(home, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (home / ".cache" / "hrmspec").mkdir(parents=True)
    (home / ".cache" / "hrmspec" / "inductor").symlink_to(elsewhere)
    assert private_inductor_cache() is None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_the_inductor_backend_sets_it_before_compiling(home):
    from hrmspec.backends import get_backend
    from hrmspec.backends.inductor.table import InductorTable

    InductorTable(get_backend("reference"))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(home / ".cache" / "hrmspec" / "inductor")

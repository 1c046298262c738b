"""The fork tooling: materialize, export, check, and that it never loses work."""

import email
import email.utils
import importlib.util
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import venv
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from gqa import data, fork, install, release, runs, suites, ForkError
from gqa.bases import BASES, DEFAULT

ROOT = Path(__file__).resolve().parent.parent


def git(fork, *args):
    return subprocess.run(["git", *args], cwd=fork, capture_output=True, text=True, check=True).stdout


def commits(fork):
    return git(fork, "log", "--format=%s").splitlines()


def test_materialize_builds_release_plus_one_commit_per_patch(base):
    series = fork.read_series(base)
    fork.materialize(base, base.fork, None, None, False)
    log = commits(base.fork)
    assert len(log) == len(series) + 1
    assert log[-1] == "torchtitan 0.2.1 release from PyPI"
    assert git(base.fork, "rev-list", "-n1", "v0.2.1") == git(base.fork, "rev-list", "--max-parents=0", "HEAD")
    assert git(base.fork, "status", "--porcelain") == ""


def test_base_commit_is_the_verified_release(base, tmp_path):
    fork.materialize(base, base.fork, "0001", None, False)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "xzf", str(release.verified_sdist(base, None)), "-C", str(unpacked)], check=True)
    released = unpacked / "torchtitan-0.2.1"
    listed = set(git(base.fork, "ls-tree", "-r", "--name-only", "v0.2.1").splitlines())
    on_disk = {
        str(p.relative_to(released)) for p in released.rglob("*")
        if p.is_file() and not p.relative_to(released).parts[0].endswith(".egg-info")
    }
    assert listed == on_disk
    attention = "torchtitan/models/attention.py"
    assert git(base.fork, "show", f"v0.2.1:{attention}") == (released / attention).read_text()


def test_materialize_again_changes_nothing(base):
    fork.materialize(base, base.fork, None, None, False)
    head = git(base.fork, "rev-parse", "HEAD")
    assert "up to date" in fork.materialize(base, base.fork, None, None, False)
    assert git(base.fork, "rev-parse", "HEAD") == head


def test_export_round_trips_byte_for_byte(base):
    before = {p.name: p.read_bytes() for p in base.patches.iterdir()}
    fork.materialize(base, base.fork, None, None, False)
    fork.export(base)
    assert {p.name: p.read_bytes() for p in base.patches.iterdir()} == before


def test_export_writes_new_commits_and_series(base):
    fork.materialize(base, base.fork, None, None, False)
    (base.fork / "NOTE.md").write_text("a change\n")
    git(base.fork, "add", "NOTE.md")
    git(base.fork, "-c", "user.name=Dev", "-c", "user.email=dev@example.com", "commit", "-qm", "[docs] Add a note")
    fork.export(base)
    names = fork.read_series(base)
    assert names[-1].endswith("-docs-Add-a-note.patch")
    assert "+a change" in (base.patches / names[-1]).read_text()
    assert "up to date" in fork.materialize(base, base.fork, None, None, False)


def test_export_of_a_partial_fork_needs_drop_missing_and_names_what_goes(base):
    fork.materialize(base, base.fork, "0001", None, False)
    series = fork.read_series(base)
    lacking = ", ".join(series[1:])
    with pytest.raises(ForkError) as refused:
        fork.export(base)
    assert str(refused.value) == (
        f"the fork holds the first 1 patch of the series' {len(series)} (it was made with --upto, or its update "
        f"did not finish); run 'materialize' to bring it to the whole series, or pass --drop-missing to delete "
        f"{lacking} from {base.patches}"
    )
    assert fork.read_series(base) == series and all((base.patches / n).exists() for n in series)
    message = fork.export(base, drop_missing=True)
    assert f"deleted {lacking}: no commit of the fork makes them now; 'git checkout -- FILE' brings one back" in message
    assert fork.read_series(base) == series[:1]
    assert sorted(p.name for p in base.patches.glob("*.patch")) == series[:1]


def test_a_fork_with_more_of_the_series_than_it_recorded_is_finished_not_refused(base):
    """As an older tool left a fork whose update was stopped: some of the
    series' commits past its sync record. They are the series' own."""
    fork.materialize(base, base.fork, "0001", None, False)
    series = fork.read_series(base)
    patches = {p.name: p.read_bytes() for p in base.patches.iterdir()}
    for name in series[1:4]:
        git(base.fork, "-c", "user.name=Dev", "-c", "user.email=dev@example.com", "am", "-q", "--keep-non-patch", str(base.patches / name))
    assert f"0.2.1 + {len(series)} patches" in fork.materialize(base, base.fork, None, None, False)
    assert {p.name: p.read_bytes() for p in base.patches.iterdir()} == patches
    assert "up to date" in fork.materialize(base, base.fork, None, None, False)


def test_a_fork_in_the_middle_of_git_am_says_how_to_finish_or_undo_it(base, tmp_path):
    fork.materialize(base, base.fork, "0001", None, False)
    series = fork.read_series(base)
    text = (base.patches / series[1]).read_text()
    context = text.index("\n ", text.index("\n@@"))
    (tmp_path / "mine.patch").write_text(text[:context] + "\n NOT THE CONTEXT" + text[context + 2 :])
    stuck = subprocess.run(
        ["git", "-c", "user.name=Dev", "-c", "user.email=dev@example.com", "am", "-q", str(tmp_path / "mine.patch")],
        cwd=base.fork, capture_output=True,
    )
    assert stuck.returncode != 0
    with pytest.raises(ForkError, match=r"in the middle of a 'git am'; finish it \(git -C \S+ am --continue\) or undo it"):
        fork.materialize(base, base.fork, None, None, False)
    git(base.fork, "am", "--abort")
    assert f"0.2.1 + {len(series)} patches" in fork.materialize(base, base.fork, None, None, False)


def edit_patch(base, number):
    """A hand edit of a patch file: a new line in its commit message."""
    (patch,) = base.patches.glob(f"{number}-*.patch")
    patch.write_text(patch.read_text().replace("\n---\n", "\nEdited by hand.\n---\n", 1))
    return patch


def test_a_hand_edited_patch_is_brought_into_the_fork_not_overwritten(base):
    fork.materialize(base, base.fork, None, None, False)
    patch = edit_patch(base, "0003")
    edited = patch.read_text()
    with pytest.raises(ForkError, match=r"the series changed since the fork was made \(0003-.*run 'materialize'"):
        fork.export(base)
    assert patch.read_text() == edited
    assert "series changed: 0003-" in fork.materialize(base, base.fork, None, None, False)
    assert "Edited by hand." in git(base.fork, "log", "--format=%B")
    fork.export(base)
    assert patch.read_text() == edited


def test_when_fork_and_patches_both_changed_nothing_is_overwritten(base):
    fork.materialize(base, base.fork, None, None, False)
    (base.fork / "mine.txt").write_text("x\n")
    git(base.fork, "add", "mine.txt")
    git(base.fork, "-c", "user.name=Dev", "-c", "user.email=dev@example.com", "commit", "-qm", "mine")
    patch = edit_patch(base, "0002")
    edited = patch.read_text()
    with pytest.raises(ForkError, match=r"both .* and the series \(0002-.*\) changed.*--discard"):
        fork.materialize(base, base.fork, None, None, False)
    with pytest.raises(ForkError, match="the series changed since the fork was made"):
        fork.export(base)
    assert patch.read_text() == edited and commits(base.fork)[0] == "mine"


def test_upto_stops_after_the_named_patch_in_another_folder(base, tmp_path):
    dest = tmp_path / "compat"
    fork.materialize(base, dest, "0001", None, False)
    assert len(commits(dest)) == 2
    with pytest.raises(ForkError, match="matches no patch.*use one of: 0001-"):
        fork.materialize(base, dest, "0042", None, False)


def test_moving_between_upto_points_is_safe(base):
    fork.materialize(base, base.fork, "0001", None, False)
    fork.materialize(base, base.fork, None, None, False)
    assert len(commits(base.fork)) == len(fork.read_series(base)) + 1
    fork.materialize(base, base.fork, "0002", None, False)
    assert len(commits(base.fork)) == 3


def test_hash_mismatch_stops_before_unpacking(base, tmp_path):
    fake = tmp_path / "torchtitan-0.2.1.tar.gz"
    fake.write_bytes(b"not the release")
    with pytest.raises(ForkError, match="sha256 of .* expected 0b288bd9"):
        fork.materialize(base, base.fork, None, fake, False)
    assert not base.fork.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patches", "torchtitan-0.2.1.tar.gz"]


def corrupt(base, number):
    (patch,) = base.patches.glob(f"{number}-*.patch")
    text = patch.read_text()
    hunk = text.index("\n@@")
    context = text.index("\n ", hunk)  # the hunk's first context line
    patch.write_text(text[:context] + "\n CORRUPTED" + text[context + 2 :])
    return patch.name


def test_patch_that_does_not_apply_leaves_nothing_behind(base, tmp_path):
    name = corrupt(base, "0002")
    with pytest.raises(ForkError, match=rf"patch {name} does not apply at \S+\.py:\d+"):
        fork.materialize(base, base.fork, None, None, False)
    assert not base.fork.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patches"]


def test_failed_update_rolls_the_fork_back(base):
    fork.materialize(base, base.fork, "0001", None, False)
    head = git(base.fork, "rev-parse", "HEAD")
    corrupt(base, "0003")
    with pytest.raises(ForkError, match="does not apply"):
        fork.materialize(base, base.fork, None, None, False)
    assert git(base.fork, "rev-parse", "HEAD") == head
    assert git(base.fork, "status", "--porcelain") == ""


def test_refuses_to_overwrite_uncommitted_work(base):
    fork.materialize(base, base.fork, "0001", None, False)
    edited = base.fork / "torchtitan" / "models" / "attention.py"
    edited.write_text(edited.read_text() + "# my work\n")
    with pytest.raises(ForkError, match="uncommitted changes; commit them and run 'export', or run 'materialize --discard'"):
        fork.materialize(base, base.fork, None, None, False)
    with pytest.raises(ForkError, match="uncommitted changes"):
        fork.export(base)
    assert edited.read_text().endswith("# my work\n")


def test_refuses_commits_not_in_the_series(base):
    fork.materialize(base, base.fork, None, None, False)
    (base.fork / "mine.txt").write_text("x\n")
    git(base.fork, "add", "mine.txt")
    git(base.fork, "-c", "user.name=Dev", "-c", "user.email=dev@example.com", "commit", "-qm", "mine")
    with pytest.raises(ForkError, match="commits that are not in .*series; run 'export' to keep them, or run 'materialize --discard'"):
        fork.materialize(base, base.fork, None, None, False)
    assert commits(base.fork)[0] == "mine"


def test_refuses_a_folder_it_did_not_make(base):
    base.fork.mkdir()
    (base.fork / "notes.txt").write_text("mine\n")
    with pytest.raises(ForkError, match="not a fork made by this tool"):
        fork.materialize(base, base.fork, None, None, False)
    assert (base.fork / "notes.txt").read_text() == "mine\n"


def test_discard_keeps_a_backup_first(base, tmp_path):
    fork.materialize(base, base.fork, None, None, False)
    (base.fork / "wip.py").write_text("work in progress\n")
    fork.materialize(base, base.fork, None, None, True)
    (backup,) = tmp_path.glob("torchtitan.backup-*")
    assert (backup / "wip.py").read_text() == "work in progress\n"
    assert not (base.fork / "wip.py").exists()
    assert git(base.fork, "status", "--porcelain") == ""


def test_discard_with_a_patch_that_does_not_apply_keeps_the_fork(base, tmp_path):
    fork.materialize(base, base.fork, None, None, False)
    (base.fork / "wip.py").write_text("work in progress\n")
    corrupt(base, "0003")
    with pytest.raises(ForkError, match="does not apply"):
        fork.materialize(base, base.fork, None, None, True)
    assert (base.fork / "wip.py").read_text() == "work in progress\n"
    assert not list(tmp_path.glob("torchtitan.backup-*"))
    assert not list(tmp_path.glob(".torchtitan-*"))


def test_backups_of_one_second_get_their_own_names(base, tmp_path, monkeypatch):
    monkeypatch.setattr(fork.time, "strftime", lambda _: "20260101-000000")
    fork.materialize(base, base.fork, "0001", None, False)
    for _ in range(2):
        fork.materialize(base, base.fork, "0001", None, True)
    assert sorted(p.name for p in tmp_path.glob("torchtitan.backup-*")) == [
        "torchtitan.backup-20260101-000000",
        "torchtitan.backup-20260101-000000-1",
    ]


def test_backups_are_git_ignored():
    ignored = subprocess.run(
        ["git", "check-ignore", "torchtitan.backup-20260101-000000/README.md"], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode == 0


def test_a_stale_baseline_is_rebuilt_but_never_edits(base):
    fork.materialize_release_path(base, None)
    first = base.patches / fork.read_series(base)[0]
    first.write_text(first.read_text().replace("Subject: [PATCH] [attention] Run", "Subject: [PATCH] [attention] Now run"))
    fork.materialize_release_path(base, None)
    assert commits(base.release_path)[0].startswith("[attention] Now run varlen_attn")

    (base.release_path / "README.md").write_text("my notes")
    with pytest.raises(ForkError, match="uncommitted changes"):
        fork.materialize_release_path(base, None)
    assert (base.release_path / "README.md").read_text() == "my notes"


def test_check_applies_the_series_to_a_pristine_release(base):
    assert fork.check(base, None).startswith(f"ok: the series ({len(fork.read_series(base))} patches) applies cleanly")
    corrupt(base, "0004")
    with pytest.raises(ForkError, match="0004-.* does not apply"):
        fork.check(base, None)


def test_cli_prints_one_line_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gqa_fork.py"), "materialize", "--upto", "nope", "--dest", str(tmp_path / "x")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --upto 'nope' matches no patch")


def test_bundled_data_is_what_the_generator_writes(base, tmp_path):
    data.make_data(tmp_path / "data")
    for path in (ROOT / "data").rglob("*"):
        if path.is_file():
            assert (tmp_path / "data" / path.relative_to(ROOT / "data")).read_bytes() == path.read_bytes(), path


def test_torchtitan_from_the_repository_root_is_the_fork():
    """The configs' commands run from the root, where Python finds the checkout
    folder ./torchtitan first; the fork's package must win, in pytest too."""
    code = "import torchtitan; print(torchtitan.__version__, torchtitan.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True).stdout
    package = BASES[DEFAULT].fork / "torchtitan" / "__init__.py"
    assert out.split() == ["0.2.1", str(package)]
    import torchtitan

    assert torchtitan.__file__ == str(package)


def test_bad_sdist_is_refused_even_when_the_fork_is_up_to_date(base, tmp_path):
    fork.materialize(base, base.fork, None, None, False)
    fake = tmp_path / "torchtitan-0.2.1.tar.gz"
    fake.write_bytes(b"not the release")
    with pytest.raises(ForkError, match="sha256 of .* expected"):
        fork.materialize(base, base.fork, None, fake, False)
    with pytest.raises(ForkError, match=r"is a folder; pass the path of the file torchtitan-0.2.1.tar.gz"):
        fork.materialize(base, base.fork, None, tmp_path, False)


def test_export_without_a_fork_says_to_materialize(base):
    with pytest.raises(ForkError, match=r"there is no fork at .*; run 'materialize' first"):
        fork.export(base)


def test_a_folder_that_is_not_a_fork_gets_advice_that_exists(base):
    base.fork.mkdir()
    with pytest.raises(ForkError, match="run 'materialize --discard'"):
        fork.export(base)


def test_unpacking_works_without_tarfiles_data_filter(base, tmp_path, monkeypatch):
    """Python before 3.10.12 / 3.11.4 has no data filter; the sdist is verified anyway."""
    extractall = release.tarfile.TarFile.extractall

    def without_filter(self, path, members=None, **kwargs):
        assert "filter" not in kwargs, "extractall() got an unexpected keyword argument 'filter'"
        return extractall(self, path, members)

    monkeypatch.delattr(release.tarfile, "data_filter")
    monkeypatch.setattr(release.tarfile.TarFile, "extractall", without_filter)
    release.unpack(base, release.verified_sdist(base, None), tmp_path / "release")
    assert (tmp_path / "release" / "torchtitan" / "models" / "attention.py").is_file()


@pytest.mark.parametrize("argv", [["test", "-k", "varlen", "-x"], ["test", "--", "-k", "varlen", "-x"]])
def test_test_passes_other_arguments_to_pytest(cli, argv):
    assert cli.parse_args(argv).pytest_args == ["-k", "varlen", "-x"]


def test_torch_spec_is_split_as_a_shell_would(base, monkeypatch):
    calls = []
    torch_versions = iter([None, "2.13.0+cpu"])

    def installed_versions(base, names):
        return {name: next(torch_versions) if name == "torch" else "1.0" for name in names}

    base = replace(base, torch="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    monkeypatch.setattr(install, "installed_versions", installed_versions)
    monkeypatch.setattr(install, "pip", lambda base, *args: calls.append(args))
    monkeypatch.setattr(install, "fork_imports_from_root", lambda base: True)
    base.fork.mkdir()
    install.install(base)
    assert calls == [("install", "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu")]


# ---- each base's environment: installing one never changes another's


def probe_wheel(folder, version):
    """A wheel of the package gqa-probe at `version`, made here: pip installs
    it from `folder` without any index."""
    folder.mkdir(exist_ok=True)
    info = f"gqa_probe-{version}.dist-info"
    files = {
        "gqa_probe/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: gqa-probe\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"gqa_probe-{version}-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def probe_base(tmp_path, name, version):
    """A base that is not installed into its environment, whose release
    depends on gqa-probe==`version`."""
    fork_folder = tmp_path / name / "fork"
    fork_folder.mkdir(parents=True)
    (fork_folder / "pyproject.toml").write_text(f'[project]\ndependencies = ["torch", "gqa-probe=={version}"]\n')
    return replace(
        BASES[DEFAULT], version=name, fork=fork_folder, venv=tmp_path / name / "venv", installed=False,
        release_path=None,
    )


def probe_version(base):
    return install.installed_versions(base, ["gqa-probe"])["gqa-probe"]


@pytest.fixture
def offline_pip(tmp_path, monkeypatch):
    """pip that reaches no index: only the wheels in the folder it returns."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def test_installing_one_base_never_changes_anothers_environment(tmp_path, offline_pip, monkeypatch):
    for version in ("1.0", "2.0"):
        probe_wheel(offline_pip, version)
    first, second = probe_base(tmp_path, "first", "1.0"), probe_base(tmp_path, "second", "2.0")
    install.install(first)
    install.install(second)
    assert (probe_version(first), probe_version(second)) == ("1.0", "2.0")
    assert importlib.util.find_spec("gqa_probe") is None, "the Python that runs the tool changed"
    # a suitable torch of the Python that runs the tool is used, not installed again
    assert not list((first.venv / "lib").glob("python*/site-packages/torch"))

    def no_pip(base, *args):
        raise AssertionError(f"pip {args} for {base.venv}, where nothing is missing")

    monkeypatch.setattr(install, "pip", no_pip)
    assert "had all it needs" in install.install(first)
    assert "had all it needs" in install.install(second)


def test_a_base_whose_torch_cannot_be_installed_says_why(tmp_path, offline_pip):
    base = replace(probe_base(tmp_path, "newer", "1.0"), min_torch=(99, 0), torch="torch==99.0")
    with pytest.raises(ForkError, match=r"needs torch >= 99.0, and pip could not install 'torch==99.0' into \S+newer/venv"):
        install.install_torch(base)


def test_an_unreachable_torch_index_names_the_fallback(tmp_path, offline_pip):
    base = replace(
        probe_base(tmp_path, "cpu", "1.0"), min_torch=(99, 0),
        torch=f"torch==99.0 --index-url {(tmp_path / 'no-index').as_uri()}",
    )
    with pytest.raises(ForkError) as error:
        install.install_torch(base)
    assert "cannot be reached, unset GQA_FORK_TORCH to install PyPI's torch==2.13.0" in str(error.value)
    assert "\n" not in str(error.value)


def test_requirements_are_met_by_installed_versions_alone():
    versions = {"datasets": "4.7.0", "torch": "2.14.1+cu130", "spmd-types": "0.2.3", "fla-core": None}
    assert install.unmet(["datasets>=3.6.0,<4.8.0", "torch>=2.14", "spmd-types==0.2.*", "einops"], versions) == ["einops"]
    assert install.unmet(["datasets>=3.6.0,<4.7.0", "torch~=2.13.0", "fla-core==0.6.0"], versions) == [
        "datasets>=3.6.0,<4.7.0", "torch~=2.13.0", "fla-core==0.6.0"
    ]


def test_processes_of_a_base_run_in_its_environment(base, tmp_path):
    """pytest, train_steps.py and the Trainer run with the base's Python, not
    the one that runs the tool."""
    calls = tmp_path / "calls"
    base.python.parent.mkdir(parents=True)
    base.python.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho \'{{"losses": [1.0]}}\'\n')
    base.python.chmod(0o755)
    base.fork.mkdir()
    assert suites.pytest(base, tmp_path, ["-k", "nothing"]) == 0
    assert runs.step_losses(base, base.fork, "--steps=1") == [1.0]
    runs.run_trainer(base, base.fork, tmp_path / "config.toml", tmp_path / "dump", [])
    lines = calls.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["-m", "pytest"], [str(ROOT / "scripts" / "train_steps.py"), "--steps=1"], ["-m", "torch.distributed.run"]
    ]


def test_a_failed_trainer_run_names_its_error(base, tmp_path):
    base.python.parent.mkdir(parents=True)
    base.python.write_text("#!/bin/sh\necho 'Traceback (most recent call last):'\necho 'ValueError: varlen needs bf16'\nexit 1\n")
    base.python.chmod(0o755)
    with pytest.raises(ForkError, match=r"the Trainer failed with config.toml --x \(ValueError: varlen needs bf16\); see "):
        runs.run_trainer(base, tmp_path, tmp_path / "config.toml", tmp_path / "dump", ["--x"])


def upstream_checkout(base, tmp_path, touched_edit=None):
    """A torchtitan git history like upstream's: an older commit, then the
    release's files tagged v0.2.1."""
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    identity = ["-c", "user.name=Upstream", "-c", "user.email=upstream@example.com"]
    git(upstream, "init", "-q", "-b", "main")
    (upstream / "README.md").write_text("an older torchtitan\n")
    git(upstream, "add", "-A")
    git(upstream, *identity, "commit", "-qm", "an older commit")
    release.unpack(base, release.verified_sdist(base, None), upstream)
    if touched_edit:
        path = upstream / touched_edit
        path.write_text(path.read_text() + "# upstream differs\n")
    git(upstream, "add", "-A")
    git(upstream, *identity, "commit", "-qm", "Release 0.2.1")
    git(upstream, "tag", "v0.2.1")
    return upstream


def series_author(base):
    """'Name <email>' of the series' patches, as their From: header says."""
    first = base.patches / fork.read_series(base)[0]
    return email.utils.formataddr(email.utils.parseaddr(email.message_from_string(first.read_text())["From"]))


def patch_files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_upstream_checkout_gives_a_branch_of_upstreams_history(base, tmp_path):
    upstream = upstream_checkout(base, tmp_path)
    fork.materialize(base, base.fork, None, None, False, upstream, series_author(base))
    assert git(base.fork, "rev-parse", "v0.2.1") == git(upstream, "rev-parse", "v0.2.1")
    assert commits(base.fork)[-1] == "an older commit"
    assert git(base.fork, "rev-parse", "--abbrev-ref", "HEAD").strip() == "gqa"
    before = patch_files(base.patches)
    fork.export(base)
    assert patch_files(base.patches) == before


def upstream_with_tests(base, tmp_path):
    """An upstream checkout whose release commit also has a test file that
    the sdist lacks, and the series' last patch editing it beside the series;
    the edited file's text."""
    upstream = upstream_checkout(base, tmp_path)
    test_file = upstream / "tests" / "unit_tests" / "test_upstream.py"
    test_file.parent.mkdir(parents=True)
    test_file.write_text("# exercises torchtitan.models\ndef test_release():\n    assert True\n")
    git(upstream, "add", "-A")
    git(upstream, "-c", "user.name=Upstream", "-c", "user.email=u@example.com", "commit", "-qm", "Release 0.2.1")
    git(upstream, "tag", "-f", "v0.2.1")
    edited = test_file.read_text().replace("test_release", "test_series")
    scratch = tmp_path / "edits"
    subprocess.run(["git", "clone", "-q", str(upstream), str(scratch)], check=True)
    (scratch / "tests" / "unit_tests" / "test_upstream.py").write_text(edited)
    git(scratch, "-c", "user.name=S", "-c", "user.email=s@example.com", "commit", "-qam", "edit upstream's test")
    edits = base.patches / fork.UPSTREAM_EDITS / fork.read_series(base)[-1]
    edits.parent.mkdir()
    edits.write_text(git(scratch, "format-patch", "--stdout", "-1", "HEAD"))
    return upstream, edited


def test_upstream_branch_commits_carry_the_contributor_and_the_edits_to_upstreams_tests(base, tmp_path):
    upstream, edited = upstream_with_tests(base, tmp_path)
    fork.materialize(base, base.fork, None, None, False, upstream, "Ada Lovelace <ada@example.com>")
    series = fork.read_series(base)
    identities = git(base.fork, "log", "--format=%an <%ae> | %cn <%ce>", f"v0.2.1..HEAD").splitlines()
    assert identities == ["Ada Lovelace <ada@example.com> | Ada Lovelace <ada@example.com>"] * len(series)
    touching = git(base.fork, "log", "--format=%s", "v0.2.1..HEAD", "--", "tests/unit_tests/test_upstream.py")
    assert touching.splitlines() == [commits(base.fork)[0]]
    assert (base.fork / "tests" / "unit_tests" / "test_upstream.py").read_text() == edited


def test_export_from_an_upstream_branch_writes_its_edits_to_upstreams_tests_beside_the_series(base, tmp_path):
    upstream, _ = upstream_with_tests(base, tmp_path)
    fork.materialize(base, base.fork, None, None, False, upstream, series_author(base))
    patches = {name: text for name, text in patch_files(base.patches).items() if name.parent == Path(".")}
    fork.export(base)
    exported = patch_files(base.patches)
    assert {name: text for name, text in exported.items() if name.parent == Path(".")} == patches
    edits = exported[Path(fork.UPSTREAM_EDITS) / fork.read_series(base)[-1]].decode()
    assert "+def test_series():" in edits and "torchtitan/" not in edits
    # a fork on the sdist has no such edits to write, and keeps them
    fork.materialize(base, base.fork, None, None, True)
    fork.export(base)
    assert patch_files(base.patches) == exported
    assert fork.check(base, None).startswith("ok")


def test_an_update_of_an_upstream_branch_keeps_its_contributor_and_the_edits_to_upstreams_tests(base, tmp_path):
    upstream, edited = upstream_with_tests(base, tmp_path)
    fork.materialize(base, base.fork, None, None, False, upstream, "Ada Lovelace <ada@example.com>")
    series = fork.read_series(base)
    edit_patch(base, series[-1][:4])
    assert f"series changed: {series[-1]}" in fork.materialize(base, base.fork, None, None, False)
    identities = git(base.fork, "log", "--format=%an <%ae> | %cn <%ce>", "v0.2.1..HEAD").splitlines()
    assert identities == ["Ada Lovelace <ada@example.com> | Ada Lovelace <ada@example.com>"] * len(series)
    assert (base.fork / "tests" / "unit_tests" / "test_upstream.py").read_text() == edited
    fork.export(base)
    assert "+def test_series():" in (base.patches / fork.UPSTREAM_EDITS / series[-1]).read_text()


def test_a_hand_edit_to_the_edits_of_upstreams_tests_is_brought_into_the_fork_not_overwritten(base, tmp_path):
    upstream, _ = upstream_with_tests(base, tmp_path)
    fork.materialize(base, base.fork, None, None, False, upstream, series_author(base))
    series = fork.read_series(base)
    edits = base.patches / fork.UPSTREAM_EDITS / series[-1]
    edits.write_text(edits.read_text().replace("test_series", "test_by_hand"))
    with pytest.raises(ForkError, match=rf"the series changed since the fork was made \({series[-1]}\)"):
        fork.export(base)
    assert f"series changed: {series[-1]}" in fork.materialize(base, base.fork, None, None, False)
    assert "def test_by_hand" in (base.fork / "tests" / "unit_tests" / "test_upstream.py").read_text()
    fork.export(base)
    assert "+def test_by_hand" in edits.read_text()


def test_upstream_branch_without_an_identity_is_refused(base, tmp_path, monkeypatch):
    upstream = upstream_checkout(base, tmp_path)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    with pytest.raises(ForkError, match="set git config user.name and user.email, or pass --author"):
        fork.materialize(base, base.fork, None, None, False, upstream)
    with pytest.raises(ForkError, match="--author 'Ada' is not of the form 'Name <email>'"):
        fork.materialize(base, base.fork, None, None, False, upstream, "Ada")
    assert not base.fork.exists()


def test_edits_to_upstreams_tests_for_a_patch_not_in_series_are_refused(base, tmp_path):
    folder = base.patches / fork.UPSTREAM_EDITS
    folder.mkdir()
    (folder / "0099-gone.patch").write_text("From 0 Mon Sep 17 00:00:00 2001\n")
    with pytest.raises(ForkError, match="edits to upstream's tests for patches not in series: 0099-gone.patch"):
        fork.check(base, None)


def test_upstreams_tests_run_edited_on_the_fork(base, tmp_path):
    upstream, _ = upstream_with_tests(base, tmp_path)
    base = replace(base, venv=BASES[DEFAULT].venv)
    base.fork.mkdir()
    module = "tests.unit_tests.test_upstream"
    changes = base.patches / "upstream-test-changes"
    assert sorted(suites.compare_upstream_tests(base, upstream, None)) == [
        f"{module}::test_release (passed -> None) is not in upstream-test-changes",
        f"{module}::test_series (None -> passed) is not in upstream-test-changes",
    ]
    changes.write_text(f"{module}::test_release | renamed\n{module}::test_series | renamed\n")
    assert suites.compare_upstream_tests(base, upstream, None) == []


def test_upstream_that_differs_in_a_touched_file_is_refused(base, tmp_path):
    upstream = upstream_checkout(base, tmp_path, touched_edit="torchtitan/models/attention.py")
    with pytest.raises(ForkError, match="differs from the PyPI release in torchtitan/models/attention.py"):
        fork.materialize(base, base.fork, None, None, False, upstream)
    assert not base.fork.exists()


# ---- misuse: each of these once ended in a traceback, a wrong fork or false advice


def cli_run(*args, script=ROOT / "scripts" / "gqa_fork.py", **kwargs):
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, **kwargs)


def test_a_failed_update_of_the_whole_fork_leaves_it_as_it_was(base):
    fork.materialize(base, base.fork, None, None, False)
    head = git(base.fork, "rev-parse", "HEAD")
    last = fork.read_series(base)[-1].split("-", 1)[0]
    corrupt(base, last)
    with pytest.raises(ForkError, match="does not apply.*the fork was left as it was"):
        fork.materialize(base, base.fork, None, None, False)
    assert git(base.fork, "rev-parse", "HEAD") == head
    assert git(base.fork, "status", "--porcelain") == ""


def edit_code(base, number, line):
    """A hand edit of a patch's code: a comment added to one of its added lines."""
    (patch,) = base.patches.glob(f"{number}-*.patch")
    lines = patch.read_text().split("\n")
    lines[lines.index(line)] += "  # edited by hand"
    patch.write_text("\n".join(lines))
    return patch


def test_a_hand_edit_to_a_patchs_code_sticks(base):
    fork.materialize(base, base.fork, None, None, False)
    # a later patch changes the same file: its index line changes too
    patch = edit_code(base, "0003", "+def check_head_counts(n_heads: int, n_kv_heads: int) -> None:")
    assert "series changed: 0003-" in fork.materialize(base, base.fork, None, None, False)
    third = git(base.fork, "rev-list", "--reverse", f"{base.tag}..HEAD").split()[2]
    assert "# edited by hand" in git(base.fork, "show", third)
    assert "up to date" in fork.materialize(base, base.fork, None, None, False)
    fork.materialize_release_path(base, None)
    fork.export(base)
    assert "# edited by hand" in patch.read_text()
    assert fork.check(base, None).startswith("ok:")
    assert "up to date" in fork.materialize(base, base.fork, None, None, False)


def test_a_destination_that_is_or_holds_the_repository_is_refused(base, tmp_path, monkeypatch):
    # a stand-in repository: a tool that failed this test would move it away
    repository = tmp_path / "repo"
    (repository / "patches").mkdir(parents=True)
    monkeypatch.setattr(fork, "ROOT", repository)
    for dest, what in ((repository, "is this repository"), (tmp_path, "is this repository or holds it")):
        with pytest.raises(ForkError, match=f"--dest {dest} {what}; pass a folder of the fork's own"):
            fork.materialize(base, dest, None, None, True)
    assert (repository / "patches").is_dir() and not list(tmp_path.glob("*.backup-*"))


@pytest.mark.parametrize("discard", [False, True])
@pytest.mark.parametrize("inside", ["scripts/gqa", "patches/0.2.1", "docs/new-folder", "torchtitan-0.3.0"])
def test_a_destination_anywhere_inside_the_repository_is_refused(stand_in_repository, inside, discard):
    before = subprocess.run(["git", "ls-files", "-s"], cwd=stand_in_repository, capture_output=True, text=True).stdout
    proc = cli_run("materialize", "--dest", str(stand_in_repository / inside), *["--discard"] * discard,
                   script=stand_in_repository / "scripts" / "gqa_fork.py")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert f"--dest {stand_in_repository / inside} is inside this repository" in proc.stderr
    assert git(stand_in_repository, "status", "--porcelain") == ""
    assert git(stand_in_repository, "ls-files", "-s") == before


def test_a_destination_under_a_file_is_refused(base, tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    with pytest.raises(ForkError, match=r"lies under .*notes.txt, which is a file"):
        fork.materialize(base, tmp_path / "notes.txt" / "fork", None, None, False)
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("kind", ["missing", "plain folder"])
def test_upstream_that_is_no_git_clone_is_refused(base, tmp_path, kind):
    upstream = tmp_path / "upstream"
    if kind == "plain folder":
        upstream.mkdir()
    what = "is not a folder" if kind == "missing" else "is not a git repository; clone upstream there"
    with pytest.raises(ForkError, match=f"--upstream {upstream} {what}"):
        fork.materialize(base, base.fork, None, None, False, upstream)
    assert not base.fork.exists()


def test_upstream_clone_on_a_branch_named_gqa_works(base, tmp_path):
    upstream = upstream_checkout(base, tmp_path)
    git(upstream, "checkout", "-q", "-b", "gqa")
    fork.materialize(base, base.fork, None, None, False, upstream, "Ada Lovelace <ada@example.com>")
    assert git(base.fork, "rev-parse", "--abbrev-ref", "HEAD").strip() == "gqa"
    assert git(base.fork, "rev-parse", "v0.2.1") == git(upstream, "rev-parse", "v0.2.1")


def test_export_refuses_to_empty_the_series(base):
    fork.materialize(base, base.fork, None, None, False)
    git(base.fork, "reset", "-q", "--hard", "v0.2.1")
    series = fork.read_series(base)
    with pytest.raises(ForkError, match="no commits since v0.2.1, so export would empty the series"):
        fork.export(base, drop_missing=True)
    assert fork.read_series(base) == series


def test_an_empty_series_gives_a_release_path_error_that_says_what_to_do(base):
    base.series.write_text("")
    with pytest.raises(ForkError, match="has no patch 0001, which the tests' 0.2.1 path is made from; restore the series"):
        fork.materialize_release_path(base, None)


def test_counts_read_as_english(base, tmp_path):
    assert fork.materialize(base, tmp_path / "one", "0001", None, False).endswith("0.2.1 + 1 patch")


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--steps", "0"], "argument --steps: must be a whole number of 1 or more"),
        (["setup", "--steps", "-2"], "argument --steps: must be a whole number of 1 or more"),
    ],
)
def test_bad_arguments_end_in_one_line_that_says_what_to_do(args, message):
    proc = cli_run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--n-kv-heads", "0"], "argument --n-kv-heads: must be a whole number of 1 or more"),
        (["--n-heads", "16", "--n-kv-heads", "3"], "--n-heads 16 must be a multiple of --n-kv-heads 3"),
        (["--attn-type", "varlen"], "--attn-type varlen needs a CUDA device"),
        (["--seq-len", "100000000"], "--seq-len 100000000 with --batch-size 2 needs at least 3063.7 GiB"),
        (["--seq-len", "300000", "--batch-size", "1"], "the single_doc corpus holds 1 batches of --batch-size 1 x --seq-len 300000, fewer than --steps 5"),
    ],
)
def test_train_steps_refuses_bad_arguments_in_one_line(args, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_steps.py"), *args],
        capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]


def test_every_command_says_what_it_does(cli):
    commands = ["materialize", "export", "check", "install", "data", "train", "setup", "test"]
    helps = {command: cli_run(command, "--help").stdout for command in commands}
    for command, text in helps.items():
        description = text.split("\n\n")[1]
        assert not description.startswith(("options:", "positional")), f"{command} --help has no description"
    assert "training steps per backend (default 10)" in helps["train"]
    for command in ("install", "setup", "test"):
        assert "GQA_FORK_TORCH" in helps[command], command
    assert "CPU: sdpa trained directly, flex forward only, varlen skipped" in " ".join(helps["train"].split())


# ---- a second base: the same commands, its own series, fork and upstream refs


def test_a_second_base_materializes_exports_and_checks_on_its_own(other_base):
    default = BASES[DEFAULT]
    assert (other_base.fork.name, other_base.patches.name) != (default.fork.name, default.patches.name)
    fork.materialize(other_base, other_base.fork, None, None, False)
    series = fork.read_series(other_base)
    assert len(commits(other_base.fork)) == len(series) + 1
    assert commits(other_base.fork)[-1] == f"torchtitan {other_base.version} release from PyPI"
    before = patch_files(other_base.patches)
    fork.export(other_base)
    assert patch_files(other_base.patches) == before
    assert fork.check(other_base, None).startswith(f"ok: the series ({len(series)} patch")


def test_an_upstream_release_branch_stands_in_for_a_missing_tag(other_base, tmp_path):
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    identity = ["-c", "user.name=Upstream", "-c", "user.email=upstream@example.com"]
    git(upstream, "init", "-q", "-b", "main")
    release.unpack(other_base, release.verified_sdist(other_base, None), upstream)
    git(upstream, "add", "-A")
    git(upstream, *identity, "commit", "-qm", "Release branch head")
    branch = next(ref for ref in other_base.upstream_refs if not ref.startswith(("v", "origin/")))
    git(upstream, "branch", branch)
    # this stand-in has none of upstream's tests for the series' edits to them
    shutil.rmtree(other_base.patches / fork.UPSTREAM_EDITS)
    fork.materialize(other_base, other_base.fork, None, None, False, upstream, "Ada Lovelace <ada@example.com>")
    assert git(other_base.fork, "rev-parse", f"{other_base.tag}^{{commit}}") == git(upstream, "rev-parse", branch)
    assert commits(other_base.fork)[-1] == "Release branch head"


def test_train_and_setup_take_only_a_base_installed_into_python(other_base):
    for command in ("train", "setup"):
        proc = cli_run(command, "--base", other_base.version)
        assert proc.returncode == 2
        assert f"invalid choice: '{other_base.version}'" in proc.stderr.strip().splitlines()[-1]


def test_a_later_base_whose_torch_is_missing_is_skipped_only_where_pip_is_kept_offline(base, tmp_path, monkeypatch):
    later = replace(base, version="9.9")

    def install_torch(b):
        if b is later:
            raise ForkError("pip could not install 'torch==2.14.1'")
        return "2.13.0"

    monkeypatch.setattr(suites, "install_torch", install_torch)
    for name in ("materialize", "materialize_release_path", "install"):
        monkeypatch.setattr(suites, name, lambda *args: "done")
    monkeypatch.setattr(suites, "git", lambda *args: "HEAD")
    monkeypatch.setattr(suites, "fork_report", lambda *args: tmp_path / "report.xml")
    monkeypatch.setattr(suites, "pytest", lambda *args: 0)
    monkeypatch.setattr(suites, "each_commit_passes_its_tests", lambda *args: ([], "ok"))
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    with pytest.raises(ForkError, match="pip could not install 'torch==2.14.1'"):
        suites.run_tests([base, later], None, [])
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert suites.run_tests([base, later], None, []) == (
        f"tests passed for torchtitan {base.version} "
        f"(skipped {later.version}: its torch could not be installed offline, see above)"
    )


def test_test_takes_sdist_and_upstream_only_with_a_base():
    proc = cli_run("test", "--upstream", "/nowhere")
    assert proc.returncode == 2
    assert "pass --base too" in proc.stderr.strip().splitlines()[-1]


# ---- Ctrl-C: the fork and the series are left whole, and the next run finishes


def interrupt_at_call(monkeypatch, owner, name, number):
    """Ctrl-C (SIGINT to this process) just before the `number`th call of owner.name."""
    original = getattr(owner, name)
    calls = itertools.count(1)

    def interrupting(*args, **kwargs):
        if next(calls) == number:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupting)


def test_ctrl_c_at_any_moment_of_an_update_leaves_the_fork_whole_and_resumable(base, monkeypatch):
    series = fork.read_series(base)
    patches = {p.name: p.read_bytes() for p in base.patches.iterdir()}
    fork.materialize(base, base.fork, series[-2], None, False)
    before = git(base.fork, "rev-parse", "HEAD")
    for number in itertools.count(1):
        with monkeypatch.context() as patched:
            interrupt_at_call(patched, subprocess, "run", number)
            try:
                fork.materialize(base, base.fork, None, None, False)
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
        assert git(base.fork, "status", "--porcelain") == "", f"Ctrl-C at call {number}"
        assert len(commits(base.fork)) in (len(series), len(series) + 1), f"Ctrl-C at call {number}"
        assert f"0.2.1 + {len(series)} patches" in fork.materialize(base, base.fork, None, None, False), number
        assert {p.name: p.read_bytes() for p in base.patches.iterdir()} == patches
        if not interrupted:
            break
        fork.materialize(base, base.fork, series[-2], None, False)
        assert git(base.fork, "rev-parse", "HEAD") == before
    assert number > 5, "the update made fewer calls than expected; were they all interrupted?"


def test_a_change_made_to_the_fork_during_an_update_stops_it_and_is_kept(base, monkeypatch):
    series = fork.read_series(base)
    fork.materialize(base, base.fork, series[-2], None, False)
    before = git(base.fork, "rev-parse", "HEAD")
    touched = re.search(r"^diff --git a/(\S+)", (base.patches / series[-1]).read_text(), re.M).group(1)
    update = fork.updated_commit

    def edited_meanwhile(*args):
        head = update(*args)
        (base.fork / touched).write_text("my edit\n")
        return head

    monkeypatch.setattr(fork, "updated_commit", edited_meanwhile)
    with pytest.raises(ForkError, match="changed during the update, which was stopped so as not to lose them"):
        fork.materialize(base, base.fork, None, None, False)
    assert (base.fork / touched).read_text() == "my edit\n"
    assert git(base.fork, "rev-parse", "HEAD") == before


def test_ctrl_c_during_export_writes_the_series_whole(base, monkeypatch):
    fork.materialize(base, base.fork, None, None, False)
    (base.fork / "NOTE.md").write_text("a change\n")
    git(base.fork, "add", "NOTE.md")
    git(base.fork, "-c", "user.name=Dev", "-c", "user.email=dev@example.com", "commit", "-qm", "[docs] Add a note")
    last = len(fork.read_series(base)) + 1
    # Ctrl-C as the new patch file is moved into the series
    interrupt_at_call(monkeypatch, Path, "replace", last)
    with pytest.raises(KeyboardInterrupt):
        fork.export(base)
    monkeypatch.undo()
    assert fork.read_series(base)[-1].endswith("-docs-Add-a-note.patch")
    assert "up to date" in fork.materialize(base, base.fork, None, None, False)


def test_ctrl_c_in_the_cli_prints_one_line_and_the_next_run_finishes(stand_in_repository):
    cli = [sys.executable, str(stand_in_repository / "scripts" / "gqa_fork.py"), "materialize"]
    the_fork = stand_in_repository / "torchtitan"
    subprocess.run([*cli, "--upto", "0001"], check=True, capture_output=True)
    before = git(the_fork, "rev-parse", "HEAD")
    # in a process group of its own, as a shell runs a command in the foreground
    proc = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # Ctrl-C while the update applies the patches: the terminal signals the whole group, git too
    while proc.poll() is None and not list((the_fork / ".git" / "worktrees").glob("*")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate()
    assert proc.returncode == 130, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("interrupted: "), stderr
    assert git(the_fork, "rev-parse", "HEAD") == before and git(the_fork, "status", "--porcelain") == ""
    finished = subprocess.run(cli, capture_output=True, text=True)
    series = (stand_in_repository / "patches" / "0.2.1" / "series").read_text().split()
    assert finished.stdout.strip().endswith(f"0.2.1 + {len(series)} patches"), finished.stderr
    assert git(stand_in_repository, "status", "--porcelain") == ""


# ---- a damaged patch file is named as such, with the way back


DAMAGES = {
    "is empty": lambda text: "",
    "is truncated: it ends inside a hunk": lambda text: text[: text.index("\n@@") + len(text) // 3],
    "is not a patch (it has no mail header or no diff)": lambda text: "<html>Page not found</html>\n",
}


@pytest.mark.parametrize("problem", DAMAGES)
def test_a_damaged_patch_is_named_with_the_way_back_and_no_loop(stand_in_repository, problem):
    script = stand_in_repository / "scripts" / "gqa_fork.py"
    assert cli_run("materialize", script=script).returncode == 0
    (patch,) = (stand_in_repository / "patches" / "0.2.1").glob("0003-*.patch")
    patch.write_text(DAMAGES[problem](patch.read_text()))
    way_back = f"restore it with 'git checkout -- {patch}'"
    for command in ("materialize", "export"):
        proc = cli_run(command, script=script)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"{patch} {problem}; {way_back}" in proc.stderr, proc.stderr
    subprocess.run(["git", "checkout", "--", str(patch)], cwd=stand_in_repository, check=True)
    assert "up to date" in cli_run("materialize", script=script).stdout


def test_a_patch_that_does_not_apply_names_the_way_back_not_export(base):
    name = corrupt(base, "0002")
    with pytest.raises(ForkError) as error:
        fork.materialize(base, base.fork, None, None, False)
    assert f"Mend the patch file, or restore it with 'git checkout -- {base.patches / name}'" in str(error.value)
    assert "export" not in str(error.value)


# ---- prerequisites are checked first, and end in one line that says what to run


@pytest.fixture
def bare_python(tmp_path):
    """The Python of a fresh virtual environment: no torch, no tokenizers."""
    venv.EnvBuilder(with_pip=False).create(tmp_path / "bare")
    return tmp_path / "bare" / "bin" / "python"


@pytest.mark.parametrize(
    "command,message",
    [
        ("train", "is not installed in {venv}, so training would not run it; run 'python3 scripts/gqa_fork.py setup'"),
        ("data", "'data' trains the tokenizer with the tokenizers package, which {venv} lacks; run 'python3 scripts/gqa_fork.py install' first"),
        ("check", "'check' runs each commit's tests in {venv}, but {venv} is not made; run 'python3 scripts/gqa_fork.py install --base 0.2.1' first"),
        ("install", "{fork} does not exist; run 'materialize' first"),
    ],
)
def test_a_command_without_its_prerequisites_says_what_to_run(stand_in_repository, bare_python, command, message):
    proc = subprocess.run(
        [bare_python, stand_in_repository / "scripts" / "gqa_fork.py", command], capture_output=True, text=True
    )
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    where = {"venv": stand_in_repository / "build" / "venv-0.2.1", "fork": stand_in_repository / "torchtitan"}
    assert message.format(**where) in proc.stderr


def test_train_refuses_another_checkouts_fork(stand_in_repository):
    """This checkout's environment sees a Python where another checkout's fork
    is installed (the one these tests run in): train must not train that one."""
    script = stand_in_repository / "scripts" / "gqa_fork.py"
    stand_in = replace(
        BASES[DEFAULT], fork=stand_in_repository / "torchtitan", venv=stand_in_repository / "build" / "venv-0.2.1"
    )
    install.make_environment(stand_in)
    for materialized in (False, True):
        if materialized:
            assert cli_run("materialize", script=script).returncode == 0
        proc = cli_run("train", "--steps", "1", script=script)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"this checkout's fork {stand_in.fork} is not installed in {stand_in.venv}" in proc.stderr


def test_a_bad_sdist_is_never_advised_deleted(stand_in_repository, tmp_path):
    script = stand_in_repository / "scripts" / "gqa_fork.py"
    mine = tmp_path / "torchtitan-0.2.1.tar.gz"
    mine.write_bytes(b"my own file")
    proc = cli_run("materialize", "--sdist", str(mine), script=script)
    assert "so it is not the release; pass PyPI's torchtitan-0.2.1.tar.gz, or omit --sdist to download it" in proc.stderr
    cache = stand_in_repository / "build" / "torchtitan-0.2.1.tar.gz"
    cache.unlink()
    cache.write_bytes(b"a broken download")
    proc = cli_run("materialize", script=script)
    assert "so it is not the release; move it away and run again to download torchtitan-0.2.1.tar.gz" in proc.stderr
    for message in (proc.stderr, cli_run("materialize", "--sdist", str(mine), script=script).stderr):
        assert message.count("\n") == 1 and "delete" not in message
    assert mine.read_bytes() == b"my own file" and cache.read_bytes() == b"a broken download"


# ---- the README's "Nothing is lost" list: each line, by its opening words, and the tests that hold it

NOTHING_IS_LOST = {
    "`materialize` refuses a fork with uncommitted changes": [
        test_refuses_to_overwrite_uncommitted_work, test_refuses_commits_not_in_the_series,
        test_a_fork_in_the_middle_of_git_am_says_how_to_finish_or_undo_it,
        test_a_fork_with_more_of_the_series_than_it_recorded_is_finished_not_refused,
        test_discard_keeps_a_backup_first, test_discard_with_a_patch_that_does_not_apply_keeps_the_fork,
        test_backups_of_one_second_get_their_own_names, test_backups_are_git_ignored,
    ],
    "A destination that is this repository, holds it, or lies anywhere inside it": [
        test_a_destination_that_is_or_holds_the_repository_is_refused,
        test_a_destination_anywhere_inside_the_repository_is_refused,
    ],
    "Ctrl-C at any moment leaves the fork and the series whole": [
        test_ctrl_c_at_any_moment_of_an_update_leaves_the_fork_whole_and_resumable,
        test_ctrl_c_during_export_writes_the_series_whole,
        test_ctrl_c_in_the_cli_prints_one_line_and_the_next_run_finishes,
        test_a_change_made_to_the_fork_during_an_update_stops_it_and_is_kept,
    ],
    "The fork remembers the series and its own commits": [
        test_a_hand_edited_patch_is_brought_into_the_fork_not_overwritten, test_a_hand_edit_to_a_patchs_code_sticks,
        test_when_fork_and_patches_both_changed_nothing_is_overwritten,
    ],
    "`export` refuses a fork with fewer commits than the series": [
        test_export_of_a_partial_fork_needs_drop_missing_and_names_what_goes, test_export_refuses_to_empty_the_series,
    ],
    "A patch file that is empty, truncated or not a patch": [
        test_a_damaged_patch_is_named_with_the_way_back_and_no_loop,
        test_a_patch_that_does_not_apply_names_the_way_back_not_export,
        test_patch_that_does_not_apply_leaves_nothing_behind, test_failed_update_rolls_the_fork_back,
        test_a_failed_update_of_the_whole_fork_leaves_it_as_it_was,
    ],
    "The sdist's sha256 is checked before anything is unpacked": [
        test_hash_mismatch_stops_before_unpacking, test_bad_sdist_is_refused_even_when_the_fork_is_up_to_date,
        test_a_bad_sdist_is_never_advised_deleted,
    ],
    "Installing one base never changes another's environment": [
        test_installing_one_base_never_changes_anothers_environment,
    ],
    "`export` is byte-stable": [
        test_export_round_trips_byte_for_byte, test_a_second_base_materializes_exports_and_checks_on_its_own,
    ],
    "The series' edits to upstream's tests": [
        test_export_from_an_upstream_branch_writes_its_edits_to_upstreams_tests_beside_the_series,
        test_edits_to_upstreams_tests_for_a_patch_not_in_series_are_refused,
        test_an_update_of_an_upstream_branch_keeps_its_contributor_and_the_edits_to_upstreams_tests,
        test_a_hand_edit_to_the_edits_of_upstreams_tests_is_brought_into_the_fork_not_overwritten,
    ],
}


def test_every_line_of_nothing_is_lost_has_its_tests():
    section = (ROOT / "README.md").read_text().split("Nothing is lost:\n", 1)[1].split("\n\n", 1)[0]
    lines = [line[2:] for line in section.splitlines() if line.startswith("- ")]
    promises = [next((promise for promise in NOTHING_IS_LOST if line.startswith(promise)), line) for line in lines]
    assert promises == list(NOTHING_IS_LOST), "a line of the list without its tests here"

"""The fork tooling: materialize, export, check, and that it never loses work."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def git(fork, *args):
    return subprocess.run(["git", *args], cwd=fork, capture_output=True, text=True, check=True).stdout


def commits(fork):
    return git(fork, "log", "--format=%s").splitlines()


def test_materialize_builds_release_plus_one_commit_per_patch(tool):
    series = tool.read_series()
    tool.materialize(tool.FORK, None, None, False)
    log = commits(tool.FORK)
    assert len(log) == len(series) + 1
    assert log[-1] == "torchtitan 0.2.1 release from PyPI"
    assert git(tool.FORK, "rev-list", "-n1", "v0.2.1") == git(tool.FORK, "rev-list", "--max-parents=0", "HEAD")
    assert git(tool.FORK, "status", "--porcelain") == ""


def test_base_commit_is_the_verified_release(tool, tmp_path):
    tool.materialize(tool.FORK, "0001", None, False)
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "xzf", str(tool.verified_sdist(None)), "-C", str(unpacked)], check=True)
    release = unpacked / "torchtitan-0.2.1"
    listed = set(git(tool.FORK, "ls-tree", "-r", "--name-only", "v0.2.1").splitlines())
    on_disk = {
        str(p.relative_to(release)) for p in release.rglob("*")
        if p.is_file() and not p.relative_to(release).parts[0].endswith(".egg-info")
    }
    assert listed == on_disk
    attention = "torchtitan/models/attention.py"
    assert git(tool.FORK, "show", f"v0.2.1:{attention}") == (release / attention).read_text()


def test_materialize_again_changes_nothing(tool):
    tool.materialize(tool.FORK, None, None, False)
    head = git(tool.FORK, "rev-parse", "HEAD")
    assert "up to date" in tool.materialize(tool.FORK, None, None, False)
    assert git(tool.FORK, "rev-parse", "HEAD") == head


def test_export_round_trips_byte_for_byte(tool):
    before = {p.name: p.read_bytes() for p in tool.PATCHES.iterdir()}
    tool.materialize(tool.FORK, None, None, False)
    tool.export()
    assert {p.name: p.read_bytes() for p in tool.PATCHES.iterdir()} == before


def test_export_writes_new_commits_and_series(tool):
    tool.materialize(tool.FORK, None, None, False)
    (tool.FORK / "NOTE.md").write_text("a change\n")
    git(tool.FORK, "add", "NOTE.md")
    git(tool.FORK, "-c", "user.name=Dev", "-c", "user.email=dev@example.com", "commit", "-qm", "[docs] Add a note")
    tool.export()
    names = tool.read_series()
    assert names[-1].endswith("-docs-Add-a-note.patch")
    assert "+a change" in (tool.PATCHES / names[-1]).read_text()
    assert "up to date" in tool.materialize(tool.FORK, None, None, False)


def test_export_of_a_partial_fork_needs_drop_missing(tool):
    tool.materialize(tool.FORK, "0001", None, False)
    series = tool.read_series()
    with pytest.raises(tool.ForkError, match=rf"holds 1 commits and patches/series {len(series)} patches.*--drop-missing"):
        tool.export()
    assert tool.read_series() == series and all((tool.PATCHES / n).exists() for n in series)
    tool.export(drop_missing=True)
    assert tool.read_series() == series[:1]
    assert sorted(p.name for p in tool.PATCHES.glob("*.patch")) == series[:1]


def edit_patch(tool, number):
    """A hand edit of a patch file: a new line in its commit message."""
    (patch,) = tool.PATCHES.glob(f"{number}-*.patch")
    patch.write_text(patch.read_text().replace("\n---\n", "\nEdited by hand.\n---\n", 1))
    return patch


def test_a_hand_edited_patch_is_brought_into_the_fork_not_overwritten(tool):
    tool.materialize(tool.FORK, None, None, False)
    patch = edit_patch(tool, "0003")
    edited = patch.read_text()
    with pytest.raises(tool.ForkError, match=r"patches/ changed since the fork was made \(0003-.*run 'materialize'"):
        tool.export()
    assert patch.read_text() == edited
    assert "patches/ changed: 0003-" in tool.materialize(tool.FORK, None, None, False)
    assert "Edited by hand." in git(tool.FORK, "log", "--format=%B")
    tool.export()
    assert patch.read_text() == edited


def test_when_fork_and_patches_both_changed_nothing_is_overwritten(tool):
    tool.materialize(tool.FORK, None, None, False)
    (tool.FORK / "mine.txt").write_text("x\n")
    git(tool.FORK, "add", "mine.txt")
    git(tool.FORK, "-c", "user.name=Dev", "-c", "user.email=dev@example.com", "commit", "-qm", "mine")
    patch = edit_patch(tool, "0002")
    edited = patch.read_text()
    with pytest.raises(tool.ForkError, match=r"both .* and patches/ \(0002-.*\) changed.*--discard"):
        tool.materialize(tool.FORK, None, None, False)
    with pytest.raises(tool.ForkError, match="patches/ changed since the fork was made"):
        tool.export()
    assert patch.read_text() == edited and commits(tool.FORK)[0] == "mine"


def test_upto_stops_after_the_named_patch_in_another_folder(tool, tmp_path):
    dest = tmp_path / "compat"
    tool.materialize(dest, "0001", None, False)
    assert len(commits(dest)) == 2
    with pytest.raises(tool.ForkError, match="matches no patch.*use one of: 0001-"):
        tool.materialize(dest, "0042", None, False)


def test_moving_between_upto_points_is_safe(tool):
    tool.materialize(tool.FORK, "0001", None, False)
    tool.materialize(tool.FORK, None, None, False)
    assert len(commits(tool.FORK)) == len(tool.read_series()) + 1
    tool.materialize(tool.FORK, "0002", None, False)
    assert len(commits(tool.FORK)) == 3


def test_hash_mismatch_stops_before_unpacking(tool, tmp_path):
    fake = tmp_path / "torchtitan-0.2.1.tar.gz"
    fake.write_bytes(b"not the release")
    with pytest.raises(tool.ForkError, match="sha256 of .* expected 0b288bd9"):
        tool.materialize(tool.FORK, None, fake, False)
    assert not tool.FORK.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patches", "torchtitan-0.2.1.tar.gz"]


def corrupt(tool, number):
    (patch,) = tool.PATCHES.glob(f"{number}-*.patch")
    text = patch.read_text()
    hunk = text.index("\n@@")
    context = text.index("\n ", hunk)  # the hunk's first context line
    patch.write_text(text[:context] + "\n CORRUPTED" + text[context + 2 :])
    return patch.name


def test_patch_that_does_not_apply_leaves_nothing_behind(tool, tmp_path):
    name = corrupt(tool, "0002")
    with pytest.raises(tool.ForkError, match=rf"patch {name} does not apply at \S+\.py:\d+"):
        tool.materialize(tool.FORK, None, None, False)
    assert not tool.FORK.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patches"]


def test_failed_update_rolls_the_fork_back(tool):
    tool.materialize(tool.FORK, "0001", None, False)
    head = git(tool.FORK, "rev-parse", "HEAD")
    corrupt(tool, "0003")
    with pytest.raises(tool.ForkError, match="does not apply"):
        tool.materialize(tool.FORK, None, None, False)
    assert git(tool.FORK, "rev-parse", "HEAD") == head
    assert git(tool.FORK, "status", "--porcelain") == ""


def test_refuses_to_overwrite_uncommitted_work(tool):
    tool.materialize(tool.FORK, "0001", None, False)
    edited = tool.FORK / "torchtitan" / "models" / "attention.py"
    edited.write_text(edited.read_text() + "# my work\n")
    with pytest.raises(tool.ForkError, match="uncommitted changes; commit them and run 'export'.*--discard"):
        tool.materialize(tool.FORK, None, None, False)
    with pytest.raises(tool.ForkError, match="uncommitted changes"):
        tool.export()
    assert edited.read_text().endswith("# my work\n")


def test_refuses_commits_not_in_the_series(tool):
    tool.materialize(tool.FORK, None, None, False)
    (tool.FORK / "mine.txt").write_text("x\n")
    git(tool.FORK, "add", "mine.txt")
    git(tool.FORK, "-c", "user.name=Dev", "-c", "user.email=dev@example.com", "commit", "-qm", "mine")
    with pytest.raises(tool.ForkError, match="commits that are not in patches/series; run 'export'"):
        tool.materialize(tool.FORK, None, None, False)
    assert commits(tool.FORK)[0] == "mine"


def test_refuses_a_folder_it_did_not_make(tool):
    tool.FORK.mkdir()
    (tool.FORK / "notes.txt").write_text("mine\n")
    with pytest.raises(tool.ForkError, match="not a fork made by this tool"):
        tool.materialize(tool.FORK, None, None, False)
    assert (tool.FORK / "notes.txt").read_text() == "mine\n"


def test_discard_keeps_a_backup_first(tool, tmp_path):
    tool.materialize(tool.FORK, None, None, False)
    (tool.FORK / "wip.py").write_text("work in progress\n")
    tool.materialize(tool.FORK, None, None, True)
    (backup,) = tmp_path.glob("torchtitan.backup-*")
    assert (backup / "wip.py").read_text() == "work in progress\n"
    assert not (tool.FORK / "wip.py").exists()
    assert git(tool.FORK, "status", "--porcelain") == ""


def test_discard_with_a_patch_that_does_not_apply_keeps_the_fork(tool, tmp_path):
    tool.materialize(tool.FORK, None, None, False)
    (tool.FORK / "wip.py").write_text("work in progress\n")
    corrupt(tool, "0003")
    with pytest.raises(tool.ForkError, match="does not apply"):
        tool.materialize(tool.FORK, None, None, True)
    assert (tool.FORK / "wip.py").read_text() == "work in progress\n"
    assert not list(tmp_path.glob("torchtitan.backup-*"))
    assert not list(tmp_path.glob(".torchtitan-*"))


def test_backups_of_one_second_get_their_own_names(tool, tmp_path, monkeypatch):
    monkeypatch.setattr(tool.time, "strftime", lambda _: "20260101-000000")
    tool.materialize(tool.FORK, "0001", None, False)
    for _ in range(2):
        tool.materialize(tool.FORK, "0001", None, True)
    assert sorted(p.name for p in tmp_path.glob("torchtitan.backup-*")) == [
        "torchtitan.backup-20260101-000000",
        "torchtitan.backup-20260101-000000-1",
    ]


def test_backups_are_git_ignored():
    ignored = subprocess.run(
        ["git", "check-ignore", "torchtitan.backup-20260101-000000/README.md"], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode == 0


def test_a_stale_baseline_is_rebuilt_but_never_edits(tool):
    tool.materialize_baseline(None)
    first = tool.PATCHES / tool.read_series()[0]
    first.write_text(first.read_text().replace("Subject: [PATCH] [attention] Run", "Subject: [PATCH] [attention] Now run"))
    tool.materialize_baseline(None)
    assert commits(tool.BASELINE)[0].startswith("[attention] Now run varlen_attn")

    (tool.BASELINE / "README.md").write_text("my notes")
    with pytest.raises(tool.ForkError, match="uncommitted changes"):
        tool.materialize_baseline(None)
    assert (tool.BASELINE / "README.md").read_text() == "my notes"


def test_check_applies_the_series_to_a_pristine_release(tool):
    assert tool.check(None).startswith(f"ok: {len(tool.read_series())} patches apply cleanly")
    corrupt(tool, "0004")
    with pytest.raises(tool.ForkError, match="0004-.* does not apply"):
        tool.check(None)


def test_cli_prints_one_line_errors(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gqa_fork.py"), "materialize", "--upto", "nope", "--dest", str(tmp_path / "x")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --upto 'nope' matches no patch")


def test_bundled_data_is_what_the_generator_writes(tool, tmp_path):
    tool.make_data(tmp_path / "data")
    for path in (ROOT / "data").rglob("*"):
        if path.is_file():
            assert (tmp_path / "data" / path.relative_to(ROOT / "data")).read_bytes() == path.read_bytes(), path


def test_torchtitan_from_the_repository_root_is_the_fork(cli):
    """The configs' commands run from the root, where Python finds the checkout
    folder ./torchtitan first; the fork's package must win, in pytest too."""
    code = "import torchtitan; print(torchtitan.__version__, torchtitan.__file__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True).stdout
    package = cli.FORK / "torchtitan" / "__init__.py"
    assert out.split() == ["0.2.1", str(package)]
    import torchtitan

    assert torchtitan.__file__ == str(package)


def test_bad_sdist_is_refused_even_when_the_fork_is_up_to_date(tool, tmp_path):
    tool.materialize(tool.FORK, None, None, False)
    fake = tmp_path / "torchtitan-0.2.1.tar.gz"
    fake.write_bytes(b"not the release")
    with pytest.raises(tool.ForkError, match="sha256 of .* expected"):
        tool.materialize(tool.FORK, None, fake, False)
    with pytest.raises(tool.ForkError, match=r"is a folder; pass the path of the file torchtitan-0.2.1.tar.gz"):
        tool.materialize(tool.FORK, None, tmp_path, False)


def test_export_without_a_fork_says_to_materialize(tool):
    with pytest.raises(tool.ForkError, match=r"there is no fork at .*; run 'materialize' first"):
        tool.export()


def test_a_folder_that_is_not_a_fork_gets_advice_that_exists(tool):
    tool.FORK.mkdir()
    with pytest.raises(tool.ForkError, match="run 'materialize --discard'"):
        tool.export()


def test_unpacking_works_without_tarfiles_data_filter(tool, tmp_path, monkeypatch):
    """Python before 3.10.12 / 3.11.4 has no data filter; the sdist is verified anyway."""
    extractall = tool.tarfile.TarFile.extractall

    def without_filter(self, path, members=None, **kwargs):
        assert "filter" not in kwargs, "extractall() got an unexpected keyword argument 'filter'"
        return extractall(self, path, members)

    monkeypatch.delattr(tool.tarfile, "data_filter")
    monkeypatch.setattr(tool.tarfile.TarFile, "extractall", without_filter)
    tool.unpack(tool.verified_sdist(None), tmp_path / "release")
    assert (tmp_path / "release" / "torchtitan" / "models" / "attention.py").is_file()


@pytest.mark.parametrize("argv", [["test", "-k", "varlen", "-x"], ["test", "--", "-k", "varlen", "-x"]])
def test_test_passes_other_arguments_to_pytest(tool, argv):
    assert tool.parse_args(argv).pytest_args == ["-k", "varlen", "-x"]


def test_torch_spec_is_split_as_a_shell_would(tool, monkeypatch):
    calls = []
    versions = iter([None, "2.13.0+cpu"])
    monkeypatch.setattr(tool, "TORCH_SPEC", "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu")
    monkeypatch.setattr(tool, "installed_version", lambda dist: next(versions) if dist == "torch" else "1.0")
    monkeypatch.setattr(tool, "pip", lambda *args: calls.append(args))
    monkeypatch.setattr(tool, "fork_imports_from_root", lambda: True)
    tool.FORK.mkdir()
    tool.install()
    assert calls == [("install", "torch==2.13.0", "--index-url", "https://download.pytorch.org/whl/cpu")]


def upstream_checkout(tool, tmp_path, touched_edit=None):
    """A torchtitan git history like upstream's: an older commit, then the
    release's files tagged v0.2.1."""
    upstream = tmp_path / "upstream"
    upstream.mkdir()
    identity = ["-c", "user.name=Upstream", "-c", "user.email=upstream@example.com"]
    git(upstream, "init", "-q", "-b", "main")
    (upstream / "README.md").write_text("an older torchtitan\n")
    git(upstream, "add", "-A")
    git(upstream, *identity, "commit", "-qm", "an older commit")
    tool.unpack(tool.verified_sdist(None), upstream)
    if touched_edit:
        path = upstream / touched_edit
        path.write_text(path.read_text() + "# upstream differs\n")
    git(upstream, "add", "-A")
    git(upstream, *identity, "commit", "-qm", "Release 0.2.1")
    git(upstream, "tag", "v0.2.1")
    return upstream


def test_upstream_checkout_gives_a_branch_of_upstreams_history(tool, tmp_path):
    upstream = upstream_checkout(tool, tmp_path)
    tool.materialize(tool.FORK, None, None, False, upstream)
    assert git(tool.FORK, "rev-parse", "v0.2.1") == git(upstream, "rev-parse", "v0.2.1")
    assert commits(tool.FORK)[-1] == "an older commit"
    assert git(tool.FORK, "rev-parse", "--abbrev-ref", "HEAD").strip() == "gqa"
    before = {p.name: p.read_bytes() for p in tool.PATCHES.iterdir()}
    tool.export()
    assert {p.name: p.read_bytes() for p in tool.PATCHES.iterdir()} == before


def test_upstream_that_differs_in_a_touched_file_is_refused(tool, tmp_path):
    upstream = upstream_checkout(tool, tmp_path, touched_edit="torchtitan/models/attention.py")
    with pytest.raises(tool.ForkError, match="differs from the PyPI release in torchtitan/models/attention.py"):
        tool.materialize(tool.FORK, None, None, False, upstream)
    assert not tool.FORK.exists()

"""A run folder is a jail: nothing a command writes follows a link planted in it, outputs never overwrite a
checkpoint or a run, a reader never mistakes a pruned checkpoint for a damaged one, and a failed save (a full
disk) is one line that keeps the previous checkpoint."""

import errno
import hashlib
import os
import shutil
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_train import SPEC as TRAIN_SPEC

import hrmspec
from hrmspec.cli import main
from hrmspec.errors import CheckpointError, HrmspecError
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.files import (
    OutputError,
    atomic_write,
    open_append_nofollow,
    open_lock_nofollow,
    protected_folder,
    read_tensors,
)
from hrmspec.runtime.artifacts.tokenizer import Tokenizer
from hrmspec.spec.load import load_spec

# test_train's micro spec, saving and pruning at every step
SPEC = TRAIN_SPEC.replace("steps: 6,", "steps: 2,").replace("save_every: 3, keep: 5", "save_every: 1, keep: 1")
SPEC = SPEC.replace("max_new_tokens: 8", "max_new_tokens: 4")
SECRET = "the user's own file: not the run's to write\n"


def target(root: Path, name: str) -> Path:
    """A file outside the run folder with known content, for a link to point at."""
    path = root / "outside" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SECRET)
    return path


def plant(link: Path, to: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(to)
    return to


def untouched(*paths: Path) -> bool:
    return all(p.read_text() == SECRET for p in paths)


def regular(path: Path) -> bool:
    return not path.is_symlink() and path.is_file()


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spec") / "micro.yaml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, spec_file):
    """A new run trained into a folder where links were planted for every file it writes: spec.yaml,
    tokenizer.json, a checkpoint folder (step 1, a link to a folder outside) and a checkpoint file (step 2's
    model.safetensors, in a folder an earlier run left without trainer.pt)."""
    root = tmp_path_factory.mktemp("planted")
    run = root / "run"
    outside_dir = root / "outside" / "folder"
    outside_dir.mkdir(parents=True)
    (outside_dir / "model.safetensors").write_text(SECRET)
    targets = [
        plant(run / "spec.yaml", target(root, "spec")),
        plant(run / "tokenizer.json", target(root, "tokenizer")),
        plant(run / "checkpoints" / "step_00000002" / "model.safetensors", target(root, "weights")),
        outside_dir / "model.safetensors",
    ]
    plant(run / "checkpoints" / "step_00000001", outside_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a micro model's ops are too small to share between threads
    try:
        code = main(["train", str(spec_file), "--out", str(run), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    return run, targets, code


# --------------------------------------------------------------------------- planted links


def test_a_run_replaces_every_planted_link_and_writes_nothing_outside(planted_run):
    run, targets, code = planted_run
    assert code == 0
    assert untouched(*targets)
    assert (targets[-1].parent / "model.safetensors").read_text() == SECRET  # the linked folder: kept as it was
    assert sorted(p.name for p in targets[-1].parent.iterdir()) == ["model.safetensors"]
    assert regular(run / "spec.yaml") and "name: micro" in (run / "spec.yaml").read_text()
    assert regular(run / "tokenizer.json") and Tokenizer.load(run).vocab_size <= 320
    assert regular(run / "metrics.jsonl") and regular(run / ".lock")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002"]
    last = ckpt.latest_checkpoint(run)
    assert not last.is_symlink() and all(regular(p) for p in last.iterdir())
    read_tensors(last / "model.safetensors")
    assert not (run / "checkpoints" / "step_00000001").exists()  # the link to a folder: removed, not followed
    assert not list((run / "checkpoints").glob(".tmp-*"))


@pytest.fixture
def run_copy(planted_run, tmp_path) -> Path:
    """A copy of the trained run to plant links in (the copy keeps links as links)."""
    copy = tmp_path / "run"
    shutil.copytree(planted_run[0], copy, symlinks=True)
    return copy


@pytest.mark.parametrize("resume", [True, False])
def test_a_linked_lock_is_refused_and_its_target_never_truncated(run_copy, spec_file, tmp_path, capsys, resume):
    (run_copy / ".lock").unlink()
    aim = plant(run_copy / ".lock", target(tmp_path, "lock"))
    code, err = run_cli(capsys, "train", spec_file, "--out", run_copy, "--no-progress",
                        *(["--resume", "--set", "train.steps=3"] if resume else ["--overwrite"]))
    assert code == 2 and one_line(err)
    assert ".lock is a symbolic link; a run folder's files must be regular files" in err
    assert untouched(aim) and (run_copy / ".lock").is_symlink()


def test_a_linked_metrics_file_is_refused_on_resume(run_copy, spec_file, tmp_path, capsys):
    (run_copy / "metrics.jsonl").unlink()
    aim = plant(run_copy / "metrics.jsonl", target(tmp_path, "metrics"))
    before = digest(ckpt.latest_checkpoint(run_copy))
    code, err = run_cli(capsys, "train", spec_file, "--out", run_copy, "--no-progress", "--resume",
                        "--set", "train.steps=3")
    assert code == 2 and one_line(err) and "metrics.jsonl is a symbolic link" in err
    assert untouched(aim)
    assert digest(ckpt.latest_checkpoint(run_copy)) == before


def test_appends_and_locks_never_open_through_a_link_or_a_hard_link(tmp_path):
    aim = target(tmp_path, "file")
    plant(tmp_path / "run" / "metrics.jsonl", aim)
    with pytest.raises(OutputError, match="metrics.jsonl is a symbolic link"):
        open_append_nofollow(tmp_path / "run" / "metrics.jsonl")
    plant(tmp_path / "run" / ".lock", aim)
    with pytest.raises(OutputError, match=r"\.lock is a symbolic link"):
        open_lock_nofollow(tmp_path / "run" / ".lock")
    os.link(aim, tmp_path / "run" / "hard")
    with pytest.raises(OutputError, match="other hard links"):
        open_append_nofollow(tmp_path / "run" / "hard")
    assert untouched(aim)
    with open_append_nofollow(tmp_path / "run" / "new.jsonl") as f:  # a plain file: made, then appended to
        f.write("a\n")
    with open_append_nofollow(tmp_path / "run" / "new.jsonl") as f:
        f.write("b\n")
    assert (tmp_path / "run" / "new.jsonl").read_text() == "a\nb\n"


def test_overwrite_removes_planted_links_not_their_targets(planted_run, run_copy, spec_file, tmp_path, capsys):
    (run_copy / "metrics.jsonl").unlink()
    (run_copy / "eval.json").unlink(missing_ok=True)  # the run's own final evaluation, replaced by a link
    aims = [plant(run_copy / "metrics.jsonl", target(tmp_path, "metrics")),
            plant(run_copy / "eval.json", target(tmp_path, "eval"))]
    shutil.rmtree(run_copy / "checkpoints")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ckpt.latest_checkpoint(planted_run[0]).parent, elsewhere)
    plant(run_copy / "checkpoints", elsewhere)
    before = {p.name: digest(p) for p in elsewhere.iterdir()}
    code, err = run_cli(capsys, "train", spec_file, "--out", run_copy, "--no-progress", "--overwrite",
                        "--set", "train.steps=1")
    assert code == 0, err
    assert untouched(*aims) and {p.name: digest(p) for p in elsewhere.iterdir()} == before
    assert regular(run_copy / "metrics.jsonl") and regular(run_copy / "eval.json")  # the new run's final eval
    assert not (run_copy / "checkpoints").is_symlink()
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["step_00000001"]


def test_a_linked_checkpoints_folder_is_refused(spec_file, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    plant(run / "checkpoints", elsewhere)
    code, err = run_cli(capsys, "train", spec_file, "--out", run, "--no-progress", "--set", "train.steps=1")
    assert code == 2 and one_line(err) and "checkpoints is a symbolic link" in err, err
    assert list(elsewhere.iterdir()) == []


def test_a_linked_tensorboard_folder_is_refused(monkeypatch, tmp_path):
    from hrmspec.runtime.training.loggers import TensorBoardLogger

    made = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = lambda log_dir, purge_step=None: made.append(log_dir)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    plant(tmp_path / "tensorboard", tmp_path / "outside")
    with pytest.raises(OutputError, match="tensorboard is a symbolic link"):
        TensorBoardLogger(tmp_path, 0)
    (tmp_path / "tensorboard").unlink()
    TensorBoardLogger(tmp_path, 0)
    assert made == [str(tmp_path / "tensorboard")]


def test_eval_and_plot_replace_linked_outputs(run_copy, tmp_path, capsys):
    (run_copy / "eval.json").unlink(missing_ok=True)  # the run's own final evaluation, replaced by a link
    aims = [plant(run_copy / "eval.json", target(tmp_path, "eval")),
            plant(run_copy / "training.png", target(tmp_path, "png"))]
    code, err = run_cli(capsys, "eval", run_copy, "--n", "1")
    assert code == 0, err
    code, err = run_cli(capsys, "plot", run_copy)
    assert code == 0, err
    assert untouched(*aims)
    assert regular(run_copy / "eval.json") and '"accuracy"' in (run_copy / "eval.json").read_text()
    assert regular(run_copy / "training.png") and (run_copy / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_out_that_is_no_image_file_is_one_line(run_copy, tmp_path, capsys):
    cases = {
        run_copy / "metrics.jsonl": "not an image file name",  # never over the run's own files
        tmp_path: "is a folder",
        tmp_path / "missing" / "a.png": "does not exist",
        ckpt.latest_checkpoint(run_copy) / "plot.png": "inside the checkpoints",
    }
    metrics = (run_copy / "metrics.jsonl").read_text()
    for out, says in cases.items():
        code, err = run_cli(capsys, "plot", run_copy, "--out", out)
        assert code == 2 and one_line(err) and says in err and str(out) in err, err
    assert (run_copy / "metrics.jsonl").read_text() == metrics
    assert not (ckpt.latest_checkpoint(run_copy) / "plot.png").exists()


def test_atomic_write_replaces_a_link_and_never_follows_it(tmp_path):
    aim = target(tmp_path, "file")
    plant(tmp_path / "out" / "x.txt", aim)
    atomic_write(tmp_path / "out" / "x.txt", lambda p: p.write_text("new"))
    assert untouched(aim) and regular(tmp_path / "out" / "x.txt")
    assert (tmp_path / "out" / "x.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.txt"]  # no temp file left


# --------------------------------------------------------------------------- where outputs may go


def test_train_out_must_be_a_place_for_a_run(spec_file, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    cases = {home: "is your home folder", tmp_path / "notes": "is a folder of other files",
             tmp_path / "file": "is a file, not a folder"}
    for out, says in cases.items():
        code, err = run_cli(capsys, "train", spec_file, "--out", out, "--no-progress")
        assert code == 2 and one_line(err) and says in err and str(out) in err, err
    assert list(home.iterdir()) == [] and sorted(p.name for p in (tmp_path / "notes").iterdir()) == ["mine.txt"]
    assert protected_folder(Path("/")) == "the filesystem root"
    assert protected_folder(tmp_path / "new") == ""


def test_outputs_never_overwrite_a_checkpoint_or_a_run(run_copy, tmp_path, capsys):
    last = ckpt.latest_checkpoint(run_copy)
    before = digest(last)
    code, err = run_cli(capsys, "export-hf", run_copy, "--out", tmp_path / "hf")
    assert code == 0, err
    ours = tmp_path / "ours"
    code, err = run_cli(capsys, "import-hf", tmp_path / "hf", "--out", ours)
    assert code == 0, err
    refused = [
        ("export-hf", last, last),  # export-hf CKPT --out CKPT
        ("export-hf", ours, ours),
        ("export-hf", run_copy, run_copy),
        ("import-hf", tmp_path / "hf", last),  # import-hf ... --out RUN/checkpoints/step_N
        ("import-hf", tmp_path / "hf", run_copy / "checkpoints" / "step_00000099"),
        ("import-hf", tmp_path / "hf", ours),  # an earlier import
        ("import-hf", tmp_path / "hf", tmp_path / "hf"),  # its own source
        ("export-hrm", ours, last),
        ("export-hrm", ours, ours),
    ]
    hf_before, ours_before = digest(tmp_path / "hf"), digest(ours)
    for command, source, out in refused:
        code, err = run_cli(capsys, command, source, "--out", out)
        assert code == 2 and one_line(err) and str(out) in err and "never overwrites" in err, (command, out, err)
    assert digest(last) == before and digest(ours) == ours_before and digest(tmp_path / "hf") == hf_before
    assert not (run_copy / "checkpoints" / "step_00000099").exists()
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == [last.name]


def test_an_out_that_is_a_file_is_one_line(run_copy, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text(SECRET)
    for argv in (["export-hf", run_copy], ["export-hrm", run_copy], ["import-hf", run_copy]):
        code, err = run_cli(capsys, *argv, "--out", file)
        assert code == 2 and one_line(err) and f"{file} is a file, not a folder" in err, err
    from hrmspec.emit import write_files

    with pytest.raises(OutputError, match=f"{file} is a file, not a folder"):
        write_files(file, {"kernels.json": "[]\n"})
    assert untouched(file)


def test_emitted_files_never_write_through_links(tmp_path):
    from hrmspec.emit import write_files

    aim = target(tmp_path, "kernel")
    out = tmp_path / "emit"
    plant(out / "kernels" / "a.py", aim)
    write_files(out, {"kernels/a.py": "print()\n", "kernels.json": "[]\n"})
    assert untouched(aim) and regular(out / "kernels" / "a.py") and (out / "kernels.json").read_text() == "[]\n"
    (out / "kernels" / "a.py").unlink()
    (out / "kernels").rmdir()
    plant(out / "kernels", aim.parent)
    with pytest.raises(OutputError, match="kernels is a symbolic link"):
        write_files(out, {"kernels/b.py": "print()\n"})
    assert not (aim.parent / "b.py").exists()


def test_a_write_that_fails_is_one_line_naming_the_file(monkeypatch, tmp_path):
    from hrmspec.runtime.interop import convert
    from hrmspec.spec import load_spec_text

    model = hrmspec.compile(load_spec_text(SPEC))

    def read_only(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    monkeypatch.setattr("safetensors.torch.save_file", lambda *a, **k: read_only(a[1]))
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'ckpt'}: Permission denied"):
        convert.save_checkpoint(model, tmp_path / "ckpt")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == []  # no temp file left


# --------------------------------------------------------------------------- reading while a run prunes


def test_load_run_while_a_trainer_saves_and_prunes_with_keep_1(run_copy):
    from hrmspec.runtime.evaluate.heldout import load_run

    last = ckpt.latest_checkpoint(run_copy)
    spec_raw = load_spec(last / "spec.yaml").raw
    tokenizer = Tokenizer.load(last)
    state = read_tensors(last / "model.safetensors")
    ema = read_tensors(last / "ema.safetensors")
    stop, saved, failures = threading.Event(), [0], []

    def trainer():
        step = 3
        try:
            while not stop.is_set():
                ckpt.save_checkpoint(run_copy, step, state, spec_raw, tokenizer, ema_state=ema,
                                     trainer_state={"data": {}}, keep=1)
                step, saved[0] = step + 1, saved[0] + 1
        except BaseException as e:  # the test's thread must not die silently
            failures.append(e)

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    errors, reads = [], 0
    try:
        while reads < 150 or saved[0] < 60:
            try:
                model, tok, spec, folder = load_run(run_copy, device="cpu", backend="reference")
                assert folder.name.startswith("step_") and tok is not None
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
            reads += 1
            if reads > 2000:
                break
    finally:
        stop.set()
        thread.join()
    assert not failures
    assert saved[0] >= 60, "the trainer thread saved too few checkpoints to race with"
    assert errors == [], f"{len(errors)} of {reads} reads failed, e.g. {errors[:3]}"
    # a checkpoint held by a reader while a save pruned is pruned by the next save
    ckpt.save_checkpoint(run_copy, 10**6, state, spec_raw, tokenizer, trainer_state={"data": {}}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == [f"step_{10**6:08d}"]
    assert not list((run_copy / "checkpoints").glob(".tmp-*"))


def test_a_checkpoint_still_there_but_unreadable_is_damaged(run_copy):
    from hrmspec.runtime.evaluate.heldout import load_run

    (ckpt.latest_checkpoint(run_copy) / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt checkpoint file"):
        load_run(run_copy, device="cpu", backend="reference")


# --------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1366"),
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
])
def test_a_failed_save_is_one_line_keeps_the_previous_checkpoint_and_its_temp_folder_goes(run_copy, monkeypatch,
                                                                                            error):
    last = ckpt.latest_checkpoint(run_copy)
    before = digest(last)
    state = read_tensors(last / "model.safetensors")
    def fails(*a, **k):
        raise error

    if isinstance(error, SafetensorError):
        monkeypatch.setattr(ckpt, "save_file", fails)
    else:
        monkeypatch.setattr(ckpt.torch, "save", fails)
    with pytest.raises(CheckpointError) as e:
        ckpt.save_checkpoint(run_copy, 3, state, {"name": "micro"}, optimizer_state={}, keep=1)
    message = str(e.value)
    assert "\n" not in message and "the disk may be full" in message and f"{last} is intact" in message
    assert isinstance(e.value, HrmspecError)
    assert ckpt.latest_checkpoint(run_copy) == last and digest(last) == before
    assert not list((run_copy / "checkpoints").glob(".tmp-*"))


def test_a_full_disk_ends_train_in_one_line(run_copy, spec_file, monkeypatch, capsys):
    last = ckpt.latest_checkpoint(run_copy)
    calls = [0]
    real = ckpt.torch.save

    def full_after_one(obj, path, *a, **k):
        calls[0] += 1
        if calls[0] > 2:  # step 3's optimizer and trainer state; step 4's fail
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1472 vs 1366")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full_after_one)
    code, err = run_cli(capsys, "train", spec_file, "--out", run_copy, "--no-progress", "--resume",
                        "--set", "train.steps=4")
    assert code == 2 and one_line(err) and "the disk may be full" in err, err
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["step_00000003"]
    assert ckpt.latest_checkpoint(run_copy) != last
    assert not list((run_copy / "checkpoints").glob(".tmp-*"))


def test_overwrite_replaces_a_converted_checkpoint_whole_and_nothing_it_must_not(tmp_path, capsys):
    """import-hrm --overwrite: the new checkpoint takes the old one's place whole (no stale file stays); without
    it the old one is refused; an input, a run folder and a run's checkpoints are never replaced."""
    from test_hrm_checkpoint import archs_example, official_tensors, resolved, write_official

    from hrmspec.cli import main
    from hrmspec.runtime.interop.convert import load_checkpoint

    a = archs_example(trm=True)
    step = write_official(tmp_path / "official", a, official_tensors(resolved(a), 7, 3, 5, seed=0))
    out = tmp_path / "ours"
    assert main(["import-hrm", str(step), "--seq-len", "5", "--out", str(out)]) == 0
    (out / "stale.txt").write_text("from before")
    assert main(["import-hrm", str(step), "--seq-len", "5", "--out", str(out)]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert main(["import-hrm", str(step), "--seq-len", "5", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and load_checkpoint(out).spec.model.max_seq_len == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ours.")]  # no temporary folder left
    # a conversion that fails half way leaves the old checkpoint as it was
    assert main(["import-hrm", str(step), "--out", str(out), "--overwrite"]) == 2  # no --seq-len: refused late
    assert load_checkpoint(out).spec.model.max_seq_len == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ours.")]
    capsys.readouterr()
    for target in (tmp_path / "official", out):  # the input's folder; a checkpoint read by export-hrm
        source = step if target != out else out
        command = "import-hrm" if target != out else "export-hrm"
        args = [command, str(source), "--out", str(target), "--overwrite"]
        args += ["--seq-len", "5"] if target != out else []
        assert main(args) == 2
        assert "never replaces an input" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    for target in (run, run / "checkpoints" / "step_00000001"):
        assert main(["import-hrm", str(step), "--seq-len", "5", "--out", str(target), "--overwrite"]) == 2
        assert "never that" in capsys.readouterr().err
    assert step.is_file() and (run / "metrics.jsonl").exists()

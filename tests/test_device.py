"""Training where the kernels run: train.backend / train.device, their resolution and errors, the kernel
backends training like the reference, and (on a GPU) a whole run on CUDA with the Triton backend."""

import json

import pytest
import torch
from conftest import TINY

from hrmspec.backends import REGISTRY
from hrmspec.backends.common.fallback import record_fallbacks
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts import placement
from hrmspec.runtime.artifacts.config import TrainConfig, TrainError
from hrmspec.runtime.artifacts.files import read_tensors
from hrmspec.runtime.artifacts.placement import PlacementError, resolve
from hrmspec.runtime.training.loop import Trainer, train
from hrmspec.spec import load_spec_text

# conftest's tiny spec, small enough that a step in Triton's interpreter takes seconds: few rows of few
# tokens, one call per module, every call with gradient
PICO = {"model.vocab": 288, "model.d_model": 16, "model.heads": 2, "model.ffn": 32, "model.max_seq_len": 16,
        "model.schedule": [{"repeat": 1, "do": ["z_L = L(z_L + z_H)", "z_H = H(z_H + z_L)"]}], "model.credit": "none",
        "train": {"steps": 3, "batch_size": 1, "seq_len": 16, "log_every": 1, "save_every": 100, "lr": 3.0e-3,
                  "max_new_tokens": 4}}


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    """A spec factory over a tiny JSONL set: spec(**overrides)."""
    root = tmp_path_factory.mktemp("pico")
    data = root / "sums.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{i}+{i}", "response": str(2 * i)}) + "\n"
                            for i in range(20)))
    base = {**PICO, "data": {"source": "jsonl", "path": str(data), "eval_path": str(data)}}
    return lambda **over: load_spec_text(TINY, overrides={**base, **over})


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def reference_run(pico, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    train(pico(), run, progress_bar=False, backend="reference")
    return run


@pytest.mark.parametrize("backend", [pytest.param("c", marks=pytest.mark.needs_cc),
                                     pytest.param("opencl", marks=pytest.mark.needs_opencl), "triton", "inductor"])
def test_kernel_backends_train_like_the_reference(pico, reference_run, tmp_path, backend):
    """A few optimizer steps on generated kernels (host C, PoCL, Triton's interpreter, Inductor's C++) give the
    reference's losses and weights, every row op on a kernel."""
    if backend == "triton":
        pytest.importorskip("triton")
    if backend == "inductor" and REGISTRY["inductor"].missing():
        pytest.skip(REGISTRY["inductor"].missing())
    with record_fallbacks() as fell:
        train(pico(), tmp_path, progress_bar=False, backend=backend)
    assert not fell, fell
    ref, got = losses(reference_run), losses(tmp_path)
    assert len(got) == len(ref) == 3
    assert got == pytest.approx(ref, rel=1e-4)
    a = read_tensors(ckpt.latest_checkpoint(reference_run) / "model.safetensors")
    b = read_tensors(ckpt.latest_checkpoint(tmp_path) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_train_section_names_backend_device_and_dtype():
    cfg = TrainConfig.from_dict({})
    assert (cfg.backend, cfg.device, cfg.dtype) == ("auto", "auto", "auto")
    assert TrainConfig.from_dict({"device": "cuda:1", "backend": "opencl"}).device == "cuda:1"
    for key, value, want in [("device", "gpu", "train.device: expected auto | cpu | cuda | cuda:N, found 'gpu'"),
                             ("device", 0, "train.device: expected"),
                             ("backend", "tritn", "train.backend: expected auto | reference .* did you mean 'triton'"),
                             ("dtype", "fp16", "train.dtype: expected auto | fp32 | bf16")]:
        with pytest.raises(TrainError, match=want):
            TrainConfig.from_dict({key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_auto_on_a_cpu_machine_is_the_cpu_backend_in_fp32():
    p = resolve()
    assert (p.backend, p.device, p.dtype) == (placement.CPU_BACKEND, torch.device("cpu"), "fp32")
    with resolve(dtype="bf16").autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two CUDA devices as torch reports them, for the resolution logic alone (nothing runs on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_devices_resolve_per_local_rank(fake_gpus, monkeypatch):
    assert placement.resolve_device("auto") == torch.device("cuda", 0)
    assert placement.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert placement.resolve_device("cpu") == torch.device("cpu")
    assert placement.resolve_device("auto", rank=1) == torch.device("cuda", 1)  # one device per local rank
    with pytest.raises(PlacementError, match=r"--device cuda:2: this machine has 2 CUDA devices \(cuda:0..cuda:1\)"):
        placement.resolve_device("cuda:2")
    with pytest.raises(PlacementError, match=r"train.device cuda \(local rank 2\): this machine has 2 CUDA devices"):
        placement.resolve_device("cuda", "train.device", rank=2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(PlacementError, match="each process takes the device of its local rank; use --device cuda"):
        placement.resolve_device("cuda:1", rank=0)


def test_auto_on_cuda_is_triton_and_bf16(fake_gpus, monkeypatch):
    pytest.importorskip("triton")
    from hrmspec.backends.triton import table

    monkeypatch.setattr(table, "interpreting", lambda: False)  # as on a GPU machine: compiled kernels
    p = resolve("auto", "cuda")
    assert (p.backend, p.device, p.dtype) == ("triton", torch.device("cuda", 0), "bf16")
    assert resolve("auto", "cpu").backend == placement.CPU_BACKEND
    with pytest.raises(PlacementError, match="--backend triton: Triton's kernels run on CUDA here .*TRITON_INTERPRET"):
        resolve("triton", "cpu")
    monkeypatch.setattr(table, "interpreting", lambda: True)  # TRITON_INTERPRET set on a GPU machine
    assert resolve("auto", "cuda").backend == "reference"  # the interpreter takes no CUDA tensors
    with pytest.raises(PlacementError, match="TRITON_INTERPRET is set.*not on cuda:0; unset it, or use --device cpu"):
        resolve("triton", "cuda")


def test_a_backend_on_the_wrong_kind_of_device_says_what_to_use(fake_gpus, c_ops):
    with pytest.raises(PlacementError, match=f"train.backend {c_ops.name}: its kernels take CPU tensors, not CUDA "
                                             "ones; on cuda:0 use train.backend triton, cuda or reference"):
        resolve(c_ops.name, "cuda", keys=("train.backend", "train.device"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("argv, want", [
    (["--device", "cuda"], "hrmspec: error: --device cuda: torch sees no CUDA device here"),
    (["--set", "train.device=cuda:0"], "hrmspec: error: train.device cuda:0: torch sees no CUDA device here"),
    (["--backend", "cuda"], "hrmspec: error: --backend cuda: the cuda backend needs a CUDA device and CuPy"),
])
def test_what_cannot_run_here_is_one_line_exit_2(pico, tmp_path, capsys, argv, want):
    from hrmspec.cli import main

    spec_file = tmp_path / "pico.yaml"
    spec_file.write_text(json.dumps(pico().raw))
    assert main(["train", str(spec_file), "--out", str(tmp_path / "run"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(want) and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_eval_and_generate_take_backend_and_device(reference_run, capsys):
    from hrmspec.cli import main
    from hrmspec.runtime.evaluate.heldout import load_run

    model, *_ = load_run(reference_run, backend="auto", device="cpu")
    assert model.backend == placement.CPU_BACKEND and model.embed.weight.device.type == "cpu"
    assert main(["eval", str(reference_run), "--n", "2", "--device", "cpu", "--backend", "reference"]) == 0
    assert main(["generate", str(reference_run), "3+3", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(["generate", str(reference_run), "3+3", "--device", "cuda"]) == 2
        assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.fallback  # decoding with a KV cache runs the reference attention (query and key lengths differ)
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.needs_gpu]),
                                    pytest.param("cpu", marks=pytest.mark.slow)])
def test_a_run_on_the_device_resumes_evaluates_and_generates(pico, tmp_path, capsys, device):
    """20 steps with the Triton backend on `device` (CUDA: compiled kernels in bf16 autocast; CPU: the
    interpreter), stopped at 10 and resumed; state on the device throughout, checkpoints on the CPU,
    eval and generate on the device, and the weights equal on the CPU."""
    pytest.importorskip("triton")
    from hrmspec.cli import main
    from hrmspec.runtime.evaluate.heldout import load_run

    spec = pico(**{"train.steps": 20, "train.save_every": 10, "train.log_every": 5})
    full, part = tmp_path / "full", tmp_path / "part"
    trainer = Trainer(spec, full, backend="triton", device=device)
    try:
        assert trainer.placement.backend == "triton" and trainer.device.type == device
        with record_fallbacks() as fell:
            trainer.fit(progress_bar=False)
        assert not fell, fell  # every row op, the attention and the loss ran as Triton kernels
        on = {t.device.type for t in [*trainer.model.parameters(), *trainer.model.buffers(),
                                      *trainer.ema.shadow.values()]}
        on |= {v.device.type for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"}
        assert on == {device}
    finally:
        trainer.release()
    train(spec, part, progress_bar=False, backend="triton", device=device, stop_after=10)
    train(spec, part, resume=True, progress_bar=False, backend="triton", device=device)
    assert losses(part) == pytest.approx(losses(full), rel=1e-3)
    last = ckpt.latest_checkpoint(part)
    saved = torch.load(last / "optimizer.pt", weights_only=True)  # no map_location: only CPU tensors in it
    assert {v.device.type for s in saved["state"].values() for v in s.values()} == {"cpu"}

    assert main(["eval", str(part), "--n", "4", "--backend", "triton", "--device", device]) == 0
    assert main(["generate", str(part), "3+3", "--max-new-tokens", "3", "--backend", "triton",
                 "--device", device]) == 0
    capsys.readouterr()
    here, *_ = load_run(part, backend="triton", device=device)
    there, *_ = load_run(part, backend="reference", device="cpu")
    ids = torch.randint(0, 200, (2, 8))
    with torch.no_grad():
        a, b = here(ids.to(device)).logits.float().cpu(), there(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)

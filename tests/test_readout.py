"""Per-cycle readouts (runtime/evaluate/readout.py): the loss after each loop step equals an independent
computation — the recurrence written out by hand with the model's own modules, or the forward run with the
loop cut at that step — and each call's norm and change are those of the states it wrote."""

import json

import pytest
import torch
import torch.nn.functional as F

import hrmspec
from hrmspec.cli import main
from hrmspec.runtime.evaluate.readout import Readout, merge, read_out, read_out_rows
from hrmspec.spec import load_spec_text
from hrmspec.spec.load import load_spec

HRM = """
name: hrm-readout
model:
  vocab: 40
  d_model: 32
  heads: 2
  ffn: 64
  max_seq_len: 32
  modules: {L: {layers: 1}, H: {layers: 1}}
  states: {z_H: {init: embed}, z_L: {init: buffer}}
  schedule:
    - repeat: 3
      do:
        - repeat: 2
          do: ["z_L = L(z_L + z_H)"]
        - "z_H = H(z_H + z_L)"
  output: z_H
  credit: {last: 2}
"""


def batch(vocab, rows=3, S=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, S), generator=g)
    labels = torch.randint(0, vocab, (rows, S), generator=g)
    labels[:, : S // 3] = -100  # the instruction: not counted
    return {"input_ids": ids, "labels": labels}


def ce(logits, labels):
    return float(F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100))


def test_an_hrm_readout_matches_the_recurrence_written_by_hand():
    torch.manual_seed(0)
    spec = load_spec_text(HRM)
    model = hrmspec.compile(spec, backend="reference").eval()
    b = batch(spec.model.vocab)
    res = read_out(model, b)
    assert [p["step"] for p in res.points] == [1, 2, 3] and len(res.calls) == 9
    with torch.no_grad():
        z, ctx, _ = model.begin(b["input_ids"])
        zh, zl = z["z_H"], z["z_L"]
        want_loss, want_change = [], []
        for _ in range(3):
            for _ in range(2):
                new = model.stacks["L"]([zl, zh], ctx)
                want_change.append(float((new - zl).norm() / new.norm()))
                zl = new
            new = model.stacks["H"]([zh, zl], ctx)
            want_change.append(float((new - zh).norm() / new.norm()))
            zh = new
            want_loss.append(ce(model.logits_of(zh), b["labels"]))
    assert [p["loss"] for p in res.points] == pytest.approx(want_loss, rel=1e-4)
    assert [c["change"] for c in res.calls] == pytest.approx(want_change, rel=1e-4, abs=1e-6)
    assert [c["state"] for c in res.calls] == ["z_L", "z_L", "z_H"] * 3
    logits = model.logits_of(zh)
    right = (logits.argmax(-1) == b["labels"]) & (b["labels"] != -100)
    assert res.points[-1]["accuracy"] == pytest.approx(float(right.sum()) / int((b["labels"] != -100).sum()), abs=1e-6)


def test_each_step_of_a_huginn_readout_is_the_forward_with_the_loop_cut_there():
    """huginn-tiny: a prelude, a sampled core loop and a coda; the readout after step t runs the coda on the
    states at t, which is what the forward computes when the loop runs t times (same random initial state)."""
    spec = load_spec("specs/huginn-tiny.yaml")
    torch.manual_seed(0)
    model = hrmspec.compile(spec, backend="reference").eval()
    b = batch(spec.model.vocab, rows=2, S=10)
    torch.manual_seed(5)
    res = read_out(model, b, num_steps=4)
    assert len(res.points) == 4
    for t in range(1, 5):
        torch.manual_seed(5)
        with torch.no_grad():
            out = model(b["input_ids"], labels=b["labels"], num_steps=t)
        assert res.points[t - 1]["loss"] == pytest.approx(float(out.loss), rel=1e-5)


def test_a_schedule_without_a_loop_has_one_point_the_forward():
    with open("specs/transformer.yaml") as f:
        spec = load_spec_text(f.read(), "specs/transformer.yaml",
                              {"model.d_model": 32, "model.heads": 2, "model.ffn": 64, "model.vocab": 50})
    torch.manual_seed(0)
    model = hrmspec.compile(spec, backend="reference").eval()
    b = batch(50)
    res = read_out(model, b)
    with torch.no_grad():
        out = model(b["input_ids"], labels=b["labels"])
    assert len(res.points) == 1 and res.points[0]["loss"] == pytest.approx(float(out.loss), rel=1e-5)


def test_merged_readouts_weight_losses_by_tokens_and_exact_by_rows():
    def one(loss, accuracy, exact, norm, change, rows, tokens):
        call = {"call": 0, "state": "h", "text": "h = T(h)", "norm": norm, "change": change}
        return Readout([{"step": 1, "loss": loss, "accuracy": accuracy, "exact": exact}], [call], rows, tokens)

    a, b = one(1.0, 0.5, 0.0, 1.0, 0.2, 1, 10), one(4.0, 0.0, 1.0, 3.0, 0.4, 3, 30)
    m = merge([a, b])
    assert m.rows == 4 and m.tokens == 40
    assert m.points[0]["loss"] == pytest.approx((10 * 1 + 30 * 4) / 40)
    assert m.points[0]["accuracy"] == pytest.approx(5 / 40) and m.points[0]["exact"] == pytest.approx(3 / 4)
    assert m.calls[0]["norm"] == pytest.approx((1 + 9) / 4) and m.calls[0]["change"] == pytest.approx((0.2 + 1.2) / 4)


def test_chunked_rows_read_out_as_one_batch():
    torch.manual_seed(0)
    spec = load_spec_text(HRM)
    model = hrmspec.compile(spec, backend="reference").eval()
    b = batch(spec.model.vocab, rows=5)

    class Rows:
        def __len__(self):
            return 5

        def batch(self, index):
            return {k: v[index] for k, v in b.items()}

    whole, chunked = read_out(model, b), read_out_rows(model, Rows(), n=5, batch_size=2)
    for p, q in zip(whole.points, chunked.points):
        assert q["loss"] == pytest.approx(p["loss"], rel=1e-4) and q["accuracy"] == pytest.approx(p["accuracy"])


def test_eval_per_cycle_prints_the_table_and_writes_readout_json(tmp_path, capsys):
    from test_eval_reports import SPEC

    from hrmspec.runtime.training.loop import train

    _text_folder(tmp_path)
    spec = load_spec_text(SPEC, str(tmp_path / "micro.yaml"))
    run = tmp_path / "run"
    train(spec, run, progress_bar=False)
    capsys.readouterr()
    assert main(["eval", str(run), "--per-cycle", "--n", "4"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "readout.json").read_text())
    assert len(saved["points"]) == 2 and len(saved["calls"]) == 4 and saved["rows"] >= 1
    assert "per-cycle readout" in out and "z_L = L(z_L + z_H)" in out
    assert main(["eval", str(run), "--per-cycle", "--exit", "kl:0.01"]) == 2
    assert "--per-cycle" in capsys.readouterr().err


def _text_folder(tmp_path):
    from test_eval_reports import WORDS

    for name, part in (("train", WORDS[:24]), ("eval", WORDS[24:])):
        lines = [json.dumps({"instruction": f"reverse {w}", "response": w[::-1]}) for w in part]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_training_logs_a_readout_each_log_line_without_touching_the_training_stream(tmp_path, capsys):
    """A random initial state draws from the RNG at every forward: the readout draws from a fork of it, so a run
    that reads out trains exactly as one that does not; `plot` draws the readouts."""
    from test_eval_reports import SPEC

    from hrmspec.runtime.training.loop import train

    folder = _text_folder(tmp_path)
    losses = {}
    for rows in (0, 3):
        spec = load_spec_text(SPEC, str(folder / "micro.yaml"),
                              {"model.states.z_L": {"init": "random"}, "train.readout_rows": rows,
                               "train.steps": 3, "train.save_every": 3})
        run = folder / f"run{rows}"
        train(spec, run, progress_bar=False)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if "loss" in r and "eval" not in r]
        losses[rows] = [r["loss"] for r in steps]
        if rows:
            readouts = [r["readout"] for r in steps]
            assert len(readouts) == 3 and all(len(r["loss"]) == 2 and len(r["change"]) == 4 for r in readouts)
            assert readouts[0]["calls"][0] == "z_L = L(z_L + z_H)"
        else:
            assert not any("readout" in r for r in steps)
    assert losses[0] == losses[3]
    capsys.readouterr()
    assert main(["plot", str(folder / "run3")]) == 0
    out = capsys.readouterr().out
    assert "readout.png" in out and (folder / "run3" / "readout.png").stat().st_size > 0
    assert main(["plot", str(folder / "run0")]) == 0 and "readout.png" not in capsys.readouterr().out


def test_a_readout_point_made_a_few_positions_at_a_time_is_the_same(monkeypatch):
    """A large vocabulary never makes S x V logits at once: the points are computed in position chunks."""
    import hrmspec.runtime.evaluate.readout as readout

    torch.manual_seed(0)
    spec = load_spec_text(HRM)
    model = hrmspec.compile(spec, backend="reference").eval()
    b = batch(spec.model.vocab)
    whole = read_out(model, b)
    monkeypatch.setattr(readout, "LOGITS", 3 * 2 * spec.model.vocab)  # two positions of 3 rows at a time
    chunked = read_out(model, b)
    assert [p["loss"] for p in chunked.points] == pytest.approx([p["loss"] for p in whole.points], rel=1e-6)
    assert [p["accuracy"] for p in chunked.points] == [p["accuracy"] for p in whole.points]
    assert [p["exact"] for p in chunked.points] == [p["exact"] for p in whole.points]

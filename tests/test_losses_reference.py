"""Every training loss and halting loss against a reference written here from its definition.

The references are plain Python over floats (math.fsum, one token, one row, one position at a time),
written from the papers, not from the code:

    softmax     -log(exp(x_y) / sum_j exp(x_j))
    stablemax   -log(s(x_y) / sum_j s(x_j)),  s(x) = x + 1 for x >= 0, 1 / (1 - x) below (HRM)
    BCE(x, t)   -(t log sigmoid(x) + (1 - t) log sigmoid(-x)), t in [0, 1]

1. task_completion: the loss of response tokens only (PrefixLM rows packed), normalised per token over
   the whole batch (docs/training.md: "averaged over every response token of the global batch"): the
   model's loss on either path (full logits, chunked linear + cross-entropy), and the trainer's step.
2. token losses and the reductions over the loop's steps: softmax and stablemax per token, each row's
   mean, `steps: last` (the output's loss) and `steps: sum` (sum_t L_t); `steps: expected` is the exit
   gate's, in 4. A grid objective takes `last` only (the spec refuses the others for grids).
3. deep supervision (HRM's ACT loss head, TRM's): sum over rows of each row's mean token loss, plus
   weight x (BCE(q_halt, row solved) + BCE(q_continue, target)); the Q-learning target from the HRM
   paper, sigmoid(q_halt') at the last segment, else sigmoid(max(q_halt', q_continue')); the metrics
   of the rows that halted; the trainer's step, which divides by the rows.
4. halting inside one forward: Graves' ACT (N, the remainder R, the ponder cost N + R, the weighted
   state) and Ouro's exit gate (p_t = lambda_t prod_{j<t} (1 - lambda_j), loss sum_t p_t L_t - beta H(p),
   exit at the first step whose cumulative probability reaches q), values and the head's gradients.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_grids import GRID_SPEC

import hrmspec
from hrmspec.runtime.artifacts.packing import pack
from hrmspec.runtime.execution.losses import row_mean, token_losses
from hrmspec.runtime.execution.rules import act_update, exit_gate_loss, exit_log_probs, expected_step, ponder_loss
from hrmspec.runtime.execution.supervision import Carry, SegmentOutput, Supervisor
from hrmspec.runtime.training.loop import Trainer
from hrmspec.spec import load_spec_text

IGNORE = -100


# ================================================================ references from the definitions
def softmax_nll(row: list[float], y: int) -> float:
    top = max(row)
    return -(row[y] - top - math.log(math.fsum(math.exp(x - top) for x in row)))


def stablemax_nll(row: list[float], y: int) -> float:
    s = [x + 1.0 if x >= 0 else 1.0 / (1.0 - x) for x in row]
    return -math.log(s[y] / math.fsum(s))


NLL = {"softmax": softmax_nll, "stablemax": stablemax_nll}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def bce(x: float, t: float) -> float:
    return -(t * log_sigmoid(x) + (1.0 - t) * log_sigmoid(-x))


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


# ================================================================ 1. task_completion
TEXT = """
name: text-probe
model:
  vocab: 17
  d_model: 16
  heads: 2
  ffn: 32
  max_seq_len: 16
  modules: {L: {layers: 1}, H: {layers: 1}}
  states: {z_H: {init: embed}, z_L: {init: buffer}}
  schedule:
    - repeat: 2
      do: ["z_L = L(z_L + z_H)", "z_H = H(z_H + z_L)"]
  output: z_H
  credit: none
objective: OBJECTIVE
"""


def text_model(objective: str = "task_completion", seed: int = 0):
    model = hrmspec.compile(load_spec_text(TEXT.replace("OBJECTIVE", objective)))
    model.reset_parameters(seed=seed)
    return model


def response_labels(samples: list[tuple[list[int], list[int]]], seq_len: int) -> list[int]:
    """HRM-Text's labels of samples laid side by side in one row: the last prompt token predicts the first
    response token and each response token the next; the sample's last token and the prompt predict nothing."""
    labels = []
    for prompt, response in samples:
        ids = prompt + response
        for j in range(len(ids)):
            labels.append(ids[j + 1] if len(prompt) - 1 <= j < len(ids) - 1 else IGNORE)
    return labels + [IGNORE] * (seq_len - len(labels))


def test_packed_labels_count_response_tokens_only():
    samples = [([5, 6, 7], [8, 9]), ([4], [3, 2, 1])]
    rows, _ = pack(samples, 12)
    # written out: 5 6 7 | 8 9 then 4 | 3 2 1; 7 predicts 8, 8 predicts 9, 4 predicts 3, 3 -> 2, 2 -> 1
    want = [IGNORE, IGNORE, 8, 9, IGNORE, 3, 2, 1, IGNORE, IGNORE, IGNORE, IGNORE]
    assert rows.labels[0].tolist() == want == response_labels(samples, 12)
    assert rows.prefix_mask[0].tolist() == [True] * 3 + [False] * 2 + [True] + [False] * 6


def _batch(rows):
    return {k: getattr(rows, k) for k in rows.KEYS}


def _token_mean(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean over every counted token of the batch, mean over rows of each row's mean), by hand."""
    per_row = []
    for b in range(labels.shape[0]):
        row = [softmax_nll(logits[b, s].double().tolist(), int(labels[b, s]))
               for s in range(labels.shape[1]) if labels[b, s] != IGNORE]
        per_row.append(row)
    tokens = [x for row in per_row for x in row]
    return math.fsum(tokens) / len(tokens), math.fsum(math.fsum(r) / len(r) for r in per_row if r) / len(per_row)


def test_task_completion_loss_is_the_mean_over_the_batchs_response_tokens():
    # rows with 5 and 2 response labels: a mean of row means would weigh the short row's tokens 2.5 x
    rows, _ = pack([([5, 6, 7], [8, 9]), ([4], [3, 2, 1]), ([1, 2, 3, 4, 5, 6, 7], [9, 10])], 12)
    counts = (rows.labels != IGNORE).sum(-1).tolist()
    assert len(rows) == 2 and sorted(counts) == [2, 5]
    model = text_model()
    batch = _batch(rows)
    full = model(**batch)
    chunked = model(**batch, return_logits=False)
    per_token, per_row = _token_mean(full.logits.detach(), batch["labels"])
    assert rel(per_token, per_row) > 1e-3, "the rows' means must differ for this to tell the normalisations apart"
    assert int(full.n_tokens) == int(chunked.n_tokens) == 7
    assert full.loss.item() == pytest.approx(per_token, rel=1e-5)
    assert chunked.loss.item() == pytest.approx(per_token, rel=1e-5)
    assert chunked.loss_sum.item() == pytest.approx(per_token * 7, rel=1e-5)
    # F.cross_entropy's mean with ignore_index is the per-token mean too
    ref = torch.nn.functional.cross_entropy(full.logits.detach().flatten(0, 1), batch["labels"].flatten())
    assert chunked.loss.item() == pytest.approx(ref.item(), rel=1e-5)


samples_st = st.lists(st.tuples(st.lists(st.integers(1, 16), min_size=1, max_size=5),
                                st.lists(st.integers(1, 16), min_size=1, max_size=5)), min_size=1, max_size=5)


@settings(max_examples=25)
@given(samples=samples_st, seed=st.integers(0, 50))
def test_task_completion_loss_on_packed_samples(samples, seed):
    rows, _ = pack(samples, 12)
    model = text_model(seed=seed)
    batch = _batch(rows)
    # the labels by hand, row by row from the samples the packer placed there
    for r, members in enumerate(rows.sources):
        assert rows.labels[r].tolist() == response_labels([samples[i] for i in members], 12)
    with torch.no_grad():
        logits = model(**batch).logits
        out = model(**batch, return_logits=False)
    per_token, _ = _token_mean(logits, batch["labels"])
    assert out.loss.item() == pytest.approx(per_token, rel=1e-5, abs=1e-6)


JSONL_SPEC = """
name: text-trainer
model:
  vocab: 300
  d_model: 16
  heads: 2
  ffn: 32
  max_seq_len: 32
  modules: {U: {layers: 1}}
  states: {h: {init: embed}}
  schedule: ["h = U(h)"]
  output: h
  credit: none
data: {source: jsonl, path: PATH}
train: {steps: 4, batch_size: 2, seq_len: 32, eval_every: 0}
"""


def test_the_trainers_step_loss_is_the_mean_over_the_batchs_response_tokens(tmp_path):
    words = ["cat", "dog", "bird", "fish", "owl", "bee", "ant", "cow", "yak", "emu"]
    lines = [json.dumps({"instruction": f"reverse {w}", "response": w[::-1] * (1 + i % 3)})
             for i, w in enumerate(words)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    spec = load_spec_text(JSONL_SPEC.replace("PATH", str(tmp_path / "train.jsonl")))
    trainer = Trainer(spec, tmp_path / "run")
    try:
        batch = next(trainer.batches)
        trainer._schedule()
        with torch.no_grad():
            logits = trainer.model(**batch).logits
        per_token, per_row = _token_mean(logits, batch["labels"])
        assert rel(per_token, per_row) > 1e-4, "rows with equal means cannot tell the normalisations apart"
        loss = trainer.train_step(batch).loss
        assert loss == pytest.approx(per_token, rel=1e-5)
    finally:
        trainer.release()


# ================================================================ 2. token losses, rows, steps
def test_token_losses_of_hand_picked_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(1), math.log(2), math.log(5)], [0.0, 1.0, -1.0],
                            [3.0, -3.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[1, 2, 1, 0]])
    # softmax: p = 1/3; 5/8; e / (1 + e + 1/e); e^3 / (e^3 + e^-3 + 1)
    e = math.e
    soft = [math.log(3), -math.log(5 / 8), -math.log(e / (1 + e + 1 / e)), -math.log(e**3 / (e**3 + e**-3 + 1))]
    # stablemax: s = (1, 1, 1); (1, 1 + ln 2, 1 + ln 5); (1, 2, 1/2); (4, 1/4, 1)
    stable = [math.log(3), -math.log((1 + math.log(5)) / (2 + math.log(2) + 1 + math.log(5))), math.log(3.5 / 2),
              math.log(5.25 / 4)]
    got_soft, got_stable = token_losses(logits, labels, "softmax"), token_losses(logits, labels, "stablemax")
    assert got_soft[0].tolist() == pytest.approx(soft, rel=1e-6, abs=1e-6)  # softmax in fp32
    assert got_stable[0].tolist() == pytest.approx(stable, rel=1e-12)
    ignored = torch.tensor([[1, IGNORE, IGNORE, 0]])
    for kind, want in (("softmax", soft), ("stablemax", stable)):
        per_token = token_losses(logits, ignored, kind)
        assert per_token[0].tolist() == pytest.approx([want[0], 0.0, 0.0, want[3]], rel=1e-6, abs=1e-6)
        # the row's mean over its two counted tokens; a row with none counts 0
        both = torch.cat([ignored, torch.full_like(ignored, IGNORE)])
        means = row_mean(token_losses(logits.expand(2, -1, -1), both, kind), both)
        assert means.tolist() == pytest.approx([(want[0] + want[3]) / 2, 0.0], rel=1e-6)


@settings(max_examples=40)
@given(data=st.data(), B=st.integers(1, 3), S=st.integers(1, 4), V=st.integers(2, 5),
       kind=st.sampled_from(["softmax", "stablemax"]))
def test_token_losses_and_row_means_of_drawn_logits(data, B, S, V, kind):
    logits = data.draw(st.lists(st.floats(-20, 20, width=32), min_size=B * S * V, max_size=B * S * V))
    labels = data.draw(st.lists(st.sampled_from([IGNORE, *range(V)]), min_size=B * S, max_size=B * S))
    x, y = torch.tensor(logits).view(B, S, V), torch.tensor(labels).view(B, S)
    per_token = token_losses(x, y, kind)
    means = row_mean(per_token, y)
    for b in range(B):
        row = [NLL[kind](x[b, s].double().tolist(), int(y[b, s])) if y[b, s] != IGNORE else 0.0 for s in range(S)]
        assert per_token[b].tolist() == pytest.approx(row, rel=1e-5, abs=1e-5)
        counted = [v for v, t in zip(row, y[b].tolist()) if t != IGNORE]
        assert means[b].item() == pytest.approx(math.fsum(counted) / len(counted) if counted else 0.0,
                                                rel=1e-5, abs=1e-5)


LOOP_TEXT = """
name: loop-probe
model:
  vocab: 13
  d_model: 8
  heads: 2
  ffn: 16
  max_seq_len: 16
  modules: {U: {layers: 1}}
  states: {h: {init: embed}}
  schedule:
    - repeat: 4
      do: ["h = U(h)"]
  output: h
  head: untied
  credit: none
HALTING
objective: OBJECTIVE
"""
T = 4  # steps of LOOP_TEXT's loop


def loop_model(objective: str, halting: str = "", seed: int = 0):
    text = LOOP_TEXT.replace("HALTING", f"  halting: {halting}" if halting else "").replace("OBJECTIVE", objective)
    model = hrmspec.compile(load_spec_text(text))
    model.reset_parameters(seed=seed)
    return model


def record_outputs(model, module: str = "U") -> list[torch.Tensor]:
    """Every output of a module's calls, in order (float64 copies)."""
    seen, real = [], model.stacks[module].forward

    def forward(*args, **kwargs):
        y = real(*args, **kwargs)
        seen.append(y.detach().double().clone())
        return y

    model.stacks[module].forward = forward
    return seen


def text_batch(B=2, S=6, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = torch.randint(0, vocab, (B, S), generator=g)
    labels[0, :2] = IGNORE  # rows count different numbers of tokens
    labels[-1, -1] = IGNORE
    return ids, labels


def scored(states: torch.Tensor, W: torch.Tensor, labels: torch.Tensor, kind: str) -> float:
    """Sum over the counted positions of the token loss of the head's logits of output states (B, S, d)."""
    logits = states @ W.T
    counted = (labels != IGNORE).nonzero().tolist()
    return math.fsum(NLL[kind](logits[b, s].tolist(), int(labels[b, s])) for b, s in counted)


@pytest.mark.parametrize("kind", ["softmax", "stablemax"])
@pytest.mark.parametrize("objective", ["lm", "task_completion"])
def test_steps_last_scores_the_output_with_the_objectives_token_loss(kind, objective):
    model = loop_model(f"{{type: {objective}, loss: {kind}}}")
    ids, labels = text_batch()
    seen = record_outputs(model)
    W = model.head.weight.detach().double()
    for return_logits in (True, False):
        seen.clear()
        out = model(ids, labels=labels, return_logits=return_logits)
        assert len(seen) == T
        want = scored(seen[-1], W, labels, kind) / int((labels != IGNORE).sum())
        assert out.loss.item() == pytest.approx(want, rel=1e-5), f"return_logits={return_logits}"


@pytest.mark.parametrize("kind", ["softmax", "stablemax"])
def test_steps_sum_scores_every_steps_output(kind):
    model = loop_model(f"{{type: lm, loss: {kind}, steps: sum}}")
    ids, labels = text_batch(seed=1)
    seen = record_outputs(model)
    out = model(ids, labels=labels, return_logits=False)
    W = model.head.weight.detach().double()
    assert len(seen) == T
    want = math.fsum(scored(h, W, labels, kind) for h in seen) / int((labels != IGNORE).sum())
    assert out.loss.item() == pytest.approx(want, rel=1e-5)


# ================================================================ 3. deep supervision
GRID = """
name: supervised-probe
model:
  vocab: 5
  d_model: 8
  heads: 2
  expansion: 2
  max_seq_len: 6
  block:
    norm: {type: rms, eps: 1.0e-5, place: post}
    attention: {type: plain, mask: bidirectional}
  modules: {net: {layers: 1, exit_norm: none}}
  states: {z: {init: buffer}, y: {init: buffer}}
  schedule:
    - repeat: 2
      do: ["z = net(z + y + x)", "y = net(y + z)"]
  output: y
  head: untied
  credit: {last: 2}
  puzzle: {identifiers: 2, positions: 1}
objective: {type: grid, loss: LOSS}
supervision: {segments: SEGMENTS, halting: {type: HALTING, exploration: 0.0, weight: WEIGHT}}
"""


def grid_model(halting="q_learning", loss="softmax", segments=3, weight=0.5, seed=0):
    text = GRID.replace("LOSS", loss).replace("SEGMENTS", str(segments)).replace("WEIGHT", str(weight))
    if halting is None:
        text = text.replace(", halting: {type: HALTING, exploration: 0.0, weight: " + str(weight) + "}", "")
    text = text.replace("HALTING", str(halting))
    model = hrmspec.compile(load_spec_text(text))
    model.reset_parameters(seed=seed)
    return model


def supervision_reference(logits, labels, q_halt, q_continue, target, halted, steps, kind, weight):
    """HRM's ACT loss head, row by row: (total, metrics). Arguments are nested lists / lists of floats;
    `q_halt` None without a halting head, `target` None without a q_continue target (TRM, or not training)."""
    lm, halt_losses, cont_losses = [], [], []
    m = {"rows": 0, "exact": 0, "accuracy": 0.0, "steps": 0, "q_halt_accuracy": 0}
    for b, (row_logits, row_labels) in enumerate(zip(logits, labels)):
        counted = [(x, y) for x, y in zip(row_logits, row_labels) if y != IGNORE]
        lm.append(math.fsum(NLL[kind](x, y) for x, y in counted) / len(counted) if counted else 0.0)
        right = sum(argmax(x) == y for x, y in counted)
        solved = right == len(counted)  # a row without counted tokens is vacuously solved, as in HRM
        if halted[b] and counted:  # the metrics are of the rows whose sample ended at this step
            m["rows"] += 1
            m["exact"] += solved
            m["accuracy"] += right / len(counted)
            m["steps"] += steps[b]
            if q_halt is not None:
                m["q_halt_accuracy"] += (q_halt[b] >= 0) == solved
        if q_halt is not None:
            halt_losses.append(bce(q_halt[b], 1.0 if solved else 0.0))
        if target is not None:
            cont_losses.append(bce(q_continue[b], target[b]))
    total = math.fsum(lm) + weight * (math.fsum(halt_losses) + math.fsum(cont_losses))
    m["lm_loss"] = math.fsum(lm)
    if q_halt is not None:
        m["q_halt_loss"] = math.fsum(halt_losses)
    else:
        del m["q_halt_accuracy"]
    if target is not None:
        m["q_continue_loss"] = math.fsum(cont_losses)
    return total, m


def check_metrics(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def carry_of(labels, halted, steps) -> Carry:
    labels = torch.tensor(labels)
    return Carry({}, torch.tensor(steps), torch.tensor(halted), {"labels": labels})


# logits c x onehot(prediction): the token loss is log(1 + (V - 1) e^-c) where the prediction is the label,
# log(e^c + V - 1) elsewhere
C, V = 2.0, 3
RIGHT, WRONG = math.log(1 + (V - 1) * math.exp(-C)), math.log(math.exp(C) + V - 1)
PREDICTIONS = [[0, 1, 2], [1, 0, 2], [0, 0, 0], [2, 2, 0]]
LABELS = [[0, 1, 2],  # all right: solved
          [1, IGNORE, 0],  # one right of two: not solved
          [IGNORE, IGNORE, IGNORE],  # nothing counted: no metrics, vacuously solved
          [2, 2, IGNORE]]  # solved, but its sample goes on: no metrics
HALTED, STEPS = [True, True, True, False], [2, 5, 1, 3]
Q_HALT, Q_CONTINUE, TARGET = [1.5, 0.25, 2.0, -1.0], [0.3, -2.0, 1.0, 0.0], [0.9, 0.2, 0.5, 0.7]


def hand_logits() -> torch.Tensor:
    return C * torch.nn.functional.one_hot(torch.tensor(PREDICTIONS), V).float()


@pytest.mark.parametrize("halting", ["q_learning", "bce", None])
def test_supervision_loss_of_hand_made_rows(halting):
    sup = Supervisor(grid_model(halting, weight=0.5))
    q = halting is not None
    out = SegmentOutput(hand_logits(), torch.tensor(Q_HALT) if q else None, torch.tensor(Q_CONTINUE) if q else None,
                        torch.tensor(TARGET) if halting == "q_learning" else None)
    total, metrics = sup.loss(carry_of(LABELS, HALTED, STEPS), out)
    lm = RIGHT + (RIGHT + WRONG) / 2 + 0.0 + RIGHT  # per row mean, summed over rows
    want = lm
    if q:  # targets of q_halt: solved, not, solved (vacuously), solved; BCE(x, 1) = log(1 + e^-x)
        halt = (math.log1p(math.exp(-1.5)) + math.log1p(math.exp(0.25)) + math.log1p(math.exp(-2.0))
                + math.log1p(math.exp(1.0)))
        cont = math.fsum(-(t * math.log(sigmoid(x)) + (1 - t) * math.log(1 - sigmoid(x)))
                         for x, t in zip(Q_CONTINUE, TARGET)) if halting == "q_learning" else 0.0
        want = lm + 0.5 * (halt + cont)
        assert metrics["q_halt_loss"] == pytest.approx(halt, rel=1e-6)
        assert metrics["q_halt_accuracy"] == 1  # row 0: q_halt >= 0 and solved; row 1: q_halt >= 0, not solved
        if halting == "q_learning":
            assert metrics["q_continue_loss"] == pytest.approx(cont, rel=1e-6)
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert metrics["lm_loss"] == pytest.approx(lm, rel=1e-6)
    # rows 0 and 1 halted with counted tokens: one exact, accuracies 1 and 1/2, after 2 and 5 segments
    assert (metrics["rows"], metrics["exact"], metrics["accuracy"], metrics["steps"]) == (2, 1, 1.5, 7)
    check_metrics(metrics, supervision_reference(hand_logits().tolist(), LABELS, Q_HALT if q else None, Q_CONTINUE,
                                                 TARGET if halting == "q_learning" else None, HALTED, STEPS,
                                                 "softmax", 0.5)[1])


def test_supervision_loss_weighs_the_halting_terms_and_nothing_else():
    out = SegmentOutput(hand_logits(), torch.tensor(Q_HALT), torch.tensor(Q_CONTINUE), torch.tensor(TARGET))
    carry = carry_of(LABELS, HALTED, STEPS)
    t0, m0 = Supervisor(grid_model(weight=0.0)).loss(carry, out)
    t2, m2 = Supervisor(grid_model(weight=2.0)).loss(carry, out)
    assert t0.item() == pytest.approx(m0["lm_loss"], rel=1e-6)
    assert t2.item() == pytest.approx(m2["lm_loss"] + 2.0 * (m2["q_halt_loss"] + m2["q_continue_loss"]), rel=1e-6)


@settings(max_examples=40)
@given(B=st.integers(1, 5), S=st.integers(1, 4), Vd=st.integers(2, 5), seed=st.integers(0, 2**16),
       halting=st.sampled_from(["q_learning", "bce", None]), kind=st.sampled_from(["softmax", "stablemax"]),
       with_target=st.booleans(), weight=st.sampled_from([0.0, 0.5, 1.3]))
def test_supervision_loss_of_drawn_rows(B, S, Vd, seed, halting, kind, with_target, weight):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, Vd, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) < 0.3] = IGNORE
    # a clear winner per token (the label about half the time), so rows are solved and unsolved
    guess = torch.where(torch.rand(B, S, generator=g) < 0.6, labels.clamp(min=0), torch.randint(0, Vd, (B, S),
                                                                                                 generator=g))
    logits = torch.rand(B, S, Vd, generator=g) * 2 - 1 + 3 * torch.nn.functional.one_hot(guess, Vd)
    halted = torch.rand(B, generator=g) < 0.5
    steps = torch.randint(1, 4, (B,), generator=g)
    q = torch.randn(B, 2, generator=g) * 3
    target = torch.rand(B, generator=g) if halting == "q_learning" and with_target else None
    sup = Supervisor(grid_model(halting, kind, weight=weight))
    out = SegmentOutput(logits, q[:, 0] if halting else None, q[:, 1] if halting else None, target)
    total, metrics = sup.loss(Carry({}, steps, halted, {"labels": labels}), out)
    want, want_metrics = supervision_reference(
        logits.double().tolist(), labels.tolist(), q[:, 0].tolist() if halting else None, q[:, 1].tolist(),
        None if target is None else target.tolist(), halted.tolist(), steps.tolist(), kind, weight)
    assert total.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    check_metrics(metrics, want_metrics)


def grid_batch(B=5, S=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(1, 5, (B, S), generator=g)
    labels[0] = IGNORE  # a row with nothing counted
    labels[1, :2] = IGNORE
    return {"input_ids": torch.randint(1, 5, (B, S), generator=g), "labels": labels,
            "puzzle_ids": torch.randint(0, 2, (B,), generator=g)}


def continuing_head(model, scale=0.05, q_halt=-3.0, q_continue=3.0):
    """A head whose q_halt stays far below q_continue (no row halts early) unless the scale is large."""
    with torch.no_grad():
        model.halting.weight.normal_(0, scale, generator=torch.Generator().manual_seed(7))
        model.halting.bias.copy_(torch.tensor([q_halt, q_continue]))
    return model


def hrm_target(next_q: torch.Tensor, steps: torch.Tensor, segments: int) -> list[float]:
    """HRM's target for q_continue, per row, from the next segment's (q_halt', q_continue'): at the last
    segment the sample ends, so only halting is worth anything, sigmoid(q_halt'); before it, the better of
    halting and going on, sigmoid(max(q_halt', q_continue'))."""
    return [sigmoid(h) if n == segments else sigmoid(max(h, c)) for (h, c), n in zip(next_q.tolist(), steps.tolist())]


@pytest.mark.parametrize("halting", ["q_learning", "bce"])
@pytest.mark.parametrize("kind", ["softmax", "stablemax"])
def test_supervised_segments_through_the_last_against_direct_forwards(halting, kind):
    segments = 3
    model = continuing_head(grid_model(halting, kind, segments=segments, weight=0.5, seed=1))
    sup = Supervisor(model)
    batch = grid_batch()
    carry, states = sup.initial_carry(batch), None
    for segment in range(1, segments + 1):
        carry, out = sup.step(carry, batch)
        assert (carry.steps == segment).all() and bool(carry.halted.all()) == (segment == segments)
        with torch.no_grad():
            direct = model(batch["input_ids"], puzzle_ids=batch["puzzle_ids"], states=states)
            nxt = model(batch["input_ids"], puzzle_ids=batch["puzzle_ids"], states=direct.states)
        states = direct.states
        torch.testing.assert_close(out.logits, direct.logits)
        target = hrm_target(nxt.q_logits, carry.steps, segments) if halting == "q_learning" else None
        if target is not None:
            assert out.target_q_continue.tolist() == pytest.approx(target, rel=1e-5)
        total, metrics = sup.loss(carry, out)
        want, want_metrics = supervision_reference(
            direct.logits.double().tolist(), batch["labels"].tolist(), direct.q_logits[:, 0].tolist(),
            direct.q_logits[:, 1].tolist(), target, carry.halted.tolist(), carry.steps.tolist(), kind, 0.5)
        assert total.item() == pytest.approx(want, rel=1e-5)
        check_metrics(metrics, want_metrics)
        assert metrics["rows"] == (4 if segment == segments else 0)  # every row with counted tokens ends at 3


def test_a_training_step_of_a_grid_run_is_the_supervised_loss_over_the_rows(tmp_path):
    spec = load_spec_text(GRID_SPEC, overrides={"data.size": 8, "train.batch_size": 4, "train.ema": None})
    trainer = Trainer(spec, tmp_path / "run")
    try:
        model, batch = trainer.model, next(trainer.batches)
        with torch.no_grad():  # a head that says something
            model.halting.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        trainer._schedule()
        with torch.no_grad():  # the first step: every row starts its sample from the initial states
            direct = model(batch["input_ids"], puzzle_ids=batch["puzzle_ids"])
            nxt = model(batch["input_ids"], puzzle_ids=batch["puzzle_ids"], states=direct.states)
        B, segments = batch["input_ids"].shape[0], spec.supervision.segments
        want, _ = supervision_reference(
            direct.logits.double().tolist(), batch["labels"].tolist(), direct.q_logits[:, 0].tolist(),
            direct.q_logits[:, 1].tolist(), hrm_target(nxt.q_logits, torch.ones(B, dtype=torch.long), segments),
            [False] * B, [1] * B, spec.objective.loss, spec.supervision.halting.weight)
        loss = trainer.train_step(batch).loss
        assert loss == pytest.approx(want / B, rel=1e-5)
    finally:
        trainer.release()


# ================================================================ 4. halting inside one forward
def fixed_step_logits(model, probabilities: list[list[float]]) -> list[torch.Tensor]:
    """Make the per-step head give probabilities[t] (one per position of a one-row batch) at step t + 1,
    and record the states it is shown."""
    seen, t = [], iter(range(len(probabilities)))

    def step_logits(h):
        seen.append(h.detach().double().clone())
        return torch.logit(torch.tensor(probabilities[next(t)], dtype=torch.float64)).float()[None]

    model.step_logits = step_logits
    return seen


# Graves' ACT by hand, four steps: N is the first step whose cumulative probability reaches the threshold
# 1 - eps (or the last step), R = 1 - sum_{t<N} p_t, the weights p_1 .. p_{N-1}, R, the ponder cost N + R.
ACT_P = [[0.3, 0.995, 0.1, 0.6],  # step 1, positions 0..3
         [0.5, 0.5, 0.1, 0.45],
         [0.4, 0.5, 0.1, 0.5],
         [0.2, 0.5, 0.1, 0.5]]
ACT_CASES = {
    # threshold: (N per position, weights per position)
    0.99: ([3, 1, 4, 2], [[0.3, 0.5, 0.2, 0], [1, 0, 0, 0], [0.1, 0.1, 0.1, 0.7], [0.6, 0.4, 0, 0]]),
    0.5: ([2, 1, 4, 1], [[0.3, 0.7, 0, 0], [1, 0, 0, 0], [0.1, 0.1, 0.1, 0.7], [1, 0, 0, 0]]),
}


@pytest.mark.parametrize("threshold", sorted(ACT_CASES))
def test_act_of_hand_picked_halting_probabilities(threshold):
    tau = 0.05
    model = loop_model("task_completion", f"{{type: act, threshold: {threshold}, weight: {tau}}}", seed=2)
    steps, weights = ACT_CASES[threshold]
    ids, labels = torch.tensor([[3, 1, 4, 1]]), torch.tensor([[IGNORE, 5, 9, 2]])
    seen = fixed_step_logits(model, ACT_P)
    out = model(ids, labels=labels)
    assert out.steps[0].tolist() == steps
    assert out.step_weights[0].tolist() == [pytest.approx(w, abs=1e-6) for w in weights]
    ponder = [n + w[n - 1] for n, w in zip(steps, weights)]  # N + R
    mixture = torch.stack([sum(w[t] * seen[t][0, s] for t in range(T)) for s, w in enumerate(weights)])[None]
    torch.testing.assert_close(out.hidden.double(), mixture, rtol=0, atol=1e-5)
    W = model.head.weight.detach().double()
    counted = [1, 2, 3]  # position 0 has no label: neither its token loss nor its ponder cost counts
    want = (scored(mixture, W, labels, "softmax") + tau * math.fsum(ponder[s] for s in counted)) / len(counted)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert out.ponder.item() == pytest.approx(math.fsum(ponder[s] for s in counted) / 3, rel=1e-6)


@settings(max_examples=60)
@given(st.lists(st.floats(0.001, 0.999), min_size=1, max_size=6), st.sampled_from([0.5, 0.9, 0.99, 1.0]))
def test_act_steps_of_drawn_probabilities(p, threshold):
    T_ = len(p)
    total, N = 0.0, T_  # Graves: N = min {n : sum_{t<=n} p_t >= 1 - eps}, at most T
    for n in range(1, T_ + 1):
        if total + p[n - 1] >= threshold:
            N = n
            break
        total += p[n - 1]
    R = 1.0 - math.fsum(p[: N - 1])
    cum, running, got = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.bool), []
    for t in range(T_):
        w, stop = act_update(torch.tensor([p[t]], dtype=torch.float64), cum, running, t == T_ - 1, threshold)
        got.append(float(w))
        cum, running = cum + w, running & ~stop
    assert got == pytest.approx(p[: N - 1] + [R] + [0.0] * (T_ - N), abs=1e-12)
    assert math.fsum(got) == pytest.approx(1.0, abs=1e-12)


# Ouro's exit gate by hand, four steps: lambda_t at steps 1..3, p_t = lambda_t prod_{j<t} (1 - lambda_j),
# p_4 = prod_{j<4} (1 - lambda_j)
EXIT_LAMBDA = [[0.5, 0.2, 0.9, 0.01],  # step 1, positions 0..3
               [0.5, 0.25, 0.5, 0.01],
               [0.5, 1 / 3, 0.5, 0.01]]
EXIT_P = [[0.5, 0.25, 0.125, 0.125], [0.2, 0.2, 0.2, 0.4], [0.9, 0.05, 0.025, 0.025],
          [0.01, 0.0099, 0.009801, 0.970299]]
# the first step whose cumulative probability 1 - prod_{j<=t} (1 - lambda_j) reaches q, or the last
EXIT_AT = {0.3: [1, 2, 1, 4], 0.7: [2, 4, 1, 4]}


def test_exit_gate_of_hand_picked_gates():
    beta = 0.1
    model = loop_model("{type: lm, steps: expected}", f"{{type: exit_gate, threshold: 0.5, weight: {beta}}}", seed=3)
    ids, labels = torch.tensor([[3, 1, 4, 1]]), torch.tensor([[7, IGNORE, 9, 2]])
    fixed_step_logits(model, EXIT_LAMBDA)
    seen = record_outputs(model)
    out = model(ids, labels=labels, return_logits=False)
    assert len(seen) == T and out.steps[0].tolist() == [T] * 4  # training runs every step
    for s, p in enumerate(EXIT_P):
        if labels[0, s] != IGNORE:
            assert out.step_weights[0, s].tolist() == pytest.approx(p, abs=1e-6)
    W = model.head.weight.detach().double()
    total = 0.0
    for s in (0, 2, 3):
        L = [NLL["softmax"]((seen[t][0, s] @ W.T).tolist(), int(labels[0, s])) for t in range(T)]
        entropy = -math.fsum(q * math.log(q) for q in EXIT_P[s])
        total += math.fsum(q * x for q, x in zip(EXIT_P[s], L)) - beta * entropy
    assert out.loss.item() == pytest.approx(total / 3, rel=1e-5)
    # position 0's entropy, written out: 1/2 log 2 + 1/4 log 4 + 2 x 1/8 log 8 = 7/4 log 2
    assert -math.fsum(q * math.log(q) for q in EXIT_P[0]) == pytest.approx(1.75 * math.log(2))
    # the expected exit step the trainer logs: sum_t t p_t
    expected = expected_step(model.spec, out.steps, out.step_weights)[0]
    assert expected[0].item() == pytest.approx(1 * 0.5 + 2 * 0.25 + 3 * 0.125 + 4 * 0.125, rel=1e-6)


def geometric_prior(lam: float, steps: int) -> list[float]:
    """PonderNet's prior: the geometric distribution of parameter lam (the probability of halting at each
    step) truncated at `steps`, the mass beyond on the last step: lam (1 - lam)^(t-1), then (1 - lam)^(T-1)."""
    return [lam * (1 - lam) ** t for t in range(steps - 1)] + [(1 - lam) ** (steps - 1)]


def test_ponder_of_hand_picked_halting_probabilities():
    """PonderNet (arXiv 2107.05407): L = sum_t p_t L_t + beta KL(p || p_G(lambda_p)), with the halting
    distribution of the exit gate's construction and the geometric prior truncated the same way."""
    beta, prior = 0.05, 0.3
    model = loop_model("lm", f"{{type: ponder, threshold: 0.5, weight: {beta}, prior: {prior}}}", seed=3)
    assert model.spec.objective.steps == "expected"  # ponder trains its distribution's expectation
    ids, labels = torch.tensor([[3, 1, 4, 1]]), torch.tensor([[7, IGNORE, 9, 2]])
    fixed_step_logits(model, EXIT_LAMBDA)
    seen = record_outputs(model)
    out = model(ids, labels=labels, return_logits=False)
    assert out.steps[0].tolist() == [T] * 4  # training runs every step
    g = geometric_prior(prior, T)
    assert math.fsum(g) == pytest.approx(1.0) and g[0] == pytest.approx(0.3) and g[-1] == pytest.approx(0.343)
    W = model.head.weight.detach().double()
    total = 0.0
    for s in (0, 2, 3):
        L = [NLL["softmax"]((seen[t][0, s] @ W.T).tolist(), int(labels[0, s])) for t in range(T)]
        kl = math.fsum(q * math.log(q / r) for q, r in zip(EXIT_P[s], g))
        total += math.fsum(q * x for q, x in zip(EXIT_P[s], L)) + beta * kl
        assert out.step_weights[0, s].tolist() == pytest.approx(EXIT_P[s], abs=1e-6)
    assert out.loss.item() == pytest.approx(total / 3, rel=1e-5)
    # at inference the halting step is where the cumulative probability reaches the threshold
    fixed_step_logits(model, EXIT_LAMBDA)
    with torch.no_grad():
        model.eval()
        assert model(ids, threshold=0.3).steps[0].tolist() == EXIT_AT[0.3]


@settings(max_examples=40)
@given(M=st.integers(1, 4), steps=st.integers(2, 6), beta=st.sampled_from([0.0, 0.01, 1.0]),
       prior=st.floats(0.05, 0.95), seed=st.integers(0, 999))
def test_ponder_loss_of_drawn_halting_probabilities(M, steps, beta, prior, seed):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(M, steps - 1, generator=g, dtype=torch.float64) * 3
    L = torch.rand(M, steps, generator=g, dtype=torch.float64) * 5
    got = ponder_loss(L, exit_log_probs(gate), beta, prior)
    G = geometric_prior(prior, steps)
    for m in range(M):
        lam = [sigmoid(x) for x in gate[m].tolist()]
        p = [lam[t] * math.prod(1 - x for x in lam[:t]) for t in range(steps - 1)] + [math.prod(1 - x for x in lam)]
        kl = math.fsum(q * math.log(q / r) for q, r in zip(p, G) if q > 0)
        want = math.fsum(q * x for q, x in zip(p, L[m].tolist())) + beta * kl
        assert got[m].item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_ponder_trains_its_head_by_the_float64_reference():
    """The halting head's gradient under PonderNet's loss equals autograd of the loss written out in float64."""
    beta, prior = 0.1, 0.25
    model = loop_model("lm", f"{{type: ponder, weight: {beta}, prior: {prior}}}", seed=5).double()
    ids, labels = torch.tensor([[3, 1, 4, 1, 5]]), torch.tensor([[7, IGNORE, 9, 2, 6]])
    seen = record_outputs(model)
    out = model(ids, labels=labels, return_logits=False)
    out.loss.backward()
    w = model.step_head.weight.detach()[0].clone().requires_grad_()
    b = model.step_head.bias.detach()[0].clone().requires_grad_()
    W = model.head.weight.detach()
    G = torch.tensor(geometric_prior(prior, T), dtype=torch.float64)
    total, counted = 0.0, 0
    for bi, s in (labels != IGNORE).nonzero().tolist():
        lam = [torch.sigmoid(seen[t][bi, s] @ w + b) for t in range(T - 1)]
        survive, p = 1.0, []
        for t in range(T - 1):
            p.append(lam[t] * survive)
            survive = survive * (1 - lam[t])
        p.append(survive)
        L = [-torch.log_softmax(seen[t][bi, s] @ W.T, -1)[labels[bi, s]] for t in range(T)]
        total = total + sum(q * x for q, x in zip(p, L)) + beta * sum(q * torch.log(q / r) for q, r in zip(p, G))
        counted += 1
    want = total / counted
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)  # the distribution is taken in fp32
    want.backward()
    torch.testing.assert_close(model.step_head.weight.grad[0], w.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(model.step_head.bias.grad[0], b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("q", sorted(EXIT_AT))
def test_exit_gate_at_inference_exits_where_the_cumulative_probability_reaches_q(q):
    model = loop_model("{type: lm, steps: expected}", "{type: exit_gate, threshold: 0.5}", seed=3).eval()
    seen = fixed_step_logits(model, EXIT_LAMBDA)
    with torch.no_grad():
        out = model(torch.tensor([[3, 1, 4, 1]]), threshold=q)
    assert out.steps[0].tolist() == EXIT_AT[q]
    W = model.head.weight.detach().double()
    for s, n in enumerate(EXIT_AT[q]):
        if n < T:  # the head reads the state of the step it exited at
            torch.testing.assert_close(out.logits[0, s].double(), seen[n - 1][0, s] @ W.T, rtol=0, atol=1e-5)


@settings(max_examples=40)
@given(M=st.integers(1, 4), steps=st.integers(2, 5), beta=st.sampled_from([0.0, 0.1, 1.0]), seed=st.integers(0, 999))
def test_exit_gate_loss_of_drawn_gates(M, steps, beta, seed):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(M, steps - 1, generator=g, dtype=torch.float64) * 4
    L = torch.rand(M, steps, generator=g, dtype=torch.float64) * 5
    got = exit_gate_loss(L, exit_log_probs(gate), beta)
    for m in range(M):
        lam = [sigmoid(x) for x in gate[m].tolist()]
        p = [lam[t] * math.prod(1 - x for x in lam[:t]) for t in range(steps - 1)] + [math.prod(1 - x for x in lam)]
        H = -math.fsum(q * math.log(q) for q in p if q > 0)
        want = math.fsum(q * x for q, x in zip(p, L[m].tolist())) - beta * H
        assert got[m].item() == pytest.approx(want, rel=1e-4, abs=1e-5)


def record_head_inputs(model) -> list[torch.Tensor]:
    seen, real = [], model.step_logits

    def step_logits(h):
        seen.append(h.detach().double().clone())
        return real(h)

    model.step_logits = step_logits
    return seen


def act_reference(w, b, states, labels, W, threshold, tau):
    """Graves' ACT loss in float64 as a function of the head (w, b): (loss, N per position)."""
    B, S = labels.shape
    total, counted, N = 0.0, 0, torch.zeros(B, S, dtype=torch.long)
    for bi in range(B):
        for s in range(S):
            p = [torch.sigmoid(states[t][bi, s] @ w + b) for t in range(len(states))]
            cum, reached, weights = 0.0, 0.0, []  # reached: cum's value, for the (discrete) halting decision
            for t in range(T):
                if t == T - 1 or reached + float(p[t].detach()) >= threshold:
                    weights.append(1.0 - cum)
                    break
                weights.append(p[t])
                cum, reached = cum + p[t], reached + float(p[t].detach())
            n = len(weights)
            N[bi, s] = n
            if labels[bi, s] == IGNORE:
                continue
            h = sum(wt * states[t][bi, s] for t, wt in enumerate(weights))
            logits = h @ W.T
            total = total - torch.log_softmax(logits, -1)[labels[bi, s]] + tau * (n + weights[-1])
            counted += 1
    return total / counted, N


def exit_reference(w, b, states, last, labels, W, beta):
    """Ouro's loss in float64 as a function of the gate (w, b)."""
    total, counted = 0.0, 0
    for bi, s in (labels != IGNORE).nonzero().tolist():
        lam = [torch.sigmoid(states[t][bi, s] @ w + b) for t in range(T - 1)]
        survive, p = 1.0, []
        for t in range(T - 1):
            p.append(lam[t] * survive)
            survive = survive * (1 - lam[t])
        p.append(survive)
        hs = [states[t][bi, s] for t in range(T - 1)] + [last[bi, s]]
        L = [-torch.log_softmax(h @ W.T, -1)[labels[bi, s]] for h in hs]
        H = -sum(q * torch.log(q) for q in p)
        total = total + sum(q * x for q, x in zip(p, L)) - beta * H
        counted += 1
    return total / counted


@settings(max_examples=10)
@given(kind=st.sampled_from(["act", "exit_gate"]), seed=st.integers(0, 999), scale=st.sampled_from([0.5, 2.0]),
       bias=st.sampled_from([-1.0, 0.0, 1.0]), threshold=st.sampled_from([0.6, 0.99]))
def test_step_halting_loss_and_head_gradients_against_float64(kind, seed, scale, bias, threshold):
    weight = 0.05
    if kind == "act":
        model = loop_model("task_completion", f"{{type: act, threshold: {threshold}, weight: {weight}}}", seed=seed)
    else:
        model = loop_model("{type: lm, steps: expected}", f"{{type: exit_gate, weight: {weight}}}", seed=seed)
    with torch.no_grad():
        model.step_head.weight.normal_(0, scale, generator=torch.Generator().manual_seed(seed))
        model.step_head.bias.fill_(bias)
    ids, labels = text_batch(seed=seed)
    seen = record_head_inputs(model)
    out = model(ids, labels=labels, return_logits=False)
    out.loss.backward()
    w = model.step_head.weight.detach().double()[0].clone().requires_grad_()
    b = model.step_head.bias.detach().double()[0].clone().requires_grad_()
    W = model.head.weight.detach().double()
    if kind == "act":
        want, N = act_reference(w, b, seen, labels, W, threshold, weight)
        assert torch.equal(out.steps, N)
    else:
        want = exit_reference(w, b, seen, out.hidden.detach().double(), labels, W, weight)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    if not want.requires_grad:  # every position halted at the first step: weight 1, cost 1 + 1, whatever the head
        assert not model.step_head.weight.grad.any() and not model.step_head.bias.grad.any()
        return
    want.backward()
    torch.testing.assert_close(model.step_head.weight.grad[0].double(), w.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(model.step_head.bias.grad[0].double(), b.grad, rtol=1e-3, atol=1e-6)

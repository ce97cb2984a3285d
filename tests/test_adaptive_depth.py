"""Adaptive depth at inference (runtime/execution/adaptive.py): a loop that converges exits early under every
criterion and one that does not runs to the cap, the exit step against a by-hand contraction, argmax-N counted
against a direct loop, full depth equal to `generate` (tokens, logits and the KV cache's contents), the latest-
available KV policy, the cache against re-running the sequence, each row's own depth in a batch, the warm
start's rule, the specs it refuses, and the CLI (eval.json against full depth, one-line errors)."""

import json
import math
from dataclasses import replace

import pytest
import torch
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from known_answers import KnownAnswers
from test_recurrent_depth import SPEC as MICRO_HUGINN

import hrmspec
from hrmspec.cli import main
from hrmspec.graph.build import unroll
from hrmspec.runtime.artifacts import checkpoint as ckpt
from hrmspec.runtime.artifacts.data import DataConfig, load_split
from hrmspec.runtime.artifacts.tokenizer import Tokenizer
from hrmspec.runtime.execution.adaptive import (
    AdaptiveDepth,
    AdaptiveError,
    Argmax,
    Cosine,
    Entropy,
    Latent,
    Never,
    check_loop,
    loop_stages,
    parse_exit,
)
from hrmspec.runtime.execution.depth import DecodeStats
from hrmspec.spec import load_spec, load_spec_text
from hrmspec.spec.schema import Repeat

T = 6  # the loop's evaluation count: the cap
# test_recurrent_depth's micro Huginn, with pre-norm layers (a layer whose weights are zero adds nothing, so a
# loop can be made linear), a prefix_lm mask and a longer loop
SPEC = MICRO_HUGINN.replace("mean: 3, sigma: 0.5, max: 8", f"mean: {T}, sigma: 0.5, max: 16")
SIZES = {"model.block.norm.place": "pre", "model.block.attention.mask": "prefix_lm", "model.d_model": 16,
         "model.ffn": 32, "train.steps": 2, "train.save_every": 2}


def micro(seed=0):
    torch.manual_seed(seed)
    model = hrmspec.compile(load_spec_text(SPEC, "micro.yaml", SIZES)).eval()
    model.reset_parameters(seed=seed)
    return model


def linear_core(model, c: float, b: float = 1.0, seed=0):
    """R(cat(s, e)) = c s + B e exactly: every weight of R zero (its layer adds nothing to the residual
    stream), the adapter [c I | B] with B random of scale b. A contraction for |c| < 1, a fixed point after one
    step for c = 0, an oscillation for c = -1, b = 0."""
    d = model.spec.model.d_model
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.stacks["R"].parameters():
            p.zero_()
        W = model.stacks["R"].weight("adapter.weight")
        W[:, :d] = c * torch.eye(d)
        W[:, d:] = b * torch.randn(d, d, generator=g) / math.sqrt(d)
    return model


def contracting(seed: int, c: float = 0.5):
    """A random model whose loop settles: R reads c x its state, and its layer's outputs are scaled by 0.3, so
    tokens converge at speeds of their own."""
    model = micro(seed)
    d = model.spec.model.d_model
    with torch.no_grad():
        model.stacks["R"].weight("adapter.weight")[:, :d] *= c
        for name in ("layers.0.attn.o.weight", "layers.0.mlp.down.weight"):
            model.stacks["R"].weight(name).mul_(0.3)
    return model


def prompts(B=2, S=5, seed=0):
    return torch.randint(0, 320, (B, S), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ criteria


@pytest.mark.parametrize("text, kind, threshold, shown", [
    ("kl:1e-3", "kl", 1e-3, "kl:0.001"), ("entropy:0.01", "entropy", 0.01, "entropy:0.01"),
    ("latent:0.03", "latent", 0.03, "latent:0.03"), ("COSINE:2e-4", "cosine", 2e-4, "cosine:0.0002"),
    ("argmax:3", "argmax", 3, "argmax:3"), ("kl", "kl", 1e-3, "kl:0.001"), ("argmax", "argmax", 5, "argmax:5"),
    ("none", "none", 0.0, "none"),
])
def test_criteria_read_from_their_text(text, kind, threshold, shown):
    c = parse_exit(text)
    assert c.name == kind and c.threshold == threshold and str(c) == shown
    assert str(parse_exit(str(c))) == shown


@pytest.mark.parametrize("text, message", [
    ("klx:1e-3", "unknown criterion 'klx'; expected one of kl, entropy, latent, cosine, argmax, none "
                 "(did you mean 'kl'?)"),
    ("speed:1", "unknown criterion 'speed'"),
    ("kl:abc", "expected a threshold > 0 after 'kl:', e.g. kl:0.001"),
    ("latent:-1", "expected a threshold > 0 after 'latent:'"),
    ("cosine:0", "expected a threshold > 0"),
    ("entropy:nan", "expected a threshold > 0"),
    ("kl:inf", "expected a threshold > 0"),
    ("argmax:0", "argmax takes a number of steps from 1 to"),
    ("argmax:1.5", "argmax takes a number of steps from 1 to"),
    ("none:3", "'none' takes no threshold"),
])
def test_a_criterion_that_cannot_be_read_is_one_line(text, message):
    with pytest.raises(AdaptiveError, match="^--exit ") as e:
        parse_exit(text)
    assert message in str(e.value) and "\n" not in str(e.value)


@settings(max_examples=25, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(0, 2), min_size=T, max_size=T), min_size=1, max_size=6),
       n=st.integers(1, T))
def test_argmax_n_exits_after_n_unchanged_steps(seqs, n):
    """Fed the argmax of every step, the criterion stops a position at the first step t whose argmax equals
    the argmaxes of the n steps before it (counted by hand)."""
    crit = Argmax(n)
    crit.start()
    seq = torch.tensor(seqs).T  # (T, positions)
    stops = []
    for t in range(T):
        logits = torch.nn.functional.one_hot(seq[t], 3).float()[None]  # (1, positions, 3)
        stops.append(crit.step(logits)[0])
    first = [next((t for t in range(T) if stops[t][p]), None) for p in range(len(seqs))]
    for p, s in enumerate(seqs):
        want = next((t for t in range(n, T) if len(set(s[t - n:t + 1])) == 1), None)
        assert first[p] == want


# ------------------------------------------------------------------ converging, contracting and oscillating loops


def depths(model, exit, ids=None, **kw):
    ids = prompts() if ids is None else ids
    with torch.no_grad():
        return AdaptiveDepth(model, exit, init_scale=kw.pop("init_scale", 0.0), **kw)(ids).steps


@pytest.mark.parametrize("exit, step", [("latent:1e-3", 2), ("cosine:1e-4", 2), ("kl:1e-6", 2), ("entropy:1e-6", 2),
                                        ("argmax:1", 2), ("argmax:3", 4), ("argmax:6", T)])
def test_a_state_at_a_fixed_point_after_one_step_exits_at_step_two(exit, step):
    """c = 0: s_t = B e for every t >= 1, so the first comparison (step 2 against step 1) finds no change;
    argmax:N needs N + 1 equal steps (or the cap)."""
    model = linear_core(micro(), 0.0)
    assert torch.equal(depths(model, exit, init_scale=1.0), torch.full((2, 5), step))


@pytest.mark.parametrize("exit", ["latent:0.5", "cosine:0.5", "kl:1e-6", "none"])
def test_an_oscillating_state_runs_to_the_cap(exit):
    """c = -1, no input: s_{t+1} = -s_t, so nothing converges and every position runs all T steps."""
    model = linear_core(micro(), -1.0, 0.0)
    assert torch.equal(depths(model, exit, init_scale=1.0), torch.full((2, 5), T))
    assert torch.equal(depths(model, exit, init_scale=1.0, max_steps=9), torch.full((2, 5), 9))  # a chosen cap


@settings(max_examples=12, deadline=None)
@given(c=st.floats(0.05, 0.9), threshold=st.floats(1e-3, 0.5))
def test_a_contraction_exits_where_its_relative_change_falls_below_the_threshold(c, threshold):
    """From s_0 = 0, s_t = (1 + c + ... + c^{t-1}) B e, so ||s_t - s_{t-1}|| / ||s_t|| = c^{t-1} (1 - c) / (1 - c^t):
    the position exits at the first t >= 2 where that is below the threshold, or at the cap."""
    change = [c ** (t - 1) * (1 - c) / (1 - c ** t) for t in range(1, T + 1)]
    assume(all(abs(v - threshold) > 1e-3 * threshold for v in change))
    want = next((t for t in range(2, T + 1) if change[t - 1] < threshold), T)
    model = linear_core(micro(), c)
    assert torch.equal(depths(model, f"latent:{threshold!r}"), torch.full((2, 5), want))
    assert torch.equal(depths(model, "cosine:1e-4"), torch.full((2, 5), 2))  # every s_t is parallel to B e


def test_criteria_that_read_the_distribution_exit_a_contraction_early():
    model = contracting(5, 0.3)
    for exit in ("kl:1e-3", "entropy:1e-3", "argmax:2"):
        d = depths(model, exit)
        assert 2 <= int(d.min()) and int(d.max()) < T, (exit, d)


# ------------------------------------------------------------------ full depth and the KV cache


def decode(forward, ids, n, cache):
    """Greedy, token by token through `forward`: (tokens (B, n), the logits of every forward, the steps)."""
    outs = [forward(ids, prefix_mask=torch.ones_like(ids, dtype=torch.bool), cache=cache)]
    tokens = []
    for _ in range(n):
        tokens.append(outs[-1].logits[:, -1].argmax(-1))
        outs.append(forward(tokens[-1][:, None], cache=cache))
    return torch.stack(tokens, 1), [o.logits for o in outs], [o.steps for o in outs]


def plain(model):
    return lambda ids, **kw: model(ids, **kw)


@pytest.mark.parametrize("exit", ["none", "argmax:99"])
def test_full_depth_is_generate_exactly_tokens_logits_and_cache(exit):
    """A criterion that never exits before the cap (argmax:99 reads the distribution at every step, through
    the stages after the loop, without touching the cache) decodes what the model's forward decodes, with the
    same random initial states: equal tokens, logits and every cached key and value, bit for bit."""
    model = micro(3)
    ids = prompts(3, 6, seed=3)
    torch.manual_seed(11)
    want = model.generate(ids, 5)
    torch.manual_seed(11)
    assert torch.equal(model.generate(ids, 5, exit=exit), want)
    forward = AdaptiveDepth(model, exit)
    runs = []
    for fwd, cache in ((plain(model), model.new_cache()), (forward, forward.new_cache())):
        torch.manual_seed(12)
        with torch.no_grad():
            runs.append((*decode(fwd, ids, 4, cache), cache))
    (tok_a, logits_a, _, cache_a), (tok_b, logits_b, steps_b, cache_b) = runs
    assert torch.equal(tok_a, tok_b) and all(torch.equal(a, b) for a, b in zip(logits_a, logits_b))
    assert all(bool((s == T).all()) for s in steps_b)
    slots = [(a, b) for ca, cb in zip(cache_a.slots, cache_b.slots) for a, b in zip(ca, cb)]
    assert len(slots) == sum(map(len, cache_a.slots)) > 0
    assert all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) for a, b in slots)


@pytest.mark.parametrize("name, sets", [
    ("huginn-tiny", {"model.d_model": 32, "model.ffn": 64, "model.heads": 2, "model.embed_scale": 5.66}),
    ("looped-transformer", {"model.d_model": 32, "model.ffn": 64, "model.heads": 2}),
    ("rins", {"model.d_model": 32, "model.ffn": 64, "model.heads": 2}),
    ("hrm-text-tiny", {"model.d_model": 32, "model.ffn": 64, "model.heads": 2}),
])
def test_the_shipped_looped_specs_decode_at_full_depth_as_generate_does(name, sets):
    model = hrmspec.compile(load_spec(name, overrides=sets)).eval()
    ids = prompts(2, 5, seed=1)
    torch.manual_seed(2)
    want = model.generate(ids, 4)
    torch.manual_seed(2)
    stats = DecodeStats()
    assert torch.equal(model.generate(ids, 4, exit="none", stats=stats), want)
    most = loop_stages(model).steps
    assert stats.steps == stats.positions * len(most) and stats.tokens == 2 * 4


@settings(max_examples=10, deadline=None)
@given(name=st.sampled_from(["huginn-tiny", "hrm-text-tiny", "looped-transformer"]), count=st.integers(1, 12))
def test_the_stages_are_the_schedule_unrolled_at_the_cap(name, count):
    """The driver's calls (the plan's, the loop's first iteration repeated) are the compiler's unrolling of the
    schedule with the loop run `count` times, split at the loop."""
    model = hrmspec.compile(load_spec(name, overrides={"model.d_model": 32, "model.heads": 2}))
    schedule = model.spec.model.schedule
    k = next(i for i, item in enumerate(schedule) if isinstance(item, Repeat))
    want = tuple(unroll(schedule[:k] + (replace(schedule[k], count=count),) + schedule[k + 1:]))
    stages = loop_stages(model, count)
    assert stages.calls == want and len(stages.steps) == count
    assert stages.before + tuple(c for step in stages.steps for c in step) + stages.after == want
    assert all(c.cycle[0] == t for t, step in enumerate(stages.steps) for c in step)


def test_a_token_that_exits_leaves_its_last_keys_in_the_later_steps_slots():
    """The latest-available policy: the cache slots of the steps after a position's exit hold that position's keys
    and values of its exit step, while the steps it ran hold their own (each differs from the one before)."""
    model = contracting(4)
    forward = AdaptiveDepth(model, "latent:0.02", init_scale=0.0)
    cache = forward.new_cache()
    with torch.no_grad():
        _, _, steps = decode(forward, prompts(3, 6, seed=4), 3, cache)
    steps = torch.cat(steps[:-1], 1)  # (B, positions in the cache)
    assert (steps < T).any() and int(steps.min()) >= 2
    for kv in ("k", "v"):
        held = torch.stack([getattr(cache.slots[calls[0].index][0], kv) for calls in forward.stages.steps])
        for b in range(steps.shape[0]):  # held: (T, B, h, positions, hd)
            for pos in range(steps.shape[1]):
                k = int(steps[b, pos])
                assert all(torch.equal(held[j, b, :, pos], held[k - 1, b, :, pos]) for j in range(k, T))
                assert not torch.equal(held[k - 1, b, :, pos], held[k - 2, b, :, pos])


@pytest.mark.parametrize("exit", ["latent:0.02", "cosine:1e-3"])
def test_decoding_with_the_cache_equals_rerunning_the_sequence(exit):
    """Inside one forward a position that exited lends later steps its latest keys, as the cache does across
    forwards: decoding token by token equals re-running the whole sequence each time, tokens and steps."""
    model = contracting(4)
    ids = prompts(2, 5, seed=4)
    cached, again = DecodeStats(), DecodeStats()
    a = model.generate(ids, 4, exit=exit, init_scale=0.0, stats=cached)
    b = model.generate(ids, 4, exit=exit, init_scale=0.0, stats=again, use_cache=False)
    assert torch.equal(a, b) and cached == again
    assert len([d for d, n in enumerate(cached.decoded) if n]) > 1  # tokens exited at several depths


def test_each_row_of_a_batch_exits_at_its_own_depth():
    """Rows decoded together take the tokens and depths they take alone, and one forward mixes depths."""
    model = contracting(5)
    ids = prompts(3, 5, seed=5)
    runs = []
    for rows in [slice(0, 3)] + [slice(i, i + 1) for i in range(3)]:
        forward = AdaptiveDepth(model, "entropy:1e-3", init_scale=0.0)
        with torch.no_grad():
            tokens, _, steps = decode(forward, ids[rows], 4, forward.new_cache())
        runs.append((tokens, torch.cat(steps, 1)))
    (tokens, steps), alone = runs[0], runs[1:]
    assert torch.equal(tokens, torch.cat([t for t, _ in alone]))
    assert torch.equal(steps, torch.cat([s for _, s in alone]))
    assert any(len(set(steps[:, p].tolist())) > 1 for p in range(5, steps.shape[1]))  # mixed in one forward


def test_a_warm_start_begins_each_token_at_the_previous_tokens_exit_state():
    model = micro(6)
    seen = []
    real = model.stacks["R"].forward

    def record(terms, ctx, cache=None):
        seen.append(terms[0].clone())  # s, as the call reads it
        return real(terms, ctx, cache)

    model.stacks["R"].forward = record
    ids = prompts(2, 5, seed=6)
    outs = {}
    for warm in (False, True):
        forward = AdaptiveDepth(model, "latent:0.05", warm_start=warm, init_scale=0.0)
        cache = forward.new_cache()
        with torch.no_grad():
            first = forward(ids, cache=cache)
            seen.clear()
            second = forward(first.logits[:, -1].argmax(-1)[:, None], cache=cache)
        start = first.states["s"][:, -1:] if warm else torch.zeros(2, 1, 16)
        assert torch.equal(seen[0], start)  # the rule: the last position's s at its exit step
        outs[warm] = second.logits
    assert not torch.equal(outs[False], outs[True])


# ------------------------------------------------------------------ what it refuses


TWO_LOOPS = SPEC.replace('    - "e = P(e)"', '    - repeat: 2\n      do: ["e = P(e)"]')  # a loop before the sampled one


@pytest.mark.parametrize("spec, message", [
    ("ut", "its positions halt by the model's own head (model.halting: act); use --threshold or --all-steps "
           "instead of --exit"),
    ("trm-tiny", "it runs whole puzzles in segments (deep supervision); --exit is for a language model's loop"),
    ("transformer", "its schedule has no repeat block: there is no loop to exit from"),
    (TWO_LOOPS, "its schedule has 2 top-level repeat blocks; an exit criterion needs exactly one loop"),
])
def test_specs_it_cannot_run_are_one_line(spec, message):
    spec = load_spec_text(spec, "two.yaml", SIZES) if "\n" in spec else load_spec(spec)
    with pytest.raises(AdaptiveError) as e:
        check_loop(spec)
    assert str(e.value) == f"{spec.name}: {message}"


def test_a_warm_start_needs_a_loop_that_reads_its_input():
    model = hrmspec.compile(load_spec("rins", overrides={"model.d_model": 32, "model.heads": 2}))
    with pytest.raises(AdaptiveError, match=r"^--warm-start: rins's loop reads only the states it assigns \(h\)"):
        AdaptiveDepth(model, "kl", warm_start=True)
    assert AdaptiveDepth(model, "kl").max_steps == 3  # its evaluation count


def test_criteria_classes_are_what_the_text_names():
    assert [type(parse_exit(t)) for t in ("latent", "cosine", "entropy", "none")] == [Latent, Cosine, Entropy, Never]


# ------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A micro run trained for 2 steps, and beside it a run of a spec without a loop (same tokenizer)."""
    root = tmp_path_factory.mktemp("adaptive")
    spec_file = root / "micro.yaml"
    spec_file.write_text(yaml.safe_dump(load_spec_text(SPEC, "micro.yaml", SIZES).raw))
    assert main(["train", str(spec_file), "--out", str(root / "run"), "--no-progress"]) == 0
    flat = load_spec("transformer", overrides={"model.vocab": 320, "model.d_model": 16, "model.heads": 2,
                                               "model.ffn": 32, "model.modules.T.layers": 1})
    last = ckpt.latest_checkpoint(root / "run")
    ckpt.save_checkpoint(root / "flat", 1, hrmspec.compile(flat).state_dict(), flat.raw, Tokenizer.load(last))
    return root


def test_eval_reports_the_exit_against_full_depth(run, capsys, monkeypatch):
    held_out = load_split(DataConfig.from_dict(load_spec_text(SPEC, "micro.yaml", SIZES).data), "eval").samples
    # answers fixed in advance: at full depth samples 0-2 answered right, with the exit only sample 0
    known = KnownAnswers(held_out, lambda i, model, options: i < (3 if isinstance(options["depth"].exit, Never) else 1))
    known.install(monkeypatch)
    assert main(["eval", str(run / "run"), "--n", "4", "--exit", "kl:1e-2", "--max-steps", "8"]) == 0
    out = capsys.readouterr().out
    res = json.loads((run / "run" / "eval.json").read_text())
    full = res["full_depth"]
    assert res["exit"] == "kl:0.01" and res["n"] == full["n"] == 4 and not res["warm_start"]
    assert full["depth"]["mean"] == full["depth"]["min"] == 8 and full["depth"]["histogram"] == {
        "8": full["depth"]["histogram"]["8"]}
    assert 2 <= res["depth"]["min"] <= res["depth"]["mean"] <= res["depth"]["max"] <= 8
    hist = res["depth"]["histogram"]
    assert sum(int(d) * n for d, n in hist.items()) / sum(hist.values()) == pytest.approx(res["depth"]["mean"])
    assert res["tokens"] > 0 and res["tokens_per_s"] > 0 and full["tokens_per_s"] > 0
    assert sorted(i for call in known.answered for i in call) == [0, 0, 1, 1, 2, 2, 3, 3]  # both depths, 4 each
    assert (res["accuracy"], full["accuracy"]) == (0.25, 0.75)
    assert res["tasks"] == {"basic_arithmetic": {"accuracy": 0.25, "n": 4}}
    assert full["tasks"] == {"basic_arithmetic": {"accuracy": 0.75, "n": 4}}
    assert f"exit kl:0.01: accuracy {100 * res['accuracy']:.1f}% against {100 * full['accuracy']:.1f}% at full " \
           "depth (8 steps)" in out
    assert f"steps per position: mean {res['depth']['mean']:.2f} of 8" in out and "tokens/s:" in out


def test_generate_prints_the_steps_per_position(run, capsys):
    assert main(["generate", str(run / "run"), "What is 2 + 3?", "--max-new-tokens", "4", "--exit", "latent:0.05",
                 "--warm-start"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("steps per position: mean ") and f"of {T} (prompt " in lines[-2]
    assert lines[-1].startswith("positions by steps: ")


def test_eval_compile_decodes_with_the_compiled_step(run, monkeypatch):
    """`eval --compile`: the held-out prompts decode through the compiled step, one program for the batch
    (counted by a backend that runs what dynamo captured), to the answers eager decoding gives."""
    from torch._dynamo.testing import CompileCounter

    from hrmspec.runtime.evaluate import heldout
    from hrmspec.runtime.execution import decode

    counter, real_compile, real_decode = CompileCounter(), torch.compile, heldout.decode_answers
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, **options, backend=counter))
    answers = []
    monkeypatch.setattr(heldout, "decode_answers", lambda *a, **options: answers.append(
        (options["depth"].compile, real_decode(*a, **options))) or answers[-1][1])
    decode.compiled_step.cache_clear()
    torch._dynamo.reset()
    try:
        for flag in ([], ["--compile"]):
            torch.manual_seed(0)  # the random initial states: the same draws both ways
            assert main(["eval", str(run / "run"), "--n", "4", *flag]) == 0
    finally:
        decode.compiled_step.cache_clear()
        torch._dynamo.reset()
    (eager_flag, eager), (compiled_flag, compiled) = answers
    assert (eager_flag, compiled_flag) == (False, True) and counter.frame_count == 1
    assert compiled == eager and len(eager) == 4


@pytest.mark.parametrize("args, message", [
    (["generate", "RUN", "hi", "--exit", "klx:1"], "--exit 'klx:1': unknown criterion 'klx'"),
    (["eval", "RUN", "--exit", "latent:-2"], "--exit 'latent:-2': expected a threshold > 0"),
    (["eval", "FLAT", "--exit", "kl"], "its schedule has no repeat block: there is no loop to exit from"),
    (["generate", "FLAT", "hi", "--max-steps", "4"], "its schedule has no repeat block"),
    (["eval", "RUN", "--exit", "kl", "--compile"], "--compile: compiled decoding runs a schedule with a fixed "
     "unrolling on the KV cache; for micro-huginn an exit criterion (kl) gives each position its own depth"),
])
def test_cli_errors_are_one_line_exit_2(run, capsys, args, message):
    args = [str(run / "run") if a == "RUN" else str(run / "flat") if a == "FLAT" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hrmspec: error: ") and message in err and err.count("\n") == 1, err

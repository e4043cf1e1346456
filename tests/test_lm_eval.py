"""The lm-evaluation-harness adapter on a tiny run: lm-eval's acc / acc_norm on a local task equal
`evaluate.multiple_choice`; log-likelihoods, rolling windows and greedy generation against plain
forward passes; left truncation; the command line; a model pool folder; bad workdirs."""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance

from jaxsel import checkpoint, evaluate, report, runs, tasks, train
from jaxsel import lm_eval as jaxsel_lm_eval
from jaxsel.data import pool as pool_lib
from jaxsel.data import tokenizer as tokenizer_lib
from tests.workers import probe_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
# (context, choices): choices of unequal lengths, so that acc_norm can differ from acc. The
# answers are planted from the model's own predictions (`run`): every other item right.
QUESTIONS = [
    ("The cat sat on the", ["mat", "dog house", "a", "roof of the barn"]),
    ("Water boils at one hundred", ["degrees", "cats", "blue skies", "x"]),
    ("Bees make", ["honey", "cars and trucks", "noise", "hd"]),
    ("The sun rises in the", ["east", "west", "fridge", "north sea coast"]),
    ("Two plus two is", ["four", "five", "a fish", "twenty two"]),
    ("Abc deg fah", ["bba", "cdefgh", "hh", "ace ace"]),
    ("Gaga hefe", ["da", "ggg", "hhhh eee", "b"]),
    ("Dead beef cafe", ["babe", "fade", "bead", "ebb and flow"]),
    ("Fish swim in the", ["sea", "sky", "desert sand", "oven"]),
    ("Ice is made of frozen", ["water", "fire", "gold", "wood chips"]),
]
TASK_YAML = """\
task: jaxsel_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run's workdir (config.json, a checkpoint, the synthetic pool it names, with its
    tokenizer), a local multiple-choice task (YAML over a jsonl) and the model loaded through
    lm-eval's registry from a model-args string; no download (HF offline)."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        config = probe_worker.tiny_config()  # seq_len 32: short contexts, easy truncation.
        config.data.update(source="synthetic", synthetic_docs_per_domain=30,
                           cache_dir=str(tmp / "cache"))
        pools = pool_lib.build_pools(config)
        workdir = str(tmp / "run")
        report.open_workdir(workdir, config)
        trainer = train.Trainer(config)
        # A fresh init scaled up: its predictions depend on the context far more than a fresh
        # init's near-uniform ones, so that a token more or less of context shows.
        params = jax.tree.map(lambda x: 4 * x, trainer.init_params(1))
        state = trainer.new_state(params)
        mngr = checkpoint.manager(workdir)
        checkpoint.save(mngr, 1, state.params, state.opt_state, {"step": 1, "data": {}})
        mngr.wait_until_finished()
        mngr.close()
        tokenizer = tokenizer_lib.load_tokenizer(pools["train"].tokenizer_path)
        guess = tasks.multiple_choice_from_texts([(c, ch, 0) for c, ch in QUESTIONS], tokenizer,
                                                 config.data.seq_len)
        pred_I = evaluate.multiple_choice(trainer, params, guess, 8, per_item=True)["pred_I"]
        items = [(c, ch, int(p if i % 2 else (p + 1) % len(ch)))
                 for i, ((c, ch), p) in enumerate(zip(QUESTIONS, pred_I, strict=True))]
        tasks_dir = tmp / "tasks"
        tasks_dir.mkdir()
        data = tasks_dir / "items.jsonl"
        data.write_text("".join(json.dumps(dict(context=c, choices=ch, answer=a)) + "\n"
                                for c, ch, a in items))
        (tasks_dir / "jaxsel_mc.yaml").write_text(TASK_YAML.format(data=data,
                                                                   cache=tmp / "hf"))
        from lm_eval.api.registry import get_model

        lm = get_model("jaxsel").create_from_arg_string(f"workdir={workdir}",
                                                        {"batch_size": 8})
        yield dict(config=config, workdir=workdir, trainer=trainer, params=params, lm=lm,
                   tokenizer=tokenizer, tokenizer_path=str(pools["train"].tokenizer_path),
                   items=items, tasks_dir=str(tasks_dir))


def _instances(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0)
            for args in args_list]


@functools.partial(jax.jit, static_argnums=0)
def _full_logp(model, params, tokens_1xW, segments_1xW):
    return jax.nn.log_softmax(model.apply(params, tokens_1xW, segments_1xW).astype(jnp.float32))


def _logp(run, tokens):
    """[len, V]: log-softmax of one plain full forward of the model over `tokens` (one row;
    followed by padding to a fixed 64 so that it compiles once)."""
    n = len(tokens)
    tokens_1xW = np.zeros((1, 64), np.int32)
    tokens_1xW[0, :n] = tokens
    segments_1xW = (np.arange(64) < n).astype(np.int32)[None]
    return np.asarray(_full_logp(run["trainer"].model, run["params"], tokens_1xW,
                                 segments_1xW))[0, :n]


def _by_hand(run, context_ids, continuation_ids, max_length):
    """(log-likelihood, greedy) of the continuation: one forward over the last max_length + 1
    tokens, as lm-eval's HF model truncates."""
    whole = (list(context_ids) + list(continuation_ids))[-(max_length + 1):]
    logp = _logp(run, whole[:-1])
    start = len(whole) - 1 - len(continuation_ids)
    picked = [logp[start + j, t] for j, t in enumerate(continuation_ids)]
    greedy = all(np.argmax(logp[start + j]) == t for j, t in enumerate(continuation_ids))
    return float(np.sum(picked)), greedy


def test_multiple_choice_equals_evaluate(run):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="jaxsel", model_args=f"workdir={run['workdir']}",
                                  tasks=["jaxsel_mc"], batch_size=8, log_samples=True,
                                  task_manager=TaskManager(include_path=run["tasks_dir"]))
    mc = tasks.multiple_choice_from_texts(run["items"], run["tokenizer"],
                                          run["config"].data.seq_len)
    ours = evaluate.multiple_choice(run["trainer"], run["params"], mc, 8, per_item=True)
    numbers = out["results"]["jaxsel_mc"]
    assert numbers["acc,none"] == pytest.approx(ours["acc"])
    assert numbers["acc_norm,none"] == pytest.approx(ours["acc_norm"])
    samples = sorted(out["samples"]["jaxsel_mc"], key=lambda s: s["doc_id"])
    loglik = [r[0][0] for s in samples for r in s["resps"]]
    np.testing.assert_allclose(loglik, ours["loglik_C"], rtol=1e-5, atol=1e-5)
    # Non-trivial: half the items right, predictions spread over the choices, and length
    # normalisation changes some of them.
    assert ours["acc"] == 0.5 and len(set(ours["pred_I"])) > 1
    assert (ours["pred_I"] != ours["pred_norm_I"]).any()


def test_loglikelihood_equals_forward_pass(run):
    lm, tok = run["lm"], run["tokenizer"]
    long_context = " ".join(["gaga hefe dead beef"] * 12)  # Far more than 32 tokens.
    pairs = [("The cat sat on the", " mat"), ("Bees make ", "honey"), ("", "Fish swim"),
             ("Abc", " deg fah hh ace ace bba cdefgh"), (long_context, " cafe babe"),
             ("x", "")] + [(f"Abc deg {'h' * i}", f" {'e' * (i % 5 + 1)}") for i in range(10)]
    assert len(tok.encode(long_context).ids) > lm.max_length + 1
    results = lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (loglik, greedy) in zip(pairs, results, strict=True):
        if context:
            stripped = context.rstrip()
            continuation = context[len(stripped):] + continuation
            context_ids = tok.encode(stripped).ids
            cont_ids = tok.encode(stripped + continuation).ids[len(context_ids):]
        else:
            context_ids, cont_ids = [lm.eot_token_id], tok.encode(continuation).ids
        if not cont_ids:
            assert (loglik, greedy) == (0.0, True)
            continue
        expected, expected_greedy = _by_hand(run, context_ids, cont_ids, lm.max_length)
        assert loglik == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert greedy == expected_greedy
    # A continuation that greedy decoding produces is reported as greedy.
    context_ids = tok.encode("Abc deg").ids
    first = int(np.argmax(_logp(run, context_ids)[-1]))
    [(_, greedy)] = lm._loglikelihood_tokens([(("", ""), context_ids, [first])])
    assert greedy
    # One compiled shape per (length, scored length) bucket, however many requests.
    assert evaluate._scorer(lm.trainer)._cache_size() <= 5 < len(pairs)


def test_loglikelihood_rolling_uses_windows(run):
    lm, tok = run["lm"], run["tokenizer"]
    text = "Dead beef cafe babe, abc deg fah. " * 8
    token_ids = tok.encode(text).ids
    assert len(token_ids) > 3 * lm.max_length
    short = "Bees make honey"
    got = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,), (short,)]),
                                   disable_tqdm=True)
    expected = 0.0
    windows = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
        token_ids, lm.eot_token_id, lm.max_length, 1)))
    assert len(windows) > 3
    assert sum(len(target) for _, target in windows) == len(token_ids)  # Each token once.
    for context, target in windows:
        expected += _by_hand(run, context, target, lm.max_length)[0]
    assert got[0] == pytest.approx(expected, rel=1e-5)
    # A string that fits is one window: its log-likelihood after the end-of-document token.
    assert got[1] == pytest.approx(_by_hand(run, [lm.eot_token_id], tok.encode(short).ids,
                                            lm.max_length)[0], rel=1e-5)


def _greedy_by_hand(run, context_ids, steps, max_length, eot):
    """Argmax steps of plain forwards over the last max_length tokens."""
    tokens, new = list(context_ids), []
    for _ in range(steps):
        token = int(np.argmax(_logp(run, tokens[-max_length:])[-1]))
        if token == eot:
            break
        tokens.append(token)
        new.append(token)
    return new


def test_generate_until_is_greedy_and_stops(run, monkeypatch):
    lm, tok = run["lm"], run["tokenizer"]
    contexts = ["Abc deg fah", "The sun rises in the", " ".join(["gaga hefe dead beef"] * 12)]
    steps = 12
    hand = {c: tok.decode(_greedy_by_hand(run, tok.encode(c).ids, steps, lm.max_length,
                                          lm.eot_token_id)) for c in contexts}
    assert len(set(hand.values())) > 1 and all(len(t) > 4 for t in hand.values())
    stop = hand[contexts[1]][3:5]  # A string the greedy text holds, after its start.
    requests = [(contexts[0], {"until": ["\x00never"], "max_gen_toks": steps}),
                (contexts[1], {"until": [stop], "max_gen_toks": steps}),
                (contexts[2], {"until": "\x00never", "max_gen_toks": steps}),
                (contexts[0], {"until": ["\x00never"], "max_gen_toks": 3})]
    got = lm.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    assert got[0] == hand[contexts[0]]
    assert got[1] == hand[contexts[1]].split(stop)[0] and len(got[1]) < len(hand[contexts[1]])
    assert got[2] == hand[contexts[2]]  # A context longer than max_length: its last tokens.
    first3 = _greedy_by_hand(run, tok.encode(contexts[0]).ids, 3, lm.max_length,
                             lm.eot_token_id)
    assert got[3] == tok.decode(first3)
    # The end-of-document token stops a generation too (here: the third greedy token).
    tokens = _greedy_by_hand(run, tok.encode(contexts[0]).ids, steps, lm.max_length, -1)
    monkeypatch.setattr(lm, "_eot", tokens[2])
    expected = _greedy_by_hand(run, tok.encode(contexts[0]).ids, steps, lm.max_length,
                               tokens[2])
    assert len(expected) <= 2
    steps_run = []
    monkeypatch.setattr(lm, "_next_tokens", lambda w, f=lm._next_tokens: steps_run.append(
        len(w)) or f(w))
    assert lm.generate_until(_instances("generate_until", requests[:1]),
                             disable_tqdm=True) == [tok.decode(expected)]
    assert steps_run == [1] * (len(expected) + 1)  # It stops there.
    steps_run.clear()  # And at an `until` string, before max_gen_toks.
    lm.generate_until(_instances("generate_until", requests[1:2]), disable_tqdm=True)
    assert len(steps_run) < steps


def test_command_line(run, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "jaxsel.lm_eval", "--model", "jaxsel", "--model_args",
         f"workdir={run['workdir']}", "--tasks", "jaxsel_mc", "--include_path",
         run["tasks_dir"], "--batch_size", "8", "--output_path", str(out)],
        cwd=ROOT, env={**os.environ, **OFFLINE, "JAX_PLATFORMS": "cpu"}, capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [path] = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
              if f.startswith("results")]
    numbers = report.read_json(path)["results"]["jaxsel_mc"]
    mc = tasks.multiple_choice_from_texts(run["items"], run["tokenizer"],
                                          run["config"].data.seq_len)
    ours = evaluate.multiple_choice(run["trainer"], run["params"], mc, 8)
    assert numbers["acc,none"] == pytest.approx(ours["acc"])
    assert numbers["acc_norm,none"] == pytest.approx(ours["acc_norm"])


def test_model_pool_folder(run):
    """A model folder of the content-keyed model pool (model.json, checkpoints) loads the same
    model with its pool's tokenizer."""
    folder = os.path.join(run["workdir"], "models", "abc123")
    os.makedirs(folder)
    os.symlink(os.path.join(run["workdir"], "checkpoints"), os.path.join(folder, "checkpoints"))
    config = run["config"]
    pool_name = f"{config.data.source}-{pool_lib.pool_key(config)}"
    identity = dict(model=config.model.to_dict(), optim=config.optim.to_dict(),
                    seq_len=config.data.seq_len, steps=config.train.steps, pool=pool_name)
    report.write_json(os.path.join(folder, runs.MODEL_FILE), dict(name="m", identity=identity))
    lm = jaxsel_lm_eval.JaxselLM(folder, batch_size=8)
    pairs = [("The cat sat on the", " mat"), ("Abc deg", " fah")]
    np.testing.assert_allclose(
        lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True),
        run["lm"].loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True),
        rtol=1e-6)


def test_bad_workdirs_are_named(run, tmp_path):
    empty = tmp_path / "no_params"
    report.open_workdir(str(empty), run["config"])  # config.json, no checkpoint.
    (empty / "models" / "k1").mkdir(parents=True)
    report.write_json(str(empty / "models" / "k1" / runs.MODEL_FILE), {})
    with pytest.raises(FileNotFoundError,
                       match=re.escape(f"workdir={empty}: no params") + ".*models/k1"):
        jaxsel_lm_eval.JaxselLM(str(empty))
    with pytest.raises(FileNotFoundError, match="neither a run's folder"):
        jaxsel_lm_eval.JaxselLM(str(tmp_path / "missing"))
    # Params, but the pool (and so its tokenizer) is not where the config says.
    config = run["config"].copy_and_resolve_references()
    config.data.cache_dir = str(tmp_path / "elsewhere")
    moved = tmp_path / "moved"
    report.open_workdir(str(moved), config)
    os.symlink(os.path.join(run["workdir"], "checkpoints"), moved / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no tokenizer.*tokenizer=PATH"):
        jaxsel_lm_eval.JaxselLM(str(moved))
    assert jaxsel_lm_eval.JaxselLM(str(moved), tokenizer=run["tokenizer_path"]).max_length == 32
    with pytest.raises(ValueError, match="max_length=1000"):
        jaxsel_lm_eval.JaxselLM(run["workdir"], max_length=1000)

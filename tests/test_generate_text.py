"""python -m experiments.generate: text through the checkpoint's tokenizer, greedy equal to
transformers' greedy `generate`, seeded sampling, the same tokens at tp=2, bad input refused in one
line; and the sampling and streaming-text modules on their own.

The checkpoint is the tiny random one (std 0.1, so greedy tokens are decisive) in a folder named
`tiny`, so its compiled artifacts are the other tests' (the compile cache is keyed by the spec),
with a byte-level BPE tokenizer trained here (BOS added by its post-processor) and two EOS ids:
the tokenizer's </s> and a token greedy decoding reaches after a few steps, so that it stops early.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Explain tensor parallelism in 5 bullet points."
SENTENCES = ["Explain tensor parallelism in 5 bullet points.", "The quick brown fox jumps over the lazy dog.",
             "Tensor parallelism splits each layer over devices.", "Café au lait costs 3 €, a croissant 2 €."]
MAX_NEW = 24


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained on SENTENCES (vocab_size 259: bytes only, no merges), <s> added in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return tok


def run(*overrides: str, cache_dir: Path, out: Path, timeout: int = 600):
    env = {**os.environ, "LAB_CACHE_DIR": str(cache_dir), "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "experiments.generate", f"hydra.run.dir={out}", "device=cpu", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _set_eos(folder: Path, eos: list[int], bos: int) -> None:
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        raw = json.loads(path.read_text()) if path.is_file() else {}
        raw.update(eos_token_id=eos, bos_token_id=bos)
        path.write_text(json.dumps(raw, indent=2))


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    from harness.oracle import Reference

    folder = tmp_path_factory.mktemp("generate") / "tiny"  # named as the preset: the compiled model is shared
    shutil.copytree(tiny_checkpoint, folder)
    tok = make_tokenizer()
    assert tok.get_vocab_size() <= 1024  # the tiny model's vocabulary
    tok.save(str(folder / "tokenizer.json"))
    free = Reference(folder).greedy(tok.encode(PROMPT).ids, MAX_NEW)
    stop = next(t for i, t in enumerate(free) if i >= 4 and t not in free[:i])  # greedy reaches it at step i
    _set_eos(folder, [tok.token_to_id("</s>"), stop], tok.token_to_id("<s>"))
    return folder


@pytest.fixture(scope="module")
def reference(checkpoint):
    from harness.oracle import Reference

    return Reference(checkpoint).model


@pytest.fixture(scope="module")
def greedy_run(checkpoint, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("greedy") / "run"
    proc = run(f"model.path={checkpoint}", f"prompt={PROMPT}", f"workload.new_tokens={MAX_NEW}", "quant=q0f32",
               cache_dir=cache_dir, out=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, results(out)


def hf_generate(model, prompt_ids: list[int], max_new: int, eos: list[int]) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(prompt_ids):].tolist()


# --- the entry point ---------------------------------------------------------------------------

def test_greedy_text_is_transformers_greedy_generate(greedy_run, checkpoint, reference):
    from tokenizers import Tokenizer

    proc, doc = greedy_run
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    g, s = doc["generation"], doc["summary"]
    assert doc["status"] == "ok"
    assert g["prompt"] == PROMPT and g["prompt_token_ids"] == tok.encode(PROMPT).ids
    assert g["prompt_token_ids"][0] == tok.token_to_id("<s>")  # BOS, from the post-processor
    eos = g["eos_token_ids"]
    assert eos == json.loads((checkpoint / "generation_config.json").read_text())["eos_token_id"]
    expected = hf_generate(reference, g["prompt_token_ids"], MAX_NEW, eos)
    assert g["token_ids"] == expected
    assert g["stop_reason"] == "eos" and g["token_ids"][-1] in eos and len(g["token_ids"]) < MAX_NEW
    assert g["text"] == tok.decode(g["token_ids"], skip_special_tokens=True)
    assert g["sampling"] == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 0, "mode": "greedy"}
    # streamed to stdout, then the summary line
    assert g["text"] in proc.stdout
    n = len(g["token_ids"])
    assert re.search(rf"{n} tokens \(stop: eos\), TTFT [\d.]+ ms, decode [\d.]+ tokens/s .*peak RSS [\d.]+ GiB",
                     proc.stdout), proc.stdout[-1000:]
    assert s["tokens_generated"] == n and s["stop_reason"] == "eos" and s["itl_s"]["count"] == n - 1
    assert s["ttft_s"]["p50"] > 0 and s["decode_tokens_per_s"] > 0 and s["peak_host_rss_bytes"] > 0
    assert s["build"]["quant"] == "q0f32" and s["build"]["tp"] == 1 and s["prompt_len"] == len(g["prompt_token_ids"])


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tp2_and_pp2_generate_the_same_tokens(greedy_run, checkpoint, cache_dir, tmp_path, tp, pp):
    out = tmp_path / f"tp{tp}pp{pp}"
    proc = run(f"model.path={checkpoint}", f"prompt={PROMPT}", f"workload.new_tokens={MAX_NEW}", "quant=q0f32",
               f"tp={tp}", f"pp={pp}", cache_dir=cache_dir, out=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = results(out)
    assert doc["status"] == "ok" and doc["summary"]["build"]["tp"] == tp and doc["summary"]["build"]["pp"] == pp
    assert doc["generation"]["token_ids"] == greedy_run[1]["generation"]["token_ids"]
    assert doc["generation"]["text"] == greedy_run[1]["generation"]["text"]


def _session(compiled, checkpoint):
    from engine.config import from_hf_folder
    from engine.session import open_session
    from engine.weights import open_source

    config = from_hf_folder(checkpoint)
    return open_session(compiled(config, "q0f32"), open_source(config, str(checkpoint)))


def test_sampling_is_seeded(checkpoint, cache_dir, compiled, tmp_path):
    """The entry point's sampled tokens (on the static KV cache: sampled tokens are written into
    the device's next input) are those of the same loop in this process on the paged cache with
    the same seed (twice); another seed gives other tokens; top_k=1 at any temperature is greedy."""
    from engine.generate import Generator
    from experiments.generate import generate
    from harness.sampling import Sampler, SamplingParams
    from harness.text import TextStream, load_tokenizer

    new = 16
    out = tmp_path / "sampled"
    proc = run(f"model.path={checkpoint}", f"prompt={PROMPT}", f"workload.new_tokens={new}", "quant=q0f32",
               "sampling.temperature=1.0", "sampling.top_p=0.95", "sampling.top_k=200", "sampling.seed=7",
               "ignore_eos=true", "device.kv_cache=static", cache_dir=cache_dir, out=out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    g = results(out)["generation"]
    assert g["stop_reason"] == "max_new_tokens" and len(g["token_ids"]) == new and g["eos_token_ids"] == []
    assert g["sampling"] == {"temperature": 1.0, "top_p": 0.95, "top_k": 200, "seed": 7, "mode": "sample"}
    assert results(out)["summary"]["build"]["kv_cache"] == "static"

    tokenizer = load_tokenizer(checkpoint)
    with _session(compiled, checkpoint) as session:
        gen = Generator(session, max_batch=1, max_total_len=len(g["prompt_token_ids"]) + MAX_NEW,
                        prefill_chunk=len(g["prompt_token_ids"]))

        def sampled(eos=(), new=new, **params):
            done = generate(gen, g["prompt_token_ids"], new, Sampler(SamplingParams(**params)), set(eos),
                            TextStream(tokenizer))
            return done.token_ids, done.text

        params = dict(temperature=1.0, top_p=0.95, top_k=200)
        assert sampled(seed=7, **params) == (g["token_ids"], g["text"])
        assert sampled(seed=7, **params) == (g["token_ids"], g["text"])
        assert sampled(seed=8, **params)[0] != g["token_ids"]
        eos = json.loads((checkpoint / "config.json").read_text())["eos_token_id"]
        greedy = sampled(eos, MAX_NEW, temperature=0.0)[0]
        assert sampled(eos, MAX_NEW, temperature=1.5, top_k=1, seed=3)[0] == greedy
        assert greedy[-1] in eos


# --- bad input: one line, exit status 2, before compiling ---------------------------------------------

def _long_prompt() -> str:
    return " ".join(["dog"] * 2100)  # more tokens than tiny's context of 2048


@pytest.mark.parametrize("case,overrides,fragments", [
    ("no model.path", ["prompt=hello"], ["pass model.path=DIR of a checkpoint with tokenizer.json"]),
    ("no tokenizer.json", ["model.path={bare}", "prompt=hello"],
     ["{bare} has no tokenizer.json", "pass model.path=DIR of a checkpoint with tokenizer.json"]),
    ("prompt=null", ["model.path={ckpt}"], ["the prompt is empty", 'prompt="some text"']),
    ("empty prompt", ["model.path={ckpt}", "prompt="], ["the prompt is empty"]),
    ("prompt beyond the context", ["model.path={ckpt}", "prompt={long}"],
     ["exceed tiny's context of 2048 tokens", "shorten the prompt or lower workload.new_tokens"]),
    ("negative temperature", ["model.path={ckpt}", "prompt=hello", "sampling.temperature=-1"],
     ["sampling.temperature must be a number >= 0", "sampling.temperature=0"]),
])
def test_bad_input_is_one_line_before_compiling(checkpoint, tiny_checkpoint, tmp_path, case, overrides, fragments):
    values = {"bare": tiny_checkpoint, "ckpt": checkpoint, "long": _long_prompt()}
    cache = tmp_path / "cache"
    start = time.monotonic()
    proc = run(*(o.format(**values) for o in overrides), cache_dir=cache, out=tmp_path / "r")
    assert time.monotonic() - start < 60
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment.format(**values) in line, (fragment, line)
    assert not [p for p in cache.glob("*") if p.is_dir()]  # nothing compiled
    assert results(tmp_path / "r")["status"] == "error"


# --- harness.sampling ------------------------------------------------------------------------------

def test_greedy_takes_the_devices_token_without_reading_logits():
    from harness.sampling import Sampler, SamplingParams

    def never():
        raise AssertionError("greedy must not read the logits")

    assert Sampler(SamplingParams()).pick(42, never) == 42
    assert SamplingParams(temperature=0, top_k=5, top_p=0.5).greedy


def test_top_k_keeps_exactly_k():
    from harness.sampling import top_k_mask

    logits = np.array([0.1, 3.0, 2.0, 2.0, 2.0, -1.0, 5.0])
    assert top_k_mask(logits, 1).nonzero()[0].tolist() == [6]
    assert top_k_mask(logits, 2).nonzero()[0].tolist() == [1, 6]
    keep = top_k_mask(logits, 3)  # a tie for the third place: exactly one of them, the lowest index
    assert keep.sum() == 3 and keep.nonzero()[0].tolist() == [1, 2, 6]
    assert top_k_mask(logits, 0).all() and top_k_mask(logits, 100).all()


def test_top_p_keeps_the_nucleus():
    from harness.sampling import top_p_mask

    probs = np.array([0.15, 0.5, 0.05, 0.3])
    nucleus = lambda p: set(top_p_mask(probs, p).nonzero()[0].tolist())  # noqa: E731
    assert nucleus(0.1) == {1}  # the most likely token is always kept
    assert nucleus(0.5) == {1}
    assert nucleus(0.7) == {1, 3}
    assert nucleus(0.9) == {0, 1, 3}
    assert nucleus(0.99) == {0, 1, 2, 3}
    assert nucleus(1.0) == {0, 1, 2, 3}


def test_distribution_applies_temperature_then_top_k_then_top_p():
    from harness.sampling import SamplingParams, distribution, softmax

    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    np.testing.assert_allclose(distribution(logits, SamplingParams(temperature=1.0)), [0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(distribution(logits, SamplingParams(temperature=0.5)), softmax(2 * logits))
    np.testing.assert_allclose(distribution(logits, SamplingParams(temperature=1.0, top_k=3)), [4 / 9, 3 / 9, 2 / 9, 0])
    # top-p over what top-k left: 4/9 + 3/9 reaches 0.7
    np.testing.assert_allclose(distribution(logits, SamplingParams(temperature=1.0, top_k=3, top_p=0.7)),
                               [4 / 7, 3 / 7, 0, 0])
    cold = distribution(logits, SamplingParams(temperature=1e-3))
    assert cold.argmax() == 0 and cold[0] > 1 - 1e-9


def test_draws_follow_the_distribution_and_the_seed():
    from harness.sampling import Sampler, SamplingParams, draw

    probs = np.array([0.5, 0.0, 0.3, 0.2])
    rng = np.random.default_rng(0)
    counts = np.bincount([draw(probs, rng) for _ in range(20000)], minlength=4) / 20000
    assert counts[1] == 0
    np.testing.assert_allclose(counts, probs, atol=0.02)
    logits = np.linspace(0, 2, 64)

    def picks(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [sampler.pick(0, lambda: logits) for _ in range(30)]

    assert picks(1) == picks(1) and picks(1) != picks(2)


@pytest.mark.parametrize("params,fragment", [
    (dict(temperature=-0.5), "sampling.temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "sampling.temperature"),
    (dict(temperature="hot"), "sampling.temperature"),
    (dict(temperature=1.0, top_p=0.0), "sampling.top_p must be in (0, 1]"),
    (dict(temperature=1.0, top_p=1.5), "sampling.top_p=1.0"),
    (dict(temperature=1.0, top_k=-1), "sampling.top_k must be an integer >= 0"),
    (dict(temperature=1.0, top_k=2.5), "sampling.top_k"),
    (dict(temperature=1.0, top_k=True), "sampling.top_k"),
    (dict(seed=-1), "sampling.seed"),
])
def test_bad_sampling_values_name_the_fix(params, fragment):
    from harness.sampling import SamplingParams

    with pytest.raises(ConfigError) as err:
        SamplingParams(**params)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_sampling_options_are_refused():
    from harness.sampling import SamplingParams

    with pytest.raises(ConfigError, match="unknown sampling option.*temprature"):
        SamplingParams.from_config({"temprature": 1.0})
    assert SamplingParams.from_config({"temperature": 1, "top_k": 4}) == SamplingParams(1.0, 1.0, 4, 0)


# --- harness.text ------------------------------------------------------------------------------------

def test_the_stream_holds_back_an_incomplete_character():
    from harness.text import TextStream

    tok = make_tokenizer(259)  # bytes only: "é" and "€" are two and three tokens
    ids = tok.encode("Café €!", add_special_tokens=False).ids
    assert len(ids) == len("Café €!".encode())
    stream = TextStream(tok)
    pieces = [stream.add(t) for t in ids]
    assert "".join(pieces) + stream.finish() == "Café €!" and stream.text == "Café €!"
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[3] == "" and pieces[4] == "é"  # the first byte of "é" waits for the second
    assert pieces[6:8] == ["", ""] and pieces[8] == "€"
    cut = TextStream(tok)  # a character never completed is handed out at the end
    assert [cut.add(t) for t in ids[:7]] == ["C", "a", "f", "", "é", " ", ""] and cut.finish() == "\ufffd"


def test_eos_ids_come_from_generation_config_then_config(tmp_path):
    from harness.text import eos_token_ids

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert eos_token_ids(tmp_path, 100) == [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9, 7]}))
    assert eos_token_ids(tmp_path, 100) == [7, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 500}))
    with pytest.raises(ConfigError, match=r"eos_token_id must be a token id in \[0, 100\).*ignore_eos=true"):
        eos_token_ids(tmp_path, 100)
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert eos_token_ids(tmp_path, 100) == []

"""`nucleus.Llama` batches prompts alike with every kind of tokenizer nucleus loads.

Meta's reference pads its token buffer with `tokenizer.pad_id` and takes every position holding
another id for prompt; only Meta's tokenizer has a pad id (-1) that no token equals. Here each
tokenizer kind (Meta's tiktoken `tokenizer.model`, a Hugging Face `tokenizer.json`, a GGUF `gpt2`
BPE vocabulary, a GGUF SentencePiece vocabulary) drives a random-weight model of its own
vocabulary size. Where the format has a pad id it is a real token, as in the checkpoints that set
one: the end-of-turn or end-of-sequence token, which every multi-turn chat prompt holds, and which
the token prompts below hold past the shortest prompt.

Oracles:
- each prompt run alone through the same `Llama` (a batch of one has no padding to mistake): the
  batch gives each row the same greedy tokens (fp32) and log-probabilities within 1e-4 (the batch
  feeds the tail of a longer prompt one token at a time where the single run prefills it, so the
  logits differ in the last bits);
- for the Llama 3 vocabulary, Meta's tokenizer: its `tokenizer.json` form gives exactly the same
  results on the same model (`test_generation.py` checks the Meta path against transformers);
- on the default model (SmolLM2 GGUF), its answers to each dialog asked alone.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from toy import tiny_model
from vocabularies import spm_gguf_metadata

from nucleus import Llama, Tokenizer
from nucleus.assets import asset_path
from nucleus.hf_tokenizer import HFTokenizer
from nucleus.loaders.gguf import read_gguf_metadata

MAX_SEQ_LEN = 96  # SmolLM2's template adds a system prompt of 20 tokens
KINDS = ["meta", "hf", "gguf-bpe", "gguf-spm"]
# A Mistral-style template (no system role) for the SentencePiece vocabulary, which has none.
SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ ' ' + m['content'] + eos_token }}{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% endif %}{% endfor %}"
)
DIALOGS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    [
        {"role": "user", "content": "Say <|eot_id|> or </s>."},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": "Why?"},
    ],
]
PROMPTS = ["Hi", "The capital of France is", "One two three four five six seven eight nine ten"]


def make_tokenizer(kind: str, tmp_path_factory) -> Tokenizer | HFTokenizer:
    if kind == "meta":
        return Tokenizer(asset_path("llama3-tokenizer"))
    if kind == "hf":
        # Llama 3 Instruct's tokenizer.json and configs, padded with <|eot_id|> as fine-tunes do.
        folder = tmp_path_factory.mktemp("hf-tokenizer")
        shutil.copy(asset_path("llama3-tokenizer-json"), folder / "tokenizer.json")
        config = {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "pad_token": "<|eot_id|>",
            "add_bos_token": True,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "generation_config.json").write_text(
            json.dumps({"eos_token_id": [128001, 128009]})
        )
        return HFTokenizer.from_file(folder / "tokenizer.json")
    if kind == "gguf-bpe":  # the default model's: pad id 2, <|im_end|>
        return HFTokenizer.from_gguf(read_gguf_metadata(asset_path("smollm2-135m-instruct")))
    # SentencePiece, padded with </s> as Llama 2 fine-tunes do.
    metadata = spm_gguf_metadata(padding_token_id=2)
    return HFTokenizer.from_gguf({**metadata, "tokenizer.chat_template": SPM_CHAT_TEMPLATE})


@pytest.fixture(scope="module")
def model_for():
    """One random model per vocabulary size (Meta's and the tokenizer.json share one)."""
    models = {}

    def get(vocab_size: int):
        if vocab_size not in models:
            models[vocab_size] = tiny_model(
                vocab_size=vocab_size, dim=32, ffn=64, max_len=MAX_SEQ_LEN, std=0.3, seed=0
            )
        return models[vocab_size]

    return get


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {kind: make_tokenizer(kind, tmp_path_factory) for kind in KINDS}


def make_llama(kind, tokenizers, model_for, fix_reference_bugs=False) -> Llama:
    tok = tokenizers[kind]
    return Llama(
        model_for(tok.n_words),
        tok,
        max_seq_len=MAX_SEQ_LEN,
        max_batch_size=4,
        fix_reference_bugs=fix_reference_bugs,
    )


def token_prompts(tok, lengths, seed):
    """Random ids; past the shortest prompt, the longer ones hold the pad id (if the tokenizer has
    one) and a stop token."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, tok.n_words, (n,), generator=g).tolist() for n in lengths]
    specials = [t for t in (tok.pad_id, min(tok.stop_tokens)) if t >= 0]
    for p in prompts[1:]:
        p[min(lengths) + 1 : min(lengths) + 1 + len(specials)] = specials
    return prompts


def assert_rows_match(batched, alone):
    """Greedy tokens equal; log-probabilities (lists or None) within 1e-4."""
    (tokens, lps), (tokens_alone, lps_alone) = batched, alone
    assert tokens == tokens_alone
    assert (lps is None) == (lps_alone is None)
    for got, want in zip(lps or [], lps_alone or [], strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def one_by_one(run, items):
    """`run` on each item alone, the per-row results regrouped as one batched call returns them."""
    results = [run([item]) for item in items]
    if isinstance(results[0], tuple):  # generate: (tokens, logprobs or None)
        tokens = [r[0][0] for r in results]
        lps = None if results[0][1] is None else [r[1][0] for r in results]
        return tokens, lps
    return [r[0] for r in results]


def assert_predictions_match(batched, alone):
    assert [p["generation"] for p in batched] == [p["generation"] for p in alone]
    for got, want in zip(batched, alone, strict=True):
        assert got["tokens"] == want["tokens"]
        assert got["logprobs"] == pytest.approx(want["logprobs"], abs=1e-4)


@pytest.mark.parametrize("fix", [False, True], ids=["reference", "fixed"])
@pytest.mark.parametrize("kind", KINDS)
def test_batched_generate_gives_each_row_what_it_gets_alone(kind, fix, tokenizers, model_for):
    """With echo, so that the prompt tokens come back too (the reference cuts them at the first
    stop token of the prompt, `fix_reference_bugs` at the first generated one)."""
    llama = make_llama(kind, tokenizers, model_for, fix_reference_bugs=fix)
    prompts = token_prompts(llama.tokenizer, [2, 6, 9], seed=1)

    def run(ps):
        return llama.generate(ps, max_gen_len=4, temperature=0, logprobs=True, echo=True)

    batched = run(prompts)
    assert_rows_match(batched, one_by_one(run, prompts))
    # Only the first token lacks a log-probability; the pad id has its own.
    assert all(lp < 0 for lps in batched[1] for lp in lps[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_a_stop_token_inside_a_longer_prompt_does_not_end_its_row(kind, tokenizers, model_for):
    """The issue in small: the short row generates `stop` and is done; the long row's prompt holds
    `stop` at that very place (the tokenizer's pad id where it has one, as `<|im_end|>` ends
    every turn of a chat prompt). The long row must still get its answer."""
    tok = tokenizers[kind]
    stop = tok.pad_id if tok.pad_id >= 0 else min(tok.stop_tokens)
    assert stop in tok.stop_tokens
    model = copy.deepcopy(model_for(tok.n_words))
    llama = Llama(model, tok, max_seq_len=MAX_SEQ_LEN, max_batch_size=2)
    short = token_prompts(tok, [2], seed=3)[0]
    ((first, second),), _ = llama.generate([short], max_gen_len=2, temperature=0)
    assert stop not in (first, second)
    # The output rows of `second` and `stop` swapped: the model now ends after `first`.
    head = model.state_dict()["output.weight"]
    head[[second, stop]] = head[[stop, second]]
    long = [*short, first, stop, *token_prompts(tok, [3], seed=4)[0]]

    def run(ps):
        return llama.generate(ps, max_gen_len=4, temperature=0, logprobs=True)

    batched = run([short, long])
    assert batched[0][0] == [first]
    assert_rows_match(batched, one_by_one(run, [short, long]))
    assert batched[0][1]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_text_completion_gives_each_prompt_what_it_gets_alone(kind, tokenizers, model_for):
    llama = make_llama(kind, tokenizers, model_for)

    def run(ps):
        return llama.text_completion(ps, max_gen_len=5, temperature=0, logprobs=True)

    assert_predictions_match(run(PROMPTS), one_by_one(run, PROMPTS))


@pytest.mark.parametrize("kind", KINDS)
def test_batched_chat_completion_answers_each_dialog_as_alone(kind, tokenizers, model_for):
    llama = make_llama(kind, tokenizers, model_for)

    def run(ds):
        return llama.chat_completion(ds, max_gen_len=5, temperature=0, logprobs=True)

    batched = run(DIALOGS)
    assert_predictions_match(batched, one_by_one(run, DIALOGS))
    assert all(p["generation"]["role"] == "assistant" for p in batched)


@pytest.mark.parametrize(("kind", "bos"), [("meta", True), ("hf", True), ("gguf-bpe", False)])
def test_text_completion_adds_a_bos_where_the_model_wants_one(kind, bos, tokenizers, model_for):
    """Meta's tokenizer always (the reference); the tokenizer.json as its config says
    (`add_bos_token`); SmolLM2's GGUF never (`add_bos_token` false). Special-token text stays text, so the echo (cut at
    the first stop token, a quirk kept) shows the whole prompt."""
    llama = make_llama(kind, tokenizers, model_for)
    tok = llama.tokenizer
    prompt = f"Say {tok.decode([tok.eos_id])} now"
    (echoed,) = llama.text_completion([prompt], max_gen_len=2, temperature=0, echo=True)
    bos_text = tok.decode([tok.bos_id]) if bos else ""
    assert echoed["generation"].startswith(bos_text + prompt)


def test_tokenizer_json_gives_what_meta_tokenizer_gives(tokenizers, model_for):
    """The same model and vocabulary: ids, log-probabilities and text are the same, special-token
    text in chat content included (encoded as text, as Meta's ChatFormat does)."""
    meta = make_llama("meta", tokenizers, model_for)
    hf = make_llama("hf", tokenizers, model_for)
    assert meta.model is hf.model
    prompts = token_prompts(hf.tokenizer, [2, 6, 9], seed=2)
    assert hf.generate(prompts, 4, temperature=0, logprobs=True, echo=True) == (
        meta.generate(prompts, 4, temperature=0, logprobs=True, echo=True)
    )
    for call, items in ((Llama.text_completion, PROMPTS), (Llama.chat_completion, DIALOGS)):
        got = call(hf, items, max_gen_len=5, temperature=0, logprobs=True)
        assert got == call(meta, items, max_gen_len=5, temperature=0, logprobs=True)
    dialog = DIALOGS[2]
    assert hf.formatter.encode_dialog_prompt(dialog) == meta.formatter.encode_dialog_prompt(dialog)


def test_a_base_model_completes_text_and_says_it_cannot_chat(model_for):
    """A model with neither Llama 3's chat tokens nor a chat template has no chat format (that
    it loads is in test_cli.py)."""
    tok = HFTokenizer.from_gguf(spm_gguf_metadata())
    llama = Llama(model_for(tok.n_words), tok, max_seq_len=MAX_SEQ_LEN, max_batch_size=2)
    assert llama.formatter is None
    (completion,) = llama.text_completion(["Hi"], max_gen_len=2, temperature=0)
    assert isinstance(completion["generation"], str)
    with pytest.raises(ValueError, match=r"no chat format.*use text_completion"):
        llama.chat_completion(DIALOGS[:1])


def test_default_model_batched_chat_answers_equal_one_by_one():
    """The issue's case on `Llama.build(None)`, greedy: every prompt holds `<|im_end|>`, the
    model's pad id, after each turn; the multi-turn one holds it past the end of the shortest
    prompt (before the fix, its answer came back empty)."""
    llama = Llama.build(None, max_seq_len=128, max_batch_size=3, device="cpu")
    dialogs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Name a fruit."}],
        [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "What is two plus two?"},
        ],
    ]

    def answers(ds):
        results = llama.chat_completion(ds, max_gen_len=10, temperature=0)
        return [r["generation"]["content"] for r in results]

    batched = answers(dialogs)
    assert batched == [a for d in dialogs for a in answers([d])]
    assert all(a.strip() for a in batched)
    assert batched[0] == "The capital of France is Paris."

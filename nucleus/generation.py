"""`nucleus.Llama`: Meta's reference API (`build`, `generate`, `text_completion`, `chat_completion`).

Same arguments, defaults, return shapes and semantics as `llama/generation.py` of meta-llama/llama3,
including the same sampled tokens for the same seed: the global torch generator is seeded once in
`build` and each decode step makes one `(B, V)` draw for every row. `reference-semantics.md` in the
project's shared notes states that behaviour fact by fact; the comments below cite its sections.
The loop runs on the engine's machinery: each row is an engine `Sequence` holding KV blocks from a
`BlockManager`, and the `ModelRunner` runs the model (with the reference's attention arithmetic).

The reference's known bugs (its section 8.2) are kept by default. `fix_reference_bugs=True` fixes:
- the log-probabilities of the `min_prompt_len == total_len` path (aligned like the loop's, and
  computed only when asked for);
- `echo=True` output cut at a stop token that is part of the prompt (only generated stop tokens
  end the output);
- rows that keep generating after they stopped or passed `max_gen_len` (the loop ends as soon as
  every row is done).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypedDict

import torch
import torch.nn.functional as F

from nucleus.chat_template import ChatTemplate
from nucleus.distributed import TensorParallel
from nucleus.engine.block_manager import BlockManager
from nucleus.engine.runner import ModelRunner
from nucleus.engine.sequence import Sequence as EngineSequence
from nucleus.hf_tokenizer import HFTokenizer
from nucleus.model import Transformer
from nucleus.sampling import sample_top_p
from nucleus.sampling_params import SamplingParams
from nucleus.tokenizer import ChatFormat, Dialog, Message, Tokenizer

__all__ = ["ChatPrediction", "CompletionPrediction", "Dialog", "Llama", "Message"]

BLOCK_SIZE = 16
# The loop's own padding: the reference pads with `tokenizer.pad_id`, which is -1 in Meta's
# tokenizer and so equals no token. Other tokenizers give `pad_id` a real token (often the
# end-of-turn token every chat prompt holds), so the loop never uses theirs.
PAD = -1
# The reference loop samples by itself; the engine sequences it drives carry no parameters of use.
_UNUSED_PARAMS = SamplingParams()

# `llama3`'s `Llama.build` asserts `max_seq_len <= 8192`; models with Llama 3.1 RoPE scaling go on.
REFERENCE_MAX_SEQ_LEN = 8192


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA as the reference (fp16 where bf16 is missing), float32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


class Llama:
    """A model, its tokenizer and chat format, generating as Meta's reference does."""

    @staticmethod
    def build(
        ckpt_dir: str | None,
        tokenizer_path: str | None = None,
        max_seq_len: int = 2048,
        max_batch_size: int = 4,
        model_parallel_size: int | None = None,
        seed: int = 1,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        fix_reference_bugs: bool = False,
    ) -> Llama:
        """Load a model and its tokenizer.

        Args:
            ckpt_dir: a Meta checkpoint directory (`params.json`, `consolidated.*.pth`), a Hugging
                Face directory, a `.gguf` file, or None for the built-in default model.
            tokenizer_path: the tokenizer (`tokenizer.model` or `tokenizer.json`); None takes the
                model's own (for a Meta directory, its `tokenizer.model`).
            max_seq_len: longest prompt plus generation, 1..8192 (more with Llama 3.1 RoPE scaling).
            max_batch_size: most prompts in one `generate` call.
            model_parallel_size: the ranks the model is split across (tensor parallelism); None
                takes `WORLD_SIZE` (1 without it), as the reference does. With N > 1, run the
                program under `torchrun --nproc_per_node N`, as Meta's: every rank builds its
                shard and runs the same calls (same arguments, same seed), ranks beyond the first
                with stdout sent to /dev/null. A Meta checkpoint of N shards is read one file per
                rank; any other (more shards, fewer, or another format) is re-sharded. A rank that
                fails to load makes every rank raise.
            seed: seeds the global torch generator once, as the reference does.
            device: default CUDA when available (rank r of a group on `cuda:LOCAL_RANK`), else
                the CPU (a group of CPU processes talks over gloo).
            dtype: default bf16 on CUDA, float32 on CPU.
            fix_reference_bugs: fix the reference's known bugs (see the module docstring).
        """
        from nucleus.loaders import load_model_files

        _check_int("max_seq_len", max_seq_len, 1)
        _check_int("max_batch_size", max_batch_size, 1)
        if model_parallel_size is None:  # 1.2 step 3
            model_parallel_size = int(os.environ.get("WORLD_SIZE", "1"))
        _check_int("model_parallel_size", model_parallel_size, 1)
        start = time.time()
        if model_parallel_size > 1:
            tp = TensorParallel.from_torchrun(model_parallel_size, device)
            device = tp.device
            if tp.local_rank > 0:  # 1.2 step 6
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's lifetime)
        else:
            tp = TensorParallel()
            device = torch.device(device) if device is not None else default_device()
        torch.manual_seed(seed)  # once, here; generate continues this stream (1.2 step 5)
        try:
            files = load_model_files(ckpt_dir, tokenizer_path)
            config = files.config
            limit = config.max_position_embeddings or (
                131072 if config.rope_scaling else REFERENCE_MAX_SEQ_LEN
            )
            if max_seq_len > limit:
                raise ValueError(
                    f"max_seq_len must be <= {limit} for this model, got {max_seq_len}"
                )
            model = files.build_model(device=device, dtype=dtype or default_dtype(device), tp=tp)
            failure = None
        except Exception as e:
            failure = e
        tp.agree(failure, "loading the model")  # no rank goes on to wait for one that failed
        if tp.local_rank == 0:
            print(f"Loaded in {time.time() - start:.2f} seconds", file=sys.stderr)
        return Llama(
            model,
            files.tokenizer,
            chat=files.chat,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
            fix_reference_bugs=fix_reference_bugs,
        )

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | HFTokenizer,
        *,
        chat: ChatFormat | ChatTemplate | None = None,
        max_seq_len: int,
        max_batch_size: int,
        fix_reference_bugs: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        if chat is None:
            from nucleus.loaders import chat_format_for

            chat = chat_format_for(tokenizer)
        # Meta's ChatFormat for Llama 3 vocabularies, else the model's own template; None for a
        # model with neither, which can complete text but not chat.
        self.formatter = chat
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.fix_reference_bugs = fix_reference_bugs

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _validate(
        self,
        prompt_tokens: Sequence[Sequence[int]],
        max_gen_len: int,
        temperature: float,
        top_p: float,
    ) -> None:
        if not isinstance(prompt_tokens, Sequence) or isinstance(prompt_tokens, (str, bytes)):
            raise TypeError("prompt_tokens must be a list of token-id lists")
        if len(prompt_tokens) == 0:
            raise ValueError("prompt_tokens is empty: pass at least one prompt")
        if len(prompt_tokens) > self.max_batch_size:
            raise ValueError(
                f"prompt_tokens has {len(prompt_tokens)} prompts, more than "
                f"max_batch_size={self.max_batch_size}"
            )
        vocab = self.model.config.vocab_size
        for i, prompt in enumerate(prompt_tokens):
            if not isinstance(prompt, Sequence) or isinstance(prompt, (str, bytes)):
                raise TypeError(f"prompt_tokens[{i}] must be a list of token ids")
            if len(prompt) == 0:
                raise ValueError(f"prompt_tokens[{i}] is empty: each prompt needs a token")
            if len(prompt) > self.max_seq_len:
                raise ValueError(
                    f"prompt_tokens[{i}] has {len(prompt)} tokens, more than "
                    f"max_seq_len={self.max_seq_len}"
                )
            for t in prompt:
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
                    raise ValueError(
                        f"prompt_tokens[{i}] holds {t!r}, not a token id in [0, {vocab})"
                    )
        _check_int("max_gen_len", max_gen_len, 0)
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number, got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")

    def _logits(
        self,
        runner: ModelRunner,
        rows: list[EngineSequence],
        start: int,
        end: int,
        all_logits: bool,
    ) -> torch.Tensor:
        """Logits `(B, end-start or 1, V)` of columns `[start, end)` of every row, through the
        engine's runner with the reference's attention arithmetic."""
        bsz, width = len(rows), end - start
        hidden = runner.forward(rows, [start] * bsz, [width] * bsz).view(bsz, width, -1)
        if not all_logits:
            hidden = hidden[:, -1:]
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate continuations of tokenized prompts (reference-semantics section 2).

        Args:
            prompt_tokens: one list of token ids per prompt; prompts may differ in length.
            max_gen_len: most tokens generated per prompt.
            temperature: softmax temperature; `<= 0` is greedy.
            top_p: nucleus sampling threshold, as the reference's `sample_top_p`.
            logprobs: also return each returned token's log-probability (raw distribution).
            echo: return the prompt tokens before the generation.

        Returns:
            The token lists (cut at the first stop token) and, if `logprobs`, their
            log-probabilities; else None.
        """
        self._validate(prompt_tokens, max_gen_len, temperature, top_p)
        fix = self.fix_reference_bugs
        bsz = len(prompt_tokens)
        device = self.device
        prompt_lens = [len(t) for t in prompt_tokens]
        min_prompt_len, max_prompt_len = min(prompt_lens), max(prompt_lens)
        total_len = min(self.max_seq_len, max_gen_len + max_prompt_len)

        tokens = torch.full((bsz, total_len), PAD, dtype=torch.long, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
        token_logprobs = torch.zeros_like(tokens, dtype=torch.float) if logprobs else None
        # Each row is an engine sequence with KV blocks for `total_len` tokens, from a pool sized
        # for this call (not `max_batch_size x max_seq_len` up front, as the reference does).
        rows = [
            EngineSequence(f"row-{i}", list(t), _UNUSED_PARAMS) for i, t in enumerate(prompt_tokens)
        ]
        pool = BlockManager(
            bsz * -(-total_len // BLOCK_SIZE), BLOCK_SIZE, enable_prefix_caching=False
        )
        runner = ModelRunner(
            self.model,
            num_kv_blocks=pool.num_blocks,
            block_size=BLOCK_SIZE,
            attention_backend="reference",
            max_model_len=total_len,
        )
        for seq in rows:
            pool.allocate(seq, total_len)

        prev_pos = 0
        eos_reached = torch.tensor([False] * bsz, device=device)
        # The prompt positions, from the prompt lengths (the reference's `tokens != pad_id`).
        prompt_ends = torch.tensor(prompt_lens, device=device)
        input_text_mask = torch.arange(total_len, device=device) < prompt_ends[:, None]
        # Positions each row may still fill: the reference fills up to total_len; the fix stops a
        # row at its own budget.
        row_end = (prompt_ends + max_gen_len).clamp(max=total_len)
        if min_prompt_len == total_len and logprobs:  # unused otherwise; draws no RNG
            logits = self._logits(runner, rows, 0, total_len, all_logits=True)
            if fix:  # aligned as the loop aligns them: position 0 has no prediction
                token_logprobs[:, 1:] = -F.cross_entropy(
                    logits[:, :-1].transpose(1, 2),
                    tokens[:, 1:],
                    reduction="none",
                    ignore_index=PAD,
                )
            else:  # the reference's unshifted target (2.1 step 7)
                token_logprobs = -F.cross_entropy(
                    logits.transpose(1, 2), tokens, reduction="none", ignore_index=PAD
                )

        stop_tokens = torch.tensor(
            sorted(self.tokenizer.stop_tokens), dtype=torch.long, device=device
        )
        for cur_pos in range(min_prompt_len, total_len):
            logits = self._logits(runner, rows, prev_pos, cur_pos, all_logits=logprobs)
            if temperature > 0:
                probs = torch.softmax(logits[:, -1] / temperature, dim=-1)
                next_token = sample_top_p(probs, top_p)
            else:
                next_token = torch.argmax(logits[:, -1], dim=-1)
            next_token = next_token.reshape(-1)
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            for seq, token in zip(rows, next_token.tolist(), strict=True):
                if seq.num_tokens == cur_pos:  # a generated column: the row's sequence grows
                    seq.token_ids.append(token)
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2),
                    tokens[:, prev_pos + 1 : cur_pos + 1],
                    reduction="none",
                    ignore_index=PAD,
                )
            eos_reached |= (~input_text_mask[:, cur_pos]) & torch.isin(next_token, stop_tokens)
            prev_pos = cur_pos
            done = eos_reached | (row_end <= cur_pos + 1) if fix else eos_reached
            if all(done):
                break

        for seq in rows:
            pool.free(seq)
        if logprobs:
            token_logprobs = token_logprobs.tolist()
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else prompt_lens[i]
            toks = toks[start : prompt_lens[i] + max_gen_len]
            probs = token_logprobs[i][start : prompt_lens[i] + max_gen_len] if logprobs else None
            # Cut at the first stop token; the fix ignores stop tokens that are part of the prompt.
            first_searchable = prompt_lens[i] - start if fix else 0
            cut = next(
                (
                    j
                    for j in range(first_searchable, len(toks))
                    if toks[j] in self.tokenizer.stop_tokens
                ),
                len(toks),
            )
            out_tokens.append(toks[:cut])
            if logprobs:
                out_logprobs.append(probs[:cut])
        return out_tokens, out_logprobs if logprobs else None

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[CompletionPrediction]:
        """Complete each prompt: special-token text is encoded as text, and a BOS comes first
        where the model wants one (always with Meta's tokenizer, as the reference)."""
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        if not isinstance(prompts, Sequence) or isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings")
        prompt_tokens = [self.tokenizer.encode_prompt(x) for x in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens,
            max_gen_len=max_gen_len,
            temperature=temperature,
            top_p=top_p,
            logprobs=logprobs,
            echo=echo,
        )
        return self._predictions(generation_tokens, generation_logprobs, self.tokenizer.decode)

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
    ) -> list[ChatPrediction]:
        """Answer each dialog as the assistant, in the Llama 3 chat format (other models: in
        their own chat template)."""
        if self.formatter is None:
            raise ValueError(
                "this model has no chat format (neither Llama 3's chat tokens nor a chat "
                "template): use text_completion"
            )
        if max_gen_len is None:
            max_gen_len = self.max_seq_len - 1
        prompt_tokens = [self.formatter.encode_dialog_prompt(dialog) for dialog in dialogs]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens=prompt_tokens,
            max_gen_len=max_gen_len,
            temperature=temperature,
            top_p=top_p,
            logprobs=logprobs,
        )
        return self._predictions(
            generation_tokens,
            generation_logprobs,
            lambda t: {"role": "assistant", "content": self.tokenizer.decode(t)},
        )

    def _predictions(
        self,
        tokens: list[list[int]],
        logprobs: list[list[float]] | None,
        generation: Callable[[list[int]], str | Message],
    ) -> list[dict]:
        """The reference's result dicts: `generation`, plus per-token strings and log-probs."""
        if logprobs is None:
            return [{"generation": generation(t)} for t in tokens]
        return [
            {
                "generation": generation(t),
                "tokens": [self.tokenizer.decode([x]) for x in t],
                "logprobs": logprobs_i,
            }
            for t, logprobs_i in zip(tokens, logprobs, strict=True)
        ]

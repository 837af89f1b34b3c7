"""The `nucleus` command end to end, each run in a subprocess as a user would run it.

Oracle: the exit status, stdout and stderr of the process. Runs that load the default model
(SmolLM2-135M-Instruct) are kept to five and generate few tokens; at temperature 0 the model's
answers are deterministic ("The capital of France is Paris."), which the chat tests rely on.
User mistakes must give exactly one line on stderr, a non-zero status and no traceback, and are
all caught before or while the model is read (no generation).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

TIMEOUT = 600  # seconds for one model-loading run; CI machines can be slow and shared


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NUCLEUS_DEBUG", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def nucleus(*args: str, stdin: str | None = None, timeout: float = TIMEOUT):
    """`python -m nucleus ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "nucleus", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nucleus", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )


def assert_clean_stderr(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def default_model() -> Path:
    """The default model, fetched before any timed subprocess needs it."""
    from nucleus.assets import asset_path

    return asset_path("smollm2-135m-instruct")


# ---- help (no model) ------------------------------------------------------------------------


def test_help_lists_commands_and_options():
    script = Path(sys.executable).with_name("nucleus")
    top = subprocess.run(
        [str(script) if script.exists() else "nucleus", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert top.returncode == 0, top.stderr
    for word in ("generate", "chat", "serve"):
        assert word in top.stdout

    chat = nucleus("chat", "--help")
    assert chat.returncode == 0, chat.stderr
    for option in (
        "--model",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--seed",
        "--device",
        "--dtype",
        "--system",
    ):
        assert option in chat.stdout
    assert "each line of stdin is one user message" in chat.stdout
    assert chat.stderr == ""


# ---- user mistakes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, default_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-models")
    not_a_model = root / "empty-dir"
    not_a_model.mkdir()
    truncated = root / "truncated.gguf"
    with open(default_model, "rb") as f:
        truncated.write_bytes(f.read(64 * 1024))  # a real header whose tensors are cut off
    garbage = root / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    text = root / "notes.gguf"
    text.write_text("not a model\n")
    return {"dir": not_a_model, "truncated": truncated, "garbage": garbage, "text": text}


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (["generate", "hi", "--model", "/no/such/model.gguf"], 2, "--model"),
        (["chat", "hi", "--tokenizer", "/no/such/tokenizer.json"], 2, "--tokenizer"),
        (["generate", "hi", "--temperature", "-1"], 2, "--temperature"),
        (["generate", "hi", "--temperature", "hot"], 2, "--temperature"),
        (["chat", "hi", "--max-tokens", "0"], 2, "--max-tokens"),
        (["chat", "hi", "--top-p", "1.5"], 2, "--top-p"),
        (["chat", "hi", "--dtype", "int3"], 2, "--dtype"),
        (["chat", "hi", "--seed", "x"], 2, "--seed"),
        (["generate", "hi", "--no-such-option"], 2, "--no-such-option"),
        (["frobnicate"], 2, "frobnicate"),
        ([], 2, "COMMAND"),
        (["chat", "hi", "--device", "toaster"], 2, "--device"),
    ],
)
def test_usage_mistake_is_one_line(args, status, needle):
    result = nucleus(*args)
    assert result.returncode == status
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert lines[0].startswith("nucleus")
    assert result.stdout == ""


@pytest.mark.parametrize("kind", ["dir", "truncated", "garbage", "text"])
def test_unusable_model_is_one_line(bad_models, kind):
    path = bad_models[kind]
    result = nucleus("chat", "hi", "--model", str(path))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]
    assert_clean_stderr(result.stderr)
    assert result.stdout == ""


def test_chat_with_a_base_model_is_one_line(tmp_path):
    """A model with neither Llama 3's chat tokens nor a chat template loads, but cannot chat."""
    from vocabularies import write_base_model

    checkpoint, tokenizer = write_base_model(tmp_path)
    result = nucleus("chat", "hi", "--model", str(checkpoint), "--tokenizer", str(tokenizer))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no chat format" in lines[0] and "nucleus generate" in lines[0]
    assert_clean_stderr(result.stderr)
    assert result.stdout == ""


# ---- with the default model -----------------------------------------------------------------


def _read_chunks(proc: subprocess.Popen, on_first=None) -> tuple[list[bytes], bool]:
    """All of stdout as the chunks it arrived in; whether the process was still running when
    the first chunk came (the text is streamed, not printed at the end)."""
    chunks: list[bytes] = []
    running_at_first = False
    fd = proc.stdout.fileno()
    while True:
        data = os.read(fd, 65536)
        if not data:
            return chunks, running_at_first
        if not chunks:
            running_at_first = proc.poll() is None
            if on_first is not None:
                on_first()
        chunks.append(data)


@pytest.mark.slow
def test_generate_streams(default_model):
    proc = popen("generate", "The capital of France is", "--max-tokens", "12", "--temperature", "0")
    proc.stdin.close()
    chunks, running_at_first = _read_chunks(proc)
    status = proc.wait(timeout=TIMEOUT)
    stderr = proc.stderr.read().decode()
    assert status == 0, stderr
    assert_clean_stderr(stderr)
    text = b"".join(chunks).decode()
    assert "Paris" in text  # greedy: " Paris.\n\nThe capital of ..."
    assert text.endswith("\n")
    assert running_at_first and len(chunks) >= 2, chunks


@pytest.mark.slow
def test_generate_on_the_cpu_imports_no_torch_server_or_jit(default_model):
    """The default model on the CPU runs the C forward pass: the command imports only what it
    uses (`-X importtime` lists every module imported)."""
    command = ["generate", "--max-tokens", "2", "--device", "cpu", "Hello"]
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nucleus", *command],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    for heavy in ("torch", "transformers", "fastapi", "uvicorn", "triton", "gguf", "tqdm"):
        assert heavy not in imported, heavy
    assert "nucleus.kernels.library" in imported


@pytest.mark.slow
def test_ctrl_c_exits_130_without_traceback(default_model):
    proc = popen("generate", "Once upon a time", "--max-tokens", "400", "--seed", "0")
    proc.stdin.close()
    chunks, _ = _read_chunks(proc, on_first=lambda: proc.send_signal(signal.SIGINT))
    status = proc.wait(timeout=TIMEOUT)
    stderr = proc.stderr.read().decode()
    assert status == 130, stderr
    assert_clean_stderr(stderr)
    assert chunks


@pytest.mark.slow
def test_chat_one_shot(default_model):
    """`--exact`: the float32 model, whose greedy answer is known (the default 8-bit path answers
    as llama.cpp does: tests/cpu/test_llamacpp_agreement.py)."""
    result = nucleus(
        "chat",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--exact",
    )
    assert result.returncode == 0, result.stderr
    assert_clean_stderr(result.stderr)
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_chat_interactive_keeps_history(default_model):
    """Turn by turn through stdin: each answer comes before the next message is written, the
    second question ("that city") can only be answered from the first, and /exit ends it."""
    proc = popen("chat", "--temperature", "0", "--max-tokens", "24", "--exact")
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for raw in proc.stdout:
            lines.put(raw.decode())
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    def ask(message: str) -> str:
        proc.stdin.write(message.encode() + b"\n")
        proc.stdin.flush()
        line = lines.get(timeout=TIMEOUT)
        assert line is not None, proc.stderr.read().decode()
        return line

    try:
        first = ask("What is the capital of France?")
        assert "Paris" in first
        second = ask("What is the population of that city?")
        assert "Paris" in second  # greedy: "The population of Paris is approximately ..."
        proc.stdin.write(b"/exit\n")
        proc.stdin.flush()
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read().decode()
    assert status == 0, stderr
    assert_clean_stderr(stderr)
    assert not first.startswith(">")  # no prompt when stdin is not a terminal


@pytest.mark.slow
def test_chat_from_pipe_is_reproducible_with_seed(default_model):
    """Piped lines are messages, /reset forgets, the end of input ends the chat with status 0,
    and a seed makes sampling (temperature 1) repeat: the same question after /reset gets the
    same answer."""
    result = nucleus(
        "chat",
        "--temperature",
        "1.0",
        "--seed",
        "1234",
        "--max-tokens",
        "12",
        stdin="Tell me a short story.\n/reset\n\nTell me a short story.\n",
    )
    assert result.returncode == 0, result.stderr
    assert_clean_stderr(result.stderr)
    out = result.stdout
    half = len(out) // 2
    assert len(out) > 2 and out[:half] == out[half:], out

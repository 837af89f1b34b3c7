"""`CpuModel`: a llama GGUF file run by the C forward pass, its weights left in the file's blocks.

The weights stay in the file's quantized blocks, never converted to float: K-quant and float
tensors are used where they lie in the memory-mapped file (pages the OS reads in as they are
used); Q4_0, Q4_1 and Q8_0 matrices are copied once into the kernels' interleaved layout (the same
bytes, 8 rows side by side), and their file pages released. A model takes about the memory of its
file. Each step is one call into `nucleus/kernels/llama_forward.c`, which quantizes every
matrix product's input to 8 bits per block and multiplies the file's blocks with integer dot
products, as llama.cpp does (`nucleus/kernels/quantized.c` states the error this allows). The
logits of the rows that need them are one more product with the output matrix.

No torch here: this is what `nucleus generate` runs on the CPU. `nucleus.cpu.runner` drives it
for the engine.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from nucleus.config import ModelConfig
from nucleus.kernels import library
from nucleus.loaders.gguf_file import GGML_TYPES, GGUFFile, base_frequencies, open_gguf

# GGML type ids by name (the C kernels' enum in nucleus/kernels/kernels.h uses the same ids).
TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}
# Types the kernels multiply interleaved by 8 rows (`repack_rows8` in nucleus/kernels/quantized.c).
REPACKED_TYPES = ("Q4_0", "Q4_1", "Q8_0")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class Matrix(ctypes.Structure):
    """`nc_matrix`: a (rows, cols) matrix of a GGML type, row-major blocks."""

    _fields_ = [("data", _ptr), ("type", _i64), ("rows", _i64), ("cols", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, Matrix) for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")] + [
        ("attn_norm", _ptr),
        ("ffn_norm", _ptr),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        ("n_layers", _i64),
        ("dim", _i64),
        ("n_heads", _i64),
        ("n_kv_heads", _i64),
        ("head_dim", _i64),
        ("ffn_dim", _i64),
        ("vocab", _i64),
        ("norm_eps", ctypes.c_float),
        ("rope_freqs", _ptr),
        ("tok_embd", Matrix),
        ("norm", _ptr),
        ("layers", ctypes.POINTER(_Layer)),
    ]


class Batch(ctypes.Structure):
    """`nc_batch`: one step's KV cache, flat batch, sequences and output."""

    _fields_ = [
        ("k_cache", _ptr),
        ("v_cache", _ptr),
        ("num_blocks", _i64),
        ("block_size", _i64),
        ("tokens", _ptr),
        ("positions", _ptr),
        ("slots", _ptr),
        ("num_tokens", _i64),
        ("seq_start", _ptr),
        ("seq_len", _ptr),
        ("seq_context", _ptr),
        ("block_tables", _ptr),
        ("num_seqs", _i64),
        ("table_width", _i64),
        ("hidden", _ptr),
        ("num_threads", _i64),
    ]


_FORWARD_ERRORS = {
    -1: (MemoryError, "the CPU forward pass could not allocate its scratch space"),
    -2: (IndexError, "a token, KV slot or block id of the step is out of range"),
}


class CpuModel:
    """A llama GGUF model for the C forward pass.

    `forward` returns the final normed hidden states of a step's rows (`Transformer.forward`'s
    result) and stores their keys and values in a `CpuKVCache`; `logits` multiplies some of them
    by the output matrix. Both take `num_threads` threads.
    """

    def __init__(self, file: GGUFFile, *, num_threads: int | None = None) -> None:
        self.file = file  # keeps the memory map, which the matrices point into, alive
        self.config: ModelConfig = file.config
        self.name = file.path.name
        self.num_threads = num_threads or library.default_num_threads()
        self._lib = library.require()
        c = self.config
        self._keep: list[np.ndarray] = []  # arrays the matrices and vectors point into
        self._matrices: dict[str, Matrix] = {}
        layers = (_Layer * c.n_layers)()
        for i, layer in enumerate(layers):
            p = f"layers.{i}."
            for field, name in (
                ("wq", "attention.wq"),
                ("wk", "attention.wk"),
                ("wv", "attention.wv"),
                ("wo", "attention.wo"),
                ("w1", "feed_forward.w1"),
                ("w2", "feed_forward.w2"),
                ("w3", "feed_forward.w3"),
            ):
                setattr(layer, field, self.matrix(p + name + ".weight"))
            layer.attn_norm = self._vector(p + "attention_norm.weight")
            layer.ffn_norm = self._vector(p + "ffn_norm.weight")
        self._layers = layers
        self.tok_embeddings = self.matrix("tok_embeddings.weight")
        self.output = self.matrix("tok_embeddings.weight" if c.tie_embeddings else "output.weight")
        # llama.cpp's frequencies: the base ones, divided by the file's rope_freqs if it has them.
        freqs = base_frequencies(c.head_dim, c.rope_theta)
        if file.rope_factors is not None:
            freqs = freqs / file.rope_factors.astype(np.float64)
        self._rope = np.ascontiguousarray(freqs, dtype=np.float32)
        self._model = _Model(
            n_layers=c.n_layers,
            dim=c.dim,
            n_heads=c.n_heads,
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            ffn_dim=c.ffn_hidden_dim,
            vocab=c.vocab_size,
            norm_eps=c.norm_eps,
            rope_freqs=self._rope.ctypes.data,
            tok_embd=self.tok_embeddings,
            norm=self._vector("norm.weight"),
            layers=layers,
        )

    @classmethod
    def load(cls, path: str | Path, *, num_threads: int | None = None) -> CpuModel:
        """Open a llama GGUF file (`nucleus.loaders.gguf_file.open_gguf` says what it checks)."""
        return cls(open_gguf(path), num_threads=num_threads)

    def matrix(self, name: str) -> Matrix:
        """The file's tensor `name` (a Meta name; a vector is one row) as the kernels' matrix:
        a view of the file, or for Q4_0/Q4_1/Q8_0 the same bytes interleaved by 8 rows (made
        once; the file's pages of it are then released)."""
        if name in self._matrices:
            return self._matrices[name]
        t = self.file.tensors[name]
        rows, cols = t.shape if len(t.shape) == 2 else (1, t.shape[0])
        matrix, data = as_matrix(t.type_name, t.raw, rows, cols)
        if data is not t.raw:
            t.release()
        self._keep.append(data)
        self._matrices[name] = matrix
        return matrix

    def _vector(self, name: str) -> int:
        """The address of a float32 vector (norm weights): the file's own if stored as F32, else
        dequantized once."""
        t = self.file.tensors[name]
        if t.type_name == "F32":
            data = t.raw.view(np.float32)
        else:
            data = dequantize_rows(self.matrix(name), range(1))[0]
        self._keep.append(data)
        return data.ctypes.data

    def forward(self, batch: Batch, hidden: np.ndarray) -> np.ndarray:
        """Run one step (`batch` filled by the caller, its `hidden` pointing at `hidden`, a
        float32 `(num_tokens, dim)` array, which is returned)."""
        batch.hidden = hidden.ctypes.data
        batch.num_threads = self.num_threads
        status = self._lib.llama_forward(ctypes.addressof(self._model), ctypes.addressof(batch))
        if status:
            error, message = _FORWARD_ERRORS.get(status, (RuntimeError, f"status {status}"))
            raise error(message)
        return hidden

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Float32 logits `(n, vocab)` of hidden states `(n, dim)`."""
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        out = np.empty((hidden.shape[0], self.config.vocab_size), dtype=np.float32)
        linear(self.output, hidden, out, self.num_threads)
        return out


def as_matrix(type_name: str, raw: np.ndarray, rows: int, cols: int) -> tuple[Matrix, np.ndarray]:
    """The kernels' matrix of GGUF blocks `raw` (rows x cols of `type_name`), and the array it
    points into (keep it alive): `raw` itself, or for Q4_0/Q4_1/Q8_0 its interleaved copy."""
    lib = library.require()
    type_id = TYPE_IDS[type_name]
    data = raw
    if type_name in REPACKED_TYPES:
        data = np.empty(lib.repacked_bytes(type_id, rows, cols), dtype=np.uint8)
        lib.repack_rows8(type_id, raw.ctypes.data, rows, cols, data.ctypes.data)
    return Matrix(data.ctypes.data, type_id, rows, cols), data


def dequantize_rows(w: Matrix, rows: range) -> np.ndarray:
    """Rows of a kernels' matrix as float32, as its file's dequantizer gives them."""
    out = np.empty((len(rows), w.cols), dtype=np.float32)
    if len(rows):
        library.require().dequantize_rows_f32(
            ctypes.addressof(w), rows.start, len(rows), out.ctypes.data
        )
    return out


def linear(w: Matrix, x: np.ndarray, out: np.ndarray, num_threads: int) -> np.ndarray:
    """`out (M, N) = x (M, K) @ w.T` through the kernels' 8-bit activations (float32 for float
    weights); `x` and `out` contiguous float32."""
    status = library.require().quantized_linear_f32(
        ctypes.addressof(w), x.ctypes.data, x.shape[0], out.ctypes.data, num_threads
    )
    if status == -1:
        raise MemoryError("the quantized linear kernel could not allocate its scratch space")
    if status:
        raise ValueError(f"the kernels cannot multiply a matrix of GGML type {w.type}")
    return out

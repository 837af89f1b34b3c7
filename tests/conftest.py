import sys
from pathlib import Path

# Test helper modules (checkpoints.py, tokenizer_corpus.py) are imported by name.
sys.path.insert(0, str(Path(__file__).parent))

import triton_interpreter

# CI has no GPU: the Triton kernels run on the CPU through Triton's interpreter there, set up
# before any kernel module is imported.
triton_interpreter.set_up()

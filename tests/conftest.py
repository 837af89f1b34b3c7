import sys
from pathlib import Path

# Test helper modules (checkpoints.py, tokenizer_corpus.py) are imported by name.
sys.path.insert(0, str(Path(__file__).parent))

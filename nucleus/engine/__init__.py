"""The engine: sequences, the block manager, the scheduler, the detokenizer (and the runner)."""

from nucleus.engine.block_manager import BlockManager
from nucleus.engine.detokenizer import IncrementalDetokenizer
from nucleus.engine.scheduler import ScheduledBatch, Scheduler
from nucleus.engine.sequence import Sequence, SequenceStatus

__all__ = [
    "BlockManager",
    "IncrementalDetokenizer",
    "ScheduledBatch",
    "Scheduler",
    "Sequence",
    "SequenceStatus",
]

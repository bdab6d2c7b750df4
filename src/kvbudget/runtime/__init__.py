"""Running a model under a budget: model loading, block-wise prefill, sessions (EpiCache's
episodic ones among them), session files and static (CUDA-graph) decoding."""

from .answer import Turn
from .episodic import EpisodicSession
from .models import load_model
from .prefill import prefill
from .session import Session

__all__ = ["EpisodicSession", "Session", "Turn", "load_model", "prefill"]

"""ckptmgr: rolling, verified, resumable .keras checkpoints on any fsspec storage."""

from ckptmgr.errors import CkptmgrError
from ckptmgr.manager import CheckpointManager, PruneReport, VerifyResult
from ckptmgr.retention import RetentionPolicy

__all__ = ["CheckpointManager", "CkptmgrError", "PruneReport", "RetentionPolicy", "VerifyResult"]
__version__ = "0.1.0"

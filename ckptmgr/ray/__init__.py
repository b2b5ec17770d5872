"""Ray-side parts of ckptmgr: your own model on a Ray cluster
(:func:`fit_on_ray` on plain actors; Ray Train through the callback, with
:func:`start_coordinator` and :func:`checkpoint_ref`), the memory tier's
keepers and watching Ray's node draining (preemption notices).

Importing this package imports neither Ray, TensorFlow nor Keras: the
coordinator and keeper actors load these modules, and the training helpers
import what they need when called.
"""

from ckptmgr.ray.ray_train import CheckpointRef, checkpoint_ref
from ckptmgr.ray.runners import RayJobResult, fit_on_ray, start_coordinator, stop_coordinator

__all__ = ["CheckpointRef", "RayJobResult", "checkpoint_ref", "fit_on_ray", "start_coordinator",
           "stop_coordinator"]

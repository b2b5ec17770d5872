"""Ray-side parts of ckptmgr that need a cluster: the memory tier's keepers
and watching Ray's node draining (preemption notices).

Imports neither TensorFlow nor Keras: these run in the coordinator and in
keeper actors.
"""

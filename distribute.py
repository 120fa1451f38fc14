"""Training on several devices or machines with tf.distribute.

    default      one device (TensorFlow's default strategy): the GPU if there is one, else the CPU
    mirrored     every local GPU (or every logical CPU device), one model copy each, gradients summed
    multiworker  several processes or machines, each given its part of the cluster in TF_CONFIG

The batch size of `TrainSettings` is the global batch: each step takes that many
pairs and splits them evenly across the replicas (so it must divide by their
number). The learning rate is used as given, whatever the number of replicas.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

STRATEGIES = ("default", "mirrored", "multiworker")


def make_strategy(name: str = "default", cpu_devices: int = 1):
    """Return the tf.distribute strategy called `name` (one of STRATEGIES).

    With `cpu_devices` > 1 the CPU is first split into that many logical
    devices, over which 'mirrored' replicates when there is no GPU. Create the
    strategy before any other TensorFlow work in the process: devices and the
    multi-worker strategy's collective communication are set up at start-up.
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    if cpu_devices > 1:
        split_cpu(cpu_devices)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "strategy 'multiworker' reads the cluster from the TF_CONFIG environment variable, which is not "
                'set; e.g. TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                '"task": {"type": "worker", "index": 0}}\''
            )
        return _multiworker_strategy()


def _multiworker_strategy():
    """Return a tf.distribute.MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3 gives it.

    Keras 3.15's fit and evaluate fail under the multi-worker strategy
    (keras-team/keras#20585): they reduce a whole (images, labels) batch in one
    call, which only MirroredStrategy accepts, and reduce scalar logs along
    axis 0. This strategy reduces leaf by leaf, scalars without an axis.
    """
    import tensorflow as tf

    class KerasReduceStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        def reduce(self, reduce_op, value, axis):
            def reduce_leaf(leaf):
                rank = self.experimental_local_results(leaf)[0].shape.rank
                return super(KerasReduceStrategy, self).reduce(reduce_op, leaf, axis if rank else None)

            return tf.nest.map_structure(reduce_leaf, value)

    return KerasReduceStrategy()


def split_cpu(count: int) -> None:
    """Present the CPU as `count` logical devices, for the mirrored strategy on a machine without GPUs.

    Must run before TensorFlow initialises its devices (before any op).
    """
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or [None]) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as err:
        raise RuntimeError(f"cannot split the CPU into {count} devices once TensorFlow has started; "
                           "do it first in a fresh process") from err


def is_chief(strategy) -> bool:
    """Return True for the one process that writes checkpoints and logs: always, except for non-chief workers."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type or resolver.task_type == "chief":
        return True
    # Without a "chief" task in the cluster, worker 0 is the chief (TensorFlow's convention).
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def replicas(strategy) -> int:
    """Return the number of model copies that share each global batch."""
    return strategy.num_replicas_in_sync


def replicate_pages(*arrays, count: int) -> tuple:
    """Return `arrays` with each item repeated `count` times in a row (unchanged for count 1).

    Validated in batches of `count`, every replica gets one copy of each page:
    Keras cannot split a batch unevenly across replicas, and a repeated set
    has the same means (loss, accuracy) as the pages themselves.
    """
    return tuple(np.repeat(array, count, axis=0) for array in arrays)


class WriteDir:
    """The folder a process writes its run files to: the run folder on the chief, a temporary one elsewhere.

    Every worker must run the same callbacks (saving reads mirrored variables,
    and the pictures call the model), so the others write to a private
    temporary folder that is deleted at the end.
    """

    def __init__(self, run_dir: str | Path, chief: bool):
        self.chief = chief
        self.path = Path(run_dir) if chief else Path(tempfile.mkdtemp(prefix="unet-isbi-worker-"))

    def cleanup(self) -> None:
        if not self.chief:
            shutil.rmtree(self.path, ignore_errors=True)
